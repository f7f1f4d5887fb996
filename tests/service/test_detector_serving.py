"""How the service runs the detector: its int8 graph (FER_INT8, FER_DETECTOR_INT8_GRAPH) and the
adaptive resolution (FER_DETECTOR_ADAPTIVE_SIDE), through the real app, real image bytes and the
shipped int8 graph (checkpoints/detector.int8.onnx) or damaged copies of it."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from facemodels.face.detector import DetectorWeightsError
from facemodels.face.detector_int8 import note_path
from service.config import DEFAULT_CHECKPOINTS, Settings
from service.inference.catalog import detector_int8_path
from service.main import create_app
from tests.support import SMALL_FACE_SPOTS, close_up_photo, small_faces_photo

pytest.importorskip("onnxruntime", reason="onnxruntime (serve extra) is the onnx backend")

JPEG = {"content-type": "image/jpeg"}
SHIPPED = DEFAULT_CHECKPOINTS / "detector.int8.onnx"
#: Largest |int8 - fp32| of a box or landmark coordinate on the fixture photo, in pixels
#: (measured: 0.33).
INT8_PIXEL_ATOL = 2.0


@pytest.fixture(scope="module")
def shipped() -> Path:
    if not SHIPPED.is_file():
        pytest.skip("no shipped int8 detector graph in checkpoints/")
    return SHIPPED


@pytest.fixture(scope="module")
def clients(make_settings, shipped: Path) -> Iterator[dict[str, TestClient]]:
    with TestClient(create_app(make_settings(backend="onnx", detector_int8_graph=shipped))) as int8, \
            TestClient(create_app(make_settings(backend="onnx", detector_int8_graph=shipped,
                                                int8="off"))) as fp32:
        yield {"int8": int8, "fp32": fp32}


def _detector(client: TestClient) -> dict:
    return client.get("/models").json()["detector"]


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def test_int8_detector_is_served_and_reported(clients: dict[str, TestClient], shipped: Path) -> None:
    got = _detector(clients["int8"])
    assert (got["backend"], got["precision"], got["graph"]) == ("onnx", "int8", "detector.int8.onnx")
    assert clients["int8"].app.state.engine.detector.onnx_path == shipped
    off = _detector(clients["fp32"])  # FER_INT8=off: float32 everywhere
    assert (off["precision"], off["graph"]) == ("fp32", None)
    assert clients["fp32"].app.state.engine.detector.onnx_path.parent.name == "onnx"  # the export


def test_int8_detector_finds_the_face_where_fp32_does(clients: dict[str, TestClient],
                                                      face_jpeg: bytes) -> None:
    answers = {}
    for name, c in clients.items():
        r = c.post("/predict", content=face_jpeg, headers=JPEG)
        assert r.status_code == 200, r.text
        (answers[name],) = r.json()["faces"]
    got, want = answers["int8"], answers["fp32"]
    np.testing.assert_allclose(got["box"], want["box"], atol=INT8_PIXEL_ATOL)
    np.testing.assert_allclose(got["landmarks"], want["landmarks"], atol=INT8_PIXEL_ATOL)
    assert got["score"] == pytest.approx(want["score"], abs=0.01)
    assert got["dominant"] == want["dominant"]


def test_shipped_graph_is_found_beside_the_shipped_checkpoints(tiny_checkpoint: Path) -> None:
    assert detector_int8_path(Settings()) == DEFAULT_CHECKPOINTS / "detector.int8.onnx"
    assert detector_int8_path(Settings(classifier_checkpoint=tiny_checkpoint)) is None  # none beside it
    explicit = Settings(classifier_checkpoint=tiny_checkpoint, detector_int8_graph="/x/d.onnx")
    assert detector_int8_path(explicit) == Path("/x/d.onnx")


def test_torch_backend_ignores_the_int8_graph(make_settings, shipped: Path) -> None:
    with TestClient(create_app(make_settings(backend="torch", detector_int8_graph=shipped))) as c:
        assert (_detector(c)["backend"], _detector(c)["precision"]) == ("torch", "fp32")


@pytest.fixture
def damaged(shipped: Path, tmp_path: Path) -> Path:
    out = tmp_path / "detector.int8.onnx"
    shutil.copy(shipped, out)
    shutil.copy(note_path(shipped), note_path(out))
    return out


@pytest.mark.parametrize("damage", ["corrupt", "other_weights"])
def test_damaged_graph_falls_back_to_fp32_naming_the_file(
    make_settings, damaged: Path, face_jpeg: bytes, caplog: pytest.LogCaptureFixture, damage: str,
) -> None:
    if damage == "corrupt":
        with damaged.open("r+b") as fh:
            fh.seek(damaged.stat().st_size // 2)
            fh.write(b"\xff" * 64)
    else:
        note = json.loads(note_path(damaged).read_text())
        note_path(damaged).write_text(json.dumps({**note, "weights_tensors_sha256": "0" * 64}))
    with caplog.at_level(logging.WARNING, logger="facemodels.face.detector_int8"), \
            TestClient(create_app(make_settings(backend="onnx", detector_int8_graph=damaged))) as c:
        assert _detector(c)["precision"] == "fp32"
        assert len(c.post("/predict", content=face_jpeg, headers=JPEG).json()["faces"]) == 1
    (warning,) = [r.getMessage() for r in caplog.records if "int8 detector graph" in r.getMessage()]
    assert str(damaged) in warning and "serving the float32 detector" in warning


def test_unloadable_graph_with_a_matching_note_stops_startup(make_settings, damaged: Path) -> None:
    """A note that vouches for bytes ONNX Runtime cannot load (written for them, say) is a startup
    error naming the file, not a silent float32 service."""
    from facemodels.onnx_export import sha256_file

    damaged.write_bytes(b"not an onnx graph")
    note = json.loads(note_path(damaged).read_text())
    note_path(damaged).write_text(json.dumps({**note, "onnx_sha256": sha256_file(damaged)}))
    app = create_app(make_settings(backend="onnx", detector_int8_graph=damaged))
    with pytest.raises(DetectorWeightsError, match=str(damaged)), TestClient(app):
        pass


# --- adaptive detection resolution --------------------------------------------------------------


def test_adaptive_side_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Settings().detector_adaptive_side, Settings().detector_closeup_fraction) == (0, 0.2)
    monkeypatch.setenv("FER_DETECTOR_ADAPTIVE_SIDE", "320")
    monkeypatch.setenv("FER_DETECTOR_CLOSEUP_FRACTION", "0.3")
    assert (Settings().detector_adaptive_side, Settings().detector_closeup_fraction) == (320, 0.3)
    for side in ("640", "800", "16"):  # not below FER_DETECTOR_MAX_SIDE (640), or too small
        monkeypatch.setenv("FER_DETECTOR_ADAPTIVE_SIDE", side)
        with pytest.raises(ValidationError, match="FER_DETECTOR_ADAPTIVE_SIDE"):
            Settings()


def test_adaptive_app_detects_close_ups_once_and_small_faces_at_the_full_side(
    make_settings, face_image: np.ndarray,
) -> None:
    settings = make_settings(backend="onnx", int8="off", detector_adaptive_side=320, warmup=False)
    with TestClient(create_app(settings)) as c:
        info = _detector(c)
        assert (info["adaptive_side"], info["closeup_fraction"], info["max_side"]) == (320, 0.2, 640)
        runs = c.app.state.engine.detector.runs
        r = c.post("/detect", content=_jpeg(close_up_photo(face_image)), headers=JPEG)
        assert r.status_code == 200 and len(r.json()["faces"]) == 1
        assert runs == {320: 1}  # the close-up never ran at 640
        r = c.post("/detect", content=_jpeg(small_faces_photo(face_image)), headers=JPEG)
        assert r.status_code == 200 and len(r.json()["faces"]) == len(SMALL_FACE_SPOTS)
        assert runs == {320: 2, 640: 1}
