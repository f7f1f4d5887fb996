"""uvicorn's httptools protocol with the limits the service's h11 protocol has.

httptools (llhttp) parses faster than h11, but uvicorn sets neither of the two limits that
:class:`service.timeouts.HeaderTimeoutH11Protocol` and h11 give a slow or hostile client:

- a deadline on the request headers (``config.fer_timeout_headers``, seconds, from
  ``FER_TIMEOUT_HEADERS_S``): the connection closes when a request's headers are not complete
  that long after the connection opened or after its previous response;
- a cap on the request head (request line and headers: ``config.h11_max_incomplete_event_size``,
  the same 16 KiB h11 is given). llhttp buffers a header of any length, so without the cap one
  connection can make the server hold megabytes. A head past the cap is a 400 and the connection
  closes, as with h11.

Loaded only when ``fer-serve`` picks httptools (it is installed, ``--http auto|httptools``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.timeouts import HeadersDeadline

__all__ = ["HardenedHttpToolsProtocol"]

log = logging.getLogger(__name__)

_HEAD_END = b"\r\n\r\n"


class HardenedHttpToolsProtocol(HeadersDeadline, HttpToolsProtocol):
    """httptools with a request-head deadline and a request-head size cap."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.timeout_headers: float | None = getattr(config, "fer_timeout_headers", None)
        self.max_head_bytes: int | None = getattr(config, "h11_max_incomplete_event_size", None)
        self._headers_timer: asyncio.TimerHandle | None = None
        self._in_head = True  # the bytes arriving now belong to a request head
        self._head_bytes = 0
        self._head_tail = b""  # the head's last 3 bytes, to find an end marker split across reads

    # the deadline -----------------------------------------------------------------------
    def _headers_timed_out(self) -> None:
        self._headers_timer = None
        if not self.transport.is_closing():
            peer = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
            log.info("closing a connection from %s: no complete request headers within %.1f s",
                     peer, self.timeout_headers)
            self.transport.close()

    # the size cap -----------------------------------------------------------------------
    def _head_overflows(self, data: bytes) -> bool:
        """Count ``data`` towards the current head; True when the head cannot end within the cap.

        A read may carry the end of the head and then body bytes: only what comes before the
        end marker counts, so a large upload whose first read holds its headers is not refused.
        """
        if not self._in_head or self.max_head_bytes is None:
            return False
        room = self.max_head_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            self._head_tail = (self._head_tail + data)[-3:]
            return False
        return _HEAD_END not in self._head_tail + data[: max(room, 0)]

    def data_received(self, data: bytes) -> None:
        if self._head_overflows(data):
            log.info("closing a connection from %s: request head over %d bytes",
                     f"{self.client[0]}:{self.client[1]}" if self.client else "?", self.max_head_bytes)
            self.send_400_response("Request head too large.")
            return
        super().data_received(data)

    # parser and connection events -------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_headers_timer()

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes, self._head_tail = False, 0, b""
        self._cancel_headers_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True  # what follows is the next request's head (maybe pipelined)
        super().on_message_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # the next request's headers are already in
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._arm_headers_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_headers_timer()
        super().connection_lost(exc)
