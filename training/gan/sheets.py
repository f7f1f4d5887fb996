"""PNG sample sheets: profile input | frontalised | a real frontal photo of the same person."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from facemodels.frontalizer.model import to_uint8
from training.data.cfp import CfpDataset

__all__ = ["pick_sheet_rows", "write_sheet"]

_HEADER = ("profile in", "frontalised", "real frontal")


def pick_sheet_rows(data: CfpDataset, count: int) -> tuple[Tensor, Tensor]:
    """For up to ``count`` people with both kinds: indices of one profile and one frontal photo."""
    profiles, frontals = [], []
    for pid in data.ids:
        mine = data.identity == pid
        prof = (mine & (data.pose != 0)).nonzero().flatten()
        front = (mine & (data.pose == 0)).nonzero().flatten()
        if len(prof) and len(front):
            profiles.append(int(prof[0]))
            frontals.append(int(front[0]))
        if len(profiles) == count:
            break
    return torch.tensor(profiles, dtype=torch.long), torch.tensor(frontals, dtype=torch.long)


def write_sheet(path: Path, profile: Tensor, frontalised: Tensor, frontal: Tensor, *, scale: int = 2,
                title: str = "", header: tuple[str, str, str] = _HEADER) -> Path:
    """Write a grid with one row per person and three columns.

    Inputs are ``(N, 1, S, S)`` in [-1, 1] or uint8 ``(N, S, S)``; columns of another size are
    resized to the first one's.
    """
    cols = [c if c.dtype == torch.uint8 else to_uint8(c) for c in (profile, frontalised, frontal)]
    side = int(cols[0].shape[-1]) * scale
    rows = []
    for i in range(int(cols[0].shape[0])):
        tiles = [cv2.resize(c[i].cpu().numpy(), (side, side), interpolation=cv2.INTER_NEAREST) for c in cols]
        rows.append(np.hstack(tiles))
    labels = np.full((18, side * 3), 255, np.uint8)
    for k, text in enumerate(header):
        cv2.putText(labels, text, (k * side + 3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, 0, 1, cv2.LINE_AA)
    parts = [labels, *rows]
    if title:
        bar = np.full((18, side * 3), 255, np.uint8)
        cv2.putText(bar, title, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, 0, 1, cv2.LINE_AA)
        parts.insert(0, bar)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.vstack(parts)):
        raise OSError(f"could not write {path}")
    return path
