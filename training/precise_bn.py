"""Recompute BatchNorm running statistics exactly before an evaluation ("precise BN").

During training each BatchNorm layer keeps an exponential moving average of batch means and
variances (momentum 0.1), computed under bf16 autocast when that is on, and evaluation uses
those averages. When the weights still move fast, or the averages are biased, evaluation can
swing from epoch to epoch although training accuracy rises steadily. Recomputing the statistics
as a plain average over a fixed number of float32 forward passes of training faces (the served
centre crop, no augmentation) removes that source of noise; ``fer-train classify
--bn-recalibrate N`` does so before every evaluation and logs the accuracy with the old running
statistics beside it, so a run shows whether they mattered.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from facemodels.models.cfg import ModelCfg
from facemodels.preprocess import eval_views

__all__ = ["recalibrate_batchnorm"]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    images: Tensor,
    *,
    batches: int,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
    channels_last: bool = True,
) -> int:
    """Reset every BatchNorm layer's running statistics and re-estimate them in float32.

    Args:
        model: a model with ``.cfg``; its mode is restored afterwards.
        images: uint8 training faces ``(N, C, H, W)``; ``batches * batch_size`` of them are
            drawn without replacement (all of them if fewer).
        batches: how many forward passes to average over.
        generator: draws the subset, for runs that must be reproducible.

    Returns:
        the number of BatchNorm layers recalibrated (0 leaves the model untouched).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches <= 0 or len(images) == 0:
        return 0
    cfg: ModelCfg = model.cfg
    device = next(model.parameters()).device
    momenta = [m.momentum for m in norms]
    was_training = model.training
    order = torch.randperm(len(images), generator=generator)[: batches * batch_size]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # None: a cumulative (equal-weight) average over the passes
        model.train()
        for chunk in order.split(batch_size):
            x = eval_views(images[chunk.to(images.device)].to(device), cfg, tta=False)[0]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            model(x.float())
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)
