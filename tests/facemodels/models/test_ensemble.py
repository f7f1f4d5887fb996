"""Soft-voting ensemble: voting maths, weight fitting and checkpoint round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facemodels.checkpoint import load_checkpoint, save_checkpoint
from facemodels.models import ModelCfg, create_model
from facemodels.models.ensemble import (
    SoftVotingEnsemble,
    ensemble_from_checkpoints,
    fit_ensemble_weights,
)

CFG = ModelCfg().to_dict()
SMALL = {"arch": "compact_resnet_s", "model_kwargs": {}, "cfg": CFG}


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 44, 44, generator=torch.Generator().manual_seed(1))


def _randomise_bn(model: torch.nn.Module) -> None:
    """Give BN layers non-trivial statistics and weights so members differ in eval mode."""
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def test_soft_voting_equals_weighted_mean_of_softmaxes() -> None:
    torch.manual_seed(0)
    ens = create_model("ensemble", members=[SMALL, {"arch": "cnn3", "cfg": CFG}],
                       weights=[1.0, 3.0]).eval()
    _randomise_bn(ens)
    assert isinstance(ens, SoftVotingEnsemble)
    assert ens.cfg == ModelCfg()
    assert torch.allclose(ens.member_weights, torch.tensor([0.25, 0.75]))
    x = _x()
    with torch.no_grad():
        out = ens(x)
        p0, p1 = (m(x).softmax(-1) for m in ens.members)
    expected = (0.25 * p0 + 0.75 * p1).log()
    assert out.shape == (3, 7)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out.softmax(-1), out.exp(), atol=1e-6)


def test_plain_average_without_weights() -> None:
    ens = create_model("ensemble", members=[SMALL, SMALL, SMALL]).eval()
    assert torch.allclose(ens.member_weights, torch.full((3,), 1 / 3))
    x = _x()
    with torch.no_grad():
        expected = torch.stack([m(x).softmax(-1) for m in ens.members]).mean(0).log()
        assert torch.allclose(ens(x), expected, atol=1e-6)


def test_ensemble_trains_and_runs_under_bf16_channels_last() -> None:
    ens = create_model("ensemble", members=[SMALL, SMALL]).train()
    ens(_x(2)).mean().backward()
    assert all(p.grad is not None for p in ens.parameters())
    ens.eval().to(memory_format=torch.channels_last)
    x = _x(2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ens(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_state_dict_layout() -> None:
    keys = create_model("ensemble", members=[SMALL, SMALL]).state_dict().keys()
    assert "member_weights" in keys
    assert any(k.startswith("members.0.") for k in keys)
    assert any(k.startswith("members.1.") for k in keys)


@pytest.mark.parametrize("better", [0, 1])
def test_fit_weights_prefers_the_better_member(better: int) -> None:
    g = torch.Generator().manual_seed(0)
    n, c = 400, 7
    labels = torch.randint(0, c, (n,), generator=g)
    perfect = torch.nn.functional.one_hot(labels, c).float() * 8.0
    noise = torch.randn(n, c, generator=g) * 3.0
    logits = [noise, noise]
    logits[better] = perfect
    probs = torch.stack([lg.softmax(-1) for lg in logits])
    weights = fit_ensemble_weights(probs, labels)
    assert weights.shape == (2,)
    assert (weights >= 0).all()
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert weights[better] > 0.8


def test_fit_weights_checks_shapes() -> None:
    with pytest.raises(ValueError, match="expected probs"):
        fit_ensemble_weights(torch.rand(2, 5, 7), torch.zeros(4, dtype=torch.long))


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    ens = create_model("ensemble", members=[SMALL, {"arch": "compact_resnet", "cfg": CFG}],
                       weights=[0.4, 0.6]).eval()
    _randomise_bn(ens)
    save_checkpoint(tmp_path / "ens", ens, arch="ensemble", model_kwargs=ens.model_kwargs)
    loaded, card = load_checkpoint(tmp_path / "ens")
    assert card["arch"] == "ensemble"
    assert isinstance(loaded, SoftVotingEnsemble)
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x), ens(x))
    assert torch.allclose(loaded.member_weights, torch.tensor([0.4, 0.6]))


def test_ensemble_from_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    paths = []
    for i in range(2):
        member = create_model("compact_resnet_s").eval()
        _randomise_bn(member)
        paths.append(save_checkpoint(tmp_path / f"m{i}", member, arch="compact_resnet_s"))
    ens = ensemble_from_checkpoints(paths, weights=[3.0, 1.0])
    assert not ens.training
    members = [load_checkpoint(p)[0] for p in paths]
    x = _x()
    with torch.no_grad():
        expected = (0.75 * members[0](x).softmax(-1) + 0.25 * members[1](x).softmax(-1)).log()
        assert torch.allclose(ens(x), expected, atol=1e-6)
    save_checkpoint(tmp_path / "ens", ens, arch="ensemble", model_kwargs=ens.model_kwargs)
    reloaded, _ = load_checkpoint(tmp_path / "ens")
    with torch.no_grad():
        assert torch.equal(reloaded(x), ens(x))


def test_members_with_different_cfgs_raise() -> None:
    other = ModelCfg(input_size=40).to_dict()
    with pytest.raises(ValueError, match="share one ModelCfg"):
        create_model("ensemble", members=[SMALL, {"arch": "compact_resnet_s", "cfg": other}])
    with pytest.raises(ValueError, match="differs"):
        create_model("ensemble", cfg=ModelCfg(input_size=40), members=[SMALL])


def test_bad_weights_and_empty_members_raise() -> None:
    with pytest.raises(ValueError, match="weights for"):
        create_model("ensemble", members=[SMALL, SMALL], weights=[1.0])
    with pytest.raises(ValueError, match="non-negative"):
        create_model("ensemble", members=[SMALL, SMALL], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="at least one member"):
        create_model("ensemble", members=[])
