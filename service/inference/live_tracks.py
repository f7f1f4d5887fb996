"""Face tracks of a live stream: the IoU tracker and EMA smoother of ``/predict/video``
(:mod:`facemodels.face.tracking`), plus forgetting the tracks that ended.

A video ends; a camera may run for hours, meeting many faces. The smoother keeps a state per
track id, so here each id's state is dropped once the tracker has ended its track (unseen for
more than ``max_missed`` frames, the tracker's own rule): memory follows the faces in view.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from facemodels.face.tracking import EmaSmoother, IouTracker

__all__ = ["LiveTracks"]


class LiveTracks:
    """Stable ids and smoothed probabilities for the faces of successive frames."""

    def __init__(self, *, min_iou: float, max_missed: int, smoothing_s: float) -> None:
        self.tracker = IouTracker(min_iou=min_iou, max_missed=max_missed)
        self.smoother = EmaSmoother(smoothing_s)
        self._last_seen: dict[int, int] = {}  # track id -> index of the frame it was last seen in
        self._frame = 0

    @property
    def active(self) -> int:
        """Tracks alive now."""
        return self.tracker.active

    @property
    def remembered(self) -> int:
        """Tracks whose smoothing state is kept (equal to :attr:`active`)."""
        return len(self._last_seen)

    def update(self, t: float, boxes: Sequence[Sequence[float]],
               probs: Sequence[np.ndarray]) -> list[tuple[int, np.ndarray]]:
        """``(track id, smoothed probabilities)`` for this frame's faces (seen at ``t`` seconds)."""
        ids = self.tracker.update(boxes)
        out = [(tid, self.smoother.update(tid, t, p)) for tid, p in zip(ids, probs, strict=True)]
        for tid in ids:
            self._last_seen[tid] = self._frame
        ended = [tid for tid, seen in self._last_seen.items()
                 if self._frame - seen > self.tracker.max_missed]
        for tid in ended:
            del self._last_seen[tid]
            self.smoother.forget(tid)
        self._frame += 1
        return out
