"""``fer-train quantize``: ONNX Runtime static (QDQ) int8 quantisation of a classifier graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import training.quantize as quantize
from facemodels.checkpoint import load_checkpoint, save_checkpoint
from facemodels.models import create_model
from facemodels.onnx_export import create_session, export_classifier, sha256_file
from facemodels.predict import predict_probs_onnx
from training.cli import main

pytest.importorskip("onnxruntime", reason="onnxruntime quantises and runs the graph")

#: Share of faces whose int8 top-1 must equal the float32 top-1 (measured: 128 of 128). A tiny
#: random-weight model has small margins between classes, so the bar leaves room below that.
AGREEMENT = 0.9


def _faces(n: int, seed: int) -> torch.Tensor:
    """Smooth synthetic 48x48 uint8 faces: random 6x6 patterns upsampled, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 6, 6, generator=gen)
    img = torch.nn.functional.interpolate(low, size=(48, 48), mode="bilinear", align_corners=False)
    img = img[:, 0] * 200 + torch.rand(n, 48, 48, generator=gen) * 55
    return img.clamp(0, 255).to(torch.uint8)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run" / "best", create_model("compact_resnet_s"), arch="compact_resnet_s")
    return tmp_path / "run" / "best"


def test_quantized_graph_has_qdq_and_agrees_with_fp32(checkpoint: Path, tmp_path: Path) -> None:
    model, _ = load_checkpoint(checkpoint)
    fp32 = tmp_path / "fp32.onnx"
    export_classifier(model, fp32)
    info = quantize.quantize_classifier(fp32, tmp_path / "int8.onnx", _faces(64, seed=1), model.cfg)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and info["qdq_nodes"] > 0
    assert "Softmax" in ops  # the probabilities stay float
    faces = _faces(128, seed=2)  # not the calibration faces
    want = predict_probs_onnx(create_session(fp32), faces, model.cfg)
    got = predict_probs_onnx(create_session(tmp_path / "int8.onnx"), faces, model.cfg)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.sum(1).numpy(), 1.0, atol=1e-4)
    agree = (got.argmax(1) == want.argmax(1)).float().mean().item()
    assert agree >= AGREEMENT, f"int8 top-1 agrees with fp32 on {agree:.0%} of faces"


def test_quantize_cli(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_faces(data_root: Path, n: int, *, seed: int = 0) -> torch.Tensor:
        seen.update(data=data_root, n=n)
        return _faces(n, seed)

    monkeypatch.setattr(quantize, "calibration_faces", fake_faces)
    assert main(["quantize", str(checkpoint), str(tmp_path / "out" / "clf"), "--calibration", "40",
                 "--data", str(tmp_path / "fer")]) == 0
    assert seen == {"data": tmp_path / "fer", "n": 40}
    note = json.loads((tmp_path / "out" / "clf.onnx.json").read_text())
    assert note["format"] == "onnx-int8-qdq" and note["arch"] == "compact_resnet_s"
    assert note["calibration"]["split"] == "Training" and note["calibration"]["faces"] == 40
    # the service serves the graph only beside these weights, and only these bytes
    assert note["weights_sha256"] == sha256_file(checkpoint.with_suffix(".safetensors"))
    assert note["onnx_sha256"] == sha256_file(tmp_path / "out" / "clf.onnx")
    session = create_session(tmp_path / "out" / "clf.onnx")
    (probs,) = session.run(None, {"input": np.zeros((3, 1, 44, 44), np.float32)})
    assert probs.shape == (3, 7)


def test_calibration_size_is_checked(checkpoint: Path, tmp_path: Path) -> None:
    model, _ = load_checkpoint(checkpoint)
    export_classifier(model, tmp_path / "fp32.onnx")
    with pytest.raises(ValueError, match="no calibration faces"):
        quantize.quantize_classifier(tmp_path / "fp32.onnx", tmp_path / "q.onnx",
                                     torch.empty(0, 48, 48, dtype=torch.uint8), model.cfg)
