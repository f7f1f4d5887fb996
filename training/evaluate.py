"""``fer-train eval`` and ``fer-train ensemble``: accuracy, per-class metrics, confusion matrix.

``eval`` takes one checkpoint (an ensemble checkpoint included) or several, which are then
soft-voted. ``ensemble`` fits member weights on PublicTest and saves the ensemble checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facemodels.checkpoint import load_checkpoint, save_checkpoint
from facemodels.device import AMP_CHOICES, resolve_amp, resolve_device
from facemodels.predict import predict_probs
from training.data.dataset import FaceDataset
from training.data.fer2013 import DEFAULT_DATA, SELECTION_SPLIT, load_fer2013, selection_split
from training.engine import evaluate
from training.metrics import classification_report
from training.plots import plot_confusion_matrix
from training.runtime import resolved_args

__all__ = ["ensemble_main", "eval_main", "get_ensemble_parser", "get_eval_parser", "load_model"]

log = logging.getLogger(__name__)
SPLITS = ("Training", "PublicTest", "PrivateTest")


def get_eval_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate checkpoint(s) on a FER2013 split",
                                add_help=add_help)
    p.add_argument("checkpoints", nargs="+", type=Path,
                   help="checkpoint path(s); several are soft-voted with equal weights")
    p.add_argument("--data", default=DEFAULT_DATA, help="FER2013 image folder or fer2013.csv")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--split", choices=SPLITS, default="PublicTest")
    p.add_argument("--skip-bad", action="store_true", help="skip corrupt images (counted in a warning)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="write report JSON and confusion PNG here")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", choices=AMP_CHOICES, default="none")
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N images only")
    return p


def load_model(paths: list[Path], device: torch.device) -> tuple[nn.Module, str]:
    """One checkpoint as is, or several combined into an equal-weight soft-voting ensemble."""
    if len(paths) == 1:
        model, card = load_checkpoint(paths[0], device=device)
        return model, card["arch"]
    from facemodels.models.ensemble import ensemble_from_checkpoints

    model = ensemble_from_checkpoints(paths).to(device).eval()
    return model, "ensemble(" + ",".join(p.name for p in paths) + ")"


def _split(data: FaceDataset, split: str, limit: int) -> FaceDataset:
    part = data.split(split)
    if len(part) == 0:
        raise ValueError(f"the dataset has no {split} samples")
    return part.subset(torch.arange(min(limit, len(part)))) if limit > 0 else part


def eval_main(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate 1-crop and 10-crop; log a short table; return the report."""
    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    model, name = load_model(args.checkpoints, device)
    data = _split(load_fer2013(args.data, cache_dir=args.cache_dir, skip_bad=args.skip_bad), args.split,
                  args.limit)
    one = evaluate(model, data.images, data.labels, batch_size=args.batch_size, amp_dtype=amp_dtype)
    ten = evaluate(model, data.images, data.labels, tta=True, batch_size=args.batch_size,
                   amp_dtype=amp_dtype)
    report = classification_report(ten.labels, ten.preds, model.cfg.class_names)
    report.update({"model": name, "split": args.split, "images": len(data),
                   "acc_1crop": one.accuracy, "acc_10crop": ten.accuracy})
    lines = [f"{name} on {args.split} ({len(data)} images)",
             f"  accuracy 1-crop {one.accuracy:.4f}   10-crop {ten.accuracy:.4f}   "
             f"macro-F1 (10-crop) {report['macro_f1']:.4f}",
             f"  {'class':<10}{'prec':>8}{'recall':>8}{'f1':>8}{'n':>7}"]
    for cls, m in report["per_class"].items():
        lines.append(f"  {cls:<10}{m['precision']:>8.3f}{m['recall']:>8.3f}{m['f1']:>8.3f}"
                     f"{m['support']:>7}")
    log.info("\n".join(lines))
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        stem = args.output_dir / f"eval_{args.split}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        plot_confusion_matrix(report["confusion_matrix"], model.cfg.class_names,
                              stem.with_name(stem.name + "_confusion.png"),
                              title=f"{name} {args.split} 10-crop acc {ten.accuracy:.4f}")
    return report


def get_ensemble_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=("Build a soft-voting ensemble; members are scored (and weights fitted) on "
                     f"{SELECTION_SPLIT}"),
        add_help=add_help)
    p.add_argument("members", nargs="+", type=Path, help="member checkpoints")
    p.add_argument("--output", type=Path, required=True, help="checkpoint stem to write")
    p.add_argument("--weights", choices=("fit", "average"), default="fit")
    p.add_argument("--tta", action="store_true", help="fit on 10-crop member probabilities")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--half", action="store_true", help="store weights as fp16")
    return p


def ensemble_main(args: argparse.Namespace) -> dict[str, Any]:
    """Fit (or average) member weights on PublicTest and save the ensemble checkpoint."""
    from facemodels.models.ensemble import SoftVotingEnsemble, ensemble_from_checkpoints, fit_ensemble_weights

    device = resolve_device(args.device)
    data = load_fer2013(args.data, cache_dir=args.cache_dir)
    val = selection_split(data)
    plain = ensemble_from_checkpoints(args.members, device=device)  # each member loaded once
    members = list(plain.members)
    probs = torch.stack([predict_probs(m, val.images, tta=args.tta) for m in members])
    member_acc = [(p.argmax(1) == val.labels).float().mean().item() for p in probs]
    weights = None
    if args.weights == "fit":
        weights = fit_ensemble_weights(probs, val.labels).tolist()
    model = SoftVotingEnsemble(members, weights=weights, specs=plain.specs).to(device).eval()
    avg = probs.mean(0)
    fitted = (probs * torch.tensor(weights or [1 / len(members)] * len(members)).view(-1, 1, 1)).sum(0)
    metrics = {SELECTION_SPLIT: {
        "acc_average": (avg.argmax(1) == val.labels).float().mean().item(),
        "acc_weighted": (fitted.argmax(1) == val.labels).float().mean().item(),
        "member_acc": dict(zip([str(p) for p in args.members], member_acc, strict=True)),
        "weights": weights, "tta": args.tta,
        "note": (f"weights fitted on {SELECTION_SPLIT}" if weights is not None else
                 f"plain average; members chosen on {SELECTION_SPLIT}")
        + "; report another split for unbiased accuracy",
    }}
    save_checkpoint(args.output, model, arch="ensemble", model_kwargs=model.model_kwargs,
                    metrics=metrics, half=args.half,
                    data_fingerprint=data.fingerprint, train_args=resolved_args(args))
    log.info("ensemble of %d saved to %s: %s", len(members), args.output, metrics[SELECTION_SPLIT])
    return metrics
