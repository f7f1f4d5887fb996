"""Device, precision and seeding helpers shared by training, evaluation and the service."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["autocast", "cache_root", "resolve_amp", "resolve_device", "resolved_args", "seed_everything"]

log = logging.getLogger(__name__)
AMP_CHOICES = ("auto", "none", "bf16", "fp16")


def cache_root() -> Path:
    """``$FER_CACHE_DIR`` when set, else ``~/.cache/fer-service``: the root of every cache.

    Decoded datasets go under ``datasets/``, converted detector weights under ``detector/``.
    """
    env = os.environ.get("FER_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fer-service"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cpu``/``cuda``/``cuda:N`` are forced."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (``None`` = full fp32).

    ``auto`` means bfloat16 on CPU (about twice as fast on AVX-512 machines) and on CUDA
    devices that support it, else float16.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("fp16 autocast is only supported on CUDA; use bf16 on CPU")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` for ``device`` when ``dtype`` is set, else a no-op."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for sampling and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def resolved_args(args: argparse.Namespace) -> dict[str, Any]:
    """A command's resolved arguments as JSON-ready values (the CLI's dispatch entries dropped)."""

    def plain(v: Any) -> Any:
        return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, list) else v

    return {k: plain(v) for k, v in vars(args).items()
            if not callable(v) and k not in {"command", "verbose"}}
