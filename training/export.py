"""``fer-train export``: copy a checkpoint for shipping, optionally as float16, or write it as ONNX.

The card travels with the weights (metrics, training arguments, data fingerprint), and records
where it was exported from, so a shipped ``checkpoints/default`` still says how it was made.

``--format onnx`` writes ``<dest>.onnx`` with a dynamic batch axis instead (any classifier, an
ensemble as one graph, a ``frontal_refiner``'s network, or the RetinaFace detector weights),
through the same exporter the service uses (:mod:`facemodels.onnx_export`), checked against
PyTorch by ONNX Runtime, plus
``<dest>.onnx.json``: the card (the ``cfg`` says how to preprocess the graph's input) with the
SHA-256 of the source weights and the measured difference to PyTorch.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from facemodels.atomic import write_text_atomically
from facemodels.checkpoint import card_path, load_checkpoint, save_checkpoint, weights_path
from facemodels.face.detector import load_detector_net
from facemodels.face.retinaface_convert import ARCH as DETECTOR_ARCH
from facemodels.frontalizer.refiner import REFINER_ARCH

__all__ = ["export_main", "get_export_parser"]

log = logging.getLogger(__name__)

_CARD_FIELDS = {"format", "arch", "model_kwargs", "cfg", "num_params", "train_args", "metrics",
                "data_fingerprint", "code_version", "saved_at", "weights_file", "dtype"}


def get_export_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Copy a checkpoint (and its card) for shipping",
                                add_help=add_help)
    p.add_argument("source", type=Path, help="checkpoint to export (path with or without suffix)")
    p.add_argument("dest", type=Path, help="destination stem, e.g. checkpoints/default")
    p.add_argument("--half", action="store_true", help="store floating-point weights as float16")
    p.add_argument("--confusion", type=Path, default=None,
                   help="a confusion-matrix PNG to copy beside it as <dest>_confusion.png")
    p.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors",
                   help="safetensors: a checkpoint with its card; onnx: <dest>.onnx (dynamic batch) and "
                        "<dest>.onnx.json, from a classifier or frontal_refiner checkpoint or the "
                        "detector weights")
    return p


def _export_onnx(args: argparse.Namespace) -> dict[str, Any]:
    from facemodels.onnx_export import export_classifier, export_detector, export_refiner, sha256_file

    source = weights_path(args.source)
    out = args.dest.with_name(args.dest.name.removesuffix(".onnx") + ".onnx")
    card_file = source.with_suffix(".json")
    card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    if card.get("arch") == DETECTOR_ARCH:
        info = export_detector(load_detector_net(source), out)
    else:
        model, card = load_checkpoint(args.source)
        info = (export_refiner if card["arch"] == REFINER_ARCH else export_classifier)(model, out)
    note = {**card, "format": "onnx", "exported_from": str(source), "weights_sha256": sha256_file(source),
            "onnx_file": out.name, "max_abs_diff_vs_torch": info["max_abs_diff"]}
    write_text_atomically(out.with_name(out.name + ".json"), json.dumps(note, indent=2) + "\n")
    log.info("exported %s -> %s (%.1f MB, max |ORT - torch| %s)", source, out, out.stat().st_size / 2**20,
             info["max_abs_diff"])
    return {"onnx": str(out), "card": str(out.with_name(out.name + ".json")),
            "max_abs_diff": info["max_abs_diff"]}


def export_main(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "format", "safetensors") == "onnx":
        return _export_onnx(args)
    model, card = load_checkpoint(args.source)
    extra = {k: v for k, v in card.items() if k not in _CARD_FIELDS}
    extra["exported_from"] = str(weights_path(args.source))
    out = save_checkpoint(
        args.dest, model, arch=card["arch"], model_kwargs=card.get("model_kwargs"),
        train_args=card.get("train_args"), metrics=card.get("metrics"),
        data_fingerprint=card.get("data_fingerprint"), extra=extra, half=args.half,
    )
    reloaded, _ = load_checkpoint(out)
    if card["arch"] == REFINER_ARCH:  # not a classifier: compare the weights themselves
        drift_key, drift = "max_weight_drift", _weight_drift(model, reloaded)
    else:
        x = torch.randn(4, model.cfg.in_chans, model.cfg.input_size, model.cfg.input_size)
        with torch.no_grad():
            drift = (model(x).float().softmax(1) - reloaded(x).float().softmax(1)).abs().max().item()
        drift_key = "max_prob_drift"
    if args.confusion is not None:
        shutil.copyfile(args.confusion, out.with_name(out.stem + "_confusion.png"))
    log.info("exported %s -> %s (%.1f MB, %s %.2e)", args.source, out,
             out.stat().st_size / 2**20, drift_key.replace("_", " "), drift)
    return {"weights": str(out), "card": str(card_path(out)), drift_key: drift}


def _weight_drift(model: torch.nn.Module, reloaded: torch.nn.Module) -> float:
    """Largest absolute difference between two models' floating-point tensors (0 for a copy)."""
    theirs = reloaded.state_dict()
    return max((float((v.float() - theirs[k].float()).abs().max()) for k, v in model.state_dict().items()
                if v.is_floating_point() and v.numel()), default=0.0)
