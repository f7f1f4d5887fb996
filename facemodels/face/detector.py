"""Batched RetinaFace (MobileNet-0.25) face detection with five landmarks per face.

Usage::

    detector = RetinaFaceDetector.from_cache(cache_dir)       # converts the weights once
    faces = detector.detect([rgb_a, rgb_b])                   # list[list[Detection]]

Images are resized so their long side is at most ``max_side``; images whose sizes, rounded up
to a multiple of 32, agree run as one batch (zero-padded, zero being the training mean, i.e.
the mean colour), and other sizes run as their own sub-batches, so a small image never pays for
a large one's padding. Priors are generated for the padded size. Images are placed top-left,
so decoded coordinates need no shift; detections whose centre lies in an image's padding are
dropped, boxes are clipped to the image, and everything is scaled back to the original pixels.

With ``adaptive_side`` set, every image first runs at that (smaller) long side, and only the images
where that pass found no close-up (no face at least ``close_up`` of the image's long side tall) run
again at ``max_side``, together as one batch: close-ups cost the small pass alone, other photos
both. ``runs`` counts the images each long side ran.

On the ``onnx`` backend the network is the float32 graph exported from the weights, or the graph
passed as ``int8_graph`` (an int8 quantisation of these weights: ``fer-train quantize-detector``;
:mod:`facemodels.face.detector_int8` checks its note).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torchvision.ops import nms

from facemodels.cache import default_cache_root
from facemodels.face.retinaface_convert import ensure_detector_weights, sha256_file
from facemodels.face.retinaface_net import (
    BGR_MEAN,
    RetinaFaceNet,
    decode_boxes,
    decode_landmarks,
    prior_boxes,
)
from facemodels.onnx_export import (
    DETECTOR_INPUT,
    DETECTOR_OUTPUTS,
    cached_detector_onnx,
    create_session,
)

__all__ = ["Detection", "DetectorWeightsError", "RetinaFaceDetector", "load_detector_net"]

log = logging.getLogger(__name__)

_ALIGN = 32  # the coarsest stride; padding to a multiple keeps every level's grid exact


def _padded_size(image: np.ndarray) -> tuple[int, int]:
    """(H, W) rounded up to a multiple of the coarsest stride."""
    h, w = image.shape[:2]
    return -(-h // _ALIGN) * _ALIGN, -(-w // _ALIGN) * _ALIGN


class DetectorWeightsError(RuntimeError):
    """The detector weights file is missing, corrupt, or does not fit the network."""


@dataclass(frozen=True, slots=True)
class Detection:
    """One face, in the original image's pixel coordinates.

    Attributes:
        box: ``(x1, y1, x2, y2)``, clipped to the image.
        score: Face probability in [0, 1].
        landmarks: Five ``(x, y)`` points in RetinaFace order, named as seen in the image
            (the subject's own right eye is the image-left eye): image-left eye, image-right
            eye, nose tip, image-left mouth corner, image-right mouth corner. This is the
            order of the usual 5-point (ArcFace) alignment template. Points are not clipped.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: list[tuple[float, float]]


class RetinaFaceDetector:
    """RetinaFace-MobileNet0.25 that detects faces in batches of RGB uint8 images.

    Args:
        weights: A ``.safetensors`` file from :mod:`facemodels.face.retinaface_convert`;
            ``None`` uses (and if needed creates) the default cache file.
        device: Torch device to run on.
        score_threshold: Keep detections whose face probability exceeds this.
        nms_threshold: IoU above which a lower-scored overlapping box is suppressed.
        min_face_size: Drop faces whose box is narrower or shorter than this many original
            pixels.
        max_side: Downscale images whose long side exceeds this before detection (speed);
            ``None`` keeps full resolution.
        top_k: Candidates per image kept (by score) before NMS.
        max_faces: Detections per image kept after NMS.
        backend: ``torch`` runs the network in PyTorch; ``onnx`` in ONNX Runtime on the CPU,
            from the graph :func:`facemodels.onnx_export.cached_detector_onnx` exports from
            ``weights`` into ``cache_dir`` (once; reused while the weights are unchanged).
            Everything around the network (resizing, padding, priors, NMS) is the same code.
        cache_dir: cache root for the ONNX file (``onnx`` backend);
            :func:`~facemodels.cache.default_cache_root` when ``None``.
        threads: ONNX Runtime intra-op threads (``onnx`` backend; 0 = one per core).
        spinning: whether ONNX Runtime's idle worker threads busy-wait (``onnx`` backend; see
            :func:`facemodels.onnx_export.create_session`).
        int8_graph: ``onnx`` backend: run this ONNX graph, an int8 quantisation of ``weights``
            (``fer-train quantize-detector``), instead of the float32 graph exported from them.
            Its note is not checked here (:func:`facemodels.face.detector_int8.usable_int8_graph`
            does); everything around the network stays the same code.
        adaptive_side: detect at this long side first, and again at ``max_side`` only where that
            found no close-up (module docstring); ``None`` runs every image at ``max_side`` once.
        close_up: with ``adaptive_side``, a face whose box is at least this share of the image's
            long side tall makes the first pass final.

    Raises:
        DetectorWeightsError: the weights file is missing, corrupt or mismatched, or
            ``int8_graph`` cannot be loaded (the message names the file).
        ValueError: an unknown backend, ``onnx`` on a device other than the CPU, ``int8_graph``
            without the ``onnx`` backend, or an ``adaptive_side`` not below ``max_side``.
    """

    def __init__(
        self,
        weights: Path | None = None,
        *,
        device: str | torch.device = "cpu",
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        min_face_size: float = 0.0,
        max_side: int | None = 640,
        top_k: int = 5000,
        max_faces: int = 750,
        backend: str = "torch",
        cache_dir: Path | None = None,
        threads: int = 1,
        spinning: bool = False,
        int8_graph: Path | None = None,
        adaptive_side: int | None = None,
        close_up: float = 0.2,
    ) -> None:
        if max_side is not None and max_side < _ALIGN:
            raise ValueError(f"max_side must be at least {_ALIGN}, got {max_side}")
        if backend not in ("torch", "onnx"):
            raise ValueError(f"backend must be torch or onnx, got {backend!r}")
        if int8_graph is not None and backend != "onnx":
            raise ValueError(f"an int8 graph runs on the onnx backend, not {backend}")
        if adaptive_side is not None and not (
                adaptive_side >= _ALIGN and (max_side is None or adaptive_side < max_side)):
            raise ValueError(f"adaptive_side must be at least {_ALIGN} and below max_side ({max_side}), "
                             f"got {adaptive_side}")
        if not 0 < close_up <= 1:
            raise ValueError(f"close_up must be in (0, 1], got {close_up}")
        self.device = torch.device(device)
        if backend == "onnx" and self.device.type != "cpu":
            raise ValueError(f"the onnx backend runs on the CPU, not {self.device}")
        self.weights = (Path(weights) if weights is not None
                        else ensure_detector_weights(cache_dir or default_cache_root()))
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.min_face_size = min_face_size
        self.max_side = max_side
        self.adaptive_side = adaptive_side
        self.close_up = close_up
        #: Images the network ran on, by the long side they ran at (``None``: full resolution).
        self.runs: Counter[int | None] = Counter()
        self.top_k = top_k
        self.max_faces = max_faces
        self.net = load_detector_net(self.weights).to(self.device, memory_format=torch.channels_last).eval()
        self._mean = torch.tensor(BGR_MEAN, device=self.device)
        self._mean_np = np.asarray(BGR_MEAN, np.float32)
        self._mean_scalar = (*(float(m) for m in BGR_MEAN), 0.0)  # cv2's 4-channel scalar
        self.backend = backend
        self.precision = "int8" if int8_graph is not None else "fp32"
        self.onnx_path: Path | None = None
        self._session: Any = None
        if int8_graph is not None:
            self.onnx_path = Path(int8_graph)
            try:
                self._session = create_session(self.onnx_path, threads=threads, spinning=spinning)
            except Exception as exc:  # ONNX Runtime raises its own kinds; name the file in one
                raise DetectorWeightsError(f"cannot load the int8 detector graph {self.onnx_path}: "
                                           f"{exc}") from exc
        elif backend == "onnx":
            self.onnx_path = cached_detector_onnx(self.weights, cache_dir or default_cache_root(),
                                                  net=self.net)
            self._session = create_session(self.onnx_path, threads=threads, spinning=spinning)
        log.info("RetinaFace detector loaded from %s on %s (%s, %s%s)", self.weights, self.device, backend,
                 self.precision, f" from {self.onnx_path}" if int8_graph is not None else "")

    @classmethod
    def from_cache(cls, cache_dir: Path, /, **kwargs: Any) -> RetinaFaceDetector:
        """Build from ``<cache_dir>/detector/``, converting the weights first if missing.

        Args:
            cache_dir: the cache root (callers pass their configured one).
            **kwargs: Options for :class:`RetinaFaceDetector` (the ``onnx`` backend caches its
                graph under the same root unless ``cache_dir`` is given).
        """
        kwargs.setdefault("cache_dir", cache_dir)
        return cls(ensure_detector_weights(cache_dir), **kwargs)

    def detect(self, images: list[np.ndarray]) -> list[list[Detection]]:
        """Detect faces in each image, running the network once for the whole batch (twice with
        ``adaptive_side``: the second time for the images whose first pass found no close-up).

        Args:
            images: RGB ``uint8`` arrays of shape (H, W, 3); sizes may differ.

        Returns:
            One list per image of :class:`Detection`, highest score first.
        """
        if not images:
            return []
        images = [_check_image(image, n) for n, image in enumerate(images)]
        if self.adaptive_side is None:
            return self._detect_at(images, self.max_side)
        results = self._detect_at(images, self.adaptive_side)
        again = [n for n, (image, faces) in enumerate(zip(images, results, strict=True))
                 if self._needs_full_pass(image, faces)]
        if again:
            for n, faces in zip(again, self._detect_at([images[n] for n in again], self.max_side),
                                strict=True):
                results[n] = faces
        return results

    def _needs_full_pass(self, image: np.ndarray, faces: list[Detection]) -> bool:
        """Whether an image the ``adaptive_side`` pass saw needs the ``max_side`` pass too: it was
        shrunk for the first pass, and no face found is a close-up."""
        long_side = max(image.shape[:2])
        if self.adaptive_side is None or long_side <= self.adaptive_side:
            return False  # the first pass saw every pixel; the second would see the same
        tallest = max((f.box[3] - f.box[1] for f in faces), default=0.0)
        return tallest < self.close_up * long_side

    def network_input(self, images: list[np.ndarray]) -> np.ndarray:
        """The contiguous float32 ``(N, 3, H, W)`` batch the network gets for ``images`` at
        ``max_side``, prepared as :meth:`detect` prepares it (an int8 graph is calibrated on it)."""
        resized = [self._resize(_check_image(image, n), self.max_side)[0] for n, image in enumerate(images)]
        return np.ascontiguousarray(self._batch(resized).cpu().numpy())

    def _detect_at(self, images: list[np.ndarray], max_side: int | None) -> list[list[Detection]]:
        """:meth:`detect` with every image shrunk to the long side ``max_side``, one pass."""
        prepared = [self._resize(image, max_side) for image in images]
        # Images whose padded sizes differ run as separate sub-batches, so a small image is
        # never padded up to a large one (that would multiply its cost on CPU).
        groups: dict[tuple[int, int], list[int]] = {}
        for n, (img, _) in enumerate(prepared):
            groups.setdefault(_padded_size(img), []).append(n)
        results: list[list[Detection]] = [[] for _ in images]
        with torch.inference_mode():
            for members in groups.values():
                resized = [prepared[n][0] for n in members]
                batch = self._batch(resized)
                loc, conf, landm = self._forward(batch)
                priors = prior_boxes(batch.shape[2], batch.shape[3], device=self.device)
                boxes = decode_boxes(loc, priors)
                points = decode_landmarks(landm, priors)
                scores = conf[..., 1]
                for i, n in enumerate(members):
                    results[n] = self._select(boxes[i], scores[i], points[i], prepared[n][0].shape[:2],
                                              prepared[n][1], images[n])
        self.runs[max_side] += len(images)
        return results

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The network's (loc, conf, landm) for a prepared batch, in PyTorch or ONNX Runtime."""
        if self._session is None:
            return self.net(batch)
        outputs = self._session.run(list(DETECTOR_OUTPUTS), {DETECTOR_INPUT: batch.numpy()})
        loc, conf, landm = (torch.from_numpy(o) for o in outputs)
        return loc, conf, landm

    @staticmethod
    def _resize(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, tuple[float, float]]:
        """Downscale so the long side is at most ``max_side``; return (image, (sx, sy))."""
        h, w = image.shape[:2]
        if max_side is None or max(h, w) <= max_side:
            return image, (1.0, 1.0)
        ratio = max_side / max(h, w)
        nw, nh = max(1, round(w * ratio)), max(1, round(h * ratio))
        small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        return small, (nw / w, nh / h)

    def _batch(self, images: list[np.ndarray]) -> torch.Tensor:
        """Mean-subtracted BGR float batch, each image top-left, zero (mean) padded.

        For PyTorch the batch is built as NHWC and returned as an NCHW view (channels-last, the
        faster layout for this network's depthwise convolutions); ONNX Runtime gets a contiguous
        NCHW array. On the CPU each image is written into its slot in one pass (uint8 RGB in,
        float BGR minus the mean out): about 4x faster than torch operations, bit for bit the same.
        """
        height = max(_padded_size(i)[0] for i in images)
        width = max(_padded_size(i)[1] for i in images)
        if self._session is not None:
            planar = np.zeros((len(images), 3, height, width), np.float32)
            for n, img in enumerate(images):
                h, w = img.shape[:2]
                for c in range(3):  # plane c of BGR is channel 2 - c of RGB
                    np.subtract(img[:, :, 2 - c], self._mean_np[c], out=planar[n, c, :h, :w])
            return torch.from_numpy(planar)
        if self.device.type == "cpu":
            interleaved = np.zeros((len(images), height, width, 3), np.float32)
            for n, img in enumerate(images):
                h, w = img.shape[:2]
                cv2.subtract(cv2.cvtColor(img, cv2.COLOR_RGB2BGR), self._mean_scalar,
                             dst=interleaved[n, :h, :w], dtype=cv2.CV_32F)
            return torch.from_numpy(interleaved).permute(0, 3, 1, 2)
        batch = torch.zeros(len(images), height, width, 3, device=self.device)
        for n, img in enumerate(images):
            rgb = torch.from_numpy(np.ascontiguousarray(img)).to(self.device)
            batch[n, : img.shape[0], : img.shape[1]] = rgb.flip(-1).float() - self._mean
        return batch.permute(0, 3, 1, 2)

    def _select(
        self,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        points: torch.Tensor,
        size: tuple[int, int],
        scale: tuple[float, float],
        original: np.ndarray,
    ) -> list[Detection]:
        """Threshold, drop padding hits, NMS and map one image's detections back."""
        h, w = size
        centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
        centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
        keep = (scores > self.score_threshold) & (centre_x < w) & (centre_y < h)
        if self.min_face_size > 0:
            box_w = (boxes[:, 2] - boxes[:, 0]) / scale[0]
            box_h = (boxes[:, 3] - boxes[:, 1]) / scale[1]
            keep &= torch.minimum(box_w, box_h) >= self.min_face_size
        idx = keep.nonzero().squeeze(1)
        if idx.numel() == 0:
            return []
        idx = idx[scores[idx].argsort(descending=True)[: self.top_k]]
        idx = idx[nms(boxes[idx], scores[idx], self.nms_threshold)[: self.max_faces]]
        sx, sy = scale
        factor = torch.tensor([sx, sy], device=boxes.device)
        oh, ow = original.shape[:2]
        out_boxes = (boxes[idx].view(-1, 2, 2) / factor).view(-1, 4)
        out_boxes[:, 0::2] = out_boxes[:, 0::2].clamp(0, ow)
        out_boxes[:, 1::2] = out_boxes[:, 1::2].clamp(0, oh)
        out_points = points[idx] / factor
        return [
            Detection(
                box=(b[0], b[1], b[2], b[3]),
                score=s,
                landmarks=[(x, y) for x, y in p],
            )
            for b, s, p in zip(
                out_boxes.tolist(), scores[idx].tolist(), out_points.tolist(), strict=True
            )
        ]


def _check_image(image: np.ndarray, index: int) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise TypeError(f"image {index}: expected a uint8 numpy array")
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image {index}: expected shape (H, W, 3), got {image.shape}")
    return image


def load_detector_net(path: Path) -> RetinaFaceNet:
    """Build the network from a safetensors file, checking its card's SHA-256 when present."""
    if not path.is_file():
        raise DetectorWeightsError(f"detector weights not found: {path}")
    card = path.with_suffix(".json")
    if card.is_file():
        try:
            expected = json.loads(card.read_text()).get("weights_sha256")
        except (OSError, ValueError, AttributeError) as exc:
            raise DetectorWeightsError(f"unreadable detector card {card}: {exc}") from exc
        if expected and sha256_file(path) != expected:
            raise DetectorWeightsError(
                f"detector weights {path} do not match the SHA-256 in {card}; "
                "delete both and convert again"
            )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DetectorWeightsError(f"cannot read detector weights {path}: {exc}") from exc
    net = RetinaFaceNet()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DetectorWeightsError(
            f"detector weights {path} do not fit RetinaFaceNet: {exc}"
        ) from exc
    return net
