"""``fer-serve --prepare``: the ONNX graphs a server will run are exported ahead of its first start,
and only those (FER_FRONTALIZER decides whether the refiner's graph is one of them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service.cli import main
from service.config import DEFAULT_CHECKPOINTS

pytest.importorskip("onnxruntime", reason="onnxruntime (serve extra) is the onnx backend")
pytest.importorskip("onnx", reason="the onnx package (serve extra) exports the graphs")


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder like the shipped one: a (tiny) default and the shipped frontaliser."""
    folder = tmp_path_factory.mktemp("checkpoints")
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(tiny_checkpoint.with_suffix(suffix), folder / f"default{suffix}")
        shutil.copyfile(DEFAULT_CHECKPOINTS / f"frontalizer{suffix}", folder / f"frontalizer{suffix}")
    return folder


@pytest.mark.parametrize(("mode", "kinds"), [("auto", {"detector", "classifier", "refiner"}),
                                             ("off", {"detector", "classifier"})])
def test_prepare_exports_the_graphs_the_server_will_run(
        checkpoints: Path, detector_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        mode: str, kinds: set[str]) -> None:
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FER_CLASSIFIER_CHECKPOINT", str(checkpoints / "default.safetensors"))
    monkeypatch.setenv("FER_DETECTOR_WEIGHTS", str(detector_weights))
    monkeypatch.setenv("FER_BACKEND", "onnx")
    monkeypatch.setenv("FER_FRONTALIZER", mode)
    main(["--prepare"])
    notes = [json.loads(p.read_text()) for p in (tmp_path / "onnx").glob("*.json")]
    assert {note["kind"] for note in notes} == kinds
