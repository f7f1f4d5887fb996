"""Recompute BatchNorm running statistics exactly before an evaluation ("precise BN").

During training each BatchNorm layer keeps an exponential moving average of batch means and
variances (momentum 0.1) of augmented batches, computed under bf16 autocast when that is on, and
evaluation uses those averages. When the weights still move fast the averages lag behind them,
and evaluation can swing from epoch to epoch although training accuracy rises steadily.
Recomputing the statistics as a plain average over a fixed number of float32 forward passes of
training faces, in the served centre crop without augmentation, removes the lag.
``fer-train classify --bn-recalibrate N`` does so before every evaluation and logs the accuracy
with the old running statistics beside it. The two numbers differ by the lag *and* by the change
of input (augmented against plain crops, bf16 against float32): a large, steady gap says the
statistics matter, not which of the two made it.
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
            drawn without replacement.
        batches: how many forward passes of ``batch_size`` faces to average over (fewer when
            ``images`` has fewer full batches; a short last batch is not used).
        generator: draws the subset, for runs that must be reproducible.

    Returns:
        the number of BatchNorm layers recalibrated (0 leaves the model untouched: it has none
        in training use, or there is not one full batch of images).
    """
    # layers left in eval mode on purpose (a frozen backbone) keep their statistics
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             and (m.training or not model.training)]
    full = min(batches, len(images) // batch_size)  # equal-sized passes: each weighs the same
    if not norms or full <= 0:
        return 0
    cfg: ModelCfg = model.cfg
    device = next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    order = torch.randperm(len(images), generator=generator)[: full * batch_size]
    try:
        model.eval()  # dropout and everything else as in evaluation; only the norms learn
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # None: a cumulative (equal-weight) average over the passes
            m.train()
        for chunk in order.split(batch_size):
            x = eval_views(images[chunk.to(images.device)].to(device), cfg, tta=False)[0]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            model(x.float())
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for m, training in modes.items():
            m.train(training)
    return len(norms)
