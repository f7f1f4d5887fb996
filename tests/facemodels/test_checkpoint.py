"""Checkpoint round trip, and clear errors for corrupt or mismatched files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from facemodels.checkpoint import (
    CheckpointError,
    init_from_checkpoint,
    load_card,
    load_checkpoint,
    save_checkpoint,
)
from facemodels.models import create_model
from training.data.ckplus import CK_CLASSES, CK_FER_NAMES

ARCH = "compact_resnet"


@pytest.fixture
def saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = create_model(ARCH).eval()
    path = save_checkpoint(
        tmp_path / "ck" / "best", model, arch=ARCH, train_args={"lr": 0.1},
        metrics={"PublicTest": {"acc": 0.5}}, data_fingerprint="abc123",
    )
    return model, path


def test_round_trip_gives_identical_outputs(saved: tuple[torch.nn.Module, Path]) -> None:
    model, path = saved
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    loaded, card = load_checkpoint(path.with_suffix(""))
    x = torch.randn(3, 1, 44, 44)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert card["arch"] == ARCH
    assert card["metrics"]["PublicTest"]["acc"] == 0.5
    assert card["data_fingerprint"] == "abc123"
    assert card["train_args"] == {"lr": 0.1}
    assert card["cfg"]["input_size"] == 44
    assert card["code_version"]
    assert not loaded.training


def test_half_checkpoint_is_smaller_and_close(tmp_path: Path) -> None:
    model = create_model(ARCH).eval()
    full = save_checkpoint(tmp_path / "full", model, arch=ARCH)
    half = save_checkpoint(tmp_path / "half", model, arch=ARCH, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, card = load_checkpoint(half)
    assert card["dtype"] == "float16"
    x = torch.randn(2, 1, 44, 44)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=5e-2)


def test_truncated_weights_name_the_file(saved: tuple[torch.nn.Module, Path]) -> None:
    _, path = saved
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_garbage_card_names_the_file(saved: tuple[torch.nn.Module, Path]) -> None:
    _, path = saved
    card = path.with_suffix(".json")
    card.write_text("{not json")
    with pytest.raises(CheckpointError, match=str(card)):
        load_checkpoint(path)


def test_missing_files_name_the_file(tmp_path: Path, saved: tuple[torch.nn.Module, Path]) -> None:
    with pytest.raises(CheckpointError, match="card not found"):
        load_checkpoint(tmp_path / "nothing")
    _, path = saved
    path.unlink()
    with pytest.raises(CheckpointError, match=f"weights not found: {path}"):
        load_checkpoint(path)


def test_card_and_weights_that_disagree(saved: tuple[torch.nn.Module, Path]) -> None:
    _, path = saved
    card_file = path.with_suffix(".json")
    card = json.loads(card_file.read_text())
    card["arch"] = "cnn3"
    card_file.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"do not match arch 'cnn3'"):
        load_checkpoint(path)


def test_unknown_arch_in_card(saved: tuple[torch.nn.Module, Path]) -> None:
    _, path = saved
    card_file = path.with_suffix(".json")
    card = json.loads(card_file.read_text())
    card["arch"] = "no_such_net"
    card_file.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="cannot build model"):
        load_checkpoint(path)
    assert load_card(path)["arch"] == "no_such_net"


def test_init_copies_matching_tensors_and_keeps_other_heads(
    saved: tuple[torch.nn.Module, Path],
) -> None:
    source, path = saved
    torch.manual_seed(1)
    fresh = create_model(ARCH)
    copied = init_from_checkpoint(fresh, path.with_suffix(""), ARCH)
    assert copied == len(fresh.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

    torch.manual_seed(1)
    five = dataclasses.replace(fresh.cfg, class_names=("a", "b", "c", "d", "e"))
    other_head = create_model(ARCH, num_classes=5, cfg=five)
    before = {k: v.clone() for k, v in other_head.state_dict().items()}
    copied = init_from_checkpoint(other_head, path.with_suffix(""), ARCH)
    changed = [k for k, v in other_head.state_dict().items() if not torch.equal(v, before[k])]
    assert 0 < copied < len(before) and changed
    head = [k for k, v in other_head.state_dict().items() if v.shape != source.state_dict()[k].shape]
    assert head and all(torch.equal(other_head.state_dict()[k], before[k]) for k in head)


def test_init_maps_head_rows_by_class_name(saved: tuple[torch.nn.Module, Path]) -> None:
    source, path = saved
    torch.manual_seed(2)
    ck_cfg = dataclasses.replace(source.cfg, class_names=CK_CLASSES)
    target = create_model(ARCH, num_classes=len(CK_CLASSES), cfg=ck_cfg)
    fresh_fc = target.fc.weight.detach().clone()
    init_from_checkpoint(target, path.with_suffix(""), ARCH, class_aliases=CK_FER_NAMES)
    fer = source.cfg.class_names
    for i, name in enumerate(CK_CLASSES):
        if name == "contempt":
            assert torch.equal(target.fc.weight[i], fresh_fc[i])
            continue
        j = fer.index(CK_FER_NAMES[name])
        assert torch.equal(target.fc.weight[i], source.fc.weight[j]), name
        assert torch.equal(target.fc.bias[i], source.fc.bias[j]), name
    sadness = CK_CLASSES.index("sadness")  # FER2013 "sad" sits at another index
    assert not torch.equal(target.fc.weight[sadness], source.fc.weight[sadness])


def test_init_refuses_another_arch(saved: tuple[torch.nn.Module, Path]) -> None:
    _, path = saved
    with pytest.raises(ValueError, match="compact_resnet, not a compact_resnet_s"):
        init_from_checkpoint(create_model("compact_resnet_s"), path.with_suffix(""), "compact_resnet_s")
