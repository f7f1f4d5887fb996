"""d_step/g_step: finite named losses, only the intended parameters move, no state on self."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

from training.gan.losses import LossWeights
from training.gan.recipe import GENERATION, RECONSTRUCTION, GanBatch, GanNets, GanRecipe


def _recipe(nets: GanNets, **kw: object) -> GanRecipe:
    opt_g = torch.optim.Adam([*nets.encoder.parameters(), *nets.decoder.parameters()], lr=1e-3)
    opt_d = torch.optim.Adam(nets.discriminator.parameters(), lr=1e-3)
    return GanRecipe(nets, opt_g=opt_g, opt_d=opt_d, weights=LossWeights(), **kw)


def _batch(path: str, *, codes: bool = True) -> GanBatch:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
    src = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
    ids = torch.tensor([0, 1, 2, 3])
    return GanBatch(path, real=x, real_pose=torch.tensor([0, 1, 2, 0]), real_id=ids,
                    source=src if codes else None, source_id=ids if codes else None,
                    target_pose=torch.tensor([0, 0, 1, 2]))


def _snapshot(m: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def _moved(m: nn.Module, before: list[Tensor]) -> bool:
    return any(not torch.equal(p, b) for p, b in zip(m.parameters(), before, strict=True))


def test_d_step_updates_only_d(tiny_nets: GanNets) -> None:
    recipe = _recipe(tiny_nets)
    before = {k: _snapshot(getattr(tiny_nets, k)) for k in ("encoder", "decoder", "discriminator")}
    for path in (GENERATION, RECONSTRUCTION):
        losses = recipe.d_step(_batch(path))
        assert {"d_loss", "d_adv", "d_pose", "d_id", "d_real", "d_fake"} <= losses.keys()
        assert all(isinstance(v, float) and torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert _moved(tiny_nets.discriminator, before["discriminator"])
    assert not _moved(tiny_nets.encoder, before["encoder"])
    assert not _moved(tiny_nets.decoder, before["decoder"])


@pytest.mark.parametrize(("path", "codes", "dec_on_rec", "enc_moves", "dec_moves"), [
    (GENERATION, True, False, False, True),
    (GENERATION, False, False, False, True),
    (RECONSTRUCTION, True, False, True, False),
    (RECONSTRUCTION, True, True, True, True),
])
def test_g_step_updates_the_paths_networks(tiny_nets: GanNets, path: str, codes: bool, dec_on_rec: bool,
                                           enc_moves: bool, dec_moves: bool) -> None:
    recipe = _recipe(tiny_nets, train_decoder_on_reconstruction=dec_on_rec)
    before = {k: _snapshot(getattr(tiny_nets, k)) for k in ("encoder", "decoder", "discriminator")}
    losses = recipe.g_step(_batch(path, codes=codes))
    expected = {"g_loss", "g_adv", "g_pose"} | ({"g_id"} if codes else set())
    expected |= {"g_l1"} if path == RECONSTRUCTION else set()
    assert set(losses) == expected
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert not _moved(tiny_nets.discriminator, before["discriminator"])
    assert _moved(tiny_nets.encoder, before["encoder"]) is enc_moves
    assert _moved(tiny_nets.decoder, before["decoder"]) is dec_moves
    assert all(p.requires_grad for m in dataclasses.astuple(tiny_nets) for p in m.parameters())


def test_recipe_keeps_no_tensors_between_steps(tiny_nets: GanNets) -> None:
    recipe = _recipe(tiny_nets)
    for path in (GENERATION, RECONSTRUCTION):
        recipe.d_step(_batch(path))
        recipe.g_step(_batch(path))
    for name, value in vars(recipe).items():
        assert not isinstance(value, Tensor), name
        if isinstance(value, (list, tuple, dict)):
            items = value.values() if isinstance(value, dict) else value
            assert not any(isinstance(v, Tensor) for v in items), name


def test_batch_validation() -> None:
    x = torch.zeros(2, 1, 32, 32)
    with pytest.raises(ValueError, match="reconstruction path needs"):
        GanBatch(RECONSTRUCTION, real=x, real_pose=torch.zeros(2, dtype=torch.long),
                 real_id=torch.zeros(2, dtype=torch.long), source=None, source_id=None,
                 target_pose=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown path"):
        GanBatch("other", real=x, real_pose=x, real_id=x, source=x, source_id=x, target_pose=x)  # type: ignore[arg-type]
