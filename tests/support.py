"""Helpers shared by tests (import as ``tests.support``)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from facemodels.classes import FER_CLASSES

REPO = Path(__file__).resolve().parents[1]

__all__ = ["REPO", "SMALL_FACE_SPOTS", "close_up_photo", "require_shared", "shared_data_root",
           "small_faces_photo", "synthetic_face"]

#: The fixture photo's face (72 px tall) with as much context again: rows 2-146, cols 68-212.
_FACE_PATCH = (slice(2, 146), slice(68, 212))
#: Where :func:`small_faces_photo` puts its faces (top-left corners of their patches).
SMALL_FACE_SPOTS = ((100, 100), (500, 300), (900, 150), (300, 500), (1000, 500))


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


def close_up_photo(face_image: np.ndarray) -> np.ndarray:
    """From the fixture photo (``face_image``): a 640x640 close-up whose face is about 240 px tall
    (0.37 of the long side)."""
    return cv2.resize(face_image[0:200, 40:240], (640, 640), interpolation=cv2.INTER_CUBIC)


def small_faces_photo(face_image: np.ndarray, face_height: int = 64) -> np.ndarray:
    """From the fixture photo: a 1280x720 frame with its face pasted at :data:`SMALL_FACE_SPOTS`,
    about ``face_height`` px tall. At 64 px RetinaFace finds all five at a long side of 640
    (about 32 px there) and none at 320 (about 16 px)."""
    side = round(face_image[_FACE_PATCH].shape[0] * face_height / 72)
    patch = cv2.resize(face_image[_FACE_PATCH], (side, side), interpolation=cv2.INTER_AREA)
    frame = np.full((720, 1280, 3), 110, np.uint8)
    for x, y in SMALL_FACE_SPOTS:
        frame[y:y + side, x:x + side] = patch
    return frame
