"""Pose-aware face framing for the frontaliser: FER2013 framing for frontal faces, extended
to profiles.

The FER template (:data:`facemodels.face.align.FER_TEMPLATE_48`) needs both eyes and both mouth
corners, which a profile does not show. This framing needs only three anchors that stay
well defined at any yaw: the eye centre, the mouth centre and the nose tip.

* Scale: the eye-to-mouth distance (unchanged by yaw) maps to the template's.
* Vertical: the midpoint of eye and mouth maps to the template's midpoint of eyes and mouth.
* Horizontal: the nose tip maps to ``NOSE_X + PROFILE_SHIFT * sin(yaw)`` of the width. At
  yaw 0 that is the template's nose, so a frontal face is framed like FER2013 (its
  frontalised output can go to the expression classifier after a resize to 48). For a
  profile the nose moves towards the side it points to, which keeps the head (nose to ear,
  about 1.4 eye-mouth distances) inside the crop instead of half of it being background.
* No rotation: faces are taken as upright (CFP and FER2013 nearly are; the eye line of a
  profile is not reliable enough to level it).

The same function frames CFP training photos (anchors from the 30 fiducials, see
:mod:`training.data.cfp`) and detector output at serving time (anchors from the five
landmarks, :func:`align_pose_face`), so the frontaliser sees the same framing in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from facemodels.face.align import FER_TEMPLATE_48, warp_face
from facemodels.face.pose import estimate_yaw

__all__ = [
    "EYE_Y",
    "MOUTH_Y",
    "NOSE_X",
    "PROFILE_SHIFT",
    "FaceAnchors",
    "align_pose_face",
    "anchors_from_landmarks5",
    "frame_pose_face",
    "pose_framing_matrix",
]

#: Template positions as fractions of the crop side (from the FER template).
EYE_Y = float(FER_TEMPLATE_48[:2, 1].mean() / 48.0)
MOUTH_Y = float(FER_TEMPLATE_48[3:, 1].mean() / 48.0)
NOSE_X = float(FER_TEMPLATE_48[2, 0] / 48.0)
#: How far (fraction of the side) the nose moves towards the side it points to at 90° yaw.
PROFILE_SHIFT = 0.25


@dataclass(frozen=True)
class FaceAnchors:
    """Eye centre, mouth centre and nose tip, ``(x, y)`` in the source image's pixels."""

    eye: tuple[float, float]
    mouth: tuple[float, float]
    nose: tuple[float, float]


def anchors_from_landmarks5(landmarks: np.ndarray) -> FaceAnchors:
    """Anchors from the detector's five points (eyes, nose, mouth corners)."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (5, 2):
        raise ValueError(f"expected (5, 2) landmarks, got {pts.shape}")
    eye, mouth = pts[:2].mean(0), pts[3:].mean(0)
    return FaceAnchors(eye=(eye[0], eye[1]), mouth=(mouth[0], mouth[1]), nose=(pts[2, 0], pts[2, 1]))


def pose_framing_matrix(anchors: FaceAnchors, *, yaw: float, size: int) -> np.ndarray:
    """The 2x3 scale-and-shift matrix from source pixels to the ``size`` x ``size`` crop."""
    eye, mouth, nose = (np.asarray(p, dtype=np.float64) for p in
                        (anchors.eye, anchors.mouth, anchors.nose))
    h = float(np.linalg.norm(mouth - eye))
    if not math.isfinite(h) or h < 1e-6:
        raise ValueError("eye and mouth anchors coincide; cannot frame the face")
    s = (MOUTH_Y - EYE_Y) * size / h
    yaw = 0.0 if not math.isfinite(yaw) else max(-90.0, min(90.0, yaw))
    x_nose = (NOSE_X + PROFILE_SHIFT * math.sin(math.radians(yaw))) * size
    y_mid = (EYE_Y + MOUTH_Y) / 2 * size
    tx = x_nose - s * nose[0]
    ty = y_mid - s * (eye[1] + mouth[1]) / 2
    return np.array([[s, 0.0, tx], [0.0, s, ty]], dtype=np.float64)


def frame_pose_face(image: np.ndarray, landmarks: np.ndarray, *, size: int = 64,
                    yaw: float | None = None, gray: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Frame a detected face for the frontaliser and map its landmarks into the crop.

    Args:
        image: RGB ``(H, W, 3)`` or gray ``(H, W)`` uint8.
        landmarks: the detector's five ``(x, y)`` points in ``image`` pixels.
        size: output side; use the frontaliser's ``cfg.image_size``.
        yaw: degrees; default :func:`facemodels.face.pose.estimate_yaw` of ``landmarks``.

    Returns:
        The ``size`` x ``size`` uint8 crop (grayscale when ``gray``) and the five landmarks in
        its pixels ``(5, 2)``, which the mesh warp fits its pose to.
    """
    points = np.asarray(landmarks, dtype=np.float64)
    if yaw is None:
        yaw = float(estimate_yaw(points))
    matrix = pose_framing_matrix(anchors_from_landmarks5(points), yaw=yaw, size=size)
    crop = warp_face(image, matrix, size=size, gray=gray)
    return crop, points @ matrix[:, :2].T + matrix[:, 2]


def align_pose_face(image: np.ndarray, landmarks: np.ndarray, *, size: int = 64,
                    yaw: float | None = None, gray: bool = True) -> np.ndarray:
    """The crop of :func:`frame_pose_face` alone (the serving-side entry point of the GAN)."""
    return frame_pose_face(image, landmarks, size=size, yaw=yaw, gray=gray)[0]
