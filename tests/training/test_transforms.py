"""The shared tensor transforms: normalisation, 10-crop geometry, batched augmentation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from facemodels.models.cfg import ModelCfg
from facemodels.preprocess import center_crop, crop_boxes_10, eval_views, normalize, ten_crop
from training.data.transforms import BatchAugment

CFG = ModelCfg()


def test_normalize_scales_gray_and_converts_rgb() -> None:
    gray = torch.full((2, 48, 48), 128, dtype=torch.uint8)
    x = normalize(gray, CFG)
    assert x.shape == (2, 1, 48, 48)
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.25), atol=1e-6)
    rgb = torch.zeros(1, 3, 96, 96, dtype=torch.uint8)
    rgb[:, 1] = 255  # pure green -> luma 0.587, resized to 48
    y = normalize(rgb, CFG)
    assert y.shape == (1, 1, 48, 48)
    assert torch.allclose(y, torch.full_like(y, (0.587 - 0.5) / 0.25), atol=1e-5)


def test_ten_crop_geometry_corners_centre_and_mirrors() -> None:
    x = torch.arange(48 * 48, dtype=torch.float32).view(1, 1, 48, 48)
    views = ten_crop(x, 44)
    assert views.shape == (10, 1, 1, 44, 44)
    boxes = crop_boxes_10(48, 44)
    assert boxes[:5] == [(0, 0, False), (0, 4, False), (4, 0, False), (4, 4, False), (2, 2, False)]
    assert [b[2] for b in boxes[5:]] == [True] * 5
    # top-left pixel of each unmirrored view is the pixel at (top, left) of the image
    for v, (top, left, _) in zip(views[:5], boxes[:5], strict=True):
        assert v[0, 0, 0, 0] == x[0, 0, top, left]
    # mirrored views are exact horizontal flips of their partners
    assert torch.equal(views[5:], views[:5].flip(-1))
    assert torch.equal(views[4], center_crop(x, 44))


def test_eval_views_shapes() -> None:
    imgs = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    assert eval_views(imgs, CFG, tta=False).shape == (1, 3, 1, 44, 44)
    assert eval_views(imgs, CFG, tta=True).shape == (10, 3, 1, 44, 44)


def test_ten_crop_rejects_oversized_crop() -> None:
    with pytest.raises(ValueError, match="larger"):
        crop_boxes_10(48, 50)


def test_identity_augment_is_a_centre_crop() -> None:
    aug = BatchAugment(CFG, flip=0.0, max_rotate=0.0, scale=(1.0, 1.0), erase_p=0.0)
    x = normalize(torch.randint(0, 256, (4, 48, 48), dtype=torch.uint8), CFG)
    g = torch.Generator().manual_seed(0)
    out = aug.geometric(x, generator=g)
    assert out.shape == (4, 1, 44, 44)
    # with zero rotation/zoom the window is a pure translation inside the 48x48 image:
    # each output must match some 44x44 crop, up to bilinear sub-pixel blur.
    best = min(
        (out[0] - x[0, :, t : t + 44, left : left + 44]).abs().mean().item()
        for t in range(5) for left in range(5)
    )
    assert best < (x.std().item() * 0.9)


def test_flip_only_augment_mirrors_the_crop() -> None:
    cfg = dataclasses.replace(CFG, input_size=48)
    x = normalize(torch.randint(0, 256, (2, 48, 48), dtype=torch.uint8), cfg)
    aug = BatchAugment(cfg, flip=1.0, max_rotate=0.0, scale=(1.0, 1.0), erase_p=0.0)
    out = aug.geometric(x, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x.flip(-1), atol=1e-4)


def test_augment_returns_soft_targets_and_mixes() -> None:
    aug = BatchAugment(CFG, mixup_alpha=1.0, mix_p=1.0)
    x = normalize(torch.randint(0, 256, (8, 48, 48), dtype=torch.uint8), CFG)
    y = torch.arange(8) % 7
    g = torch.Generator().manual_seed(1)
    out, targets = aug(x, y, generator=g)
    assert out.shape == (8, 1, 44, 44)
    assert targets.shape == (8, 7)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    assert (targets.max(1).values < 1).any()  # mixed, not one-hot


def test_random_erasing_changes_a_rectangle() -> None:
    aug = BatchAugment(CFG, erase_p=1.0, erase_area=(0.1, 0.1))
    x = torch.zeros(4, 1, 44, 44)
    out = aug.erase(x, generator=torch.Generator().manual_seed(0))
    changed = (out != 0).float().mean(dim=(1, 2, 3))
    assert ((changed > 0.05) & (changed < 0.2)).all()


def test_augment_is_deterministic_under_a_seed() -> None:
    aug = BatchAugment(CFG, mixup_alpha=0.4, cutmix_alpha=1.0)
    x = normalize(torch.randint(0, 256, (6, 48, 48), dtype=torch.uint8), CFG)
    y = torch.arange(6)
    a = aug(x, y, generator=torch.Generator().manual_seed(3))
    b = aug(x, y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
