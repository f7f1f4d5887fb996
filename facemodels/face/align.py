"""Five-landmark face alignment to the FER2013 framing, shared by training and serving.

A similarity transform (rotation, uniform scale, translation) maps the detector's five
landmarks (image-left eye, image-right eye, nose tip, image-left and image-right mouth corner)
onto :data:`FER_TEMPLATE_48`, the median landmark positions of FER2013 faces in their 48x48
crops. The template was measured by running the project's RetinaFace detector on upscaled
FER2013 Training faces (``python benchmarks/framing.py --fit-template --limit 1500``:
1475 of 1500 faces found), so an aligned crop
of a photo is framed like the faces the classifiers were trained on.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["FER_TEMPLATE_48", "align_face", "resize_face", "similarity_transform", "template_for",
           "warp_face"]

#: Median (x, y) of the 5 landmarks in FER2013 48x48 Training crops (see module docstring).
FER_TEMPLATE_48 = np.array(
    [
        [15.15, 18.38],
        [32.88, 18.34],
        [23.80, 28.40],
        [16.97, 36.57],
        [31.22, 36.56],
    ],
    dtype=np.float64,
)


def template_for(size: int) -> np.ndarray:
    """The FER template scaled to a ``size`` x ``size`` output."""
    return FER_TEMPLATE_48 * (size / 48.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 2x3 similarity matrix mapping ``src`` points onto ``dst`` (Umeyama)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need matching (K,2) point sets with K>=2, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    if var_s <= 1e-12:
        raise ValueError("source landmarks are degenerate (all at one point)")
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / var_s
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def align_face(image: np.ndarray, landmarks: np.ndarray, *, size: int = 48,
               gray: bool = True) -> np.ndarray:
    """Warp ``image`` (RGB HxWx3 or gray HxW uint8) so ``landmarks`` land on the FER template.

    Returns a ``size`` x ``size`` uint8 crop (grayscale when ``gray``). Areas outside the photo
    are filled by replicating the border, like a tight photo crop would look.
    """
    matrix = similarity_transform(np.asarray(landmarks, dtype=np.float64), template_for(size))
    return warp_face(image, matrix, size=size, gray=gray)


def warp_face(image: np.ndarray, matrix: np.ndarray, *, size: int, gray: bool = True) -> np.ndarray:
    """Warp ``image`` (RGB HxWx3 or gray HxW uint8) with a 2x3 ``matrix`` into a ``size`` square.

    The one warp every face crop goes through (classifier alignment and frontaliser framing).
    Large shrink factors are first done with area averaging so the crop does not alias
    (``warpAffine`` has no area mode); outside the photo the border is replicated, as a tight
    photo crop would look.
    """
    if gray and image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    matrix = np.asarray(matrix, dtype=np.float64).copy()
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if scale < 0.5:
        factor = 0.5 / scale
        image = cv2.resize(image, None, fx=1 / factor, fy=1 / factor, interpolation=cv2.INTER_AREA)
        matrix[:, :2] *= factor
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def resize_face(image: np.ndarray, *, size: int = 48, gray: bool = True) -> np.ndarray:
    """A whole image taken as an already-cropped face: grayscale, resized to ``size`` square."""
    if gray and image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)
