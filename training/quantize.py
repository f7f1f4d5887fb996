"""``fer-train quantize``: int8 ONNX graph of a classifier by ONNX Runtime static quantisation.

The classifier is exported to float32 ONNX by :func:`facemodels.onnx_export.export_classifier`
(the graph the service runs), then quantised by ``onnxruntime.quantization.quantize_static``:
QDQ format (``QuantizeLinear``/``DequantizeLinear`` pairs around each quantised op, which ONNX
Runtime fuses into integer kernels), int8 weights per output channel, uint8 activations whose
ranges come from calibration.

Calibration uses FER2013 *Training* faces only (never PublicTest, on which accuracy is
reported), fed through :func:`facemodels.preprocess.eval_views`, the preprocessing the service
uses. Each face gives its ten crops (centre-ish and corner crops, mirrored), so the ranges
cover what 1-crop and 10-crop serving feed the graph. The softmax is excluded and the
classifier head's output is not quantised, so logits and probabilities stay float32.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from facemodels.atomic import atomic_path, write_text_atomically
from facemodels.checkpoint import load_checkpoint, weights_path
from facemodels.models import ModelCfg
from facemodels.onnx_export import CLASSIFIER_INPUT, export_classifier, sha256_file
from facemodels.preprocess import eval_views

__all__ = ["calibration_faces", "get_quantize_parser", "quantize_classifier", "quantize_main"]

log = logging.getLogger(__name__)

#: Faces per calibration batch (each gives 10 views).
_CALIB_BATCH = 32


def calibration_faces(data_root: Path, n: int, *, seed: int = 0) -> Tensor:
    """``n`` FER2013 *Training* faces (uint8 ``(n, 48, 48)``), drawn at random with ``seed``."""
    from training.data.fer2013 import load_fer2013

    train = load_fer2013(data_root).split("Training")
    if n <= 0 or n > len(train.labels):
        raise ValueError(f"--calibration must be in 1..{len(train.labels)}, got {n}")
    idx = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(seed))[:n]
    return train.images[idx.sort().values]


class _Reader:
    """``CalibrationDataReader``: the faces' ten-crop views, :data:`_CALIB_BATCH` faces a batch."""

    def __init__(self, faces: Tensor, cfg: ModelCfg) -> None:
        self._faces, self._cfg = faces, cfg
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for chunk in self._faces.split(_CALIB_BATCH):
            views = eval_views(chunk, self._cfg, tta=True).flatten(0, 1)
            yield {CLASSIFIER_INPUT: views.contiguous().numpy().astype(np.float32)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def quantize_classifier(fp32_onnx: Path, out: Path, faces: Tensor, cfg: ModelCfg, *,
                        method: str = "minmax") -> dict[str, Any]:
    """Write the int8 QDQ graph of ``fp32_onnx`` to ``out``, calibrated on ``faces``.

    Args:
        fp32_onnx: the float32 classifier graph (from :func:`export_classifier`).
        out: the int8 ``.onnx`` to write.
        faces: uint8 ``(N, H, W)`` calibration faces (FER2013 Training faces).
        cfg: the model's config (preprocessing).
        method: calibration: ``minmax``, ``percentile`` or ``entropy``.

    Returns:
        ``{"path", "calibration_faces", "method", "seconds", "qdq_nodes"}``.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise ValueError(f"method must be one of {', '.join(methods)}, got {method!r}")
    if len(faces) == 0:
        raise ValueError("no calibration faces")
    started = time.perf_counter()
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Shape inference and graph clean-up, as ONNX Runtime recommends before quantising.
        quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=True)
        softmax = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Softmax"]
        with atomic_path(out) as dest:
            quantize_static(
                str(pre), str(dest), _Reader(faces, cfg), quant_format=QuantFormat.QDQ,
                per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                calibrate_method=methods[method], nodes_to_exclude=softmax,
                # The logits feed the float softmax: keep them float (no 8-bit logit steps).
                extra_options={"CalibTensorRangeSymmetric": False,
                               "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]},
            )
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    qdq = sum(op in ("QuantizeLinear", "DequantizeLinear") for op in ops)
    return {"path": str(out), "calibration_faces": len(faces), "method": method,
            "seconds": time.perf_counter() - started, "qdq_nodes": qdq}


def get_quantize_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="int8 ONNX graph of a classifier (ONNX Runtime static QDQ quantisation, "
                    "calibrated on FER2013 Training faces)", add_help=add_help)
    p.add_argument("checkpoint", type=Path, help="classifier checkpoint (path with or without suffix)")
    p.add_argument("out", type=Path, help="the int8 graph to write (.onnx is appended if missing)")
    p.add_argument("--data", type=Path, default=Path("../shared/data/fer2013"),
                   help="FER2013 (image folder or fer2013.csv); only its Training faces are read")
    p.add_argument("--calibration", type=int, default=500, help="calibration faces (each gives 10 crops)")
    p.add_argument("--method", choices=("minmax", "percentile", "entropy"), default="minmax",
                   help="calibration method")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing the calibration faces")
    return p


def quantize_main(args: argparse.Namespace) -> dict[str, Any]:
    model, card = load_checkpoint(args.checkpoint)
    out = args.out.with_name(args.out.name.removesuffix(".onnx") + ".onnx")
    faces = calibration_faces(args.data, args.calibration, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_classifier(model, fp32)
        info = quantize_classifier(fp32, out, faces, model.cfg, method=args.method)
    source = weights_path(args.checkpoint)
    # The service serves <stem>.int8.onnx beside a checkpoint only while weights_sha256 is the
    # hash of that checkpoint's weights file and onnx_sha256 the hash of the graph's bytes.
    note = {**card, "format": "onnx-int8-qdq", "exported_from": str(source),
            "weights_sha256": sha256_file(source), "onnx_file": out.name, "onnx_sha256": sha256_file(out),
            "calibration": {"data": str(args.data), "split": "Training", "faces": len(faces),
                            "seed": args.seed, "method": args.method, "views": "ten-crop"}}
    write_text_atomically(out.with_name(out.name + ".json"), json.dumps(note, indent=2) + "\n")
    log.info("quantised %s -> %s (%.1f MB, %d Q/DQ nodes, %d calibration faces, %.1f s)", source, out,
             out.stat().st_size / 2**20, info["qdq_nodes"], len(faces), info["seconds"])
    return info
