"""FaceDataset: validation, subset, split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data.dataset import USAGES, FaceDataset, content_fingerprint


def make(n: int = 6) -> FaceDataset:
    images = torch.arange(n * 4, dtype=torch.uint8).reshape(n, 2, 2)
    labels = torch.arange(n, dtype=torch.int64) % 3
    usage = torch.tensor([i % 3 for i in range(n)], dtype=torch.uint8)
    names = ("a", "b", "c")
    return FaceDataset(images=images, labels=labels, usage=usage, class_names=names,
                       fingerprint=content_fingerprint(images, labels, usage, names),
                       source="mem", paths=tuple(f"f{i}" for i in range(n)))


def test_len_and_split() -> None:
    ds = make(6)
    assert len(ds) == 6
    for code, name in enumerate(USAGES):
        part = ds.split(name)
        assert len(part) == 2
        assert part.usage_names == [name, name]
        assert part.paths == (f"f{code}", f"f{code + 3}")
    with pytest.raises(ValueError, match="unknown usage"):
        ds.split("Validation")


@pytest.mark.parametrize(
    "picker",
    [
        [True, False, True, False, False, False],
        np.array([True, False, True, False, False, False]),
        torch.tensor([True, False, True, False, False, False]),
        [0, 2],
        np.array([0, 2]),
        torch.tensor([0, 2]),
    ],
)
def test_subset_mask_or_indices(picker: object) -> None:
    ds = make(6)
    sub = ds.subset(picker)  # type: ignore[arg-type]
    assert torch.equal(sub.images, ds.images[[0, 2]])
    assert torch.equal(sub.labels, ds.labels[[0, 2]])
    assert sub.paths == ("f0", "f2")
    assert sub.class_names == ds.class_names
    assert sub.fingerprint != ds.fingerprint
    assert sub.fingerprint == ds.subset([0, 2]).fingerprint  # deterministic
    assert sub.fingerprint != ds.subset([2, 0]).fingerprint  # order matters


def test_subset_errors_and_empty() -> None:
    ds = make(6)
    with pytest.raises(ValueError, match="mask"):
        ds.subset([True, False])
    with pytest.raises(IndexError):
        ds.subset([6])
    with pytest.raises(ValueError):
        ds.subset(np.array([0.5]))
    assert len(ds.subset([])) == 0


def test_class_counts() -> None:
    assert make(6).class_counts() == {"a": 2, "b": 2, "c": 2}


def test_validation() -> None:
    ds = make(3)
    with pytest.raises(ValueError, match="uint8"):
        FaceDataset(ds.images.float(), ds.labels, ds.usage, ds.class_names, "x", "mem")
    with pytest.raises(ValueError, match="labels"):
        FaceDataset(ds.images, ds.labels[:2], ds.usage, ds.class_names, "x", "mem")
    with pytest.raises(ValueError, match="labels must lie"):
        FaceDataset(ds.images, ds.labels + 5, ds.usage, ds.class_names, "x", "mem")
    with pytest.raises(ValueError, match="usage"):
        FaceDataset(ds.images, ds.labels, ds.usage + 5, ds.class_names, "x", "mem")
    with pytest.raises(ValueError, match="paths"):
        FaceDataset(ds.images, ds.labels, ds.usage, ds.class_names, "x", "mem", paths=("a",))


def test_content_fingerprint_tracks_content() -> None:
    ds = make(3)
    fp = content_fingerprint(ds.images, ds.labels, ds.usage, ds.class_names)
    assert fp == ds.fingerprint
    images = ds.images.clone()
    images[0, 0, 0] += 1
    assert content_fingerprint(images, ds.labels, ds.usage, ds.class_names) != fp
    assert content_fingerprint(ds.images, ds.labels, ds.usage, ("x", "b", "c")) != fp
