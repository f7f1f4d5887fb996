"""Aligned views of 48x48 faces: each face as the serving pipeline would crop it.

The service finds a face's 5 landmarks with RetinaFace and warps them onto the FER template
(:func:`~facemodels.face.align.align_face`). FER2013's own crops are framed more loosely, so a
classifier trained on them alone loses about 3 points on served crops
(``benchmarks/framing.py``). Here each face is upscaled into a grey canvas, like a face in a
photo, run through the serving detector and aligned with the same function. The trainer mixes
these views into training (``fer-train classify --aligned-views P``). They are cached as
``.npz`` beside the decoded datasets, keyed by the faces' content.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from facemodels.atomic import save_npz_atomically
from facemodels.face.align import FER_TEMPLATE_48, align_face
from training.data._cache import default_cache_dir
from training.runtime import cache_root

__all__ = [
    "CANVAS",
    "UPSCALE",
    "align_views",
    "cached_aligned_views",
    "detect_face_landmarks",
    "mix_views",
]

log = logging.getLogger(__name__)

#: A 48x48 face is upscaled this much and centred in a CANVAS-pixel grey image for detection.
UPSCALE, CANVAS = 4, 320
#: Bump when the detection or the alignment of the views changes; old cache files are then unused.
VIEWS_VERSION = 1


def detect_face_landmarks(faces: np.ndarray, detector: Any, *, batch: int = 16,
                          min_score: float = 0.0) -> list[np.ndarray | None]:
    """Five landmarks per small face, in the face's own pixels (``None`` where none is found).

    Args:
        faces: uint8 (N, S, S) grayscale faces.
        detector: anything with the serving detector's ``detect(list of RGB arrays)``.
        min_score: a detection counts only with a score above this (the detector's own
            threshold applies first).
    """
    if faces.shape[-1] * UPSCALE > CANVAS:
        raise ValueError(f"faces of {faces.shape[-1]} px upscaled x{UPSCALE} do not fit the "
                         f"{CANVAS} px detection canvas (at most {CANVAS // UPSCALE} px)")
    side = faces.shape[-1] * UPSCALE
    off = (CANVAS - side) // 2
    out: list[np.ndarray | None] = []
    started = time.perf_counter()
    for s in range(0, len(faces), batch):
        canvases = []
        for face in faces[s:s + batch]:
            img = np.full((CANVAS, CANVAS), 128, np.uint8)
            img[off:off + side, off:off + side] = _upscale(face)
            canvases.append(cv2.cvtColor(img, cv2.COLOR_GRAY2RGB))
        for dets in detector.detect(canvases):
            dets = [d for d in dets if d.score > min_score]
            out.append((np.asarray(dets[0].landmarks) - off) / UPSCALE if dets else None)
        if (s // batch) % 200 == 199:
            log.info("landmarks: %d/%d faces (%.0f s)", len(out), len(faces),
                     time.perf_counter() - started)
    return out


def align_views(faces: np.ndarray, landmarks: list[np.ndarray | None]) -> np.ndarray:
    """Each face warped onto the FER template as the service would; unchanged where no face was found.

    The warp starts from the upscaled face, as the service's starts from a photo, so the
    resampling matches too.
    """
    size = faces.shape[-1]
    views = faces.copy()
    for i, points in enumerate(landmarks):
        if points is not None:
            views[i] = align_face(_upscale(faces[i]), np.asarray(points) * UPSCALE, size=size)
    return views


def cached_aligned_views(
    faces: Tensor, *, cache_dir: Path | None = None, detector: Any = None
) -> tuple[Tensor, float]:
    """Aligned views of ``faces`` (uint8 (N, S, S)) and the fraction with a detected face.

    Computed once (the detector takes about 8 ms a face on one CPU core) and then read from
    ``cache_dir`` (default: the dataset cache). A corrupt cache file is rebuilt with a warning.
    ``detector`` defaults to the serving RetinaFace from its local weights cache.
    """
    array = np.ascontiguousarray(faces.cpu().numpy(), dtype=np.uint8)
    path = (cache_dir or default_cache_dir()) / f"aligned-views-{_key(array)}.npz"
    cached = _load(path, array.shape)
    if cached is not None:
        log.info("aligned views cache hit: %s", path)
        return cached
    if detector is None:
        from facemodels.face.detector import RetinaFaceDetector  # the serving detector

        detector = RetinaFaceDetector.from_cache(cache_root(), score_threshold=0.5, max_side=CANVAS)
    log.info("computing aligned views of %d faces (cached afterwards in %s)", len(array), path)
    landmarks = detect_face_landmarks(array, detector)
    views = align_views(array, landmarks)
    found = np.array([p is not None for p in landmarks])
    save_npz_atomically(path, views=views, found=found)
    return torch.from_numpy(views), float(found.mean()) if len(found) else 0.0


def mix_views(images: Tensor, views: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Swap each of a batch's ``images`` for its aligned view with probability ``p``."""
    if p <= 0:
        return images
    swap = (torch.rand(len(images), generator=generator) < p).to(images.device)
    return torch.where(swap.view(-1, *([1] * (images.dim() - 1))), views, images)


def _upscale(face: np.ndarray) -> np.ndarray:
    side = face.shape[-1] * UPSCALE
    return cv2.resize(face, (side, side), interpolation=cv2.INTER_CUBIC)


def _key(array: np.ndarray) -> str:
    h = hashlib.sha256(f"aligned-views v{VIEWS_VERSION} x{UPSCALE} c{CANVAS}\n".encode())
    h.update(FER_TEMPLATE_48.tobytes())
    h.update(str(array.shape).encode())
    h.update(array.tobytes())
    return h.hexdigest()[:24]


def _load(path: Path, shape: tuple[int, ...]) -> tuple[Tensor, float] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            views, found = z["views"], z["found"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        log.warning("aligned views cache %s is unreadable (%s); rebuilding it", path, err)
        return None
    if views.shape != shape or views.dtype != np.uint8 or found.shape != shape[:1]:
        log.warning("aligned views cache %s has shape %s, expected %s; rebuilding it", path,
                    views.shape, shape)
        return None
    return torch.from_numpy(views), float(found.mean()) if len(found) else 0.0
