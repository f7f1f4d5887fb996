"""G_enc, G_dec, D shapes; the pose code matters; the registered frontalizer and its checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facemodels.checkpoint import load_checkpoint, save_checkpoint
from facemodels.frontalizer.model import default_cfg, frontalize_faces, to_uint8
from facemodels.models import create_model, list_models
from training.gan.networks import Decoder, Discriminator, Encoder
from training.gan.recipe import GanNets
from training.gan.train import inference_model


def test_shapes(tiny_nets: GanNets) -> None:
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    f = tiny_nets.encoder(x)
    assert f.shape == (3, 16) and f.abs().max() <= 1
    y = tiny_nets.decoder(f, torch.tensor([0, 1, 2]), torch.randn(3, 4))
    assert y.shape == (3, 1, 32, 32) and y.abs().max() <= 1
    out = tiny_nets.discriminator(y)
    assert out.critic.shape == (3,) and out.pose.shape == (3, 3) and out.identity.shape == (3, 5)
    with pytest.raises(ValueError, match="multiple of 16"):
        Encoder(image_size=40)


def test_decoder_responds_to_pose_code() -> None:
    """The pose code reaches the output: the decoder can learn one image per pose for one code."""
    torch.manual_seed(0)
    dec = Decoder(width=8, feat_dim=16, noise_dim=4, image_size=32)
    pose = torch.eye(3)[[0]].requires_grad_()
    dec(torch.rand(2, 16), pose.expand(2, 3)).sum().backward()
    assert pose.grad is not None and pose.grad.abs().sum() > 0
    f = (torch.rand(1, 16) * 2 - 1).expand(6, 16)
    poses = torch.tensor([0, 1, 2, 0, 1, 2])
    target = (poses.float() - 1).mul(0.5).view(6, 1, 1, 1).expand(6, 1, 32, 32)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        (dec(f, poses) - target).abs().mean().backward()
        opt.step()
    with torch.no_grad():
        out = dec(f, poses).mean((1, 2, 3))
    assert out[1] - out[0] > 0.3 and out[2] - out[1] > 0.3
    assert torch.equal(dec(f[:2], torch.zeros(2, dtype=torch.long)), dec(f[:2], torch.eye(3)[[0, 0]]))


def test_frontalizer_is_registered_apart_from_classifiers() -> None:
    assert list_models(task="frontalize") == ["frontalizer"]
    assert "frontalizer" not in list_models()
    assert "frontalizer" in list_models(task=None)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("frontalizer", num_classes=7)


def test_checkpoint_roundtrip_and_inference_api(tiny_nets: GanNets, tmp_path: Path) -> None:
    wrapper = inference_model(tiny_nets, 32).eval()
    kwargs = {"width": 8, "feat_dim": 16, "noise_dim": 4, "d_width": 8}
    save_checkpoint(tmp_path / "g", wrapper, arch="frontalizer", model_kwargs=kwargs, half=True)
    model, card = load_checkpoint(tmp_path / "g")
    assert card["cfg"]["class_names"] == ["frontal", "left_profile", "right_profile"]
    assert model.cfg == default_cfg(32)
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert model.frontalize(x).shape == (4, 1, 32, 32)
        assert model.pose_logits(x).shape == (4, 3)
        ref = wrapper.frontalize(x)
        assert (model.frontalize(x) - ref).abs().max() < 0.05  # fp16 storage
    faces = torch.randint(0, 256, (5, 32, 32), dtype=torch.uint8)
    out = frontalize_faces(model, faces, out_size=48)
    assert out.shape == (5, 48, 48) and out.dtype == torch.uint8
    assert to_uint8(torch.ones(1, 1, 4, 4)).unique().tolist() == [255]


def test_default_generator_is_well_under_25mb_in_fp16() -> None:
    model = create_model("frontalizer", num_classes=3)
    assert model.cfg.image_size == 64
    n = sum(p.numel() for p in model.parameters())
    assert 2 * n < 20e6
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)
    assert Discriminator(num_identities=450).identity.out_features == 450
