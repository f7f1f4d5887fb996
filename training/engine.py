"""``train_one_epoch`` and ``evaluate``: plain functions, torchvision-reference style.

The whole dataset lives as one uint8 tensor on the training device; batches are drawn by index,
normalised and augmented on that device. There is no DataLoader and no per-sample PIL work.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from facemodels.device import autocast
from facemodels.models.cfg import ModelCfg
from facemodels.predict import predict_probs
from facemodels.preprocess import normalize, standardize
from training.data.aligned_views import mix_views
from training.data.transforms import BatchAugment
from training.distributed import shard, unwrap
from training.ema import WeightAverage
from training.teacher_views import TeacherViews

__all__ = ["Distillation", "EvalResult", "evaluate", "soft_cross_entropy", "soft_target_kl",
           "train_one_epoch"]

log = logging.getLogger(__name__)


@dataclass
class Distillation:
    """Knowledge distillation from a frozen teacher (e.g. the ensemble).

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(teacher_T || student_T)

    With ``teacher=None`` the teacher's logits come precomputed with each batch (the fixed
    views of :class:`~training.teacher_views.TeacherViews`).
    """

    teacher: nn.Module | None  # None when every batch brings its teacher logits (TeacherViews)
    alpha: float = 0.5
    temperature: float = 4.0


@dataclass
class EvalResult:
    """Outputs of :func:`evaluate`."""

    probs: Tensor  # (N, C) on CPU, averaged over views
    labels: Tensor  # (N,) on CPU
    loss: float
    accuracy: float

    @property
    def preds(self) -> Tensor:
        return self.probs.argmax(1)


def soft_cross_entropy(
    logits: Tensor, targets: Tensor, *, label_smoothing: float = 0.0,
    class_weights: Tensor | None = None,
) -> Tensor:
    """Cross-entropy against soft targets ``(N, C)`` with optional smoothing and class weights."""
    n_classes = logits.shape[1]
    if label_smoothing > 0:
        targets = targets * (1 - label_smoothing) + label_smoothing / n_classes
    per_sample = -(targets * F.log_softmax(logits.float(), dim=1)).sum(1)
    if class_weights is None:
        return per_sample.mean()
    w = targets @ class_weights
    return (per_sample * w).sum() / w.sum()


def _batches(batch_size: int, order: Tensor) -> list[Tensor]:
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:  # BatchNorm needs at least two samples
        chunks.pop()
    return chunks


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    *,
    augment: BatchAugment,
    batch_size: int,
    amp_dtype: torch.dtype | None,
    generator: torch.Generator,
    sample_weights: Tensor | None = None,
    class_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
    grad_clip: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    distill: Distillation | None = None,
    channels_last: bool = True,
    epoch: int = 0,
    progress: bool = True,
    max_batches: int | None = None,
    views: Tensor | None = None,
    view_p: float = 0.0,
    teacher_views: TeacherViews | None = None,
    ema: WeightAverage | None = None,
    order_generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Train ``model`` for one pass over ``images`` (uint8, on the training device).

    Args:
        sample_weights: per-sample weights for balanced sampling with replacement; ``None``
            draws a random permutation.
        class_weights: per-class loss weights (class-weighted loss).
        max_batches: stop early (smoke tests and benchmarks).
        progress: show a per-batch bar when stderr is a terminal.
        views: another view of each image (e.g. the served alignment), the same shape as
            ``images``; each sample is swapped for its view with probability ``view_p``.
        teacher_views: stored views of ``images`` with the teacher's logits; each sample is
            one of them, drawn at random, instead of a fresh ``augment`` view, and ``distill``
            (whose ``teacher`` may then be ``None``) uses the stored logits.
        ema: a weight average updated after every optimizer step.
        order_generator: draws the epoch's order (default ``generator``). Under DDP it must be
            seeded alike on every rank, so that all ranks shard one and the same order.
        rank, world_size: train on this rank's shard of the order (:func:`~training.distributed.shard`);
            ``model`` is then the ``DistributedDataParallel`` wrapper.

    Returns:
        mean loss, training accuracy (against the un-mixed labels), images/s and the last lr.
    """
    model.train()
    device = images.device
    cfg: ModelCfg = unwrap(model).cfg
    n = images.shape[0]
    if teacher_views is not None and (views is not None or teacher_views.images.shape[1] != n):
        raise ValueError("teacher_views replace augment and views: pass views=None, and views "
                         f"of all {n} images (got {teacher_views.images.shape[1]})")
    order_gen = order_generator if order_generator is not None else generator
    if sample_weights is not None:
        order = torch.multinomial(sample_weights, n, replacement=True, generator=order_gen)
    else:
        order = torch.randperm(n, generator=order_gen)
    batches = _batches(batch_size, shard(order, rank, world_size))
    if max_batches is not None:
        batches = batches[:max_batches]
    total_loss, total_correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    # disable=None: draw the bar only on a terminal, so nohup logs keep just the epoch lines.
    bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=None if progress else True,
               unit="batch")
    for idx in bar:
        idx = idx.to(device)
        y = labels[idx]
        teacher_logits = None
        if teacher_views is not None:
            pixels, teacher_logits = teacher_views.draw(idx, generator)
            x = standardize(pixels.float().div_(255.0), cfg)
            targets = F.one_hot(y, cfg.num_classes).to(x.dtype)
        else:
            x = images[idx] if views is None else mix_views(images[idx], views[idx], view_p,
                                                            generator)
            x, targets = augment(normalize(x, cfg), y, generator=generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x)
            loss = soft_cross_entropy(
                logits, targets, label_smoothing=label_smoothing, class_weights=class_weights
            )
            if distill is not None:
                loss = _distill_loss(loss, logits, x, distill, teacher_logits)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if ema is not None:
            ema.update(unwrap(model))
        bs = len(idx)
        seen += bs
        total_loss += loss.item() * bs
        total_correct += int((logits.argmax(1) == y).sum())
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{total_correct / seen:.3f}",
                        img_s=f"{seen / max(elapsed, 1e-9):.0f}")
    elapsed = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(seen, 1),
        "train_acc": total_correct / max(seen, 1),
        "images_per_s": seen / max(elapsed, 1e-9),
        "lr": optimizer.param_groups[0]["lr"],
        "epoch_time_s": elapsed,
    }


