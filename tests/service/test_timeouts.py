"""Issue 17 item 7: slow clients are cut off (headers, body), and SIGTERM is a clean exit 0
within the graceful-shutdown limit. Against a real ``fer-serve`` on a loopback port."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.service.browser.support import run_server

pytestmark = pytest.mark.e2e


def _connect(origin: str) -> socket.socket:
    url = urlsplit(origin)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    return sock


def _read_until_closed(sock: socket.socket, limit_s: float = 10) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start, data = time.monotonic(), b""
    sock.settimeout(limit_s)
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def _half_body(sock: socket.socket) -> None:
    sock.sendall(b"POST /detect HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
                 b"Content-Length: 10000\r\n\r\n" + b"\xff" * 5000)


def test_stalled_clients_are_cut_off_and_sigterm_exits_0(tmp_path: Path, detector_weights: Path) -> None:
    with run_server(tmp_path, detector_weights, FER_USE_SHIPPED_EXTRAS="false", FER_WARMUP="false",
                    FER_TIMEOUT_BODY_S="2", FER_TIMEOUT_HEADERS_S="2",
                    FER_TIMEOUT_GRACEFUL_SHUTDOWN_S="4") as server:
        # half a body, then nothing: a 408 and a closed connection after the body timeout
        with _connect(server.origin) as body_client:
            _half_body(body_client)
            answer, took = _read_until_closed(body_client)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer
        assert 1.5 <= took <= 6, took
        # counted as the 408 the client got, not as a client that went away (499)
        metrics = httpx.get(f"{server.origin}/metrics", timeout=10).text
        assert 'fer_requests_total{method="POST",route="/detect",status="408"} 1.0' in metrics
        assert 'status="499"' not in metrics
        assert 'fer_errors_total{kind="request_timeout"} 1.0' in metrics

        # half the headers, then nothing: closed after the headers timeout
        with _connect(server.origin) as header_client:
            header_client.sendall(b"POST /detect HTTP/1.1\r\nHost: test\r\n")
            answer, took = _read_until_closed(header_client)
        assert answer == b""
        assert 1.5 <= took <= 6, took

        # SIGTERM while a client stalls mid-body: exit status 0, within the graceful limit
        with _connect(server.origin) as stalled:
            _half_body(stalled)
            time.sleep(0.3)
            start = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = server.process.wait(timeout=15)
            took = time.monotonic() - start
        assert code == 0, server.tail()
        assert took <= 4 + 3, took


def test_a_path_can_have_its_own_body_timeout() -> None:
    """Video uploads get a longer body deadline than the default one (pure ASGI, no server)."""
    import asyncio

    from service.timeouts import BodyTimeoutMiddleware

    async def app(scope, receive, send) -> None:  # reads the whole body, then answers 200
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def upload(path: str) -> int:
        async def slow_receive():  # one chunk every 0.1 s, 5 chunks: 0.5 s in all
            nonlocal left
            await asyncio.sleep(0.1)
            left -= 1
            return {"type": "http.request", "body": b"x", "more_body": left > 0}

        left, statuses = 5, []

        async def send(message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        middleware = BodyTimeoutMiddleware(app, timeout=0.25, path_timeouts={"/predict/video": 5.0})
        await middleware({"type": "http", "path": path, "client": ("127.0.0.1", 1)}, slow_receive, send)
        return statuses[0]

    assert asyncio.run(upload("/predict")) == 408
    assert asyncio.run(upload("/predict/video")) == 200
