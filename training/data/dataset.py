"""``FaceDataset``: a whole face dataset held in memory as uint8 tensors.

FER2013 (35,887 faces of 48x48) is about 83 MB as uint8, so every loader returns the full
dataset as tensors and training slices batches out of them; there is no per-sample
``__getitem__`` pipeline. Splits and cross-validation folds are :meth:`FaceDataset.subset`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["USAGES", "DatasetError", "FaceDataset", "content_fingerprint"]

#: Usage names of the original FER2013 CSV; ``FaceDataset.usage`` holds indices into this.
USAGES: tuple[str, ...] = ("Training", "PublicTest", "PrivateTest")


class DatasetError(ValueError):
    """A dataset file or folder is missing or malformed; the message names the file."""


def content_fingerprint(
    images: Tensor, labels: Tensor, usage: Tensor, class_names: Sequence[str]
) -> str:
    """SHA-256 over the decoded content (pixels, labels, usage codes and class names).

    It depends only on what a model would see, not on where or when the files were written,
    so the same data copied to another machine keeps its fingerprint.
    """
    h = hashlib.sha256()
    h.update("\n".join(class_names).encode())
    h.update(repr(tuple(images.shape)).encode())
    for t in (images, labels, usage):
        h.update(np.ascontiguousarray(t.numpy()).tobytes())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class FaceDataset:
    """Faces, labels and the split each face belongs to.

    Attributes:
        images: uint8 ``(N, H, W)`` grayscale faces (48x48 for FER2013 and CK+48).
        labels: int64 ``(N,)`` indices into ``class_names``.
        usage: uint8 ``(N,)`` indices into :data:`USAGES`.
        class_names: label index -> class name.
        fingerprint: identifies the content (see :func:`content_fingerprint`); subsets derive
            their own from it, so a checkpoint card can name exactly what it was trained on.
        source: where the data came from (a path).
        paths: per-sample origin, relative to ``source`` (``"train/angry/Training_1.jpg"``,
            or ``"fer2013.csv:17"`` for a CSV line); ``None`` when unknown.
    """

    images: Tensor
    labels: Tensor
    usage: Tensor
    class_names: tuple[str, ...]
    fingerprint: str
    source: str
    paths: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dtype != torch.uint8 or self.images.dim() != 3:
            raise ValueError(
                f"images must be uint8 (N,H,W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or tuple(self.labels.shape) != (n,):
            raise ValueError(f"labels must be int64 ({n},), got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")
        if self.usage.dtype != torch.uint8 or tuple(self.usage.shape) != (n,):
            raise ValueError(f"usage must be uint8 ({n},), got {self.usage.dtype} "
                             f"{tuple(self.usage.shape)}")
        if self.paths is not None and len(self.paths) != n:
            raise ValueError(f"paths has {len(self.paths)} entries for {n} images")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            raise ValueError(f"labels must lie in [0, {len(self.class_names)})")
        if n and int(self.usage.max()) >= len(USAGES):
            raise ValueError(f"usage codes must lie in [0, {len(USAGES)})")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        counts = {u: int((self.usage == i).sum()) for i, u in enumerate(USAGES)}
        counts = {u: c for u, c in counts.items() if c}
        return (f"FaceDataset(n={len(self)}, source={self.source!r}, usage={counts}, "
                f"fingerprint={self.fingerprint[:12]}...)")

    @property
    def usage_names(self) -> list[str]:
        """Per-sample usage as strings (``"Training"``, ``"PublicTest"``, ``"PrivateTest"``)."""
        return [USAGES[i] for i in self.usage.tolist()]

    def class_counts(self) -> dict[str, int]:
        """Number of samples per class, in class order."""
        counts = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        return dict(zip(self.class_names, counts, strict=True))

    def subset(self, mask_or_indices: Tensor | np.ndarray | Sequence[int] | Sequence[bool]
               ) -> FaceDataset:
        """The samples picked by a boolean mask of length N, or by integer indices (in order)."""
        if isinstance(mask_or_indices, Tensor):
            idx = mask_or_indices.detach().cpu()
        else:
            idx = torch.as_tensor(np.asarray(mask_or_indices))
        if idx.dtype == torch.bool:
            if tuple(idx.shape) != (len(self),):
                raise ValueError(f"mask has shape {tuple(idx.shape)}, expected ({len(self)},)")
            idx = idx.nonzero().flatten()
        elif idx.numel() == 0:
            idx = idx.to(torch.int64)
        elif idx.is_floating_point() or idx.is_complex() or idx.dim() != 1:
            raise ValueError("subset expects a boolean mask or a 1-D sequence of integer indices")
        idx = idx.to(torch.int64)
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise IndexError(f"subset index out of range for a dataset of {len(self)}")
        h = hashlib.sha256(self.fingerprint.encode())
        h.update(idx.numpy().tobytes())
        return FaceDataset(
            images=self.images[idx],
            labels=self.labels[idx],
            usage=self.usage[idx],
            class_names=self.class_names,
            fingerprint=h.hexdigest(),
            source=self.source,
            paths=None if self.paths is None else tuple(self.paths[i] for i in idx.tolist()),
        )

    def split(self, usage: str) -> FaceDataset:
        """The samples of one usage: ``"Training"``, ``"PublicTest"`` or ``"PrivateTest"``."""
        if usage not in USAGES:
            raise ValueError(f"unknown usage {usage!r}; expected one of {USAGES}")
        return self.subset(self.usage == USAGES.index(usage))
