"""Training-side runtime: the cache root, seeding and resolved arguments.

Device and precision choices live in :mod:`facemodels.device` (the service uses them too).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facemodels.cache import default_cache_root

__all__ = ["cache_root", "resolved_args", "seed_everything"]

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$FER_CACHE_DIR`` when set, else :func:`~facemodels.cache.default_cache_root`.

    The training commands' one reader of that variable (the service reads it through its
    settings). Decoded datasets go under ``datasets/``, converted detector weights under
    ``detector/``, the same layout the service uses.
    """
    env = os.environ.get("FER_CACHE_DIR")
    return Path(env).expanduser() if env else default_cache_root()


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
