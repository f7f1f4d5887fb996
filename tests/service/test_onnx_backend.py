"""FER_BACKEND: the app on ONNX Runtime answers as it does on PyTorch, through the same batchers
and metrics, from ONNX graphs it exports into the cache at start-up and reuses after.

The app test uses the shipped checkpoints (``checkpoints/default`` and, when shipped, the
ensemble): probabilities in the responses (rounded to 5 decimals) agree within 2e-5 and the
dominant emotion is the same, with and without 10-crop TTA. These compare float32 graphs, so
they set FER_INT8=off (the shipped default's int8 graph is tested in test_int8.py).
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from service.config import DEFAULT_CHECKPOINTS, Settings
from service.main import create_app

pytest.importorskip("onnxruntime", reason="onnxruntime (serve extra) is the onnx backend")
pytest.importorskip("onnx", reason="the onnx package (serve extra) exports the graphs")

JPEG = {"content-type": "image/jpeg"}
PROB_ATOL = 2e-5  # responses round probabilities to 5 decimals; the graphs agree within 1e-5
SHIPPED_ENSEMBLE = DEFAULT_CHECKPOINTS / "ensemble.safetensors"


def test_backend_setting_reads_fer_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().backend == "auto"
    monkeypatch.setenv("FER_BACKEND", "onnx")
    assert Settings().backend == "onnx"
    monkeypatch.setenv("FER_BACKEND", "tensorrt")
    with pytest.raises(ValidationError):
        Settings()


def test_onnx_backend_on_cuda_is_a_startup_error(make_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr("service.inference.pipeline.resolve_device", lambda name: torch.device("cuda"))
    with pytest.raises(ValueError, match="runs on CPU"):
        create_app(make_settings(backend="onnx", device="cuda"))
    assert create_app(make_settings(backend="auto", device="cuda")).state.engine.backend == "torch"


def test_ort_spinning_setting_reaches_every_session(make_settings, monkeypatch: pytest.MonkeyPatch,
                                                    face_jpeg: bytes) -> None:
    assert Settings().ort_spinning is False
    monkeypatch.setenv("FER_ORT_SPINNING", "true")
    assert Settings().ort_spinning is True
    for spinning, flag in ((False, "0"), (True, "1")):
        settings = make_settings(backend="onnx", torch_threads=2, ort_spinning=spinning, int8="off")
        with TestClient(create_app(settings)) as c:
            engine = c.app.state.engine
            sessions = [engine.detector._session, *(clf._session for clf in engine.classifiers.values())]
            assert {s.get_session_options().get_session_config_entry(f"session.{pool}.allow_spinning")
                    for s in sessions for pool in ("intra_op", "inter_op")} == {flag}
            assert len(_faces(c, face_jpeg, "model=default")) == 1


@pytest.fixture(scope="module")
def shipped_settings(detector_weights: Path, tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("onnx-app-cache")

    def make(backend: str) -> Settings:
        return Settings(detector_weights=detector_weights, device="cpu", backend=backend,
                        cache_dir=cache, torch_threads=1, max_wait_ms=2.0, int8="off",
                        ensemble_checkpoint=SHIPPED_ENSEMBLE if SHIPPED_ENSEMBLE.is_file() else None,
                        use_shipped_extras=False)

    return make


@pytest.fixture(scope="module")
def clients(shipped_settings) -> Iterator[dict[str, TestClient]]:
    with TestClient(create_app(shipped_settings("torch"))) as torch_client, \
            TestClient(create_app(shipped_settings("onnx"))) as onnx_client:
        yield {"torch": torch_client, "onnx": onnx_client}


def _faces(client: TestClient, jpeg: bytes, query: str) -> list[dict]:
    r = client.post(f"/predict?{query}", content=jpeg, headers=JPEG)
    assert r.status_code == 200, r.text
    return r.json()["faces"]


@pytest.mark.parametrize("query", ["model=default", "model=default&tta=true", "model=ensemble",
                                   "model=default&detect=false"])
def test_onnx_predict_matches_torch(clients: dict[str, TestClient], face_jpeg: bytes, query: str) -> None:
    if "ensemble" in query and not SHIPPED_ENSEMBLE.is_file():
        pytest.skip("no shipped ensemble in checkpoints/")
    (want,) = _faces(clients["torch"], face_jpeg, query)
    (got,) = _faces(clients["onnx"], face_jpeg, query)
    assert got["dominant"] == want["dominant"]
    if "detect=false" not in query:  # the whole photo as one "face" is not a smile
        assert want["dominant"] == "happy"
    assert got["emotions"].keys() == want["emotions"].keys()
    for name, p in want["emotions"].items():
        assert got["emotions"][name] == pytest.approx(p, abs=PROB_ATOL), name
    assert got["box"] == pytest.approx(want["box"], abs=0.011)  # rounded to 0.01 px
    assert got["score"] == pytest.approx(want["score"], abs=1e-4)


def test_onnx_app_reports_its_backend_and_batches_through_the_same_metrics(
    clients: dict[str, TestClient], face_jpeg: bytes,
) -> None:
    c = clients["onnx"]
    assert c.get("/readyz").json()["backend"] == "onnx"
    assert clients["torch"].get("/readyz").json()["backend"] == "torch"
    models = c.get("/models").json()["models"]
    # every classifier runs in ONNX Runtime; the frontaliser (the warp-only one is served by
    # default) has no ONNX graph and reports torch
    assert {m["backend"] for m in models if m["role"] != "frontalizer"} == {"onnx"}
    assert {m["role"] for m in models if m["backend"] != "onnx"} <= {"frontalizer"}

    def counts() -> dict[str, float]:
        text = c.get("/metrics").text
        return {m: float(re.search(rf'^fer_batch_size_count{{model="{m}"}} (\S+)$', text, re.M).group(1))
                for m in ("detector", "default")}

    before = counts()
    _faces(c, face_jpeg, "model=default")
    after = counts()
    assert after["detector"] == before["detector"] + 1 and after["default"] == before["default"] + 1
    engine = c.app.state.engine
    assert engine.detector.backend == "onnx" and engine.detector.onnx_path is not None


def test_graphs_are_exported_once_into_the_cache_and_reused(
    clients: dict[str, TestClient], shipped_settings, face_jpeg: bytes,
) -> None:
    engine = clients["onnx"].app.state.engine
    settings = engine.settings
    files = {p.name: p.stat().st_mtime_ns for p in (Path(settings.cache_dir) / "onnx").glob("*.onnx")}
    served = [engine.detector.onnx_path, *(c.onnx_path for c in engine.classifiers.values())]
    assert {p.name for p in served} == set(files)  # one graph per model, the ensemble included
    with TestClient(create_app(shipped_settings("onnx"))) as again:  # a restart
        assert again.get("/readyz").status_code == 200
        _faces(again, face_jpeg, "model=default")
    assert {p.name: p.stat().st_mtime_ns
            for p in (Path(settings.cache_dir) / "onnx").glob("*.onnx")} == files


def test_detector_weights_from_the_cache_on_both_backends(source_file: Path, tmp_path: Path,
                                                         face_jpeg: bytes) -> None:
    """FER_DETECTOR_WEIGHTS unset: the detector is converted into, and its graph exported to, the cache."""
    for backend in ("torch", "onnx"):
        settings = Settings(cache_dir=tmp_path, backend=backend, device="cpu", use_shipped_extras=False,
                            torch_threads=1, int8="off")  # off: the default's fp32 graph is exported
        with TestClient(create_app(settings)) as c:
            assert c.get("/readyz").json()["backend"] == backend
            assert len(_faces(c, face_jpeg, "model=default")) == 1
    assert (tmp_path / "detector" / "retinaface_mnet025.safetensors").is_file()
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 2  # the detector and the default


def _batches(c: TestClient, model: str) -> float:
    text = c.get("/metrics").text
    return float(re.search(rf'^fer_batch_size_count{{model="{model}"}} (\S+)$', text, re.M).group(1))


def test_refiner_frontaliser_on_onnx_answers_like_torch(make_settings, trained_refiner: Path,
                                                        face_jpeg: bytes) -> None:
    """A frontal_refiner checkpoint (non-zero weights): on the onnx backend its network runs in
    ONNX Runtime from a graph exported into the cache, through the same batcher and metrics, and
    /frontalize answers the torch backend's faces within one grey level (the graphs agree within
    about 1e-5 of the image range; the PNG is uint8)."""
    faces: dict[str, np.ndarray] = {}
    for backend in ("torch", "onnx"):
        settings = make_settings(backend=backend, frontalizer_checkpoint=trained_refiner, torch_threads=1,
                                 frontalize_min_yaw=0, int8="off")
        with TestClient(create_app(settings)) as c:
            fz = c.app.state.engine.frontalizer
            assert fz.backend == backend and (fz.onnx_path is not None) == (backend == "onnx")
            (info,) = [m for m in c.get("/models").json()["models"] if m["role"] == "frontalizer"]
            assert info["arch"] == "frontal_refiner" and info["backend"] == backend
            before = _batches(c, "frontalizer")
            r = c.post("/frontalize", content=face_jpeg, headers=JPEG)
            assert r.status_code == 200, r.text
            (face,) = r.json()["faces"]
            faces[backend] = np.asarray(Image.open(io.BytesIO(base64.b64decode(face["image_png"]))))
            (predicted,) = _faces(c, face_jpeg, "model=default&frontalize=on")
            assert predicted["frontalized"] is True
            assert _batches(c, "frontalizer") == before + 2
    assert faces["torch"].shape == (64, 64) and faces["torch"].std() > 10
    diff = np.abs(faces["onnx"].astype(int) - faces["torch"].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01
