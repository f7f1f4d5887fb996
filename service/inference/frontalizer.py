"""The frontalisers as service models: pose-framed crops and their landmarks in, frontal faces out.

* :class:`FrontalizerModel`: a trained DR-GAN checkpoint (``FER_FRONTALIZER_CHECKPOINT``, or a shipped
  ``frontalizer.safetensors``). Its card says where frontalising helped expression accuracy
  (``metrics["FER2013-PublicTest"]["frontalize_helps"]``: |yaw| ranges as numbers, see
  :class:`~facemodels.frontalizer.yaw.YawRange`), and ``frontalize=auto`` only frontalises faces
  whose |yaw| falls in one of them.
* :class:`WarpFrontalizerModel`: the mesh warp (a 3D mean face fitted to the five landmarks,
  :class:`~facemodels.frontalizer.warp.MeshWarp`), alone or refined by a ``frontal_refiner``
  checkpoint (:mod:`facemodels.frontalizer.refiner`). Alone it needs no weights, so
  ``/frontalize`` works out of the box; its evaluation (docs/frontalizer.md) found it lowers
  expression accuracy, so ``frontalize=auto`` never picks warp-only. With the ``onnx`` backend the
  refiner's network runs on ONNX Runtime (its graph exported into ``<cache_dir>/onnx/`` by
  :func:`~facemodels.onnx_export.cached_refiner_onnx`); the warp's sampling stays in PyTorch.

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

from facemodels.cache import default_cache_root
from facemodels.checkpoint import CheckpointError, card_path, code_version, load_card, load_checkpoint
from facemodels.face.align import template_for
from facemodels.face.pose_framing import frame_pose_face
from facemodels.frontalizer.model import frontalize_faces
from facemodels.frontalizer.refiner import REFINER_ARCH, FrontalRefiner, Heads, load_refiner, onnx_heads
from facemodels.frontalizer.refiner import frontalize as refine_frontalize
from facemodels.frontalizer.warp import DEFAULT_SIZE, MeshWarp
from facemodels.frontalizer.yaw import YawRange
from facemodels.onnx_export import cached_refiner_onnx, create_session

__all__ = ["FrontalJob", "FrontalizerModel", "WarpFrontalizerModel", "load_frontalizer"]

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
        self.helpful_yaw: list[YawRange] = _helpful_yaw(self.card, self.path)
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


def _helpful_yaw(card: dict[str, Any], path: Path) -> list[YawRange]:
    helps = card.get("metrics", {}).get("FER2013-PublicTest", {}).get("frontalize_helps", [])
    try:
        return [YawRange.from_json(r) for r in helps]
    except ValueError as e:
        raise CheckpointError(
            f"checkpoint card {card_path(path)}: bad frontalize_helps: {e}; cards written before "
            "yaw ranges became numbers are rewritten by `fer-train eval-frontalizer CHECKPOINT "
            "--update-card`") from e


class WarpFrontalizerModel:
    """The mesh-warp frontaliser, alone (no weights) or with a trained refiner checkpoint.

    Warp-only needs nothing beyond the mesh that ships with :mod:`facemodels.frontalizer`; its
    evaluation found it lowers expression accuracy, so ``frontalize=auto`` never picks it. A
    refiner's card says where it helps, as a GAN checkpoint's does.

    ``backend`` is the service's resolved backend (``torch`` or ``onnx``, as the classifiers get
    it). With ``onnx`` the refiner's network runs on an ONNX Runtime session (``threads``,
    ``spinning`` as :func:`~facemodels.onnx_export.create_session`); warp-only has no network,
    so it always reports ``torch``.
    """

    def __init__(self, refiner_path: Path | None = None, *, device: torch.device | None = None,
                 backend: str = "torch", cache_dir: Path | None = None, threads: int = 1,
                 spinning: bool = False) -> None:
        if backend not in ("torch", "onnx"):
            raise ValueError(f"backend must be torch or onnx, got {backend!r}")
        self.path = refiner_path
        self.refiner: FrontalRefiner | None = None
        self.backend = "torch"
        self.onnx_path: Path | None = None
        self._heads: Heads | None = None
        if refiner_path is None:
            self.size = DEFAULT_SIZE
            self.card: dict[str, Any] = {
                "arch": "mesh_warp", "code_version": code_version(), "image_size": self.size,
                "description": "3D mean-face warp fitted to the five landmarks, hidden pixels from "
                               "the mirrored side (Hassner et al. 2015); no learned weights",
                "frontalize_auto": "never: warp-only lowered FER2013 PublicTest accuracy "
                                   "(docs/frontalizer.md)",
            }
            self.helpful_yaw: list[YawRange] = []
        else:
            self.refiner = load_refiner(str(refiner_path), device=device or torch.device("cpu"))
            self.refiner.requires_grad_(False)
            self.card = load_card(refiner_path)
            self.size = self.refiner.cfg.image_size
            self.helpful_yaw = _helpful_yaw(self.card, refiner_path)
            if backend == "onnx":
                if device is not None and device.type != "cpu":
                    raise ValueError(f"the onnx backend runs on the CPU, not {device}")
                self.onnx_path = cached_refiner_onnx(refiner_path, cache_dir or default_cache_root(),
                                                     model=self.refiner)
                self._heads = onnx_heads(create_session(self.onnx_path, threads=threads, spinning=spinning))
                self.backend = "onnx"
        self.warp = _mesh_warp(self.size)
        log.info("frontalizer: mesh warp%s (%dx%d, %s); auto frontalises |yaw| in %s",
                 f" + refiner {refiner_path}" if refiner_path else " only, no checkpoint", self.size,
                 self.size, self.backend, [r.label for r in self.helpful_yaw] or "no bin")

    @property
    def version(self) -> str:
        return str(self.card.get("code_version", "unknown"))

    def describe(self) -> dict[str, Any]:
        device = next(self.refiner.parameters()).device if self.refiner is not None else "cpu"
        return {"name": "frontalizer", "role": "frontalizer", "arch": str(self.card["arch"]),
                "version": self.version, "device": str(device), "backend": self.backend, "card": self.card}

    def helps_at(self, yaw: float) -> bool:
        """Whether the card's evaluation found frontalising helps at this |yaw| (never for warp-only)."""
        return any(r.contains(yaw) for r in self.helpful_yaw)

    def __call__(self, jobs: list[FrontalJob]) -> list[np.ndarray]:
        """Frontal faces (uint8, ``size`` square) for framed faces (batcher worker thread)."""
        crops = np.stack([j.crop for j in jobs])
        landmarks = np.stack([j.landmarks for j in jobs])
        return list(refine_frontalize(crops, landmarks, self.refiner, warp=self.warp, heads=self._heads))


def load_frontalizer(path: Path, *, device: torch.device, backend: str = "torch",
                     cache_dir: Path | None = None, threads: int = 1, spinning: bool = False,
                     ) -> FrontalizerModel | WarpFrontalizerModel:
    """The service model for a frontaliser checkpoint: a warp refiner or a DR-GAN, by its card.

    ``backend`` (with ``cache_dir``, ``threads``, ``spinning``) is the service's resolved backend,
    as the classifiers get it; it applies to a warp refiner. A DR-GAN runs on PyTorch.
    """
    if load_card(path).get("arch") == REFINER_ARCH:
        return WarpFrontalizerModel(path, device=device, backend=backend, cache_dir=cache_dir,
                                    threads=threads, spinning=spinning)
    return FrontalizerModel(path, device=device)
