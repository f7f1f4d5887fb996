"""The frontalisers as service models: pose-framed crops and their landmarks in, frontal faces out.

* :class:`FrontalizerModel`: a trained checkpoint (``FER_FRONTALIZER_CHECKPOINT``, or a shipped
  ``frontalizer.safetensors``). Its card says where frontalising helped expression accuracy
  (``metrics["FER2013-PublicTest"]["frontalize_helps"]``: |yaw| ranges as numbers, see
  :class:`~facemodels.frontalizer.yaw.YawRange`), and ``frontalize=auto`` only frontalises faces
  whose |yaw| falls in one of them.
* :class:`WarpFrontalizerModel`: the warp-only frontaliser (a 3D mean face fitted to the five
  landmarks, :class:`~facemodels.frontalizer.warp.MeshWarp`), which needs no weights, so
  ``/frontalize`` works out of the box. Its evaluation (docs/frontalizer.md) found it lowers
  expression accuracy, so ``frontalize=auto`` never picks it.

Both take :class:`FrontalJob` batches through the same dynamic batcher.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facemodels.checkpoint import CheckpointError, card_path, code_version, load_checkpoint
from facemodels.face.align import template_for
from facemodels.face.pose_framing import frame_pose_face
from facemodels.frontalizer.model import frontalize_faces
from facemodels.frontalizer.warp import DEFAULT_SIZE, MeshWarp
from facemodels.frontalizer.yaw import YawRange

__all__ = ["FrontalJob", "FrontalizerModel", "WarpFrontalizerModel"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FrontalJob:
    """One face for a frontaliser: its pose-framed crop and its five landmarks in crop pixels."""

    crop: np.ndarray  # uint8 (S, S)
    landmarks: np.ndarray  # float (5, 2)

    @classmethod
    def frame(cls, image: np.ndarray, landmarks: np.ndarray, *, size: int) -> FrontalJob:
        """Frame a detected face of ``image`` (landmarks in its pixels) for a frontaliser."""
        crop, points = frame_pose_face(image, landmarks, size=size)
        return cls(crop, points)

    @classmethod
    def blank(cls, size: int) -> FrontalJob:
        """A flat grey frontal face, for warming a frontaliser up."""
        return cls(np.full((size, size), 127, dtype=np.uint8), template_for(size).astype(np.float64))


class FrontalizerModel:
    """A frontaliser checkpoint loaded once; calling it frontalises a batch of framed faces."""

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

    def __call__(self, jobs: list[FrontalJob]) -> list[np.ndarray]:
        """Frontal faces (uint8, ``size`` square) for framed faces (batcher worker thread)."""
        faces = torch.from_numpy(np.stack([j.crop for j in jobs]))
        return list(frontalize_faces(self.model, faces, out_size=self.size).numpy())


@lru_cache(maxsize=4)
def _mesh_warp(size: int) -> MeshWarp:
    """One warp per output size and process: its raster and per-yaw visibility are caches."""
    return MeshWarp(size)


class WarpFrontalizerModel:
    """The warp-only frontaliser: no weights, the mesh ships with :mod:`facemodels.frontalizer`."""

    ARCH = "mesh_warp"

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = int(size)
        self.warp = _mesh_warp(self.size)
        self.card: dict[str, Any] = {
            "arch": self.ARCH, "code_version": code_version(), "image_size": self.size,
            "description": "3D mean-face warp fitted to the five landmarks, hidden pixels from the "
                           "mirrored side (Hassner et al. 2015); no learned weights",
            "frontalize_auto": "never: warp-only lowered FER2013 PublicTest accuracy (docs/frontalizer.md)",
        }
        self.helpful_yaw: list[YawRange] = []
        log.info("warp-only frontalizer (%dx%d, no checkpoint); auto frontalises no face", self.size,
                 self.size)

    @property
    def version(self) -> str:
        return str(self.card["code_version"])

    def describe(self) -> dict[str, Any]:
        return {"name": "frontalizer", "role": "frontalizer", "arch": self.ARCH, "version": self.version,
                "device": "cpu", "card": self.card}

    def helps_at(self, yaw: float) -> bool:
        """Never: the evaluation found no |yaw| range where the warp alone helps expressions."""
        return False

    def __call__(self, jobs: list[FrontalJob]) -> list[np.ndarray]:
        """Frontal faces (uint8, ``size`` square) for framed faces (batcher worker thread)."""
        crops = np.stack([j.crop for j in jobs])
        landmarks = np.stack([j.landmarks for j in jobs])
        return list(self.warp.frontalize(crops, landmarks))
