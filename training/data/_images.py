"""Grayscale image decoding shared by the dataset loaders (OpenCV, thread pool, progress bar)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from training.data.dataset import DatasetError

__all__ = ["IMAGE_SUFFIXES", "decode_gray", "decode_many", "is_image_file", "warn_skipped"]

log = logging.getLogger(__name__)

#: File name endings the folder loaders treat as images (compared case-insensitively).
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
_CHUNK = 256


def is_image_file(path: Path) -> bool:
    """True for non-hidden files ending in one of :data:`IMAGE_SUFFIXES`."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def decode_gray(path: Path, *, size: int | None = 48) -> np.ndarray:
    """Read ``path`` as a uint8 grayscale ``(H, W)`` array.

    Raises:
        DatasetError: naming ``path`` when it cannot be read or decoded, or is not
            ``size`` x ``size`` (when ``size`` is given).
    """
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file ({e.strerror or e})") from e
    img = None
    if buf.size:
        try:
            img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
        except cv2.error:
            img = None
    if img is None:
        raise DatasetError(f"{path}: corrupt or undecodable image ({buf.size} bytes)")
    if size is not None and img.shape != (size, size):
        h, w = img.shape[:2]
        raise DatasetError(f"{path}: image is {w}x{h}, expected {size}x{size}")
    return img


def _decode_chunk(
    paths: Sequence[Path], start: int, out: np.ndarray, ok: np.ndarray, size: int,
    skip_bad: bool, errors: list[tuple[int, str]],
) -> int:
    for i, p in enumerate(paths, start):
        try:
            out[i] = decode_gray(p, size=size)
        except DatasetError as e:
            if not skip_bad:
                raise
            ok[i] = False
            errors.append((i, str(e)))
    return len(paths)


def decode_many(
    paths: Sequence[Path], *, size: int = 48, skip_bad: bool = False, desc: str = "decoding",
    num_workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode many same-sized grayscale images in parallel (OpenCV releases the GIL).

    Returns:
        ``(images, ok, errors)``: uint8 ``(N, size, size)`` (zeros where a file was bad),
        a boolean ``(N,)`` mask of the files that decoded, and the error messages of the
        bad ones in file order (only with ``skip_bad``; otherwise the first error is raised).
    """
    n = len(paths)
    out = np.zeros((n, size, size), dtype=np.uint8)
    ok = np.ones(n, dtype=bool)
    errors: list[tuple[int, str]] = []
    workers = num_workers or min(8, os.cpu_count() or 1)
    with (
        tqdm(total=n, desc=desc, unit="img", disable=None, leave=False) as bar,
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
    ):
        futures = [
            pool.submit(_decode_chunk, paths[s : s + _CHUNK], s, out, ok, size, skip_bad, errors)
            for s in range(0, n, _CHUNK)
        ]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    for p in pending:
                        p.cancel()
                    raise f.exception()  # type: ignore[misc]
                bar.update(f.result())
    return out, ok, [msg for _, msg in sorted(errors)]


def warn_skipped(errors: Sequence[str], *, what: str, source: str) -> None:
    """One warning for all skipped samples: how many, and the first error."""
    if errors:
        log.warning("skipped %d bad %s in %s; first: %s", len(errors), what, source, errors[0])
