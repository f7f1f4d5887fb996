"""FER_INT8: with the onnx backend a classifier is served from ``<stem>.int8.onnx`` beside its
checkpoint when that graph's note names the checkpoint's weights by SHA-256; otherwise (no
graph, another checkpoint's graph, FER_INT8=off, the torch backend) from float32.

The int8 graph here is quantised in the test by ``fer-train quantize`` (``training.quantize``)
from a tiny real checkpoint, calibrated on synthetic faces instead of FER2013 Training faces.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from facemodels.checkpoint import save_checkpoint
from facemodels.models import create_model
from facemodels.onnx_export import sha256_file
from service.config import DEFAULT_CHECKPOINTS, Settings
from service.inference.classifier import int8_graph, int8_graph_path
from service.main import create_app

pytest.importorskip("onnxruntime", reason="onnxruntime (serve extra) is the onnx backend")
pytest.importorskip("onnx", reason="the onnx package (serve extra) exports and quantises the graphs")

JPEG = {"content-type": "image/jpeg"}
#: Largest |int8 - fp32| class probability on the fixture photo (responses round to 5 decimals).
#: Measured: 8e-5 (1-crop) and 4e-5 (10-crop). The untrained tiny model's probabilities are all
#: near 1/7 (its top two differ by 0.005), so this is tight enough that the same dominant emotion
#: is a real check too. The shipped default's int8 accuracy is in docs/results.md.
INT8_PROB_ATOL = 1e-3


def _faces(n: int, seed: int) -> torch.Tensor:
    """Smooth synthetic 48x48 uint8 faces (as tests/training/test_quantize.py calibrates)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 6, 6, generator=gen)
    img = torch.nn.functional.interpolate(low, size=(48, 48), mode="bilinear", align_corners=False)
    img = img[:, 0] * 200 + torch.rand(n, 48, 48, generator=gen) * 55
    return img.clamp(0, 255).to(torch.uint8)


def _quantise(checkpoint: Path, out: Path) -> None:
    """``fer-train quantize checkpoint out --calibration 64`` on synthetic calibration faces."""
    quantize = pytest.importorskip("training.quantize")
    from training.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize, "calibration_faces", lambda data, n, *, seed=0: _faces(n, seed))
        assert main(["quantize", str(checkpoint), str(out), "--calibration", "64"]) == 0


