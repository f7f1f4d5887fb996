"""A one-slot mailbox for live frames: the newest frame waits, older ones are dropped.

A live camera is worth only its latest picture. When a client sends frames faster than the
server answers them, queueing the surplus would make every answer later than the one before
(and hold the frames in memory); instead a new frame replaces the one waiting, and the
replaced frame's sequence number is remembered so that the next answer can say it was dropped.
So at most one frame waits, whatever the client sends.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

__all__ = ["MAX_LISTED_DROPS", "Delivery", "Frame", "LatestFrameMailbox"]

#: Most dropped sequence numbers listed between two takes; the count stays exact past it.
MAX_LISTED_DROPS = 256


@dataclass(frozen=True, slots=True)
class Frame:
    seq: int  # 0-based index of the message on its connection
    data: bytes
    arrived: float  # seconds from the opening of its connection to its arrival


@dataclass(frozen=True, slots=True)
class Delivery:
    frame: Frame
    dropped: list[int]  # sequence numbers replaced since the previous take (at most MAX_LISTED_DROPS)
    dropped_count: int  # all of them, also past the list's limit


class LatestFrameMailbox:
    """Holds at most one frame. :meth:`put` never waits; :meth:`take` waits for a frame."""

    def __init__(self) -> None:
        self._frame: Frame | None = None
        self._dropped: list[int] = []
        self._dropped_count = 0
        self._ready = asyncio.Event()

    @property
    def pending(self) -> int:
        """Frames waiting: 0 or 1."""
        return 0 if self._frame is None else 1

    def put(self, frame: Frame) -> bool:
        """Leave ``frame`` for the taker; True when it replaced (dropped) a waiting frame."""
        replaced = self._frame
        self._frame = frame
        self._ready.set()
        if replaced is None:
            return False
        self._dropped_count += 1
        if len(self._dropped) < MAX_LISTED_DROPS:
            self._dropped.append(replaced.seq)
        return True

    async def take(self) -> Delivery:
        """The newest frame, with the frames dropped since the previous take."""
        while self._frame is None:
            self._ready.clear()
            await self._ready.wait()
        delivery = Delivery(self._frame, self._dropped, self._dropped_count)
        self._frame, self._dropped, self._dropped_count = None, [], 0
        return delivery
