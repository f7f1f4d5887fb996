"""Time limits on slow clients: request headers, request bodies (and, in ``service.cli``,
keep-alive and graceful shutdown, which uvicorn enforces itself).

- :class:`HeaderTimeoutH11Protocol`: uvicorn's h11 protocol that closes a connection whose request
  headers are not complete ``FER_TIMEOUT_HEADERS_S`` after it opened or after its previous
  response (uvicorn's keep-alive timer stops at the first byte, so partial headers otherwise
  hold a connection for ever).
- :class:`BodyTimeoutMiddleware`: ASGI middleware that cuts off a request whose body has not
  arrived in full ``FER_TIMEOUT_BODY_S`` after its headers. The app's pending ``receive`` gets
  ``http.disconnect`` (so it stops, as for a client that hung up), the client gets a
  ``408 request_timeout`` with ``Connection: close`` when no response was started, and the
  connection is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.metrics import note_request_timeout

__all__ = ["BodyTimeoutMiddleware", "HeaderTimeoutH11Protocol", "HeadersDeadline"]

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]


def _peer(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


class HeadersDeadline:
    """The per-connection deadline on a request head, shared by the h11 and httptools protocols:
    ``_arm_headers_timer`` (re)starts it, ``_cancel_headers_timer`` stops it, and the protocol's
    own ``_headers_timed_out`` says what expiry means for its parser."""

    timeout_headers: float | None
    _headers_timer: asyncio.TimerHandle | None
    loop: asyncio.AbstractEventLoop

    def _arm_headers_timer(self) -> None:
        self._cancel_headers_timer()
        if self.timeout_headers:
            self._headers_timer = self.loop.call_later(self.timeout_headers, self._headers_timed_out)

    def _cancel_headers_timer(self) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None

    def _headers_timed_out(self) -> None:
        raise NotImplementedError


class HeaderTimeoutH11Protocol(HeadersDeadline, H11Protocol):
    """h11 with a deadline on the request headers (``config.fer_timeout_headers``, seconds)."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.timeout_headers: float | None = getattr(config, "fer_timeout_headers", None)
        self._headers_timer: asyncio.TimerHandle | None = None

    def _headers_timed_out(self) -> None:
        self._headers_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            log.info("closing a connection from %s: no complete request headers within %.1f s",
                     _peer(self.client), self.timeout_headers)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_headers_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in
            self._cancel_headers_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_headers_timer()  # the next request's headers

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_headers_timer()
        super().connection_lost(exc)


class BodyTimeoutMiddleware:
    """Cut off an HTTP request whose body is not complete ``timeout`` seconds after its headers.

    ``path_timeouts`` gives routes with larger bodies (video uploads) their own limit.
    """

    def __init__(self, app: Any, *, timeout: float, path_timeouts: dict[str, float] | None = None) -> None:
        self.app = app
        self.timeout = timeout
        self.path_timeouts = dict(path_timeouts or {})

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        timeout = self.path_timeouts.get(scope.get("path", ""), self.timeout)
        deadline = loop.time() + timeout
        state = {"body_done": False, "timed_out": False, "started": False}

        async def timed_receive() -> Message:
            if state["timed_out"]:
                return {"type": "http.disconnect"}
            if state["body_done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                state["timed_out"] = True
                if not state["started"]:
                    note_request_timeout(scope)
                await self._reject(scope, send, started=state["started"], timeout=timeout)
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def guarded_send(message: Message) -> None:
            if state["timed_out"]:
                return  # the client was answered (408) and the connection is closing
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, timed_receive, guarded_send)

    async def _reject(self, scope: Scope, send: Any, *, started: bool, timeout: float) -> None:
        client = scope.get("client")
        log.info("request body from %s not complete within %.1f s: cut off", _peer(client), timeout)
        if started:
            return  # too late for a 408; the app stops on the disconnect
        body = json.dumps({"error": {"code": "request_timeout", "message":
                           f"the request body did not arrive within {timeout:g} s"}}).encode()
        await send({"type": "http.response.start", "status": 408,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})
