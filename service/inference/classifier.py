"""A loaded classifier checkpoint that classifies batches of aligned face crops."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facemodels.cache import default_cache_root
from facemodels.checkpoint import load_checkpoint, weights_path
from facemodels.models.cfg import ModelCfg
from facemodels.onnx_export import cached_classifier_onnx, create_session, sha256_file
from facemodels.predict import predict_probs, predict_probs_onnx

__all__ = ["Classifier", "FaceJob", "int8_graph", "int8_graph_path"]

log = logging.getLogger(__name__)


def int8_graph_path(checkpoint: Path) -> Path:
    """Where a checkpoint's int8 graph sits: ``<stem>.int8.onnx`` beside its weights file
    (``fer-train quantize x x.int8`` writes it there, with its note ``<stem>.int8.onnx.json``)."""
    weights = weights_path(checkpoint)
    return weights.with_name(f"{weights.stem}.int8.onnx")


def int8_graph(checkpoint: Path) -> Path | None:
    """The checkpoint's int8 graph when there is one and it was quantised from these weights.

    Its note must hold ``weights_sha256``, the SHA-256 of the checkpoint's weights file, and
    (when present) ``onnx_sha256``, that of the graph's bytes. A graph whose note is missing,
    unreadable or names other bytes is not served: a warning says why, and ``None`` is returned
    (the caller serves the float32 graph).
    """
    graph = int8_graph_path(checkpoint)
    if not graph.is_file():
        return None
    note_path = graph.with_name(graph.name + ".json")
    try:
        note = json.loads(note_path.read_text())
        want = note["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("not serving the int8 graph %s: its note %s is missing or names no weights_sha256 "
                    "(serving the float32 graph)", graph, note_path.name)
        return None
    weights = weights_path(checkpoint)
    have = sha256_file(weights)
    if want != have:
        log.warning("not serving the int8 graph %s: it was quantised from weights with SHA-256 %.12s..., "
                    "but %s has %.12s... (re-quantise with fer-train quantize; serving the float32 graph)",
                    graph, want, weights, have)
        return None
    onnx_sha = note.get("onnx_sha256")
    if onnx_sha is not None and onnx_sha != sha256_file(graph):
        log.warning("not serving the int8 graph %s: its bytes do not match the SHA-256 in %s "
                    "(serving the float32 graph)", graph, note_path.name)
        return None
    return graph


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
    ``<cache_dir>/onnx/`` (:func:`facemodels.onnx_export.cached_classifier_onnx`), or, with
    ``int8="auto"``, of the int8 graph beside the checkpoint when :func:`int8_graph` accepts it
    (``precision`` says which; the torch backend is always ``fp32``).
    """

    def __init__(self, path: Path, *, name: str, role: str, device: torch.device,
                 backend: str = "torch", cache_dir: Path | None = None, threads: int = 1,
                 spinning: bool = False, int8: str = "auto") -> None:
        self.path = Path(path)
        self.name, self.role, self.device, self.backend = name, role, device, backend
        self.model, self.card = load_checkpoint(path, device=device)
        self.model.requires_grad_(False)
        if device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.cfg: ModelCfg = self.model.cfg
        self.onnx_path: Path | None = None
        self.precision = "fp32"
        self._session: Any = None
        if int8 not in ("auto", "off"):
            raise ValueError(f"int8 must be auto or off, got {int8!r}")
        if backend == "onnx":
            if device.type != "cpu":
                raise ValueError(f"the onnx backend runs on the CPU, not {device}")
            quantised = int8_graph(path) if int8 == "auto" else None
            if quantised is not None:
                self.onnx_path, self.precision = quantised, "int8"
            else:
                self.onnx_path = cached_classifier_onnx(path, cache_dir or default_cache_root(),
                                                        model=self.model)
            self._session = create_session(self.onnx_path, threads=threads, spinning=spinning)
        elif backend != "torch":
            raise ValueError(f"backend must be torch or onnx, got {backend!r}")
        log.info("loaded classifier %s (%s) from %s on %s (%s, %s)", name, self.arch, path, device, backend,
                 self.precision)

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
                "device": str(self.device), "backend": self.backend, "precision": self.precision,
                "card": self.card}

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
