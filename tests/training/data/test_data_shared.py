"""The loaders on the real data in ../shared/data (skipped when it is absent)."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facemodels.classes import FER_CLASSES
from training.data.ckplus import CK_CLASSES, load_ckplus, parse_ck_name, subject_kfold
from training.data.fer2013 import load_fer2013

pytestmark = pytest.mark.shared_data

# From shared/data/fer2013/README.md, in FER_CLASSES order.
FER_TRAIN = dict(zip(FER_CLASSES, (3995, 436, 4097, 7215, 4830, 3171, 4965), strict=True))
FER_PUBLIC_TEST = dict(zip(FER_CLASSES, (467, 56, 496, 895, 653, 415, 607), strict=True))
# From shared/data/ckplus48/README.md.
CK_COUNTS = dict(zip(CK_CLASSES, (135, 54, 177, 75, 207, 84, 249), strict=True))


@pytest.mark.slow
def test_real_fer2013_counts(fer2013_root: Path) -> None:
    """The whole set; the first run decodes 32k JPEGs into the user cache, reruns read it."""
    ds = load_fer2013(fer2013_root)  # default cache dir: $FER_CACHE_DIR or ~/.cache/...
    assert ds.class_names == FER_CLASSES
    assert ds.images.shape == (28709 + 3589, 48, 48) and ds.images.dtype == torch.uint8
    train, public = ds.split("Training"), ds.split("PublicTest")
    assert len(train) == 28709 and len(public) == 3589 and len(ds.split("PrivateTest")) == 0
    assert train.class_counts() == FER_TRAIN
    assert public.class_counts() == FER_PUBLIC_TEST


def test_real_fer2013_subset_cache_round_trip(fer2013_root: Path, tmp_path: Path) -> None:
    """A few real JPEGs per class and split: decoded like cv2.imread, identical from the cache."""
    root = tmp_path / "fer"
    for split in ("train", "test"):
        for cls in FER_CLASSES:
            src = fer2013_root / split / cls
            dst = root / split / cls
            dst.mkdir(parents=True)
            for f in sorted(src.iterdir())[:3]:
                shutil.copy2(f, dst / f.name)
    cache = tmp_path / "cache"
    first = load_fer2013(root, cache_dir=cache)
    assert len(first) == 2 * 3 * len(FER_CLASSES)
    assert len(list(cache.glob("*.npz"))) == 1
    assert set(first.usage_names) == {"Training", "PublicTest"}
    assert first.paths is not None
    for i, rel in enumerate(first.paths):
        expected = cv2.imread(str(root / rel), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(first.images[i].numpy(), expected)
        assert FER_CLASSES[int(first.labels[i])] == rel.split("/")[1]
    second = load_fer2013(root, cache_dir=cache)
    assert torch.equal(first.images, second.images) and first.fingerprint == second.fingerprint
    assert first.paths == second.paths and torch.equal(first.usage, second.usage)


def test_real_ckplus_folds(ckplus_root: Path) -> None:
    ds = load_ckplus(ckplus_root)
    assert len(ds) == 981 and ds.class_counts() == CK_COUNTS
    assert ds.paths is not None
    names = [parse_ck_name(p) for p in ds.paths]
    subjects = np.array([s for s, _, _ in names])
    assert len(set(subjects)) == 118 and len({(s, q) for s, q, _ in names}) == 327
    folds = subject_kfold(ds, k=10, seed=0)
    assert len(folds) == 10
    tests = np.concatenate([test for _, test in folds])
    assert np.array_equal(np.sort(tests), np.arange(981))
    for train, test in folds:
        assert len(train) + len(test) == 981
        assert not set(subjects[train]) & set(subjects[test])
    sizes = [len(test) for _, test in folds]
    assert max(sizes) - min(sizes) <= 10, sizes
