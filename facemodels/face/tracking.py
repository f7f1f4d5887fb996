"""Face tracks across video frames: greedy IoU matching with a short memory for missed frames,
and an exponential moving average of each track's probabilities.

Pure numpy and model-independent: boxes in, track ids out. Why not a tracking library: the faces
come from a detector at a few frames per second, where SORT-style Kalman motion models add little
over IoU with a memory, and the maintained PyPI trackers pull in scipy, filterpy or lap."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["EmaSmoother", "IouTracker", "iou_matrix"]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4), boxes as x1, y1, x2, y2."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


@dataclass(slots=True)
class _Track:
    id: int
    box: np.ndarray
    missed: int = 0


class IouTracker:
    """Assigns a stable id to each face box, frame after frame.

    Each frame's boxes are matched to the live tracks greedily by descending IoU (pairs below
    ``min_iou`` never match); an unmatched box starts a new track; a track unmatched for more than
    ``max_missed`` consecutive frames ends (its id is never reused). Matching uses the box a track
    was last seen with, so a face hidden for a frame or two picks its id up again if it has not
    moved far.
    """

    def __init__(self, *, min_iou: float = 0.3, max_missed: int = 5) -> None:
        if not 0.0 < min_iou <= 1.0:
            raise ValueError("min_iou must be in (0, 1]")
        if max_missed < 0:
            raise ValueError("max_missed must be >= 0")
        self.min_iou = min_iou
        self.max_missed = max_missed
        self._tracks: list[_Track] = []
        self._next_id = 1

    @property
    def active(self) -> int:
        """Tracks alive now (seen within the last ``max_missed`` frames)."""
        return len(self._tracks)

    def update(self, boxes: Sequence[Sequence[float]] | np.ndarray) -> list[int]:
        """Track ids for this frame's ``boxes`` (x1, y1, x2, y2), in their order."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        ids = [0] * len(boxes)
        matched_tracks: set[int] = set()
        if self._tracks and len(boxes):
            iou = iou_matrix(np.stack([t.box for t in self._tracks]), boxes)
            order = np.argsort(-iou, axis=None, kind="stable")
            for flat in order:
                ti, bi = divmod(int(flat), len(boxes))
                if iou[ti, bi] < self.min_iou:
                    break
                if ti in matched_tracks or ids[bi]:
                    continue
                track = self._tracks[ti]
                track.box, track.missed = boxes[bi], 0
                matched_tracks.add(ti)
                ids[bi] = track.id
        survivors = []
        for ti, track in enumerate(self._tracks):
            if ti not in matched_tracks:
                track.missed += 1
            if track.missed <= self.max_missed:
                survivors.append(track)
        self._tracks = survivors
        for bi, box in enumerate(boxes):
            if not ids[bi]:
                self._tracks.append(_Track(self._next_id, box))
                ids[bi] = self._next_id
                self._next_id += 1
        return ids


class EmaSmoother:
    """Exponential moving average of probability vectors per key (a track id), in probability
    space, with time constant ``tau_s`` seconds: an observation ``dt`` seconds after the previous
    one weighs ``1 - exp(-dt / tau_s)``, so the smoothing does not depend on the sampling rate and a
    track seen again after a gap follows its new face faster. ``tau_s=0`` passes values through.
    The result stays a probability vector (a convex combination of probability vectors)."""

    def __init__(self, tau_s: float) -> None:
        if tau_s < 0 or not math.isfinite(tau_s):
            raise ValueError("tau_s must be a finite number >= 0")
        self.tau_s = tau_s
        self._state: dict[int, tuple[float, np.ndarray]] = {}

    def update(self, key: int, t: float, probs: np.ndarray) -> np.ndarray:
        """The smoothed probabilities of ``key`` after observing ``probs`` at time ``t`` seconds."""
        probs = np.asarray(probs, dtype=np.float64)
        prev = self._state.get(key)
        if prev is None or self.tau_s == 0:
            smoothed = probs.copy()
        else:
            t0, value = prev
            alpha = 1.0 - math.exp(-max(t - t0, 0.0) / self.tau_s)
            smoothed = value + alpha * (probs - value)
        self._state[key] = (t, smoothed)
        return smoothed

    def forget(self, key: int) -> None:
        self._state.pop(key, None)