def soft_target_kl(logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))``, batch mean, in float32.

    The distillation term (callers scale it by ``T^2``); also the frontaliser's expression term.
    """
    t = temperature
    return F.kl_div(
        F.log_softmax(logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
        reduction="batchmean", log_target=True,
    )


def _distill_loss(
    hard_loss: Tensor, logits: Tensor, x: Tensor, distill: Distillation,
    teacher_logits: Tensor | None = None,
) -> Tensor:
    t = distill.temperature
    if teacher_logits is None:
        if distill.teacher is None:
            raise ValueError("distillation without a teacher needs precomputed teacher logits")
        with torch.no_grad():
            teacher_logits = distill.teacher(x)
    kl = soft_target_kl(logits, teacher_logits, t)
    return (1 - distill.alpha) * hard_loss + distill.alpha * t * t * kl


def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    tta: bool = False,
    batch_size: int = 256,
    amp_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Accuracy and mean NLL of ``model`` on uint8 ``images`` with integer ``labels``."""
    probs = predict_probs(model, images, tta=tta, batch_size=batch_size, amp_dtype=amp_dtype)
    labels = labels.cpu()
    nll = F.nll_loss(probs.clamp_min(1e-8).log(), labels).item() if len(labels) else float("nan")
    acc = (probs.argmax(1) == labels).float().mean().item() if len(labels) else float("nan")
    return EvalResult(probs=probs, labels=labels, loss=nll, accuracy=acc)
