"""Yaw from five landmarks, pose classes, and the pose-aware framing of detector output."""

from __future__ import annotations

import numpy as np
import pytest

from facemodels.face.align import FER_TEMPLATE_48
from facemodels.face.pose import estimate_yaw, nose_offset, pose_from_yaw
from facemodels.face.pose_framing import NOSE_X, PROFILE_SHIFT, align_pose_face

SYMMETRIC = np.array([[30.0, 40.0], [70.0, 40.0], [50.0, 60.0], [35.0, 80.0], [65.0, 80.0]])


def test_symmetric_face_is_frontal() -> None:
    assert estimate_yaw(SYMMETRIC) == pytest.approx(0.0, abs=1e-9)
    assert estimate_yaw(FER_TEMPLATE_48) == pytest.approx(0.0, abs=5.0)  # the FER median face


def test_shifted_nose_gives_signed_large_yaw() -> None:
    right = SYMMETRIC.copy()
    right[2, 0] += 16.0  # nose 0.4 eye-mouth distances right of the midline
    left = SYMMETRIC.copy()
    left[2, 0] -= 16.0
    assert estimate_yaw(right) == pytest.approx(90.0, abs=1e-6)
    assert estimate_yaw(left) == pytest.approx(-90.0, abs=1e-6)
    half = SYMMETRIC.copy()
    half[2, 0] += 8.0
    assert estimate_yaw(half) == pytest.approx(30.0, abs=1e-6)  # asin(0.5)
    assert pose_from_yaw(estimate_yaw(right)) == 2 and pose_from_yaw(estimate_yaw(left)) == 1
    assert pose_from_yaw(10.0) == 0


def test_yaw_is_rotation_and_scale_invariant_and_batched() -> None:
    pts = SYMMETRIC.copy()
    pts[2, 0] += 8.0
    a = np.radians(20)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    moved = 3.0 * pts @ rot.T + 100.0
    batch = estimate_yaw(np.stack([pts, moved, SYMMETRIC]))
    assert batch.shape == (3,)
    assert batch[0] == pytest.approx(batch[1]) and batch[2] == pytest.approx(0.0, abs=1e-9)
    degenerate = np.zeros((5, 2))
    assert np.isnan(nose_offset(degenerate))
    with pytest.raises(ValueError, match="landmarks"):
        estimate_yaw(np.zeros((4, 2)))


def test_align_pose_face_frames_the_nose_by_yaw() -> None:
    img = np.zeros((200, 200), np.uint8)
    lm = SYMMETRIC * 2 + 10  # nose at (110, 130)
    img[128:133, 108:113] = 255  # a bright dot on the nose
    for yaw in (0.0, 90.0, -90.0):
        crop = align_pose_face(img, lm, size=64, yaw=yaw)
        _, xs = np.nonzero(crop > 100)
        assert xs.mean() == pytest.approx((NOSE_X + PROFILE_SHIFT * np.sin(np.radians(yaw))) * 64, abs=1.5)
    assert align_pose_face(np.zeros((50, 50, 3), np.uint8), SYMMETRIC, size=48).shape == (48, 48)
