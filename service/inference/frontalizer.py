"""The GAN frontaliser as a service model: pose-framed crops in, frontal faces out.

The checkpoint's card says where frontalising helped expression accuracy
(``metrics["FER2013-PublicTest"]["frontalize_helps"]``: yaw bins such as ``">=45°"``), and
``frontalize=auto`` only frontalises faces whose |yaw| falls in one of those bins.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.checkpoint import load_checkpoint
from training.gan.frontalizer import frontalize_faces

__all__ = ["FrontalizerModel", "parse_yaw_bin"]

log = logging.getLogger(__name__)
_BIN = re.compile(r"^\s*(?:(?P<lt><)\s*(?P<hi>[\d.]+)|(?P<ge>>=)\s*(?P<lo>[\d.]+)|"
                  r"(?P<a>[\d.]+)\s*-\s*(?P<b>[\d.]+))\s*°?\s*$")


def parse_yaw_bin(label: str) -> tuple[float, float] | None:
    """``"<15°"`` -> (0, 15), ``"15-30°"`` -> (15, 30), ``">=45°"`` -> (45, inf); else None."""
    m = _BIN.match(label)
    if m is None:
        return None
    if m["lt"]:
        return 0.0, float(m["hi"])
    if m["ge"]:
        return float(m["lo"]), math.inf
    return float(m["a"]), float(m["b"])


class FrontalizerModel:
    """A frontaliser checkpoint loaded once; calling it frontalises a batch of uint8 crops."""

    def __init__(self, path: Path, *, device: torch.device) -> None:
        self.path = Path(path)
        self.device = device
        self.model, self.card = load_checkpoint(path, device=device)
        self.model.requires_grad_(False)
        self.size: int = self.model.cfg.image_size
        helps = self.card.get("metrics", {}).get("FER2013-PublicTest", {}).get("frontalize_helps", [])
        self.helpful_yaw: list[tuple[float, float]] = [r for r in map(parse_yaw_bin, helps) if r]
        log.info("loaded frontalizer from %s (%dx%d); auto frontalises |yaw| in %s", path,
                 self.size, self.size, self.helpful_yaw or "no bin")

    @property
    def version(self) -> str:
        return str(self.card.get("code_version", "unknown"))

    def describe(self) -> dict[str, Any]:
        return {"name": "frontalizer", "role": "frontalizer", "arch": str(self.card["arch"]),
                "version": self.version, "device": str(self.device), "card": self.card}

    def helps_at(self, yaw: float) -> bool:
        """Whether the card's evaluation found frontalising helps at this |yaw|."""
        a = abs(yaw)
        return any(lo <= a < hi for lo, hi in self.helpful_yaw)

    def __call__(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """Frontal faces (uint8, ``size`` square) for pose-framed crops (batcher worker thread)."""
        faces = torch.from_numpy(np.stack(crops))
        return list(frontalize_faces(self.model, faces, out_size=self.size).numpy())
