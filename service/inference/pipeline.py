"""The inference pipeline: detect -> align -> classify, each model behind a dynamic batcher.

Built once in the app's lifespan. Importing this module loads nothing.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.config import Settings
from service.inference.batcher import BatchObserver, DynamicBatcher
from service.inference.classifier import Classifier, FaceJob
from service.inference.detector import Detection, RetinaFaceDetector
from training.data.align import align_face, resize_face
from training.runtime import resolve_device

__all__ = ["FaceResult", "InferenceEngine", "UnknownModelError"]

log = logging.getLogger(__name__)


class UnknownModelError(KeyError):
    """A request named a model that is not loaded."""


@dataclass(frozen=True, slots=True)
class FaceResult:
    detection: Detection
    probs: np.ndarray | None = None


class InferenceEngine:
    """Owns the loaded models and their batchers; routes call its async methods."""

    def __init__(self, settings: Settings, *, observer: BatchObserver | None = None) -> None:
        self.settings = settings
        self.observer = observer
        self.device = resolve_device(settings.device)
        self.detector: RetinaFaceDetector | None = None
        self.classifiers: dict[str, Classifier] = {}
        self._batchers: dict[str, DynamicBatcher] = {}
        self.ready = False

    # lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every model (off the event loop), start the batchers, warm up."""
        if self.settings.torch_threads > 0:
            torch.set_num_threads(self.settings.torch_threads)
        await asyncio.to_thread(self._load)
        s = self.settings
        self._batchers["detector"] = DynamicBatcher(
            self._detect_batch, name="detector", max_batch_size=s.detector_batch_size,
            max_wait_ms=s.max_wait_ms, max_queue=s.max_queue, observer=self.observer)
        for name, clf in self.classifiers.items():
            self._batchers[name] = DynamicBatcher(
                clf, name=name, max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms,
                max_queue=s.max_queue, observer=self.observer)
        for b in self._batchers.values():
            await b.start()
        if s.warmup:
            await self._warmup()
        self.ready = True
        log.info("inference engine ready on %s: %s", self.device, ", ".join(self.classifiers))

    async def stop(self) -> None:
        self.ready = False
        for b in self._batchers.values():
            await b.stop()
        self._batchers.clear()

    def _load(self) -> None:
        s = self.settings
        kwargs = dict(device=self.device, score_threshold=s.detection_threshold,
                      min_face_size=s.min_face_size, max_side=s.detector_max_side)
        if s.detector_weights is not None:
            self.detector = RetinaFaceDetector(s.detector_weights, **kwargs)
        else:
            self.detector = RetinaFaceDetector.from_cache(s.cache_dir, **kwargs)
        self.classifiers["default"] = Classifier(
            Path(s.classifier_checkpoint), name="default", role="default", device=self.device)
        if s.ensemble_checkpoint is not None:
            self.classifiers["ensemble"] = Classifier(
                Path(s.ensemble_checkpoint), name="ensemble", role="ensemble", device=self.device)

    async def _warmup(self) -> None:
        blank = np.full((240, 320, 3), 127, dtype=np.uint8)
        await self.detect(blank)
        for name, clf in self.classifiers.items():
            crop = np.full((clf.cfg.image_size,) * 2, 127, dtype=np.uint8)
            await self._batchers[name].submit_many([FaceJob(crop), FaceJob(crop, tta=True)])

    # model calls -------------------------------------------------------------------------
    def _detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]:
        assert self.detector is not None
        return self.detector.detect(images)

    def classifier(self, name: str) -> Classifier:
        try:
            return self.classifiers[name]
        except KeyError:
            raise UnknownModelError(name) from None

    async def detect(self, image: np.ndarray, *, max_faces: int | None = None) -> list[Detection]:
        """Faces in an RGB uint8 image, best first, at most ``max_faces``."""
        faces: list[Detection] = await self._batchers["detector"].submit(image)
        limit = min(max_faces or self.settings.max_faces, self.settings.max_faces)
        return faces[:limit]

    async def classify(self, crops: list[np.ndarray], *, model: str, tta: bool) -> list[np.ndarray]:
        """Probabilities for aligned uint8 face crops, batched with other requests' faces."""
        self.classifier(model)
        if not crops:
            return []
        return await self._batchers[model].submit_many([FaceJob(c, tta) for c in crops])

    async def predict(self, image: np.ndarray, *, model: str, tta: bool, max_faces: int | None,
                      detect: bool = True) -> list[FaceResult]:
        """Detect, align and classify every face; ``detect=False`` takes the image as one face."""
        clf = self.classifier(model)
        size = clf.cfg.image_size
        if detect:
            faces = await self.detect(image, max_faces=max_faces)
            crops = [align_face(image, np.asarray(f.landmarks), size=size) for f in faces]
        else:
            h, w = image.shape[:2]
            faces = [Detection(box=(0.0, 0.0, float(w), float(h)), score=1.0, landmarks=[])]
            crops = [resize_face(image, size=size)]
        probs = await self.classify(crops, model=model, tta=tta)
        return [FaceResult(f, p) for f, p in zip(faces, probs, strict=True)]

    def queue_depths(self) -> dict[str, int]:
        return {name: b.queue_depth for name, b in self._batchers.items()}

    def gpu_memory(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.memory_allocated(self.device))
