"""Helpers shared by tests (import as ``tests.support``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from facemodels.classes import FER_CLASSES

REPO = Path(__file__).resolve().parents[1]

__all__ = ["REPO", "require_shared", "shared_data_root", "synthetic_face"]


def shared_data_root() -> Path:
    """``../shared/data`` beside the checkout, or ``$FER_SHARED_DATA``."""
    return Path(os.environ.get("FER_SHARED_DATA", REPO.parent / "shared" / "data"))


def require_shared(name: str) -> Path:
    """Path of a shared dataset folder, or skip the test saying why."""
    path = shared_data_root() / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {path} is absent (set FER_SHARED_DATA to its parent)")
    return path


def synthetic_face(label: int, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A uint8 image whose class is learnable: a bright blob at a class-specific spot."""
    img = rng.normal(110, 20, (size, size)).clip(0, 255)
    angle = 2 * np.pi * label / len(FER_CLASSES)
    cy, cx = size / 2 + 12 * np.sin(angle), size / 2 + 12 * np.cos(angle)
    yy, xx = np.mgrid[:size, :size]
    img += 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 5.0**2))
    return img.clip(0, 255).astype(np.uint8)
