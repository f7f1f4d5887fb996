"""Head yaw from the detector's five landmarks, and the three CFP pose classes.

Yaw model: the nose tip sits in front of the face's midline (the line from the eye midpoint
to the mouth midpoint) by a depth ``d``. Turning the head by yaw ``θ`` moves the tip sideways
by ``d·sin θ`` relative to that line, while the eye-to-mouth distance ``h`` stays the same. So

    r = (signed distance of the nose from the eye-mouth line) / h,   θ = asin(r / k)

with ``k = d / h``. ``k`` (:data:`NOSE_DEPTH_RATIO`) was calibrated on CFP with our
RetinaFace detector so that the median profile photo reads 90°: over 300 random CFP frontal
photos ``r`` has median 0.00 (90% within ±0.09, i.e. within ±13°) and over 300 profile photos
``|r|`` has median 0.40 (5th to 95th percentile 0.30 to 0.48; RetinaFace compresses the
landmarks of full profiles, so ``|r|`` saturates there). Every profile got the sign that the
CFP fiducials give. ``fer-train eval-frontalizer --yaw-check`` re-measures these
distributions.

Sign convention (as seen in the image, like the detector's landmark names): positive yaw means
the nose points to the image's right. Pose classes (:data:`POSE_CLASSES`): 0 frontal,
1 ``left_profile`` (nose points to the image's left, yaw < 0), 2 ``right_profile`` (yaw > 0).
A horizontal flip swaps 1 and 2 (:func:`flip_pose`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "NOSE_DEPTH_RATIO",
    "POSE_CLASSES",
    "PROFILE_YAW",
    "estimate_yaw",
    "flip_pose",
    "nose_offset",
    "pose_from_yaw",
]

#: Pose class names, in label order. Left/right are as seen in the image.
POSE_CLASSES: tuple[str, ...] = ("frontal", "left_profile", "right_profile")
#: ``d / h``: nose-tip depth in front of the eye-mouth line over the eye-mouth distance.
NOSE_DEPTH_RATIO = 0.40
#: |yaw| from which :func:`pose_from_yaw` calls a face a profile.
PROFILE_YAW = 45.0


def nose_offset(landmarks: np.ndarray) -> np.ndarray | float:
    """Signed nose distance from the eye-mouth line over the eye-mouth distance (``r`` above).

    Args:
        landmarks: ``(5, 2)`` or ``(N, 5, 2)`` points in detector order (image-left eye,
            image-right eye, nose tip, image-left mouth corner, image-right mouth corner).

    Returns:
        A float for one face, else an ``(N,)`` array; NaN where the eyes and mouth coincide.
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    single = pts.ndim == 2
    if single:
        pts = pts[None]
    if pts.ndim != 3 or pts.shape[1:] != (5, 2):
        raise ValueError(f"expected (5, 2) or (N, 5, 2) landmarks, got {np.shape(landmarks)}")
    eye = pts[:, :2].mean(1)
    mouth = pts[:, 3:].mean(1)
    axis = mouth - eye
    h = np.linalg.norm(axis, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = axis / h[:, None]
        perp = np.stack([u[:, 1], -u[:, 0]], axis=1)  # upright face: axis (0, 1) -> perp (1, 0)
        r = ((pts[:, 2] - eye) * perp).sum(1) / h
    r = np.where(h > 1e-9, r, np.nan)
    return float(r[0]) if single else r


def estimate_yaw(landmarks: np.ndarray, *, depth_ratio: float = NOSE_DEPTH_RATIO) -> np.ndarray | float:
    """Yaw in degrees from five landmarks: ~0 frontal, towards ±90 for profiles.

    Positive means the nose points to the image's right. Accepts ``(5, 2)`` (returns a
    float) or ``(N, 5, 2)`` (returns an ``(N,)`` array). Degenerate landmark sets give NaN.
    """
    r = np.asarray(nose_offset(landmarks), dtype=np.float64)
    yaw = np.degrees(np.arcsin(np.clip(r / depth_ratio, -1.0, 1.0)))
    return float(yaw) if yaw.ndim == 0 else yaw


def pose_from_yaw(yaw: np.ndarray | float, *, profile_yaw: float = PROFILE_YAW) -> np.ndarray | int:
    """Pose class per yaw: 0 frontal when ``|yaw| < profile_yaw``, else 1 (yaw < 0) or 2."""
    y = np.asarray(yaw, dtype=np.float64)
    cls = np.where(np.abs(y) < profile_yaw, 0, np.where(y < 0, 1, 2))
    return int(cls) if cls.ndim == 0 else cls.astype(np.int64)


def flip_pose(pose: Tensor) -> Tensor:
    """Pose labels after a horizontal flip: left and right profile swap, frontal stays."""
    swapped = torch.tensor([0, 2, 1], dtype=pose.dtype, device=pose.device)
    return swapped[pose.long()].to(pose.dtype)
