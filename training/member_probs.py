"""A model's class probabilities on one evaluation split, stored so ensembles can be scored later.

Zoo models are often too large to keep (``checkpoints/`` has a size budget), yet the ensembles
of the results table need every member's outputs at once. A member file keeps just those
outputs: 1-crop and 10-crop float32 probabilities on the split (about 200 KB for PublicTest),
the labels and a fingerprint of the data, in safetensors. The equal-weight average of member
files is what a soft-voting ensemble with equal weights outputs, so such an ensemble's accuracy
can be measured without its weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open

from facemodels.atomic import save_safetensors_atomically

__all__ = ["MemberProbs", "MemberProbsError", "average_accuracy", "load_member_probs",
           "save_member_probs"]

FORMAT = "1"


class MemberProbsError(ValueError):
    """A member file is missing, corrupt, or does not match the others."""


@dataclass(frozen=True)
class MemberProbs:
    """One model's probabilities on ``split`` (rows in the split's order)."""

    name: str
    split: str
    data_fingerprint: str
    labels: torch.Tensor  # (N,) int64
    probs_1crop: torch.Tensor  # (N, C) float32
    probs_10crop: torch.Tensor  # (N, C) float32
    checkpoint: str = ""
    source: str = ""  # the file it was read from, for error messages

    def accuracy(self, *, tta: bool) -> float:
        """Top-1 accuracy of the 10-crop (``tta``) or 1-crop probabilities."""
        probs = self.probs_10crop if tta else self.probs_1crop
        return (probs.argmax(1) == self.labels).float().mean().item()


def save_member_probs(path: str | Path, member: MemberProbs) -> Path:
    """Write ``member`` to ``path`` (float32, so no argmax changes from rounding)."""
    path = Path(path)
    save_safetensors_atomically(
        path,
        {"labels": member.labels.to(torch.int64).contiguous(),
         "probs_1crop": member.probs_1crop.to(torch.float32).contiguous(),
         "probs_10crop": member.probs_10crop.to(torch.float32).contiguous()},
        metadata={"format": FORMAT, "name": member.name, "split": member.split,
                  "data_fingerprint": member.data_fingerprint, "checkpoint": member.checkpoint},
    )
    return path


def load_member_probs(path: str | Path) -> MemberProbs:
    """Read a member file; a missing, corrupt or inconsistent file raises :class:`MemberProbsError`."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in ("labels", "probs_1crop", "probs_10crop")}
    except FileNotFoundError as exc:
        raise MemberProbsError(f"{path}: no such member file") from exc
    except (SafetensorError, OSError, KeyError) as exc:
        raise MemberProbsError(f"{path}: not a member-probabilities file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise MemberProbsError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT}")
    n, classes = len(tensors["labels"]), tensors["probs_1crop"].shape[-1]
    if tensors["labels"].ndim != 1 or tensors["labels"].is_floating_point():
        raise MemberProbsError(f"{path}: labels must be a 1-D integer tensor")
    for key in ("probs_1crop", "probs_10crop"):
        if tuple(tensors[key].shape) != (n, classes):
            raise MemberProbsError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, "
                                   f"expected ({n}, {classes})")
    return MemberProbs(
        name=meta.get("name", path.stem), split=meta.get("split", ""),
        data_fingerprint=meta.get("data_fingerprint", ""), labels=tensors["labels"],
        probs_1crop=tensors["probs_1crop"].float(), probs_10crop=tensors["probs_10crop"].float(),
        checkpoint=meta.get("checkpoint", ""), source=str(path),
    )


def average_accuracy(members: Sequence[MemberProbs], *, tta: bool) -> float:
    """Accuracy of the plain (equal-weight) average of the members' probabilities.

    The members must describe the same rows: same split, data fingerprint and labels.
    """
    if not members:
        raise MemberProbsError("an ensemble needs at least one member")
    first = members[0]
    for m in members[1:]:
        if (m.split, m.data_fingerprint) != (first.split, first.data_fingerprint):
            raise MemberProbsError(f"{m.source or m.name} was measured on other data than "
                                   f"{first.source or first.name} ({m.split} "
                                   f"{m.data_fingerprint[:12]} vs {first.split} "
                                   f"{first.data_fingerprint[:12]})")
        if not torch.equal(m.labels, first.labels) or m.probs_1crop.shape != first.probs_1crop.shape:
            raise MemberProbsError(f"{m.source or m.name} and {first.source or first.name} claim the "
                                   "same data but their labels or classes differ")
    probs = torch.stack([m.probs_10crop if tta else m.probs_1crop for m in members]).mean(0)
    return (probs.argmax(1) == first.labels).float().mean().item()
