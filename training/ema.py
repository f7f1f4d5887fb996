"""Exponential moving average (EMA) of a model's weights, for ``fer-train classify --ema``.

The average covers every floating-point entry of the state dict (weights and BatchNorm running
statistics); integer buffers such as ``num_batches_tracked`` are copied. The effective decay
ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the average follows the
model closely at first (the usual warm-up; it matters when starting from random weights).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """An EMA copy of ``model`` (``.module``), updated after each optimizer step.

    Args:
        model: the model being trained; it is deep-copied, so later changes do not leak in.
        decay: the EMA decay per update, in [0, 1). 0.999 averages over about 1,000 steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses (after the warm-up ramp)."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights."""
        d = self.current_decay()
        avg_state, new_state = self.module.state_dict(), model.state_dict()
        floats_avg, floats_new = [], []
        for name, avg in avg_state.items():
            new = new_state[name]
            if avg.dtype.is_floating_point:
                floats_avg.append(avg)
                floats_new.append(new.detach().to(avg.dtype))
            else:
                avg.copy_(new)
        if floats_avg:
            torch._foreach_lerp_(floats_avg, floats_new, 1.0 - d)
        self.num_updates += 1
