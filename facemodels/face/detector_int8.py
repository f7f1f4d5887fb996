"""The detector's int8 graph and its note: which graph may run for which weights.

``fer-train quantize-detector`` (``training/quantize_detector.py``) writes an int8 (static QDQ)
quantisation of the float32 RetinaFace graph to ``<name>.onnx`` and a note beside it,
``<name>.onnx.json`` (:func:`note_path`), that records among other things:

* ``weights_tensors_sha256``: :func:`tensors_sha256` of the detector weights
  (``retinaface_mnet025.safetensors``) the float32 graph was exported from. Not the file's own
  hash: safetensors writes its metadata in no fixed order, so converting the same weights twice
  gives files whose bytes differ while every tensor is the same;
* ``fp32_onnx_sha256``: the SHA-256 of that float32 graph;
* ``onnx_sha256``: the SHA-256 of the int8 graph's own bytes;
* the calibration photos (CFP training ids) and how the graph was quantised.

:func:`usable_int8_graph` accepts a graph only while its note names the weights about to be
loaded and its own bytes; otherwise it logs a warning naming the file and why, and the caller
runs the float32 graph (as the service does for a classifier's ``<stem>.int8.onnx``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from facemodels.onnx_export import sha256_file

__all__ = ["INT8_FORMAT", "note_path", "tensors_sha256", "usable_int8_graph"]

log = logging.getLogger(__name__)

#: ``format`` of an int8 graph's note (the classifier's notes say the same).
INT8_FORMAT = "onnx-int8-qdq"


def note_path(graph: Path) -> Path:
    """The note beside an int8 graph: ``detector.int8.onnx`` -> ``detector.int8.onnx.json``."""
    graph = Path(graph)
    return graph.with_name(graph.name + ".json")


def tensors_sha256(weights: Path) -> str:
    """SHA-256 of a safetensors file's tensors: each one's name, dtype, shape and bytes, in name
    order (the file's metadata, and the order it is written in, left out)."""
    digest = hashlib.sha256()
    with safe_open(str(weights), framework="pt") as f:
        for name in sorted(f.keys()):
            tensor = f.get_tensor(name).contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def usable_int8_graph(graph: Path, weights: Path) -> Path | None:
    """``graph`` when it exists and its note names ``weights`` (:func:`tensors_sha256`) and the
    graph's bytes by SHA-256.

    Args:
        graph: an int8 detector graph (``fer-train quantize-detector``).
        weights: the detector weights (safetensors) that will be loaded beside it.

    Returns:
        ``graph``, or ``None`` (with a warning that names the file and the reason) when it is
        missing, its note is missing or unreadable, or a hash differs.
    """
    graph, note_file = Path(graph), note_path(graph)
    if not graph.is_file():
        log.warning("no int8 detector graph at %s (serving the float32 detector)", graph)
        return None
    try:
        note = json.loads(note_file.read_text())
        want = note["weights_tensors_sha256"]
        want_graph = note["onnx_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("not serving the int8 detector graph %s: its note %s is missing or names no "
                    "weights_tensors_sha256 and onnx_sha256 (serving the float32 detector)", graph,
                    note_file.name)
        return None
    try:
        have = tensors_sha256(weights)
    except (OSError, SafetensorError) as exc:
        log.warning("not serving the int8 detector graph %s: cannot read the detector weights %s (%s; "
                    "serving the float32 detector)", graph, weights, exc)
        return None
    if want != have:
        log.warning("not serving the int8 detector graph %s: it was quantised from detector weights whose "
                    "tensors have SHA-256 %.12s..., but %s has %.12s... (re-quantise with fer-train "
                    "quantize-detector; serving the float32 detector)", graph, want, weights, have)
        return None
    if want_graph != sha256_file(graph):
        log.warning("not serving the int8 detector graph %s: its bytes do not match the SHA-256 in %s "
                    "(serving the float32 detector)", graph, note_file.name)
        return None
    return graph
