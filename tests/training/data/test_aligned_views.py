"""Aligned training views: the swap in the trainer and the warp onto the FER template."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facemodels.face.align import FER_TEMPLATE_48
from training.data.aligned_views import align_views, mix_views


def _faces(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.zeros(n, 48, 48, dtype=torch.uint8)
    views = torch.full((n, 48, 48), 255, dtype=torch.uint8)
    return images, views


@pytest.mark.parametrize(("p", "expected"), [(0.0, 0), (1.0, 64)])
def test_mix_views_at_the_extremes(p: float, expected: int) -> None:
    images, views = _faces()
    out = mix_views(images, views, p, torch.Generator().manual_seed(0))
    swapped = (out == 255).flatten(1).all(1)
    assert int(swapped.sum()) == expected
    assert ((out == 0) | (out == 255)).all()


def test_mix_views_swaps_whole_samples_with_probability_p() -> None:
    images, views = _faces(2000)
    out = mix_views(images, views, 0.3, torch.Generator().manual_seed(1))
    whole = (out == 255).flatten(1).all(1) | (out == 0).flatten(1).all(1)
    assert whole.all(), "a sample was partly swapped"
    assert 0.25 < (out == 255).flatten(1).all(1).float().mean() < 0.35


def test_align_views_keeps_a_face_at_the_template_and_the_faces_without_landmarks() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    smooth = (127 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).astype(np.uint8)
    faces = np.stack([smooth, rng.integers(0, 256, (48, 48), dtype=np.uint8)])
    views = align_views(faces, [FER_TEMPLATE_48.copy(), None])
    assert views.shape == faces.shape and views.dtype == np.uint8
    # Landmarks already on the template: the warp is the identity up to resampling.
    assert np.abs(views[0].astype(int) - smooth.astype(int)).mean() < 2.0
    assert np.array_equal(views[1], faces[1])


def test_align_views_moves_off_template_landmarks_onto_it() -> None:
    yy, xx = np.mgrid[0:48, 0:48]
    face = (127 + 60 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).astype(np.uint8)
    shifted = np.roll(face, (3, -2), axis=(0, 1))  # content moved 3 px down, 2 px left
    view = align_views(shifted[None], [FER_TEMPLATE_48 + np.array([-2.0, 3.0])])[0]
    inner = (slice(6, 42), slice(6, 42))  # away from the rolled-over border
    assert np.abs(view[inner].astype(int) - face[inner].astype(int)).mean() < 3.0
    assert np.abs(shifted[inner].astype(int) - face[inner].astype(int)).mean() > 10.0
