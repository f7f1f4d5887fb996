"""Parameter / multiply-add counting, latency timing, and the compact models' budgets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from facemodels.models import ModelCfg, create_model, list_models
from facemodels.models.complexity import count_flops, count_macs, count_params, measure_latency

COMPACT = [n for n in list_models(include_ensemble=False) if n.startswith("compact")]
# Every compact model is a candidate for the shipped default, which must stay cheap beside the
# detector: at most 12M parameters and 0.6 GFLOPs a face (FLOPs = 2 * MACs).
MAX_PARAMS = 12_000_000
MAX_GFLOPS = 0.6


def test_counts_on_a_known_model() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    assert count_params(model) == (4 * 9 + 4) + (256 * 10 + 10)
    macs = 8 * 8 * 4 * 9 + 256 * 10
    assert count_macs(model, (1, 1, 8, 8)) == macs
    assert count_macs(model, (3, 1, 8, 8)) == 3 * macs
    assert count_flops(model, (1, 1, 8, 8)) == 2 * macs


def test_count_params_trainable_only() -> None:
    model = nn.Linear(4, 2)
    model.bias.requires_grad_(False)
    assert count_params(model) == 10
    assert count_params(model, trainable_only=True) == 8


def test_count_macs_keeps_training_mode() -> None:
    model = create_model("compact_resnet_s").train()
    assert count_macs(model) > 0
    assert model.training


def test_compact_models_exist() -> None:
    assert "compact_resnet" in COMPACT


@pytest.mark.parametrize("name", COMPACT)
def test_compact_model_budget(name: str) -> None:
    model = create_model(name)
    assert model.cfg == ModelCfg()
    assert count_params(model) <= MAX_PARAMS
    assert count_flops(model) / 1e9 <= MAX_GFLOPS


def test_measure_latency_returns_ms_per_face() -> None:
    model = create_model("compact_resnet_s")
    ms = measure_latency(model, 2, repeats=2, warmup=1, channels_last=True)
    assert 0 < ms < 10_000
    with torch.no_grad():
        assert model(torch.randn(1, 1, 44, 44)).shape == (1, 7)
