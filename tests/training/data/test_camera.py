"""Camera augmentation: each degradation does what it says, on real pixel statistics."""

from __future__ import annotations

import pytest
import torch

from facemodels.models.cfg import ModelCfg
from facemodels.preprocess import normalize
from training.data.camera import CameraAugment
from training.data.transforms import BatchAugment


def _faces(n: int = 16, seed: int = 0) -> torch.Tensor:
    """Textured test images in [0, 1]: a smooth gradient plus fine checkerboard detail."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 48), indexing="ij")
    checker = ((torch.arange(48)[:, None] + torch.arange(48)[None]) % 2).float()
    base = 0.25 + 0.4 * (yy + xx) / 2 + 0.15 * checker
    jitter = torch.rand(n, 1, 1, 1, generator=g) * 0.1
    return (base[None, None] + jitter).clamp(0, 1)


def _detail(x: torch.Tensor) -> torch.Tensor:
    """Per-image high-frequency energy (mean absolute horizontal difference)."""
    return (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))


def test_off_is_the_identity_and_p_is_checked() -> None:
    x = _faces()
    assert torch.equal(CameraAugment(p=0.0)(x), x)
    with pytest.raises(ValueError, match="probability"):
        CameraAugment(p=1.5)


def test_resample_and_blur_remove_fine_detail() -> None:
    x = _faces()
    aug = CameraAugment(p=1.0)
    everyone = torch.ones(len(x), dtype=torch.bool)
    for step in (aug.resample, aug.blur):
        out = step(x, everyone, generator=torch.Generator().manual_seed(1))
        assert out.shape == x.shape
        assert (_detail(out) < 0.7 * _detail(x)).all(), step.__name__
        assert torch.allclose(out.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=0.03)


def test_only_picked_images_change() -> None:
    x = _faces()
    pick = torch.zeros(len(x), dtype=torch.bool)
    pick[::2] = True
    out = CameraAugment(p=1.0).blur(x, pick, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[1::2], x[1::2])
    assert not torch.equal(out[::2], x[::2])


def test_tone_gamma_darkens_and_contrast_scales_spread() -> None:
    x = _faces()
    none = torch.zeros(len(x), dtype=torch.bool)
    allp = ~none
    dark = CameraAugment(gamma=(1.5, 1.5)).tone(x, allp, none)
    assert (dark.mean((1, 2, 3)) < x.mean((1, 2, 3)) - 0.05).all()
    flat = CameraAugment(contrast=(0.5, 0.5)).tone(x, none, allp)
    assert torch.allclose(flat.std((1, 2, 3)), 0.5 * x.std((1, 2, 3)), rtol=1e-3)
    assert torch.allclose(flat.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-5)


def test_noise_and_jpeg_keep_range_and_change_pixels() -> None:
    x = _faces()
    allp = torch.ones(len(x), dtype=torch.bool)
    aug = CameraAugment(noise_std=(0.05, 0.05), jpeg_quality=(10, 10))
    noisy = aug.noise(x, allp, generator=torch.Generator().manual_seed(0))
    assert 0.03 < (noisy - x).std().item() < 0.06
    jpg = aug.jpeg(x, allp, generator=torch.Generator().manual_seed(0))
    assert jpg.min() >= 0.0 and jpg.max() <= 1.0
    assert (jpg - x).abs().mean() > 0.01  # quality 10 visibly changes a checkerboard
    assert torch.allclose(jpg.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=0.03)


def test_batch_augment_applies_it_in_pixel_space_and_is_seeded() -> None:
    cfg = ModelCfg()
    images = (_faces() * 255).round().to(torch.uint8)[:, 0]
    x = normalize(images, cfg)
    y = torch.zeros(len(x), dtype=torch.long)
    plain = BatchAugment(cfg, flip=0.0, max_rotate=0.0, scale=(1.0, 1.0), erase_p=0.0)
    camera = BatchAugment(cfg, flip=0.0, max_rotate=0.0, scale=(1.0, 1.0), erase_p=0.0,
                          camera=CameraAugment(p=1.0))

    def run(aug: BatchAugment, seed: int) -> torch.Tensor:
        return aug(x, y, generator=torch.Generator().manual_seed(seed))[0]

    assert torch.equal(run(camera, 3), run(camera, 3))
    degraded, reference = run(camera, 3), run(plain, 3)
    assert degraded.shape == reference.shape
    assert not torch.allclose(degraded, reference, atol=0.05)
    back = degraded * cfg.std[0] + cfg.mean[0]  # still a valid image after the round trip
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5
