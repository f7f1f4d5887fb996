"""``fer-train classify``: train one classifier on FER2013, selecting on PublicTest only.

Shaped like torchvision's reference scripts: ``get_args_parser()`` and ``main(args)``.
Each epoch writes ``last`` (weights, card and training state) so an interrupted run loses at
most one epoch, appends a line to ``metrics.jsonl`` and redraws ``curves.png``. The best epoch
on PublicTest is kept as ``best``; at the end it is re-evaluated with 10-crop TTA and its
confusion matrix is written.

Under ``torchrun --nproc_per_node N`` every process trains a DistributedDataParallel replica on
its own shard of each epoch (``--batch-size`` per process, so the global batch is N times it);
rank 0 alone evaluates, decides (best epoch, early stop, plateau lr; broadcast to the others),
saves and logs. The helpers are in :mod:`training.distributed`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facemodels.checkpoint import (
    CheckpointError,
    init_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
    update_card,
)
from facemodels.device import AMP_CHOICES, resolve_amp, resolve_device
from facemodels.models import create_model, list_models
from training.data._cache import default_cache_dir
from training.data.aligned_views import cached_aligned_views
from training.data.camera import CameraAugment
from training.data.dataset import FaceDataset
from training.data.fer2013 import DEFAULT_DATA, SELECTION_SPLIT, load_fer2013, selection_split
from training.data.transforms import BatchAugment
from training.distributed import (
    broadcast_from_main,
    check_replicas_in_sync,
    cleanup_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    is_main,
    main_first,
    same_on_all_ranks,
    seeded_generator,
    sum_across_ranks,
)
from training.ema import WeightAverage
from training.engine import Distillation, evaluate, train_one_epoch
from training.metrics import classification_report
from training.plots import plot_confusion_matrix, plot_training_curves
from training.precise_bn import recalibrate_batchnorm
from training.runtime import resolved_args, seed_everything
from training.teacher_views import build_teacher_views
from training.train_state import load_train_state, save_train_state

__all__ = ["get_args_parser", "main"]

log = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a FER2013 classifier", add_help=add_help)
    p.add_argument("--model", default="compact_resnet", help=f"one of {list_models()}")
    p.add_argument("--data", default=DEFAULT_DATA, help="FER2013 image folder or fer2013.csv")
    p.add_argument("--cache-dir", type=Path, default=None, help="decoded-dataset cache folder")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip corrupt or malformed images (counted in a warning) instead of failing")
    p.add_argument("--output-dir", type=Path, default=None, help="default: runs/<model>")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=128,
                   help="per process: under torchrun the global batch is this x WORLD_SIZE")
    p.add_argument("--opt", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--no-nesterov", dest="nesterov", action="store_false")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--lr-scheduler", choices=("cosine", "step", "plateau"), default="cosine")
    p.add_argument("--lr-step-size", type=int, default=30, help="epochs per step (step)")
    p.add_argument("--lr-gamma", type=float, default=0.1, help="decay factor (step, plateau)")
    p.add_argument("--lr-patience", type=int, default=5, help="epochs without gain (plateau)")
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--class-balance", choices=("none", "loss", "sampler"), default="none",
                   help="class-weighted loss or balanced sampling")
    p.add_argument("--grad-clip", type=float, default=0.0, help="max grad norm; 0 = off")
    p.add_argument("--rotate", type=float, default=10.0, help="max rotation in degrees")
    p.add_argument("--scale", type=float, nargs=2, default=(0.9, 1.1))
    p.add_argument("--flip", type=float, default=0.5)
    p.add_argument("--erase-p", type=float, default=0.5)
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha; 0 = off")
    p.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha; 0 = off")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this checkpoint's weights (same arch), e.g. to fine-tune")
    p.add_argument("--aligned-views", type=float, default=0.0, metavar="P",
                   help="swap each training face for its served alignment (detect -> align, "
                        "computed once and cached) with probability P, to close train/serve skew")
    p.add_argument("--camera-aug", type=float, default=0.0, metavar="P",
                   help="camera degradations (down-up sampling, blur, gamma, contrast, noise, JPEG), "
                        "each applied to an image with probability P; 0 = off")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="keep an exponential moving average of the weights (e.g. 0.999) and "
                        "evaluate, select and save it instead of the raw weights; 0 = off")
    p.add_argument("--bn-recalibrate", type=int, default=0, metavar="BATCHES",
                   help="before each evaluation, recompute BatchNorm statistics in float32 over "
                        "this many batches of training faces (precise BN; the accuracy with the "
                        "old running statistics is logged as val_acc_bn_running, of the EMA model "
                        "with --ema, whose raw model is recalibrated too); 0 = off")
    p.add_argument("--teacher", type=Path, default=None, help="checkpoint to distil from")
    p.add_argument("--teacher-views", type=int, default=0, metavar="K",
                   help="with --teacher: compute the teacher's logits once on K fixed augmented "
                        "views of every training face (cached beside the dataset) and train on "
                        "those views, so a costly teacher runs K passes in all instead of one "
                        "per epoch; 0 = distil live on fresh views")
    p.add_argument("--distill-alpha", type=float, default=0.5)
    p.add_argument("--distill-temp", type=float, default=4.0)
    p.add_argument("--amp", choices=AMP_CHOICES, default="auto")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patience", type=int, default=0,
                   help="early stopping: epochs without PublicTest gain; 0 = off")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    p.add_argument("--epoch-budget", type=int, default=0,
                   help="train at most N epochs in this invocation, then stop (resume later)")
    p.add_argument("--train-limit", type=int, default=0, help="use only N training images")
    p.add_argument("--val-limit", type=int, default=0, help="use only N PublicTest images")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--half-checkpoint", action="store_true", help="store best weights as fp16")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = default")
    return p


def _build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer) -> Any:
    main_epochs = max(args.epochs - args.warmup_epochs, 1)
    if args.lr_scheduler == "cosine":
        sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_epochs)
    elif args.lr_scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_step_size, args.lr_gamma)
    else:
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=args.lr_gamma, patience=args.lr_patience
        )
    if args.warmup_epochs > 0:
        warm = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=0.1, total_iters=args.warmup_epochs
        )
        sched = torch.optim.lr_scheduler.SequentialLR(
            optimizer, [warm, sched], milestones=[args.warmup_epochs]
        )
    return sched


def _build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov)
    return torch.optim.AdamW(groups, lr=args.lr)


def _class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=num_classes).float().clamp_min(1)
    w = counts.sum() / (num_classes * counts)
    return w / w.mean()


def _limit(ds: FaceDataset, n: int, seed: int) -> FaceDataset:
    if n <= 0 or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    return ds.subset(torch.randperm(len(ds), generator=g)[:n].sort().values)


def _resume_ema(ema: WeightAverage, out: Path, info: dict[str, Any], device: torch.device) -> None:
    """Restore the weight average saved beside ``last`` (``last_ema``)."""
    if not (out / "last_ema.safetensors").is_file():
        raise CheckpointError(f"--ema resume needs {out / 'last_ema.safetensors'}; the run was "
                              "started without --ema")
    averaged, _ = load_checkpoint(out / "last_ema", device=device)
    ema.module.load_state_dict(averaged.state_dict())
    ema.num_updates = int(info.get("ema_updates", 0))


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run training; return the best checkpoint's card metrics (on every rank under torchrun)."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = init_distributed(resolve_device(args.device))
    if not is_main():  # rank 0 tells the story; the others speak up only when something is wrong
        root = logging.getLogger()
        root.setLevel(max(root.getEffectiveLevel(), logging.WARNING))
    try:
        return _train(args, device)
    finally:
        cleanup_distributed()


def _train(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    if args.teacher_views < 0:
        raise ValueError(f"--teacher-views must be 0 (off) or more, got {args.teacher_views}")
    if args.teacher_views > 0 and args.teacher is None:
        raise ValueError("--teacher-views needs --teacher")
    if args.teacher_views > 0 and (args.mixup > 0 or args.cutmix > 0):
        raise ValueError("--teacher-views stores fixed views and cannot mix them: drop "
                         "--mixup and --cutmix")
    out = args.output_dir or Path("runs") / args.model
    out.mkdir(parents=True, exist_ok=True)
    rank, world_size = get_rank(), get_world_size()
    amp_dtype = resolve_amp(args.amp, device)
    generator = seed_everything(args.seed + rank)

    with main_first():  # rank 0 fills the dataset cache, the others then read it
        data = load_fer2013(args.data, cache_dir=args.cache_dir, skip_bad=args.skip_bad)
    train = _limit(data.split("Training"), args.train_limit, args.seed)
    val = _limit(selection_split(data), args.val_limit, args.seed)
    log.info("data %s: %d training, %d %s images; device %s, amp %s", args.data, len(train),
             len(val), SELECTION_SPLIT, device, amp_dtype)

    model = create_model(args.model, num_classes=len(data.class_names))
    if args.init is not None:
        init_from_checkpoint(model, args.init, args.model)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = model.cfg
    optimizer = _build_optimizer(args, model)
    scheduler = _build_scheduler(args, optimizer)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None
    augment = BatchAugment(
        cfg, flip=args.flip, max_rotate=args.rotate, scale=tuple(args.scale),
        erase_p=args.erase_p, mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
        camera=CameraAugment(p=args.camera_aug) if args.camera_aug > 0 else None,
    )
    if augment.camera is not None:
        log.info("%s", augment.camera.describe())
    train_images, train_labels = train.images.to(device), train.labels.to(device)
    train_views = None
    if args.aligned_views > 0:
        with main_first():
            views, found = cached_aligned_views(train.images, cache_dir=args.cache_dir)
        train_views = views.to(device)
        log.info("aligned views: a face was found in %.1f%% of training images; each sample is "
                 "swapped for its view with p=%.2f", 100 * found, args.aligned_views)
    sample_weights = class_weights = None
    if args.class_balance == "sampler":
        per_class = 1.0 / torch.bincount(train.labels, minlength=cfg.num_classes).float().clamp_min(1)
        sample_weights = per_class[train.labels]
    elif args.class_balance == "loss":
        class_weights = _class_weights(train.labels, cfg.num_classes).to(device)
    distill = None
    if args.teacher is not None:
        teacher, tcard = load_checkpoint(args.teacher, device=device)
        if teacher.cfg != cfg:
            raise ValueError(f"teacher {args.teacher} has ModelCfg {teacher.cfg}, student {cfg}")
        distill = Distillation(teacher.requires_grad_(False), args.distill_alpha, args.distill_temp)
        log.info("distilling from %s (%s)", args.teacher, tcard["arch"])
    teacher_views = None
    if args.teacher_views > 0:
        teacher_views = build_teacher_views(
            distill.teacher, train.images, augment, num_views=args.teacher_views,
            cache_dir=args.cache_dir or default_cache_dir(), aligned=train_views,
            aligned_p=args.aligned_views, seed=args.seed, amp_dtype=amp_dtype, rank=rank,
            world_size=world_size,
        ).to(device)
        # From here the stored logits stand in for the teacher, which is released.
        distill = Distillation(None, args.distill_alpha, args.distill_temp)
        del teacher
        train_views = None  # the aligned swaps are inside the stored views
        log.info("training on %d stored teacher views of each face (%s)", teacher_views.num_views,
                 teacher_views.folder)

    # The average lives on rank 0, the rank that evaluates and saves it.
    ema = WeightAverage(model, args.ema) if args.ema > 0 and is_main() else None
    start_epoch, best_acc, best_epoch, wall_before, stale = 0, -1.0, -1, 0.0, 0
    if args.resume and (out / "last.safetensors").is_file():
        state_model, _ = load_checkpoint(out / "last", device=device)
        model.load_state_dict(state_model.state_dict())
        info = load_train_state(out / "last", optimizer=optimizer, scheduler=scheduler,
                                generator=generator, scaler=scaler)
        if ema is not None:
            _resume_ema(ema, out, info, device)
        start_epoch, best_acc, best_epoch = info["epoch"] + 1, info["best_acc"], info["best_epoch"]
        wall_before, stale = info.get("wall_time_s", 0.0), info.get("stale_epochs", 0)
        log.info("resumed %s at epoch %d (best %.4f at %d)", out, start_epoch, best_acc, best_epoch)
    elif args.resume:
        log.warning("--resume given but %s has no last checkpoint; starting fresh", out)
    if not same_on_all_ranks((start_epoch, best_epoch, stale)):
        raise RuntimeError(f"ranks resumed {out} at different epochs: --output-dir must be on "
                           "storage that every rank sees")
    if is_main():
        if start_epoch == 0:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "args.json").write_text(json.dumps(resolved_args(args), indent=2) + "\n")
    train_model: nn.Module = model
    if world_size > 1:  # `model` stays the plain module: it is what gets evaluated and saved
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        log.info("DDP: %d ranks; global batch %d (--batch-size %d per rank); the linear rule "
                 "scales --lr with the global batch", world_size, args.batch_size * world_size,
                 args.batch_size)

    card_args = resolved_args(args)
    run_start = time.perf_counter()
    end_epoch = args.epochs
    if args.epoch_budget > 0:
        end_epoch = min(end_epoch, start_epoch + args.epoch_budget)
    recalibrating = args.bn_recalibrate > 0
    for epoch in range(start_epoch, end_epoch):
        order_generator = None
        if world_size > 1:  # one order for all ranks to shard; augmentation draws per rank
            order_generator = seeded_generator(args.seed, epoch)
            generator = seeded_generator(args.seed, epoch, rank + 1)
        stats = train_one_epoch(
            train_model, optimizer, train_images, train_labels, augment=augment,
            batch_size=args.batch_size, amp_dtype=amp_dtype, generator=generator,
            sample_weights=sample_weights, class_weights=class_weights,
            label_smoothing=args.label_smoothing, grad_clip=args.grad_clip, scaler=scaler,
            distill=distill, channels_last=args.channels_last, epoch=epoch,
            progress=args.progress and is_main(), views=train_views, view_p=args.aligned_views,
            teacher_views=teacher_views,
            ema=ema, order_generator=order_generator, rank=rank, world_size=world_size,
        )
        if world_size > 1:  # loss and accuracy averaged over the shards, throughput summed
            check_replicas_in_sync(model)
            loss, acc, img_s = sum_across_ranks(
                [stats["train_loss"], stats["train_acc"], stats["images_per_s"]])
            stats.update(train_loss=loss / world_size, train_acc=acc / world_size,
                         images_per_s=img_s)
        selected = model if ema is None else ema.module  # the average is selected and shipped
        result = raw_result = running_bn_result = None
        if is_main():
            if recalibrating:
                running_bn_result = evaluate(selected, val.images, val.labels, amp_dtype=amp_dtype)
                counts = [recalibrate_batchnorm(net, train.images, batches=args.bn_recalibrate,
                                                batch_size=args.batch_size,
                                                generator=seeded_generator(args.seed, epoch),
                                                channels_last=args.channels_last)
                          for net in {id(model): model, id(selected): selected}.values()]
                if not any(counts):
                    log.warning("--bn-recalibrate: %s has no BatchNorm layer to recalibrate, or the "
                                "training set not one batch; turned off", args.model)
                    recalibrating, running_bn_result = False, None
            result = raw_result = evaluate(model, val.images, val.labels, amp_dtype=amp_dtype)
            if ema is not None:
                result = evaluate(selected, val.images, val.labels, amp_dtype=amp_dtype)
        val_acc = broadcast_from_main(result.accuracy if result is not None else None)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_acc)
        else:
            scheduler.step()
        wall = wall_before + time.perf_counter() - run_start
        improved = val_acc > best_acc
        if improved:
            best_acc, best_epoch, stale = val_acc, epoch, 0
        else:
            stale += 1
        if is_main():  # rank 0 alone writes: metrics, checkpoints, training state, curves
            row = {"epoch": epoch, **stats, "val_loss": result.loss, "val_acc": result.accuracy,
                   "val_split": SELECTION_SPLIT, "wall_time_s": wall}
            if ema is not None:
                row["val_acc_raw"] = raw_result.accuracy
            if running_bn_result is not None:
                row["val_acc_bn_running"] = running_bn_result.accuracy
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            common = {"arch": args.model, "train_args": card_args,
                      "data_fingerprint": data.fingerprint}
            extra = {"device": str(device), "epochs_trained": epoch + 1, "wall_time_s": round(wall, 1)}
            if ema is not None:
                extra["ema_decay"] = args.ema
            if teacher_views is not None:  # names the stored targets the run was trained on
                extra["teacher_views_cache"] = teacher_views.folder.name
            if world_size > 1:
                extra["world_size"] = world_size
            metrics = {SELECTION_SPLIT: {"acc": result.accuracy, "loss": result.loss, "epoch": epoch}}
            if improved:
                save_checkpoint(out / "best", selected, metrics=metrics, extra=extra,
                                half=args.half_checkpoint, **common)
            save_checkpoint(out / "last", model, metrics=metrics, extra=extra, **common)
            info = {"epoch": epoch, "best_acc": best_acc, "best_epoch": best_epoch,
                    "wall_time_s": wall, "stale_epochs": stale}
            if ema is not None:
                save_checkpoint(out / "last_ema", ema.module, metrics=metrics, extra=extra, **common)
                info["ema_updates"] = ema.num_updates
            save_train_state(out / "last", optimizer=optimizer, scheduler=scheduler,
                             generator=generator, scaler=scaler, info=info)
            plot_training_curves(out / "metrics.jsonl", out / "curves.png")
            log.info("epoch %d: train loss %.4f acc %.4f | %s acc %.4f loss %.4f | %.0f img/s%s",
                     epoch, stats["train_loss"], stats["train_acc"], SELECTION_SPLIT,
                     result.accuracy, result.loss, stats["images_per_s"], " *" if improved else "")
            if running_bn_result is not None:
                log.info("epoch %d: %s acc %.4f with the running BatchNorm statistics, %.4f "
                         "recalibrated", epoch, SELECTION_SPLIT, running_bn_result.accuracy,
                         result.accuracy)
        if args.patience and stale >= args.patience:  # the same decision on every rank
            log.info("early stop: no %s gain for %d epochs", SELECTION_SPLIT, stale)
            break
    metrics = finalize_best(out, val, amp_dtype=amp_dtype, device=device) if is_main() else None
    return broadcast_from_main(metrics)


def finalize_best(
    out: Path, val: FaceDataset, *, amp_dtype: torch.dtype | None, device: torch.device
) -> dict[str, Any]:
    """Re-evaluate ``best`` with 1-crop and 10-crop TTA, update its card, plot its confusion."""
    if not (out / "best.safetensors").is_file():
        raise FileNotFoundError(f"no best checkpoint in {out}")
    model, card = load_checkpoint(out / "best", device=device)
    one = evaluate(model, val.images, val.labels, amp_dtype=amp_dtype)
    ten = evaluate(model, val.images, val.labels, tta=True, amp_dtype=amp_dtype)
    report = classification_report(ten.labels, ten.preds, model.cfg.class_names)
    metrics = dict(card["metrics"])
    metrics[SELECTION_SPLIT] = {**metrics.get(SELECTION_SPLIT, {}), "acc": one.accuracy,
                                "acc_tta": ten.accuracy, "macro_f1_tta": report["macro_f1"]}
    update_card(out / "best", metrics=metrics)
    (out / "best_confusion.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_confusion_matrix(report["confusion_matrix"], model.cfg.class_names,
                          out / "best_confusion.png",
                          title=f"{card['arch']} {SELECTION_SPLIT} 10-crop acc {ten.accuracy:.4f}")
    log.info("best %s: %s 1-crop %.4f, 10-crop %.4f", card["arch"], SELECTION_SPLIT,
             one.accuracy, ten.accuracy)
    return metrics
