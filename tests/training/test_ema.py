"""The weight average behind ``fer-train classify --ema``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.ema import WeightAverage


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_average_follows_the_closed_form_and_copies_integer_buffers() -> None:
    model = _net()
    ema = WeightAverage(model, decay=0.5)
    start = model[0].weight.detach().clone()
    decays = []
    for step in range(1, 4):
        decays.append(ema.current_decay())
        with torch.no_grad():
            model[0].weight.fill_(float(step))
        model[1].num_batches_tracked += 1
        ema.update(model)
    expected = start
    for step, d in enumerate(decays, start=1):
        expected = d * expected + (1 - d) * step
    assert decays == [0.1, 2 / 11, 3 / 12]  # the warm-up ramp, all below 0.5
    assert torch.allclose(ema.module[0].weight, expected)
    assert int(ema.module[1].num_batches_tracked) == 3
    assert ema.num_updates == 3


def test_average_is_a_separate_frozen_copy() -> None:
    model = _net()
    ema = WeightAverage(model, decay=0.99)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.allclose(ema.module[0].weight, model[0].weight)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_bad_decay_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(_net(), decay)
