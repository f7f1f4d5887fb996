"""The one way files are written: to a temporary file beside the target, then renamed over it.

A reader (another worker, a resumed run, the service) sees either the old file or the whole new
one, never a half-written one. Weights, cards, dataset caches and converted detector weights all
go through :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

__all__ = ["FILE_MODE", "atomic_path", "save_npz_atomically", "save_safetensors_atomically",
           "write_text_atomically"]

#: Temporary files are created 0600; checkpoints and caches are meant to be shared and read.
FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, else it is removed.

    Parent folders are created. The file ends up with mode :data:`FILE_MODE`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_npz_atomically(path: str | Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` as an uncompressed ``.npz`` atomically (plain arrays only)."""
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **arrays)


def save_safetensors_atomically(
    path: str | Path, tensors: Mapping[str, torch.Tensor], *, metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` to ``path`` as safetensors atomically."""
    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=metadata)
