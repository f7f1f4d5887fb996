"""``fer-train cv``: subject-independent k-fold cross-validation on CK+48."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import torch

from facemodels.checkpoint import init_from_checkpoint
from facemodels.device import AMP_CHOICES, resolve_amp, resolve_device
from facemodels.models import ModelCfg, create_model, list_models
from training.data.ckplus import CK_FER_NAMES, load_ckplus, subject_kfold
from training.data.transforms import BatchAugment
from training.engine import evaluate, train_one_epoch
from training.runtime import seed_everything

__all__ = ["cv_main", "get_cv_parser"]

log = logging.getLogger(__name__)


def get_cv_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Subject-independent k-fold CV on CK+48",
                                add_help=add_help)
    p.add_argument("--model", default="compact_resnet", help=f"one of {list_models()}")
    p.add_argument("--init", type=Path, default=None,
                   help="start each fold from this FER2013 checkpoint; head rows are matched by "
                        "class name (contempt, which FER2013 lacks, starts fresh)")
    p.add_argument("--data", default="../shared/data/ckplus48")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--amp", choices=AMP_CHOICES, default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="write the per-fold JSON here")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = default")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _fold_model(args: argparse.Namespace, cfg: ModelCfg, device: torch.device) -> torch.nn.Module:
    model = create_model(args.model, num_classes=cfg.num_classes, cfg=cfg)
    if args.init is not None:
        init_from_checkpoint(model, args.init, args.model, class_aliases=CK_FER_NAMES)
    return model.to(device).to(memory_format=torch.channels_last)


def cv_main(args: argparse.Namespace) -> dict[str, Any]:
    """Train and test one model per fold; return per-fold and mean/std accuracy."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    data = load_ckplus(args.data)
    folds = subject_kfold(data, k=args.folds, seed=args.seed)
    probe = create_model(args.model)
    cfg = dataclasses.replace(probe.cfg, class_names=tuple(data.class_names))
    accs = []
    for i, (train_idx, test_idx) in enumerate(folds):
        generator = seed_everything(args.seed + i)
        model = _fold_model(args, cfg, device)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                              weight_decay=args.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
        train_idx_t, test_idx_t = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
        x_train = data.images[train_idx_t].to(device)
        y_train = data.labels[train_idx_t].to(device)
        augment = BatchAugment(cfg)
        for epoch in range(args.epochs):
            train_one_epoch(model, opt, x_train, y_train, augment=augment,
                            batch_size=args.batch_size, amp_dtype=amp_dtype,
                            generator=generator, label_smoothing=args.label_smoothing,
                            epoch=epoch, progress=args.progress)
            sched.step()
        result = evaluate(model, data.images[test_idx_t], data.labels[test_idx_t], tta=True,
                          amp_dtype=amp_dtype)
        accs.append(result.accuracy)
        log.info("fold %d/%d: %d train, %d test images, 10-crop acc %.4f", i + 1, len(folds),
                 len(train_idx), len(test_idx), result.accuracy)
    summary = {"model": args.model, "init": str(args.init) if args.init else None,
               "folds": len(folds), "epochs": args.epochs, "fold_acc": accs,
               "mean_acc": statistics.fmean(accs),
               "std_acc": statistics.stdev(accs) if len(accs) > 1 else 0.0}
    log.info("CK+ %d-fold subject-independent: mean %.4f, std %.4f", len(folds),
             summary["mean_acc"], summary["std_acc"])
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
