"""The inference pipeline: detect -> align -> classify, each model behind a dynamic batcher.

Built once in the app's lifespan. Importing this module loads nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import cv2
import numpy as np
import torch

from facemodels.device import resolve_device
from facemodels.face.align import align_face, resize_face
from facemodels.face.detector import Detection, RetinaFaceDetector
from facemodels.face.detector_int8 import usable_int8_graph
from facemodels.face.pose import estimate_yaw
from facemodels.face.retinaface_convert import ARCH as DETECTOR_ARCH
from facemodels.face.retinaface_convert import ensure_detector_weights
from facemodels.onnx_export import resolve_backend
from service.config import Settings
from service.inference.batcher import BatchObserver, DynamicBatcher
from service.inference.catalog import classifier_specs, detector_int8_path, served_frontalizer_checkpoint
from service.inference.classifier import Classifier, FaceJob
from service.inference.decode import image_scale, original_size
from service.inference.frontalizer import (
    FrontalizerModel,
    FrontalJob,
    WarpFrontalizerModel,
    load_frontalizer,
)

__all__ = [
    "FaceResult",
    "FrontalizeMode",
    "FrontalizerUnavailableError",
    "InferenceEngine",
    "UnknownModelError",
    "default_threads",
    "face_yaw",
    "usable_cores",
]

log = logging.getLogger(__name__)


#: Most intra-op threads :func:`default_threads` gives one model: this detector and these
#: classifiers are small, so a larger pool mostly adds synchronisation.
MAX_DEFAULT_THREADS = 8


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def default_threads(cores: int | None = None) -> int:
    """Intra-op threads per model when ``FER_TORCH_THREADS`` is 0: half the usable cores,
    at least 1 and at most :data:`MAX_DEFAULT_THREADS`.

    Half, because under load the detector's and the classifier's batches run at the same time,
    each in its own worker thread, and the event loop needs CPU too. More threads per model would
    shorten one request on an idle machine, but oversubscribe the cores under concurrent load,
    where ONNX Runtime's spinning workers then burn the time the other model needs (two threads
    on two cores halved the sequential throughput and cut the 8-client one to 0.5-0.64x;
    docs/results.md, "HTTP path and intra-op threads").
    """
    cores = usable_cores() if cores is None else cores
    return max(1, min(cores // 2, MAX_DEFAULT_THREADS))


class UnknownModelError(KeyError):
    """A request named a model that is not loaded."""


def face_yaw(face: Detection) -> float | None:
    """Estimated yaw in degrees from the five landmarks (+ = nose towards the image's right)."""
    if len(face.landmarks) != 5:
        return None
    yaw = float(estimate_yaw(np.asarray(face.landmarks, dtype=np.float64)))
    return None if np.isnan(yaw) else round(yaw, 1)


def _rescale(face: Detection, sx: float, sy: float) -> Detection:
    """``face`` with its box and landmarks multiplied by ``(sx, sy)``."""
    if sx == 1.0 and sy == 1.0:
        return face
    x1, y1, x2, y2 = face.box
    return Detection(box=(x1 * sx, y1 * sy, x2 * sx, y2 * sy), score=face.score,
                     landmarks=[(x * sx, y * sy) for x, y in face.landmarks])


class FrontalizerUnavailableError(RuntimeError):
    """Frontalising was asked for but the server runs without a frontaliser."""

    MESSAGE = ("this server runs without a frontaliser (FER_FRONTALIZER=off, or "
               "FER_FRONTALIZER_WARP=false and no frontaliser checkpoint)")


class FrontalizeMode(StrEnum):
    """When ``/predict`` frontalises a face before classifying it."""

    AUTO = "auto"  # only where |yaw| >= frontalize_min_yaw and the card says it helps there
    ON = "on"
    OFF = "off"


@dataclass(frozen=True, slots=True)
class FaceResult:
    detection: Detection
    probs: np.ndarray | None = None
    yaw: float | None = None
    frontalized: bool = False


class InferenceEngine:
    """Owns the loaded models and their batchers; routes call its async methods."""

    def __init__(self, settings: Settings, *, observer: BatchObserver | None = None) -> None:
        self.settings = settings
        self.observer = observer
        self.device = resolve_device(settings.device)
        self.backend = resolve_backend(settings.backend, self.device)
        self.threads = settings.torch_threads or default_threads()  # intra-op, per model
        self.detector: RetinaFaceDetector | None = None
        self.classifiers: dict[str, Classifier] = {}
        self.frontalizer: FrontalizerModel | WarpFrontalizerModel | None = None
        self._batchers: dict[str, DynamicBatcher] = {}
        self.ready = False

    # lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every model (off the event loop), start the batchers, warm up."""
        torch.set_num_threads(self.threads)
        log.info("intra-op threads per model: %d (%s; %d usable cores)", self.threads,
                 "FER_TORCH_THREADS" if self.settings.torch_threads else "default", usable_cores())
        await asyncio.to_thread(self._load)
        s = self.settings
        models: dict[str, Any] = {"detector": self._detect_batch, **self.classifiers}
        if self.frontalizer is not None:
            models["frontalizer"] = self.frontalizer
        for name, fn in models.items():
            self._batchers[name] = DynamicBatcher(
                fn, name=name, max_wait_ms=s.max_wait_ms, max_queue=s.max_queue,
                max_batch_size=s.detector_batch_size if name == "detector" else s.max_batch_size,
                observer=self.observer)
        for b in self._batchers.values():
            await b.start()
        if s.warmup:
            await self._warmup()
        self.ready = True
        log.info("inference engine ready on %s (%s): %s", self.device, self.backend,
                 ", ".join(self.classifiers))

    async def stop(self) -> None:
        self.ready = False
        for b in self._batchers.values():
            await b.stop()
        self._batchers.clear()

    def _load(self) -> None:
        s = self.settings
        # Both backends get the same intra-op thread count: FER_TORCH_THREADS, else
        # default_threads() (half the usable cores).
        runtime = dict(backend=self.backend, cache_dir=s.cache_dir, threads=self.threads,
                       spinning=s.ort_spinning)
        weights = s.detector_weights or ensure_detector_weights(s.cache_dir)
        graph = detector_int8_path(s) if self.backend == "onnx" and s.int8 == "auto" else None
        self.detector = RetinaFaceDetector(
            weights, device=self.device, score_threshold=s.detection_threshold,
            min_face_size=s.min_face_size, max_side=s.detector_max_side,
            adaptive_side=s.detector_adaptive_side or None, close_up=s.detector_closeup_fraction,
            int8_graph=usable_int8_graph(graph, weights) if graph is not None else None, **runtime)
        for spec in classifier_specs(s):  # default first; each checkpoint file loaded once
            self.classifiers[spec.name] = Classifier(spec.path, name=spec.name, role=spec.role,
                                                     device=self.device, int8=s.int8, **runtime)
        frontalizer = served_frontalizer_checkpoint(s)
        if frontalizer is not None:
            self.frontalizer = load_frontalizer(frontalizer, device=self.device, **runtime)
        elif s.frontalizer == "warp" or (s.frontalizer == "auto" and s.frontalizer_warp):
            self.frontalizer = WarpFrontalizerModel()
        if s.frontalizer == "auto" and frontalizer is not None and not s.frontalizer_warp:
            log.info("FER_FRONTALIZER_WARP=false only stops the warp-only fallback; %s is served "
                     "(FER_FRONTALIZER=off turns frontalising off)", frontalizer)

    async def _warmup(self) -> None:
        blank = np.full((240, 320, 3), 127, dtype=np.uint8)
        await self.detect(blank)
        for name, clf in self.classifiers.items():
            crop = np.full((clf.cfg.image_size,) * 2, 127, dtype=np.uint8)
            await self._batchers[name].submit_many([FaceJob(crop), FaceJob(crop, tta=True)])
        if self.frontalizer is not None:
            await self._batchers["frontalizer"].submit(FrontalJob.blank(self.frontalizer.size))

    # model calls -------------------------------------------------------------------------
    def _detect_batch(self, images: list[np.ndarray]) -> list[list[Detection]]:
        assert self.detector is not None
        return self.detector.detect(images)

    def detector_info(self) -> dict[str, Any]:
        """What runs the detector (``GET /models``): backend, precision, the int8 graph, sides."""
        d = self.detector
        assert d is not None
        return {"name": "detector", "arch": DETECTOR_ARCH, "device": str(d.device),
                "backend": d.backend, "precision": d.precision,
                "graph": d.onnx_path.name if d.precision == "int8" and d.onnx_path else None,
                "max_side": d.max_side, "adaptive_side": d.adaptive_side,
                "closeup_fraction": d.close_up if d.adaptive_side else None}

    def classifier(self, name: str) -> Classifier:
        try:
            return self.classifiers[name]
        except KeyError:
            raise UnknownModelError(name) from None

    async def detect(self, image: np.ndarray, *, max_faces: int | None = None) -> list[Detection]:
        """Faces in an RGB uint8 image, best first, at most ``max_faces``.

        Boxes and landmarks are in the original image's pixels, also when ``image`` is a
        :class:`~service.inference.decode.DecodedImage` decoded at a reduced size.
        """
        sx, sy = image_scale(image)
        return [_rescale(f, sx, sy) for f in await self._detect_local(image, max_faces=max_faces)]

    async def _detect_local(self, image: np.ndarray, *, max_faces: int | None) -> list[Detection]:
        """Like :meth:`detect`, in the pixels of ``image`` itself (reduced, if it was decoded so)."""
        faces: list[Detection] = await self._batchers["detector"].submit(np.asarray(image))
        limit = min(max_faces or self.settings.max_faces, self.settings.max_faces)
        return faces[:limit]

    async def classify(self, crops: list[np.ndarray], *, model: str, tta: bool) -> list[np.ndarray]:
        """Probabilities for aligned uint8 face crops, batched with other requests' faces."""
        self.classifier(model)
        if not crops:
            return []
        return await self._batchers[model].submit_many([FaceJob(c, tta) for c in crops])

    async def frontalize(self, image: np.ndarray, faces: list[Detection]) -> list[np.ndarray]:
        """Frontal uint8 faces (the frontaliser's size) for detected ``faces`` of ``image`` (in
        original-image pixels, as :meth:`detect` returns them)."""
        if self.frontalizer is None:
            raise FrontalizerUnavailableError(FrontalizerUnavailableError.MESSAGE)
        size = self.frontalizer.size
        sx, sy = image_scale(image)  # faces are in original pixels; frame in the image's own
        pixels = np.asarray(image)
        jobs = [FrontalJob.frame(pixels, np.asarray(_rescale(f, 1 / sx, 1 / sy).landmarks), size=size)
                for f in faces]
        if not jobs:
            return []
        return await self._batchers["frontalizer"].submit_many(jobs)

    def _wants_frontal(self, mode: FrontalizeMode, yaw: float | None) -> bool:
        if mode is FrontalizeMode.OFF or yaw is None:
            return False
        if self.frontalizer is None:
            if mode is FrontalizeMode.ON:
                raise FrontalizerUnavailableError(
                    f"frontalize=on needs a frontaliser: {FrontalizerUnavailableError.MESSAGE}")
            return False
        if mode is FrontalizeMode.ON:
            return True
        return abs(yaw) >= self.settings.frontalize_min_yaw and self.frontalizer.helps_at(yaw)

    async def predict(self, image: np.ndarray, *, model: str, tta: bool, max_faces: int | None,
                      detect: bool = True, frontalize: FrontalizeMode = FrontalizeMode.AUTO,
                      ) -> list[FaceResult]:
        """Detect, align and classify every face; ``detect=False`` takes the image as one face.

        Faces that ``frontalize`` selects (see :class:`FrontalizeMode`) are frontalised first
        and the frontal face, resized to the classifier's input, is what gets classified.
        """
        clf = self.classifier(model)
        size = clf.cfg.image_size
        sx, sy = image_scale(image)
        pixels = np.asarray(image)  # a reduced decode is aligned from in its own pixels
        if not detect:
            w, h = original_size(image)
            face = Detection(box=(0.0, 0.0, float(w), float(h)), score=1.0, landmarks=[])
            (probs,) = await self.classify([resize_face(pixels, size=size)], model=model, tta=tta)
            return [FaceResult(face, probs)]
        local = await self._detect_local(pixels, max_faces=max_faces)
        faces = [_rescale(f, sx, sy) for f in local]
        yaws = [face_yaw(f) for f in faces]
        frontal = [self._wants_frontal(frontalize, y) for y in yaws]
        # one grayscale conversion per image, not one per face (align_face converts an RGB input)
        gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY) if local and pixels.ndim == 3 else pixels
        crops = [align_face(gray, np.asarray(f.landmarks), size=size) for f in local]
        chosen = [i for i, want in enumerate(frontal) if want]
        if chosen:
            frontal_faces = await self.frontalize(image, [faces[i] for i in chosen])
            for i, fz in zip(chosen, frontal_faces, strict=True):
                crops[i] = resize_face(fz, size=size)
        probs = await self.classify(crops, model=model, tta=tta)
        return [FaceResult(f, p, y, fr) for f, p, y, fr in zip(faces, probs, yaws, frontal, strict=True)]

    def queue_depths(self) -> dict[str, int]:
        return {name: b.queue_depth for name, b in self._batchers.items()}

    def gpu_memory(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return int(torch.cuda.memory_allocated(self.device))
