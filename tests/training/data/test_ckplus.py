"""CK+48 loader, subject parsing, subject-independent folds and the FER2013 label mapping."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from facemodels.classes import FER_CLASSES
from training.data.ckplus import (
    CK_CLASSES,
    CK_TO_FER,
    load_ckplus,
    parse_ck_name,
    subject_ids,
    subject_kfold,
    to_fer_labels,
)
from training.data.dataset import DatasetError, FaceDataset

Factory = Callable[..., object]
Tree = tuple[Path, dict[str, np.ndarray]]


def test_load_generated_tree(ck_tree: Tree) -> None:
    root, written = ck_tree
    ds = load_ckplus(root)
    assert ds.class_names == CK_CLASSES
    assert ds.paths is not None and sorted(ds.paths) == sorted(written)
    assert len(ds) == len(written)
    for i, rel in enumerate(ds.paths):
        assert torch.equal(ds.images[i], torch.from_numpy(written[rel]))  # PNG is lossless
        assert CK_CLASSES[int(ds.labels[i])] == rel.split("/")[0]
    assert set(ds.usage_names) == {"Training"}
    assert ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (48, 48)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("S010_004_00000017.png", (10, 4, 17)), ("anger/S999_001_00000001.PNG", (999, 1, 1))],
)
def test_parse_ck_name(name: str, expected: tuple[int, int, int]) -> None:
    assert parse_ck_name(name) == expected


@pytest.mark.parametrize("name", ["S10_4.png", "X010_004_00000017.png", "S010_004_0017.jpg",
                                  "S010_004_00000017.png.bak", "s010_a_00000017.png"])
def test_parse_ck_name_rejects(name: str) -> None:
    with pytest.raises(DatasetError, match=name.replace(".", r"\.")):
        parse_ck_name(f"happy/{name}")


def test_bad_file_name_names_the_file(ck_tree: Tree, image_writer: Factory,
                                      face_maker: Factory,
                                      data_logs: pytest.LogCaptureFixture) -> None:
    root, written = ck_tree
    image_writer(root / "fear" / "subject7.png", face_maker(1)[0])  # type: ignore[index]
    with pytest.raises(DatasetError, match=r"subject7\.png"):
        load_ckplus(root)
    ds = load_ckplus(root, skip_bad=True)
    assert len(ds) == len(written)
    warnings = [r.getMessage() for r in data_logs.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("skipped 1 bad images")


def test_bad_inputs(tmp_path: Path, ck_tree: Tree, image_writer: Factory) -> None:
    with pytest.raises(DatasetError, match="nowhere"):
        load_ckplus(tmp_path / "nowhere")
    root, _ = ck_tree
    bad = root / "sadness" / "S001_001_00000001.png"
    image_writer(bad, np.zeros((64, 64), np.uint8))
    with pytest.raises(DatasetError, match=r"S001_001_00000001\.png: image is 64x64"):
        load_ckplus(root)
    bad.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"S001_001_00000001\.png: corrupt"):
        load_ckplus(root)
    bad.unlink()
    (root / "neutral").mkdir()
    with pytest.raises(DatasetError, match="neutral"):
        load_ckplus(root)


def _check_folds(ds: FaceDataset, folds: list[tuple[np.ndarray, np.ndarray]], k: int) -> None:
    subjects = subject_ids(ds)
    assert len(folds) == k
    tests = np.concatenate([test for _, test in folds])
    assert np.array_equal(np.sort(tests), np.arange(len(ds)))  # each sample tested exactly once
    for train, test in folds:
        assert train.dtype == test.dtype == np.int64
        assert len(test) > 0
        assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(ds)))
        assert not set(subjects[train]) & set(subjects[test])
    sizes = [len(test) for _, test in folds]
    largest_subject = np.unique(subjects, return_counts=True)[1].max()
    assert max(sizes) - min(sizes) <= largest_subject


@pytest.mark.parametrize("k", [2, 3, 5])
def test_subject_kfold_generated(ck_tree: Tree, k: int) -> None:
    ds = load_ckplus(ck_tree[0])
    folds = subject_kfold(ds, k=k, seed=0)
    _check_folds(ds, folds, k)
    again = subject_kfold(ds, k=k, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))


def test_subject_kfold_seed_changes_assignment(ck_tree: Tree) -> None:
    ds = load_ckplus(ck_tree[0])
    layouts = {tuple(tuple(t) for _, t in subject_kfold(ds, k=3, seed=s)) for s in range(6)}
    assert len(layouts) > 1


def test_subject_kfold_bad_k(ck_tree: Tree) -> None:
    ds = load_ckplus(ck_tree[0])
    n_subjects = len(set(subject_ids(ds)))
    for k in (1, n_subjects + 1):
        with pytest.raises(ValueError, match="number of subjects"):
            subject_kfold(ds, k=k)


def test_ck_to_fer_mapping(ck_tree: Tree) -> None:
    assert CK_TO_FER["contempt"] is None
    assert {c: FER_CLASSES[i] for c, i in CK_TO_FER.items() if i is not None} == {
        "anger": "angry", "disgust": "disgust", "fear": "fear", "happy": "happy",
        "sadness": "sad", "surprise": "surprise",
    }
    ds = load_ckplus(ck_tree[0])
    fer = to_fer_labels(ds)
    assert fer.class_names == FER_CLASSES
    keep = ds.labels != CK_CLASSES.index("contempt")
    assert len(fer) == int(keep.sum())
    assert torch.equal(fer.images, ds.images[keep])
    for ck_label, fer_label in zip(ds.labels[keep].tolist(), fer.labels.tolist(), strict=True):
        assert CK_TO_FER[CK_CLASSES[ck_label]] == fer_label
    with pytest.raises(ValueError, match="CK\\+ classes"):
        to_fer_labels(fer)
