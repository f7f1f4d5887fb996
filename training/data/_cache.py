"""On-disk cache of decoded datasets as ``.npz`` (plain arrays; never pickle).

A cache file is named after a key computed from file metadata (cheap to get), and holds the
decoded arrays plus their content fingerprint, which is checked on every load: a truncated,
garbled or stale-format file is ignored with a warning and rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from facemodels.atomic import save_npz_atomically
from training.data._images import warn_skipped
from training.data.dataset import FaceDataset, content_fingerprint
from training.runtime import cache_root

__all__ = [
    "CACHE_VERSION",
    "Decoded",
    "cached_build",
    "default_cache_dir",
    "metadata_key",
]

log = logging.getLogger(__name__)

#: Bump when the decoding or the cache layout changes; old files are then simply not found.
CACHE_VERSION = 1
_ARRAYS = ("images", "labels", "usage", "class_names", "paths", "fingerprint", "skipped", "version")


def default_cache_dir() -> Path:
    """``datasets/`` under :func:`training.runtime.cache_root` (``$FER_CACHE_DIR`` or
    ``~/.cache/fer-service``)."""
    return cache_root() / "datasets"


def metadata_key(kind: str, entries: Iterable[tuple[str, int, int]]) -> str:
    """SHA-256 over ``(relative path, size, mtime_ns)`` entries (sorted) plus kind and version."""
    h = hashlib.sha256(f"{kind}\0v{CACHE_VERSION}\n".encode())
    for rel, size, mtime_ns in sorted(entries):
        h.update(f"{rel}\0{size}\0{mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass
class Decoded:
    """What a loader's decoding pass produces, before it becomes a :class:`FaceDataset`."""

    images: np.ndarray  # uint8 (N, H, W)
    labels: np.ndarray  # int64 (N,)
    usage: np.ndarray  # uint8 (N,)
    paths: list[str]
    class_names: tuple[str, ...]
    skipped: list[str] = field(default_factory=list)

    def to_dataset(self, source: str, fingerprint: str | None = None) -> FaceDataset:
        images = torch.from_numpy(np.ascontiguousarray(self.images, dtype=np.uint8))
        labels = torch.from_numpy(np.ascontiguousarray(self.labels, dtype=np.int64))
        usage = torch.from_numpy(np.ascontiguousarray(self.usage, dtype=np.uint8))
        if fingerprint is None:
            fingerprint = content_fingerprint(images, labels, usage, self.class_names)
        return FaceDataset(images=images, labels=labels, usage=usage,
                           class_names=self.class_names, fingerprint=fingerprint,
                           source=source, paths=tuple(self.paths))


def _save(path: Path, d: Decoded, fingerprint: str) -> None:
    save_npz_atomically(
        path, images=d.images, labels=d.labels, usage=d.usage,
        class_names=np.array(d.class_names, dtype=str),
        paths=np.array(d.paths, dtype=str).reshape(-1),
        fingerprint=np.array(fingerprint), skipped=np.array(d.skipped, dtype=str),
        version=np.array(CACHE_VERSION),
    )


def _load(path: Path) -> tuple[Decoded, str]:
    """Read and verify a cache file; any problem raises ``ValueError`` (or an I/O error)."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in _ARRAYS if k not in z.files]
        if missing:
            raise ValueError(f"missing arrays {missing}")
        if int(z["version"]) != CACHE_VERSION:
            raise ValueError(f"cache version {int(z['version'])}, expected {CACHE_VERSION}")
        d = Decoded(
            images=z["images"], labels=z["labels"], usage=z["usage"],
            paths=z["paths"].tolist(), class_names=tuple(z["class_names"].tolist()),
            skipped=z["skipped"].tolist(),
        )
        stored = str(z["fingerprint"])
    n = len(d.images)
    if (d.images.dtype != np.uint8 or d.images.ndim != 3 or d.labels.shape != (n,)
            or d.usage.shape != (n,) or len(d.paths) != n):
        raise ValueError("arrays have inconsistent shapes or dtypes")
    ds = d.to_dataset(source="")
    if ds.fingerprint != stored:
        raise ValueError("content does not match its fingerprint")
    return d, stored


def cached_build(
    name: str, key: str, build: Callable[[], Decoded], *, source: str,
    cache_dir: Path | None, skip_bad: bool, use_cache: bool = True, what: str = "images",
) -> FaceDataset:
    """Return the dataset for ``key`` from the cache, or ``build()`` it and store it.

    A build that skipped bad samples is stored under a separate ``-skipbad`` file that only
    ``skip_bad`` loads read, so a strict load never silently gets a dataset with holes. The
    skipped-samples warning is repeated on every load of such a file.
    """
    if not use_cache:
        d = build()
        warn_skipped(d.skipped, what=what, source=source)
        return d.to_dataset(source)
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    clean = cdir / f"{name}-{key[:40]}.npz"
    holey = cdir / f"{name}-{key[:40]}-skipbad.npz"
    for path in (clean, holey) if skip_bad else (clean,):
        if not path.is_file():
            continue
        t0 = time.perf_counter()
        try:
            d, fp = _load(path)
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            log.warning("ignoring corrupt dataset cache %s (%s); rebuilding it", path, e)
            continue
        log.info("dataset cache hit: %s (%d samples, %.2fs)", path, len(d.images),
                 time.perf_counter() - t0)
        warn_skipped(d.skipped, what=what, source=source)
        return d.to_dataset(source, fingerprint=fp)

    t0 = time.perf_counter()
    d = build()
    warn_skipped(d.skipped, what=what, source=source)
    ds = d.to_dataset(source)
    target = holey if d.skipped else clean
    try:
        _save(target, d, ds.fingerprint)
    except OSError as e:
        log.warning("could not write dataset cache %s (%s); continuing without it", target, e)
    else:
        log.info("dataset cache written: %s (%d samples, built in %.2fs)", target, len(ds),
                 time.perf_counter() - t0)
    return ds