@pytest.fixture(scope="module")
def quantised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint ``clf`` with its int8 graph ``clf.int8.onnx`` (and note) beside it."""
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path_factory.mktemp("int8") / "clf", create_model("compact_resnet_s"),
                           arch="compact_resnet_s")
    _quantise(ckpt, ckpt.parent / "clf.int8")
    assert int8_graph_path(ckpt) == ckpt.parent / "clf.int8.onnx"
    return ckpt


@pytest.fixture(scope="module")
def settings(detector_weights: Path, test_cache_dir: Path):
    def make(checkpoint: Path, **overrides: object) -> Settings:
        base = dict(classifier_checkpoint=checkpoint, detector_weights=detector_weights, device="cpu",
                    backend="onnx", cache_dir=test_cache_dir, torch_threads=1, max_wait_ms=2.0,
                    use_shipped_extras=False)
        return Settings(**{**base, **overrides})

    return make


@pytest.fixture(scope="module")
def clients(quantised: Path, settings) -> Iterator[dict[str, TestClient]]:
    with TestClient(create_app(settings(quantised))) as int8, \
            TestClient(create_app(settings(quantised, int8="off"))) as fp32:
        yield {"int8": int8, "fp32": fp32}


def _precision(client: TestClient) -> dict[str, str]:
    return {m["name"]: m["precision"] for m in client.get("/models").json()["models"]
            if m["role"] != "frontalizer"}


def test_fer_int8_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().int8 == "auto"
    monkeypatch.setenv("FER_INT8", "off")
    assert Settings().int8 == "off"
    monkeypatch.setenv("FER_INT8", "on")
    with pytest.raises(ValueError):
        Settings()


def test_matching_int8_graph_is_served(clients: dict[str, TestClient], quantised: Path) -> None:
    assert _precision(clients["int8"]) == {"default": "int8"}
    assert _precision(clients["fp32"]) == {"default": "fp32"}  # FER_INT8=off
    served = clients["int8"].app.state.engine.classifier("default")
    assert served.onnx_path == quantised.parent / "clf.int8.onnx"
    assert clients["fp32"].app.state.engine.classifier("default").onnx_path.parent.name == "onnx"


@pytest.mark.parametrize("query", ["", "tta=true"])
def test_int8_predictions_are_close_to_fp32(clients: dict[str, TestClient], face_jpeg: bytes,
                                            query: str) -> None:
    answers = {}
    for name, c in clients.items():
        r = c.post(f"/predict?{query}", content=face_jpeg, headers=JPEG)
        assert r.status_code == 200, r.text
        (answers[name],) = r.json()["faces"]
    got, want = answers["int8"], answers["fp32"]
    assert got["dominant"] == want["dominant"]
    assert got["box"] == want["box"]  # the detector is the same float32 graph
    for name, p in want["emotions"].items():
        assert got["emotions"][name] == pytest.approx(p, abs=INT8_PROB_ATOL), name


def test_int8_graph_of_other_weights_falls_back_to_fp32(
    quantised: Path, settings, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    ckpt = tmp_path / "clf"
    for suffix in (".safetensors", ".json", ".int8.onnx", ".int8.onnx.json"):
        shutil.copy(quantised.parent / f"clf{suffix}", tmp_path / f"clf{suffix}")
    note = json.loads((tmp_path / "clf.int8.onnx.json").read_text())
    assert note["weights_sha256"] == sha256_file(tmp_path / "clf.safetensors")
    assert int8_graph(ckpt) == tmp_path / "clf.int8.onnx"
    note["weights_sha256"] = "0" * 64  # quantised from some other checkpoint
    (tmp_path / "clf.int8.onnx.json").write_text(json.dumps(note))
    with caplog.at_level(logging.WARNING, logger="service.inference.classifier"), \
            TestClient(create_app(settings(ckpt))) as c:
        assert _precision(c) == {"default": "fp32"}
        assert c.app.state.engine.classifier("default").onnx_path.parent.name == "onnx"
    assert any("not serving the int8 graph" in r.getMessage() and "re-quantise" in r.getMessage()
               for r in caplog.records)


def test_graph_without_a_note_or_with_other_bytes_is_not_served(quantised: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    ckpt = tmp_path / "clf"
    for suffix in (".safetensors", ".json", ".int8.onnx", ".int8.onnx.json"):
        shutil.copy(quantised.parent / f"clf{suffix}", tmp_path / f"clf{suffix}")
    with caplog.at_level(logging.WARNING, logger="service.inference.classifier"):
        with (tmp_path / "clf.int8.onnx").open("ab") as fh:
            fh.write(b"\0")  # the graph's bytes changed after its note was written
        assert int8_graph(ckpt) is None
        (tmp_path / "clf.int8.onnx.json").unlink()
        assert int8_graph(ckpt) is None
    assert sum("not serving the int8 graph" in r.getMessage() for r in caplog.records) == 2


def test_torch_backend_ignores_int8(quantised: Path, settings) -> None:
    with TestClient(create_app(settings(quantised, backend="torch"))) as c:
        assert _precision(c) == {"default": "fp32"}
        assert c.app.state.engine.classifier("default").onnx_path is None


def test_catalog_serves_no_onnx_file_as_a_model(quantised: Path, settings) -> None:
    """Discovery (FER_USE_SHIPPED_EXTRAS) looks at *.safetensors only: the int8 graph and its
    note beside a checkpoint are not models of their own."""
    from service.inference.catalog import classifier_specs

    specs = classifier_specs(settings(quantised, use_shipped_extras=True))
    assert [s.name for s in specs] == ["default"]


def test_shipped_int8_graph_was_quantised_from_the_shipped_default() -> None:
    """Updating checkpoints/default without re-quantising (fer-train quantize checkpoints/default
    checkpoints/default.int8 --calibration 500) would silently serve fp32: fail here instead."""
    graph = DEFAULT_CHECKPOINTS / "default.int8.onnx"
    if not graph.is_file():
        pytest.skip("no shipped int8 graph in checkpoints/")
    note = json.loads((DEFAULT_CHECKPOINTS / "default.int8.onnx.json").read_text())
    assert note["weights_sha256"] == sha256_file(DEFAULT_CHECKPOINTS / "default.safetensors"), (
        "checkpoints/default.safetensors changed: re-quantise checkpoints/default.int8.onnx")
    assert note["onnx_sha256"] == sha256_file(graph)
    assert note["calibration"]["split"] == "Training" and note["format"] == "onnx-int8-qdq"
    assert int8_graph(DEFAULT_CHECKPOINTS / "default") == graph
