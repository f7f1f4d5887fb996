"""ONNX export of the served networks, the ONNX file cache, and ONNX Runtime sessions.

Three kinds of graph, each with a dynamic batch axis:

* a **classifier** (any registered architecture, the soft-voting ensemble included, as one
  graph): float ``input`` ``(N, C, s, s)``, already preprocessed by
  :func:`facemodels.preprocess.eval_views`, to ``probs`` ``(N, classes)``: the softmax of the
  model's output, which is what :func:`facemodels.predict.predict_probs` averages;
* the **detector** (:class:`~facemodels.face.retinaface_net.RetinaFaceNet`): mean-subtracted BGR
  ``input`` ``(N, 3, H, W)``, H and W dynamic too, to ``loc``, ``conf`` and ``landm``;
* the frontaliser's **refiner** network (:meth:`~facemodels.frontalizer.refiner.FrontalRefiner.heads`):
  its five input channels ``input`` ``(N, 5, S, S)`` to ``flow``, ``mask`` and ``residual``. The
  warp's sampling around it (per-face area shrinking, ``grid_sample`` of the input) stays in
  PyTorch: it is cheap, and its per-face shrink factor is data-dependent control flow.

The ONNX files are not shipped: they are produced from the safetensors weights when first
needed (service start-up, ``fer-serve --prepare``, ``fer-train export --format onnx``) and
cached as ``<cache>/onnx/<key>.onnx``. The key is the SHA-256 of the weights file's bytes, of
the card fields that shape the graph (architecture, its keyword arguments, the ``ModelCfg``)
and of :data:`EXPORT_FORMAT`, so a file is reused exactly while the weights it came from are
unchanged, and changed weights get a new file. A JSON note beside each file records the
SHA-256 of the ONNX bytes; a file whose bytes no longer match is exported again. Files are
written with :func:`facemodels.atomic.atomic_path`, so workers that start together never read
half a file.

Every export is checked before it is kept: ONNX Runtime (when installed) runs the new graph at
two batch sizes and its outputs must equal PyTorch's within :data:`CLASSIFIER_ATOL` (probs),
:data:`DETECTOR_ATOL` (raw detector outputs) or :data:`REFINER_ATOL` (the refiner's outputs).
``onnx`` (the exporter's dependency) and ``onnxruntime`` are imported lazily, so this module
costs nothing where neither is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facemodels.atomic import atomic_path, write_text_atomically
from facemodels.cache import onnx_dir

__all__ = [
    "BACKENDS",
    "CLASSIFIER_ATOL",
    "CLASSIFIER_INPUT",
    "CLASSIFIER_OUTPUT",
    "DETECTOR_ATOL",
    "DETECTOR_INPUT",
    "DETECTOR_OUTPUTS",
    "EXPORT_FORMAT",
    "OPSET",
    "REFINER_ATOL",
    "REFINER_INPUT",
    "REFINER_OUTPUTS",
    "OnnxExportError",
    "cache_key",
    "cached_classifier_onnx",
    "cached_detector_onnx",
    "cached_refiner_onnx",
    "create_session",
    "export_classifier",
    "export_detector",
    "export_refiner",
    "onnx_available",
    "resolve_backend",
    "sha256_file",
]

log = logging.getLogger(__name__)

#: Bump when the exported graph changes for the same weights (cached files are then rebuilt).
EXPORT_FORMAT = 1
OPSET = 17
CLASSIFIER_INPUT, CLASSIFIER_OUTPUT = "input", "probs"
DETECTOR_INPUT, DETECTOR_OUTPUTS = "input", ("loc", "conf", "landm")
#: Largest absolute difference between ONNX Runtime's and PyTorch's class probabilities that an
#: export may have (float32 both sides; measured differences are around 1e-7).
CLASSIFIER_ATOL = 1e-5
#: The same for the detector's raw outputs (box and landmark offsets, face probability).
DETECTOR_ATOL = 1e-4
REFINER_INPUT, REFINER_OUTPUTS = "input", ("flow", "mask", "residual")
#: The same for the refiner's outputs, in their own units: flow in output pixels, the blend mask
#: in (0, 1), the inpainting residual on the 0..255 scale (so about 4e-6 of the image range).
REFINER_ATOL = 1e-3
#: ``FER_BACKEND`` values (the service) and what :func:`resolve_backend` accepts.
BACKENDS = ("auto", "torch", "onnx")


class OnnxExportError(RuntimeError):
    """Export failed, or the exported graph disagrees with PyTorch beyond the tolerance."""


def onnx_available() -> bool:
    """Whether both ``onnx`` (to export) and ``onnxruntime`` (to run) can be imported."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def resolve_backend(name: str, device: torch.device) -> str:
    """``torch`` or ``onnx`` for a backend setting on ``device``.

    ``auto`` is ONNX Runtime on CPU when ``onnx`` and ``onnxruntime`` are installed, else
    PyTorch (always PyTorch on CUDA).

    Raises:
        ValueError: an unknown name, or ``onnx`` on a non-CPU device or without the packages.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        return "onnx" if device.type == "cpu" and onnx_available() else "torch"
    if name == "onnx":
        if device.type != "cpu":
            raise ValueError(f"the onnx backend runs on CPU (ONNX Runtime's CPU provider), not "
                             f"{device}; set the device to cpu or the backend to torch or auto")
        if not onnx_available():
            raise ValueError("the onnx backend needs the onnx and onnxruntime packages "
                             "(pip install 'fer-service[serve]')")
    return name


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def create_session(path: Path | bytes, *, threads: int = 1, spinning: bool = False) -> Any:
    """An ONNX Runtime CPU session: ``threads`` intra-op threads, sequential execution.

    Args:
        path: an ``.onnx`` file (or its bytes).
        threads: intra-op threads (at least 1; 0 leaves ONNX Runtime's default, one per core).
        spinning: let idle worker threads busy-wait for the next operator's work (ONNX Runtime's
            default) instead of sleeping. Off, they leave the cores to other work between runs
            and operators; that matters only with ``threads`` > 1.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(0, int(threads))
    opts.inter_op_num_threads = 1
    for pool in ("intra_op", "inter_op"):
        opts.add_session_config_entry(f"session.{pool}.allow_spinning", "1" if spinning else "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


# --- export ---------------------------------------------------------------------------------


class _Probs(nn.Module):
    """``softmax(model(x))`` in float32: the classifier graph ends in probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float().softmax(dim=1)


def _export_bytes(module: nn.Module, example: torch.Tensor, inputs: list[str], outputs: list[str],
                  dynamic_axes: dict[str, dict[int, str]]) -> bytes:
    """Trace ``module`` on ``example`` to ONNX bytes (float32, eval mode, on the CPU)."""
    if importlib.util.find_spec("onnx") is None:
        raise OnnxExportError("exporting to ONNX needs the onnx package (pip install onnx)")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # TorchScript-based export: it runs without onnxscript, and traces these plain
        # feed-forward graphs (no data-dependent control flow) exactly.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        try:
            torch.onnx.export(module, (example,), buf, dynamo=False, input_names=inputs,
                              output_names=outputs, dynamic_axes=dynamic_axes, opset_version=OPSET,
                              do_constant_folding=True)
        except Exception as exc:  # the exporter raises many kinds; name the model in one
            raise OnnxExportError(f"ONNX export of {type(module).__name__} failed: {exc}") from exc
    return buf.getvalue()


def _check(onnx_bytes: bytes, module: nn.Module, examples: Sequence[torch.Tensor], input_name: str,
           output_names: Sequence[str], atol: float) -> float | None:
    """Max |ONNX Runtime - PyTorch| over ``examples``; ``None`` without onnxruntime.

    Raises:
        OnnxExportError: a difference above ``atol``, or a shape that differs.
    """
    if importlib.util.find_spec("onnxruntime") is None:
        log.warning("onnxruntime is not installed: the ONNX export is not checked against PyTorch")
        return None
    session = create_session(onnx_bytes, threads=1)
    worst = 0.0
    for x in examples:
        with torch.inference_mode():
            ref = module(x)
        refs = ref if isinstance(ref, tuple | list) else (ref,)
        got = session.run(list(output_names), {input_name: x.numpy()})
        for name, r, g in zip(output_names, refs, got, strict=True):
            r = r.float().numpy()
            if r.shape != g.shape:
                raise OnnxExportError(f"ONNX output {name} has shape {g.shape}, PyTorch {r.shape}")
            worst = max(worst, float(np.abs(r - g).max()) if r.size else 0.0)
    if worst > atol:
        raise OnnxExportError(f"ONNX Runtime differs from PyTorch by {worst:.2e} (> {atol:.0e})")
    return worst


def _write(out: Path, onnx_bytes: bytes) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_bytes(onnx_bytes)
    return out


def export_classifier(model: nn.Module, out: Path, *, verify: bool = True) -> dict[str, Any]:
    """Write ``model`` (with a ``cfg``; any registered classifier) to ``out`` as ONNX.

    The graph takes the preprocessed float views (``(N, C, s, s)``, ``s = cfg.input_size``) and
    returns the softmax probabilities, batch size dynamic.

    Returns:
        ``{"path", "max_abs_diff", "seconds"}``; ``max_abs_diff`` is ``None`` when not checked.

    Raises:
        OnnxExportError: export failed or ORT disagrees with PyTorch beyond :data:`CLASSIFIER_ATOL`.
    """
    started = time.perf_counter()
    cfg = model.cfg
    wrapped = _Probs(model).to("cpu").float().eval()
    shape = (cfg.in_chans, cfg.input_size, cfg.input_size)
    gen = torch.Generator().manual_seed(0)
    examples = [torch.randn(n, *shape, generator=gen) for n in (2, 5, 1)]
    axes = {CLASSIFIER_INPUT: {0: "batch"}, CLASSIFIER_OUTPUT: {0: "batch"}}
    data = _export_bytes(wrapped, examples[0], [CLASSIFIER_INPUT], [CLASSIFIER_OUTPUT], axes)
    diff = _check(data, wrapped, examples[1:], CLASSIFIER_INPUT, [CLASSIFIER_OUTPUT],
                  CLASSIFIER_ATOL) if verify else None
    _write(out, data)
    return {"path": str(out), "max_abs_diff": diff, "seconds": time.perf_counter() - started}


def export_detector(net: nn.Module, out: Path, *, verify: bool = True) -> dict[str, Any]:
    """Write the RetinaFace network to ``out`` as ONNX (batch, height and width dynamic).

    Returns and raises as :func:`export_classifier` (tolerance :data:`DETECTOR_ATOL`).
    """
    started = time.perf_counter()
    net = net.to("cpu").float().eval()
    gen = torch.Generator().manual_seed(0)
    examples = [torch.empty(*s).uniform_(-128, 128, generator=gen)
                for s in ((1, 3, 96, 128), (2, 3, 160, 96), (1, 3, 224, 320))]
    axes = {DETECTOR_INPUT: {0: "batch", 2: "height", 3: "width"},
            **{name: {0: "batch", 1: "priors"} for name in DETECTOR_OUTPUTS}}
    data = _export_bytes(net, examples[0], [DETECTOR_INPUT], list(DETECTOR_OUTPUTS), axes)
    diff = _check(data, net, examples[1:], DETECTOR_INPUT, DETECTOR_OUTPUTS,
                  DETECTOR_ATOL) if verify else None
    _write(out, data)
    return {"path": str(out), "max_abs_diff": diff, "seconds": time.perf_counter() - started}


class _Heads(nn.Module):
    """``refiner.heads(x)``: the refiner's network with its bounded outputs, as one module."""

    def __init__(self, refiner: nn.Module) -> None:
        super().__init__()
        self.refiner = refiner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.refiner.heads(x)


def export_refiner(refiner: nn.Module, out: Path, *, verify: bool = True) -> dict[str, Any]:
    """Write a :class:`~facemodels.frontalizer.refiner.FrontalRefiner`'s network to ``out`` as ONNX.

    The graph is :meth:`~facemodels.frontalizer.refiner.FrontalRefiner.heads`: the five net
    input channels ``(N, 5, S, S)`` (``S = cfg.image_size``) to ``flow`` ``(N, S, S, 2)``,
    ``mask`` and ``residual`` ``(N, 1, S, S)``, batch size dynamic. Returns and raises as
    :func:`export_classifier` (tolerance :data:`REFINER_ATOL`).
    """
    started = time.perf_counter()
    wrapped = _Heads(refiner.to("cpu").float().eval())
    s = refiner.cfg.image_size
    gen = torch.Generator().manual_seed(0)
    examples = [torch.empty(n, 5, s, s).uniform_(-1, 1, generator=gen) for n in (2, 5, 1)]
    axes = {name: {0: "batch"} for name in (REFINER_INPUT, *REFINER_OUTPUTS)}
    data = _export_bytes(wrapped, examples[0], [REFINER_INPUT], list(REFINER_OUTPUTS), axes)
    diff = _check(data, wrapped, examples[1:], REFINER_INPUT, REFINER_OUTPUTS,
                  REFINER_ATOL) if verify else None
    _write(out, data)
    return {"path": str(out), "max_abs_diff": diff, "seconds": time.perf_counter() - started}


# --- the cache ------------------------------------------------------------------------------


def cache_key(weights: Path, graph: Mapping[str, Any]) -> str:
    """SHA-256 of the weights file, the graph-defining ``graph`` fields and :data:`EXPORT_FORMAT`."""
    spec = json.dumps({"format": EXPORT_FORMAT, "opset": OPSET, "weights_sha256": sha256_file(weights),
                       **graph}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()


def _cached(kind: str, weights: Path, graph: Mapping[str, Any], cache_dir: Path,
            export: Callable[[Path], dict[str, Any]]) -> Path:
    """``<cache_dir>/onnx/<key>.onnx`` for ``weights``, exporting it unless a good one is there."""
    weights = Path(weights)
    key = cache_key(weights, {"kind": kind, **graph})
    path = onnx_dir(cache_dir) / f"{key}.onnx"
    note = path.with_suffix(".json")
    if path.is_file() and note.is_file():
        try:
            expected = json.loads(note.read_text()).get("onnx_sha256")
        except (OSError, ValueError, AttributeError):
            expected = None
        if expected and expected == sha256_file(path):
            log.info("ONNX %s for %s: reusing %s", kind, weights, path)
            return path
        log.warning("ONNX file %s does not match its note %s; exporting it again", path, note)
    info = export(path)
    write_text_atomically(note, json.dumps({
        "kind": kind, "source": str(weights.resolve()), "weights_sha256": sha256_file(weights),
        **graph, "export_format": EXPORT_FORMAT, "opset": OPSET, "torch": torch.__version__,
        "onnx_sha256": sha256_file(path), "max_abs_diff_vs_torch": info["max_abs_diff"],
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }, indent=2) + "\n")
    log.info("ONNX %s for %s: exported to %s in %.1f s (max |ORT - torch| = %s)", kind, weights, path,
             info["seconds"], info["max_abs_diff"])
    return path


def cached_classifier_onnx(checkpoint: Path, cache_dir: Path, *, model: nn.Module | None = None) -> Path:
    """The cached ONNX graph of a classifier checkpoint, exported first when missing.

    Args:
        checkpoint: the checkpoint (``x``, ``x.safetensors`` or ``x.json``).
        cache_dir: the cache root; the file goes to its ``onnx/`` folder.
        model: the checkpoint already loaded (saves loading it again to export).
    """
    return _cached_checkpoint("classifier", checkpoint, cache_dir, model, export_classifier)


def cached_refiner_onnx(checkpoint: Path, cache_dir: Path, *, model: nn.Module | None = None) -> Path:
    """The cached ONNX graph of a ``frontal_refiner`` checkpoint's network (:func:`export_refiner`);
    arguments as :func:`cached_classifier_onnx`."""
    return _cached_checkpoint("refiner", checkpoint, cache_dir, model, export_refiner)


def _cached_checkpoint(kind: str, checkpoint: Path, cache_dir: Path, model: nn.Module | None,
                       exporter: Callable[[nn.Module, Path], dict[str, Any]]) -> Path:
    """:func:`_cached` for a registry checkpoint: its card's arch, kwargs and cfg shape the graph."""
    from facemodels.checkpoint import load_card, load_checkpoint, weights_path

    card = load_card(checkpoint)
    graph = {"arch": card["arch"], "model_kwargs": card.get("model_kwargs", {}), "cfg": card["cfg"]}

    def export(out: Path) -> dict[str, Any]:
        net = model if model is not None else load_checkpoint(checkpoint)[0]
        return exporter(net, out)

    return _cached(kind, weights_path(checkpoint), graph, cache_dir, export)


def cached_detector_onnx(weights: Path, cache_dir: Path, *, net: nn.Module) -> Path:
    """The cached ONNX graph of the RetinaFace weights ``weights`` (loaded as ``net``)."""
    return _cached("detector", Path(weights), {"arch": type(net).__name__}, cache_dir,
                   lambda out: export_detector(net, out))
