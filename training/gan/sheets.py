"""PNG sample sheets: one row per face, one column per view (input, frontalisers, a real frontal).

* CFP: profile in | warp-only | GAN | a real frontal photo of the same person
  (:func:`pick_sheet_rows` picks one profile and one frontal per person).
* FER2013 across yaw: original | warp-only | GAN, the faces binned by estimated |yaw| and
  sorted by yaw (:func:`pick_yaw_rows`), each row labelled with its yaw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from facemodels.frontalizer.model import to_uint8
from training.data.cfp import CfpDataset

__all__ = ["pick_sheet_rows", "pick_yaw_rows", "write_sheet"]

_HEADER = ("profile in", "frontalised", "real frontal")
_BAR = 18  # height of the title and header strips
_LABEL_W = 64  # width of the row-label strip


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


def pick_yaw_rows(yaw: np.ndarray, edges: Sequence[float], per_bin: int) -> np.ndarray:
    """Indices of up to ``per_bin`` faces per |yaw| bin (``edges``, the last bin open-ended),
    the largest |yaw| of each bin first, all sorted by signed yaw; faces with NaN yaw are skipped."""
    yaw = np.asarray(yaw, dtype=np.float64)
    absyaw = np.abs(yaw)
    picks: list[int] = []
    for lo, hi in zip(edges, [*edges[1:], math.inf], strict=True):
        inside = np.nonzero((absyaw >= lo) & (absyaw < hi))[0]
        picks += inside[np.argsort(-absyaw[inside], kind="stable")][:per_bin].tolist()
    picks_arr = np.array(picks, dtype=np.int64)
    return picks_arr[np.argsort(yaw[picks_arr], kind="stable")]


def _text_strip(height: int, width: int, texts: Sequence[str], step: int, x0: int = 0) -> np.ndarray:
    strip = np.full((height, width), 255, np.uint8)
    for k, text in enumerate(texts):
        cv2.putText(strip, text, (x0 + k * step + 3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, 0, 1, cv2.LINE_AA)
    return strip


def write_sheet(path: Path, *columns: Tensor, scale: int = 2, title: str = "",
                header: Sequence[str] = _HEADER, row_labels: Sequence[str] | None = None) -> Path:
    """Write a grid with one row per face and one column per tensor of ``columns``.

    Columns are ``(N, 1, S, S)`` in [-1, 1] or uint8 ``(N, S, S)``; columns of another size are
    resized to the first one's. ``header`` names the columns; ``row_labels`` (one per row)
    are written in a strip on the left.
    """
    if len(header) != len(columns):
        raise ValueError(f"{len(columns)} columns but {len(header)} header names")
    cols = [c if c.dtype == torch.uint8 else to_uint8(c) for c in columns]
    side = int(cols[0].shape[-1]) * scale
    n = int(cols[0].shape[0])
    if row_labels is not None and len(row_labels) != n:
        raise ValueError(f"{n} rows but {len(row_labels)} row labels")
    left = _LABEL_W if row_labels is not None else 0
    rows = []
    for i in range(n):
        tiles = [cv2.resize(c[i].cpu().numpy(), (side, side), interpolation=cv2.INTER_NEAREST) for c in cols]
        if row_labels is not None:
            label = np.full((side, left), 255, np.uint8)
            cv2.putText(label, row_labels[i], (3, side // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.38, 0, 1,
                        cv2.LINE_AA)
            tiles.insert(0, label)
        rows.append(np.hstack(tiles))
    width = left + side * len(cols)
    parts = [_text_strip(_BAR, width, header, side, left), *rows]
    if title:
        parts.insert(0, _text_strip(_BAR, width, [title], 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.vstack(parts)):
        raise OSError(f"could not write {path}")
    return path
