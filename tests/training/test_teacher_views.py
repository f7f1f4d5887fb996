"""Stored teacher views (``--teacher-views``): exact targets, determinism, resume, cache keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from facemodels.models import create_model
from facemodels.models.cfg import ModelCfg
from facemodels.preprocess import standardize
from tests.support import synthetic_face
from training.data.transforms import BatchAugment
from training.engine import Distillation, train_one_epoch
from training.teacher_views import (
    TeacherViews,
    TeacherViewsError,
    build_teacher_views,
    teacher_views_dir,
)

N = 24


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    rng = np.random.default_rng(3)
    return torch.from_numpy(np.stack([synthetic_face(i % 7, rng) for i in range(N)]))


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("compact_resnet").eval()


def _augment(teacher: torch.nn.Module, **kw: object) -> BatchAugment:
    return BatchAugment(teacher.cfg, **kw)  # type: ignore[arg-type]


def _build(teacher: torch.nn.Module, faces: torch.Tensor, cache: Path, k: int = 2, **kw: object):
    augment = kw.pop("augment", None) or _augment(teacher)
    return build_teacher_views(teacher, faces, augment, num_views=k, cache_dir=cache,
                               batch_size=10, **kw)  # type: ignore[arg-type]


class LinearStudent(torch.nn.Module):
    """A BatchNorm- and dropout-free classifier, so train mode computes what eval mode does."""

    def __init__(self, cfg: ModelCfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.fc = torch.nn.Linear(cfg.in_chans * cfg.input_size ** 2, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_stored_logits_are_the_teachers_on_the_stored_pixels(teacher, faces, tmp_path) -> None:
    views = _build(teacher, faces, tmp_path)
    size = teacher.cfg.input_size
    assert views.images.shape == (2, N, 1, size, size) and views.images.dtype == torch.uint8
    assert views.logits.shape == (2, N, 7)
    for v in range(2):
        with torch.no_grad():
            expected = teacher(standardize(views.images[v].float() / 255.0, teacher.cfg))
        torch.testing.assert_close(views.logits[v], expected, atol=1e-4, rtol=1e-4)


def test_views_differ_from_each_other_and_rebuild_identically(teacher, faces, tmp_path) -> None:
    first = _build(teacher, faces, tmp_path / "a")
    again = _build(teacher, faces, tmp_path / "b")
    assert not torch.equal(first.images[0], first.images[1])
    assert torch.equal(first.images, again.images)
    assert torch.equal(first.logits, again.logits)


def test_a_longer_build_keeps_stored_views_and_adds_the_missing_ones(teacher, faces, tmp_path) -> None:
    one = _build(teacher, faces, tmp_path, k=1)
    (folder,) = tmp_path.iterdir()
    stamp = (folder / "view-0.safetensors").stat().st_mtime_ns
    three = _build(teacher, faces, tmp_path, k=3)
    assert (folder / "view-0.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in folder.iterdir()) == [f"view-{v}.safetensors" for v in range(3)]
    assert torch.equal(three.images[0], one.images[0])


def test_cache_key_follows_teacher_data_augmentation_and_seed(teacher, faces, tmp_path) -> None:
    augment = _augment(teacher)

    def key(**kw: object) -> Path:
        args = {"teacher": teacher, "images": faces, "augment": augment, "aligned": None,
                "aligned_p": 0.0, "seed": 0, "batch_size": 256, "amp_dtype": None, **kw}
        return teacher_views_dir(tmp_path, **args)  # type: ignore[arg-type]

    other_teacher = create_model("compact_resnet").eval()
    brighter = faces.clone()
    brighter[0, 0, 0] ^= 1
    base = key()
    assert key() == base
    assert key(aligned=faces, aligned_p=0.5) != key(aligned=faces, aligned_p=0.6)
    assert key(aligned=faces, aligned_p=0.5) != key(aligned=brighter, aligned_p=0.5)
    for changed in (key(teacher=other_teacher), key(images=brighter), key(seed=1),
                    key(augment=dataclasses.replace(augment, flip=0.0)), key(batch_size=64),
                    key(amp_dtype=torch.bfloat16), key(aligned=faces),
                    key(teacher=LinearStudent(teacher.cfg))):
        assert changed != base


def test_aligned_views_are_swapped_in_before_augmenting(teacher, faces, tmp_path) -> None:
    black = torch.zeros_like(faces)
    plain = _augment(teacher, erase_p=0.0)
    swapped = _build(teacher, faces, tmp_path / "all", augment=plain, aligned=black, aligned_p=1.0)
    kept = _build(teacher, faces, tmp_path / "none", augment=plain, aligned=black, aligned_p=0.0)
    assert swapped.images.max() == 0
    assert kept.images.float().mean() > 50


def test_draw_returns_a_stored_view_of_each_face_with_its_logits(teacher, faces, tmp_path) -> None:
    views = _build(teacher, faces, tmp_path, k=3)
    idx = torch.tensor([5, 0, 5, 23, 11])
    g = torch.Generator().manual_seed(0)
    drawn = [views.draw(idx, g) for _ in range(8)]
    used = set()
    for pixels, logits in drawn:
        for j, i in enumerate(idx.tolist()):
            matches = [v for v in range(3) if torch.equal(views.images[v, i], pixels[j])]
            assert matches, f"face {i} got pixels that are none of its stored views"
            assert torch.equal(logits[j], views.logits[matches[0], i])
            used.update(matches)
    assert used == {0, 1, 2}


def test_a_corrupt_view_file_is_named(teacher, faces, tmp_path) -> None:
    _build(teacher, faces, tmp_path, k=1)
    (path,) = tmp_path.glob("*/view-0.safetensors")
    path.write_bytes(b"not safetensors")
    with pytest.raises(TeacherViewsError, match=str(path)):
        _build(teacher, faces, tmp_path, k=1)


def test_mixing_augmentations_are_refused(teacher, faces, tmp_path) -> None:
    with pytest.raises(ValueError, match="mixup or cutmix"):
        _build(teacher, faces, tmp_path, augment=_augment(teacher, mixup_alpha=0.2))


@pytest.mark.parametrize("paired", [True, False])
def test_training_pairs_each_stored_view_with_its_own_logits(faces, tmp_path, paired) -> None:
    """Pure distillation (alpha 1) of a student onto its own logits is zero loss only if the
    engine feeds each stored view together with the logits taken on it."""
    torch.manual_seed(0)
    student = LinearStudent(ModelCfg())
    views = _build(student, faces, tmp_path, k=3, augment=_augment(student))
    logits = views.logits if paired else views.logits.roll(1, dims=1)  # neighbour's targets
    stats = train_one_epoch(
        student, torch.optim.SGD(student.parameters(), lr=0.1), faces,
        torch.arange(N) % 7, augment=_augment(student), batch_size=8, amp_dtype=None,
        generator=torch.Generator().manual_seed(1), channels_last=False, progress=False,
        distill=Distillation(None, alpha=1.0, temperature=1.0),
        teacher_views=TeacherViews(views.images, logits, views.folder),
    )
    if paired:
        assert stats["train_loss"] < 1e-6
    else:
        assert stats["train_loss"] > 1e-3
