"""The GAN frontaliser as a service model: pose-framed crops in, frontal faces out.

The checkpoint's card says where frontalising helped expression accuracy
(``metrics["FER2013-PublicTest"]["frontalize_helps"]``: |yaw| ranges as numbers, see
:class:`~facemodels.frontalizer.yaw.YawRange`), and ``frontalize=auto`` only frontalises faces
whose |yaw| falls in one of them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facemodels.checkpoint import CheckpointError, card_path, load_checkpoint
from facemodels.frontalizer.model import frontalize_faces
from facemodels.frontalizer.yaw import YawRange

__all__ = ["FrontalizerModel"]

log = logging.getLogger(__name__)


class FrontalizerModel:
    """A frontaliser checkpoint loaded once; calling it frontalises a batch of uint8 crops."""

    def __init__(self, path: Path, *, device: torch.device) -> None:
        self.path = Path(path)
        self.device = device
        self.model, self.card = load_checkpoint(path, device=device)
        self.model.requires_grad_(False)
        self.size: int = self.model.cfg.image_size
        helps = self.card.get("metrics", {}).get("FER2013-PublicTest", {}).get("frontalize_helps", [])
        try:
            self.helpful_yaw: list[YawRange] = [YawRange.from_json(r) for r in helps]
        except ValueError as e:
            raise CheckpointError(
                f"checkpoint card {card_path(path)}: bad frontalize_helps: {e}; cards written before "
                "yaw ranges became numbers are rewritten by `fer-train eval-frontalizer CHECKPOINT "
                "--update-card`") from e
        log.info("loaded frontalizer from %s (%dx%d); auto frontalises |yaw| in %s", path,
                 self.size, self.size, [r.label for r in self.helpful_yaw] or "no bin")

    @property
    def version(self) -> str:
        return str(self.card.get("code_version", "unknown"))

    def describe(self) -> dict[str, Any]:
        return {"name": "frontalizer", "role": "frontalizer", "arch": str(self.card["arch"]),
                "version": self.version, "device": str(self.device), "card": self.card}

    def helps_at(self, yaw: float) -> bool:
        """Whether the card's evaluation found frontalising helps at this |yaw|."""
        return any(r.contains(yaw) for r in self.helpful_yaw)

    def __call__(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """Frontal faces (uint8, ``size`` square) for pose-framed crops (batcher worker thread)."""
        faces = torch.from_numpy(np.stack(crops))
        return list(frontalize_faces(self.model, faces, out_size=self.size).numpy())
