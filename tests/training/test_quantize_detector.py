"""``training.quantize_detector``: the int8 (static QDQ) RetinaFace graph loads and finds faces;
``fer-train quantize-detector`` writes it with the note the service checks."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from facemodels.face.detector import Detection, RetinaFaceDetector
from facemodels.face.detector_int8 import note_path, tensors_sha256, usable_int8_graph
from facemodels.onnx_export import sha256_file
from tests.support import require_shared
from training import quantize_detector as quantize_module
from training.data.cfp import EVAL_IDS, TRAIN_IDS, read_fiducials
from training.quantize_detector import (
    FLOAT_HEADS,
    FLOAT_STAGES,
    calibration_photos,
    detector_inputs,
    load_int8_detector,
    quantize_detector,
)

pytest.importorskip("onnxruntime", reason="onnxruntime quantises and runs the graph")


def _iou(a: Detection, b: Detection) -> float:
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union


@pytest.fixture(scope="module")
def fp32(detector_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> RetinaFaceDetector:
    return RetinaFaceDetector(detector_weights, backend="onnx", threads=1,
                              cache_dir=tmp_path_factory.mktemp("onnx-cache"))


def _float_weight(model: onnx.ModelProto, prefix: str) -> bool:
    """Whether every Conv under ``prefix`` reads its weight straight from a float initializer."""
    inits = {i.name: i for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith(prefix)]
    return bool(convs) and all(
        n.input[1] in inits and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT for n in convs)


def test_int8_graph_finds_the_fixture_face_like_fp32(fp32: RetinaFaceDetector, face_image: np.ndarray,
                                                     detector_weights: Path, tmp_path: Path) -> None:
    # calibration: the photo, mirrored, and enlarged on a grey canvas (not the photo tested alone)
    canvas = np.full((480, 640, 3), 120, np.uint8)
    canvas[80:400, 160:480] = face_image[:, ::-1]
    photos = [face_image[:, ::-1].copy(), canvas, cv2.resize(face_image, (480, 480))]
    out = tmp_path / "det.int8.onnx"
    info = quantize_detector(fp32.onnx_path, out, list(detector_inputs(fp32, photos)))
    assert info["qdq_nodes"] > 0 and info["calibration_inputs"] == 3
    model = onnx.load(str(out))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    for prefix in (*FLOAT_HEADS, *FLOAT_STAGES):  # heads and first stage keep float weights
        assert _float_weight(model, prefix), prefix
    assert not _float_weight(model, "/body/stage2/")  # the rest is quantised

    int8 = load_int8_detector(out, weights=detector_weights, cache_dir=tmp_path, score_threshold=0.6)
    assert int8.onnx_path == out
    want = fp32.detect([face_image])[0]
    got = int8.detect([face_image])[0]
    assert len(want) == len(got) == 1
    assert _iou(got[0], want[0]) > 0.85 and abs(got[0].score - want[0].score) < 0.05
    np.testing.assert_allclose(got[0].landmarks, want[0].landmarks, atol=3.0)


def test_calibration_needs_inputs(fp32: RetinaFaceDetector, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no calibration inputs"):
        quantize_detector(fp32.onnx_path, tmp_path / "q.onnx", [])


@pytest.mark.shared_data
def test_calibration_photos_are_training_ids(tmp_path: Path) -> None:
    cfp = require_shared("cfp")
    a = calibration_photos(cfp, 3, seed=1, ids=range(1, 3))
    b = calibration_photos(cfp, 3, seed=1, ids=range(1, 3))
    assert len(a) == 3 and all(x.ndim == 3 and x.dtype == np.uint8 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="calibration photos"):
        calibration_photos(cfp, 10_000, ids=range(1, 3))
    assert inspect.signature(calibration_photos).parameters["ids"].default == TRAIN_IDS  # never 451-500


@pytest.mark.shared_data
@pytest.mark.slow
def test_int8_detector_finds_faces_in_cfp_photos(fp32: RetinaFaceDetector, detector_weights: Path,
                                                 tmp_path: Path) -> None:
    """Calibrated on training-id photos, it finds the face in evaluation-id frontal photos."""
    cfp = require_shared("cfp")
    out = tmp_path / "det.int8.onnx"
    quantize_detector(fp32.onnx_path, out, list(detector_inputs(fp32, calibration_photos(cfp, 12))))
    int8 = load_int8_detector(out, weights=detector_weights, cache_dir=tmp_path,
                              score_threshold=0.6, min_face_size=16)
    data = cfp / "Data"
    for pid in list(EVAL_IDS)[::10]:
        name = f"{pid:03d}/frontal/01"
        photo = cv2.cvtColor(cv2.imread(str(data / "Images" / f"{name}.jpg")), cv2.COLOR_BGR2RGB)
        cx, cy = read_fiducials(data / "Fiducials" / f"{name}.txt").mean(0)
        faces = int8.detect([photo])[0]
        assert any(x1 <= cx <= x2 and y1 <= cy <= y2 for x1, y1, x2, y2 in (f.box for f in faces)), name


def test_cli_writes_the_graph_and_the_note_the_service_checks(
    detector_weights: Path, face_image: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``fer-train quantize-detector OUT`` on the cache holding the detector weights; the CFP
    photos are swapped for the fixture photo (mirrored and enlarged: 3 photos, one per long side)."""
    from training.cli import main

    photos = [face_image, face_image[:, ::-1].copy(), cv2.resize(face_image, (480, 480))]
    drawn: list[tuple[Path, int, int]] = []

    def fake_photos(cfp: Path, n: int, *, seed: int = 0) -> list[np.ndarray]:
        drawn.append((cfp, n, seed))
        return photos[:n]

    monkeypatch.setattr(quantize_module, "calibration_photos", fake_photos)
    cache = detector_weights.parents[1]  # <cache>/detector/retinaface_mnet025.safetensors
    out = tmp_path / "detector.int8"
    assert main(["quantize-detector", str(out), "--calibration", "3", "--seed", "4",
                 "--cfp", str(tmp_path / "cfp"), "--cache-dir", str(cache)]) == 0
    graph = tmp_path / "detector.int8.onnx"
    assert drawn == [(tmp_path / "cfp", 3, 4)]
    note = json.loads(note_path(graph).read_text())
    assert note["onnx_sha256"] == sha256_file(graph) and note["onnx_file"] == graph.name
    assert note["weights_tensors_sha256"] == tensors_sha256(detector_weights)
    fp32 = RetinaFaceDetector(detector_weights, backend="onnx", cache_dir=cache).onnx_path
    assert note["fp32_onnx_sha256"] == sha256_file(fp32)
    calibration = note["calibration"]
    assert (calibration["photos"], calibration["seed"], calibration["long_sides"]) == (3, 4, [320, 480, 640])
    assert calibration["ids"] == "001-450 (training)"
    assert usable_int8_graph(graph, detector_weights) == graph
    (face,) = load_int8_detector(graph, weights=detector_weights, cache_dir=cache).detect([face_image])[0]
    assert face.score > 0.9
