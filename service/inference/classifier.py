"""A loaded classifier checkpoint that classifies batches of aligned face crops."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facemodels.cache import default_cache_root
from facemodels.checkpoint import load_checkpoint
from facemodels.models.cfg import ModelCfg
from facemodels.onnx_export import cached_classifier_onnx, create_session
from facemodels.predict import predict_probs, predict_probs_onnx

__all__ = ["Classifier", "FaceJob"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FaceJob:
    """One face for the classifier batcher: an aligned uint8 crop and whether to use 10-crop."""

    crop: np.ndarray
    tta: bool = False


class Classifier:
    """A checkpoint loaded once onto ``device``; calling it classifies a batch of :class:`FaceJob`.

    The preprocessing is :func:`facemodels.predict.predict_probs`, the same code that evaluates the
    model in training, driven by the :class:`ModelCfg` stored with the weights. With the ``onnx``
    backend the same preprocessing feeds an ONNX Runtime session
    (:func:`facemodels.predict.predict_probs_onnx`) of the graph exported from these weights into
    ``<cache_dir>/onnx/`` (:func:`facemodels.onnx_export.cached_classifier_onnx`).
    """

    def __init__(self, path: Path, *, name: str, role: str, device: torch.device,
                 backend: str = "torch", cache_dir: Path | None = None, threads: int = 1) -> None:
        self.path = Path(path)
        self.name, self.role, self.device, self.backend = name, role, device, backend
        self.model, self.card = load_checkpoint(path, device=device)
        self.model.requires_grad_(False)
        if device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.cfg: ModelCfg = self.model.cfg
        self.onnx_path: Path | None = None
        self._session: Any = None
        if backend == "onnx":
            if device.type != "cpu":
                raise ValueError(f"the onnx backend runs on the CPU, not {device}")
            self.onnx_path = cached_classifier_onnx(path, cache_dir or default_cache_root(),
                                                    model=self.model)
            self._session = create_session(self.onnx_path, threads=threads)
        elif backend != "torch":
            raise ValueError(f"backend must be torch or onnx, got {backend!r}")
        log.info("loaded classifier %s (%s) from %s on %s (%s)", name, self.arch, path, device, backend)

    @property
    def arch(self) -> str:
        return str(self.card["arch"])

    @property
    def version(self) -> str:
        return str(self.card.get("code_version", "unknown"))

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.cfg.class_names

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "arch": self.arch, "version": self.version,
                "device": str(self.device), "backend": self.backend, "card": self.card}

    def __call__(self, jobs: list[FaceJob]) -> list[np.ndarray]:
        """Class probabilities for each job, in order (runs in the batcher's worker thread)."""
        out: list[np.ndarray | None] = [None] * len(jobs)
        for tta in (False, True):
            idx = [i for i, j in enumerate(jobs) if j.tta == tta]
            if not idx:
                continue
            crops = torch.from_numpy(np.stack([jobs[i].crop for i in idx]))
            if self._session is not None:
                probs = predict_probs_onnx(self._session, crops, self.cfg, tta=tta, batch_size=len(idx))
            else:
                probs = predict_probs(self.model, crops.to(self.device), tta=tta, batch_size=len(idx))
            for i, p in zip(idx, probs.numpy(), strict=True):
                out[i] = p
        return out  # type: ignore[return-value]
