"""Every registered (non-ensemble) architecture honours the builder contract."""

from __future__ import annotations

import pytest
import torch

from facemodels.models import ModelCfg, create_model, list_models

MODELS = list_models(include_ensemble=False)


def _input(cfg: ModelCfg, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, cfg.in_chans, cfg.input_size, cfg.input_size)


def test_zoo_lists_the_expected_architectures() -> None:
    expected = {"cnn3", "cnn5", "cnn7", "vgg19", "resnet18", "resnet34", "compact_resnet"}
    assert expected <= set(MODELS)
    assert "ensemble" in list_models() and "ensemble" not in MODELS


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).train()
    assert isinstance(model.cfg, ModelCfg)
    assert model.cfg == ModelCfg()
    out = model(_input(model.cfg))
    assert out.shape == (2, 7)
    out.logsumexp(dim=1).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_bf16_autocast(name: str) -> None:
    model = create_model(name).eval().to(memory_format=torch.channels_last)
    x = _input(model.cfg).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", MODELS)
def test_custom_cfg_is_respected(name: str) -> None:
    cfg = ModelCfg(image_size=48, input_size=40, in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                   class_names=("neg", "neu", "pos"))
    model = create_model(name, num_classes=3, cfg=cfg).eval()
    assert model.cfg is cfg
    with torch.no_grad():
        assert model(_input(cfg, batch=1)).shape == (1, 3)


@pytest.mark.parametrize("name", MODELS)
def test_num_classes_must_match_cfg(name: str) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_model(name, num_classes=5)


def test_unknown_model_lists_registered_names() -> None:
    with pytest.raises(KeyError) as info:
        create_model("no_such_net")
    message = str(info.value)
    assert "no_such_net" in message
    for name in MODELS:
        assert name in message
