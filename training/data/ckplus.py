"""CK+48 loader and subject-independent cross-validation folds.

Layout: ``root/<class>/S<subject>_<sequence>_<frame>.png`` (48x48 grayscale), classes
:data:`CK_CLASSES`. Several frames of one sequence are near-identical, so folds must split by
subject (:func:`subject_kfold`), never by image.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from facemodels.classes import FER_CLASSES
from training.data._cache import Decoded
from training.data._images import decode_many, is_image_file, warn_skipped
from training.data.dataset import USAGES, DatasetError, FaceDataset, content_fingerprint

__all__ = [
    "CK_CLASSES",
    "CK_FER_NAMES",
    "CK_TO_FER",
    "load_ckplus",
    "parse_ck_name",
    "subject_ids",
    "subject_kfold",
    "to_fer_labels",
]

#: CK+48 class order (its own ``class_names``).
CK_CLASSES: tuple[str, ...] = (
    "anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise",
)
#: CK+ class -> FER2013 label index; contempt has no FER2013 counterpart.
CK_TO_FER: dict[str, int | None] = {
    "anger": FER_CLASSES.index("angry"),
    "contempt": None,
    "disgust": FER_CLASSES.index("disgust"),
    "fear": FER_CLASSES.index("fear"),
    "happy": FER_CLASSES.index("happy"),
    "sadness": FER_CLASSES.index("sad"),
    "surprise": FER_CLASSES.index("surprise"),
}
#: CK+ class -> the FER2013 class name it corresponds to (for mapping a classifier's head).
CK_FER_NAMES: dict[str, str] = {
    ck: FER_CLASSES[fer] for ck, fer in CK_TO_FER.items() if fer is not None
}
_NAME = re.compile(r"S(\d+)_(\d+)_(\d+)\.png", re.IGNORECASE)


def parse_ck_name(path: str | Path) -> tuple[int, int, int]:
    """``".../S010_004_00000017.png"`` -> ``(10, 4, 17)`` (subject, sequence, frame).

    Raises:
        DatasetError: naming the file when the name does not follow the CK+ pattern.
    """
    m = _NAME.fullmatch(Path(path).name)
    if m is None:
        raise DatasetError(f"{path}: file name does not match S<subject>_<sequence>_<frame>.png")
    subject, sequence, frame = (int(g) for g in m.groups())
    return subject, sequence, frame


def load_ckplus(root: str | Path, *, skip_bad: bool = False,
                num_workers: int | None = None) -> FaceDataset:
    """Load CK+48 from ``root/<class>/*.png``; every sample gets usage ``"Training"``.

    File names are validated here (so :func:`subject_ids` cannot fail later); ``paths`` holds
    ``"<class>/<file>"``. Bad images or names are skipped with one warning under ``skip_bad``.

    Raises:
        DatasetError: naming the missing root, an unknown class folder or a bad file.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (expected CK+48 class folders "
                           f"{', '.join(CK_CLASSES)})")
    rels: list[str] = []
    labels: list[int] = []
    errors: list[str] = []
    for cdir in sorted(root.iterdir()):
        if not cdir.is_dir() or cdir.name.startswith("."):
            continue
        if cdir.name.lower() not in CK_CLASSES:
            raise DatasetError(f"{cdir}: unknown class folder {cdir.name!r}; "
                               f"expected {', '.join(CK_CLASSES)}")
        label = CK_CLASSES.index(cdir.name.lower())
        for f in sorted(cdir.iterdir()):
            if not (f.is_file() and is_image_file(f)):
                continue
            try:
                parse_ck_name(f)
            except DatasetError as e:
                if not skip_bad:
                    raise
                errors.append(str(e))
                continue
            rels.append(f"{cdir.name}/{f.name}")
            labels.append(label)
    if not rels:
        raise DatasetError(f"{root}: no CK+ images found in class folders")
    images, ok, bad = decode_many([root / r for r in rels], skip_bad=skip_bad,
                                  desc="decoding CK+", num_workers=num_workers)
    errors += bad
    warn_skipped(errors, what="images", source=str(root))
    if not ok.any():
        raise DatasetError(f"{root}: no CK+ image could be decoded; first error: {errors[0]}")
    return Decoded(
        images=images[ok], labels=np.array(labels, dtype=np.int64)[ok],
        usage=np.full(int(ok.sum()), USAGES.index("Training"), dtype=np.uint8),
        paths=[r for r, good in zip(rels, ok, strict=True) if good], class_names=CK_CLASSES,
    ).to_dataset(source=str(root))


def subject_ids(dataset: FaceDataset) -> np.ndarray:
    """Subject number of every sample, parsed from ``dataset.paths`` (int64 ``(N,)``)."""
    if dataset.paths is None:
        raise ValueError("dataset has no paths to parse CK+ subjects from")
    return np.array([parse_ck_name(p)[0] for p in dataset.paths], dtype=np.int64)


def subject_kfold(
    dataset: FaceDataset, k: int = 10, *, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Subject-independent k-fold split: ``[(train_idx, test_idx), ...]``, sorted int64 indices.

    No subject is in both parts of a fold and every sample is in exactly one test part.
    Subjects are shuffled with ``seed``, sorted by sample count (largest first, a stable sort,
    so the shuffle breaks ties), then each goes to the fold with the fewest samples so far;
    fold sizes therefore differ by at most the largest subject's count.
    """
    subjects = subject_ids(dataset)
    uniq, counts = np.unique(subjects, return_counts=True)
    if not 2 <= k <= len(uniq):
        raise ValueError(f"k must lie in [2, {len(uniq)}] (the number of subjects), got {k}")
    order = np.random.default_rng(seed).permutation(len(uniq))
    order = order[np.argsort(-counts[order], kind="stable")]
    fold_of_subject: dict[int, int] = {}
    sizes = np.zeros(k, dtype=np.int64)
    for i in order:
        f = int(np.argmin(sizes))
        fold_of_subject[int(uniq[i])] = f
        sizes[f] += counts[i]
    fold = np.array([fold_of_subject[int(s)] for s in subjects], dtype=np.int64)
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k)]


def to_fer_labels(dataset: FaceDataset) -> FaceDataset:
    """Relabel a CK+ dataset into FER2013 classes, dropping classes with no counterpart."""
    if dataset.class_names != CK_CLASSES:
        raise ValueError(f"expected CK+ classes {CK_CLASSES}, got {dataset.class_names}")
    lut = torch.tensor([-1 if CK_TO_FER[c] is None else CK_TO_FER[c] for c in CK_CLASSES])
    mapped = lut[dataset.labels]
    keep = mapped >= 0
    sub = dataset.subset(keep)
    labels = mapped[keep]
    return FaceDataset(images=sub.images, labels=labels, usage=sub.usage,
                       class_names=FER_CLASSES,
                       fingerprint=content_fingerprint(sub.images, labels, sub.usage, FER_CLASSES),
                       source=sub.source, paths=sub.paths)
