"""``fer-train export --format onnx``: a classifier or refiner checkpoint or the detector weights to
ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from facemodels.checkpoint import load_checkpoint, save_checkpoint
from facemodels.face.detector import load_detector_net
from facemodels.frontalizer.refiner import load_refiner
from facemodels.models import create_model
from facemodels.onnx_export import (
    CLASSIFIER_ATOL,
    DETECTOR_ATOL,
    REFINER_ATOL,
    REFINER_OUTPUTS,
    create_session,
)
from facemodels.predict import predict_probs, predict_probs_onnx
from training.cli import main

pytest.importorskip("onnxruntime", reason="onnxruntime (dev extra) checks the exported graph")
pytest.importorskip("onnx", reason="the onnx package is the exporter's dependency")


def test_export_classifier_to_onnx(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = save_checkpoint(tmp_path / "run" / "best", create_model("compact_resnet_s"),
                          arch="compact_resnet_s", metrics={"PublicTest": {"acc": 0.5}})
    assert main(["export", str(tmp_path / "run" / "best"), str(tmp_path / "out" / "clf"),
                 "--format", "onnx"]) == 0
    onnx_file = tmp_path / "out" / "clf.onnx"
    note = json.loads((tmp_path / "out" / "clf.onnx.json").read_text())
    assert note["arch"] == "compact_resnet_s" and note["metrics"] == {"PublicTest": {"acc": 0.5}}
    assert note["format"] == "onnx" and note["onnx_file"] == "clf.onnx"
    assert note["max_abs_diff_vs_torch"] <= CLASSIFIER_ATOL and len(note["weights_sha256"]) == 64
    model, _ = load_checkpoint(src)
    crops = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 48, 48), dtype=np.uint8))
    got = predict_probs_onnx(create_session(onnx_file), crops, model.cfg, tta=True)
    np.testing.assert_allclose(got.numpy(), predict_probs(model, crops, tta=True).numpy(),
                               atol=CLASSIFIER_ATOL, rtol=0)


def test_export_detector_to_onnx(detector_weights: Path, tmp_path: Path) -> None:
    assert main(["export", str(detector_weights), str(tmp_path / "detector.onnx"), "--format", "onnx"]) == 0
    note = json.loads((tmp_path / "detector.onnx.json").read_text())
    assert note["arch"] == "retinaface_mnet025" and note["max_abs_diff_vs_torch"] <= DETECTOR_ATOL
    x = np.random.default_rng(0).uniform(-128, 128, (2, 3, 64, 96)).astype(np.float32)
    got = create_session(tmp_path / "detector.onnx").run(None, {"input": x})
    with torch.inference_mode():
        want = load_detector_net(detector_weights).eval()(torch.from_numpy(x))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=DETECTOR_ATOL, rtol=0)


def test_export_refiner_to_onnx(trained_refiner: Path, tmp_path: Path) -> None:
    """A frontal_refiner checkpoint exports its network (flow, mask, residual), batch dynamic."""
    assert main(["export", str(trained_refiner), str(tmp_path / "refiner"), "--format", "onnx"]) == 0
    note = json.loads((tmp_path / "refiner.onnx.json").read_text())
    assert note["arch"] == "frontal_refiner" and note["max_abs_diff_vs_torch"] <= REFINER_ATOL
    x = torch.empty(3, 5, 64, 64).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    got = create_session(tmp_path / "refiner.onnx").run(list(REFINER_OUTPUTS), {"input": x.numpy()})
    with torch.inference_mode():
        want = load_refiner(str(trained_refiner)).eval().heads(x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=REFINER_ATOL, rtol=0)


def test_export_refiner_as_safetensors_keeps_weights_and_card(trained_refiner: Path, tmp_path: Path) -> None:
    """The shipping copy of a refiner (``checkpoints/frontalizer``): same weights, card kept."""
    assert main(["export", str(trained_refiner), str(tmp_path / "frontalizer")]) == 0
    source, card = load_checkpoint(trained_refiner)
    copy, copy_card = load_checkpoint(tmp_path / "frontalizer")
    assert copy_card["arch"] == card["arch"] == "frontal_refiner"
    assert copy_card["exported_from"].endswith(".safetensors")
    theirs = copy.state_dict()
    for k, v in source.state_dict().items():
        assert torch.equal(v, theirs[k]), k
