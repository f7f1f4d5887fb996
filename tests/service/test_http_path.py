"""fer-serve's HTTP stack: uvloop and httptools when installed, and the same limits on slow or
oversized request heads whichever parser runs (a real uvicorn on a loopback port)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from service import cli
from service.cli import H11_MAX_HEADER_BYTES, HTTP_PROTOCOLS, http_stack

# --- choosing the stack ------------------------------------------------------------------------


def test_auto_prefers_uvloop_and_httptools_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_installed", lambda name: True)
    monkeypatch.setattr(cli.sys, "platform", "linux")
    assert http_stack() == ("uvloop", "httptools")
    assert http_stack("asyncio", "h11") == ("asyncio", "h11")


def test_auto_falls_back_to_asyncio_and_h11(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_installed", lambda name: False)
    assert http_stack() == ("asyncio", "h11")
    with pytest.raises(SystemExit, match="httptools is not installed"):
        http_stack("auto", "httptools")
    with pytest.raises(SystemExit, match="uvloop is not installed"):
        http_stack("uvloop", "auto")


def test_no_uvloop_on_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_installed", lambda name: True)
    monkeypatch.setattr(cli.sys, "platform", "win32")
    assert http_stack()[0] == "asyncio"


def test_cli_passes_the_stack_to_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    monkeypatch.setattr(cli, "_serve", lambda *args: seen.setdefault("args", args))
    monkeypatch.setattr(cli, "_installed", lambda name: True)
    monkeypatch.setattr(cli.sys, "platform", "linux")
    cli.main(["--port", "1234"])
    assert seen["args"][-2:] == ("uvloop", "httptools")
    seen.clear()
    cli.main(["--loop", "asyncio", "--http", "h11"])
    assert seen["args"][-2:] == ("asyncio", "h11")


# --- the limits, on both parsers ---------------------------------------------------------------

HEADERS_TIMEOUT_S = 0.6


async def _echo_length(scope, receive, send) -> None:
    """Reads the whole body and answers with its length; a WebSocket echoes text frames."""
    if scope["type"] == "websocket":
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message["text"]})
        return
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _stacks() -> list:
    out = [pytest.param(("asyncio", "h11"), id="asyncio-h11")]
    for loop, http in (("uvloop", "httptools"), ("asyncio", "httptools")):
        installed = all(cli._installed(m) for m in {loop, http} - {"asyncio"})
        out.append(pytest.param((loop, http), id=f"{loop}-{http}", marks=pytest.mark.skipif(
            not installed, reason=f"{loop}/{http} not installed")))
    return out


@pytest.fixture(params=_stacks())
def server(request: pytest.FixtureRequest) -> Iterator[tuple[int, str]]:
    """uvicorn as fer-serve configures it (protocol class, head cap, header deadline)."""
    import uvicorn

    loop, http = request.param
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(_echo_length, host="127.0.0.1", port=port, loop=loop, http=HTTP_PROTOCOLS[http],
                            lifespan="off", log_level="warning", timeout_keep_alive=30,
                            h11_max_incomplete_event_size=H11_MAX_HEADER_BYTES)
    config.fer_timeout_headers = HEADERS_TIMEOUT_S
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield port, http
    srv.should_exit = True
    thread.join(10)


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _responses(sock: socket.socket, count: int) -> list[bytes]:
    """Read ``count`` responses (each with a Content-Length body) off a keep-alive connection."""
    data, out = b"", []
    while len(out) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {len(out)} responses: {data[:200]!r}"
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            rest += sock.recv(65536)
        out.append(head.split(b"\r\n")[0] + b" " + rest[:length])
        data = rest[length:]
    return out


def _until_closed(sock: socket.socket) -> tuple[bytes, float]:
    start, data = time.monotonic(), b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def _post(body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST /x HTTP/1.1\r\nHost: t\r\n" + extra + b"Content-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


def test_large_body_in_the_same_write_as_the_head_is_not_a_large_head(server) -> None:
    port, _ = server
    body = b"\xff" * 300_000  # far past the head cap, sent with the head in one write
    with _connect(port) as sock:
        sock.sendall(_post(body) + _post(b"abc"))  # and a pipelined second request
        assert _responses(sock, 2) == [b"HTTP/1.1 200 OK 300000", b"HTTP/1.1 200 OK 3"]


def test_head_past_the_cap_is_a_400_and_the_connection_closes(server) -> None:
    port, _ = server
    with _connect(port) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: t\r\nX-Big: ")
        try:
            for _ in range(40):  # 40 x 1 KiB, never finishing the header
                sock.sendall(b"a" * 1024)
                time.sleep(0.005)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer, _ = _until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]


def test_head_just_under_the_cap_is_served(server) -> None:
    port, _ = server
    with _connect(port) as sock:
        sock.sendall(_post(b"ok", b"X-Pad: " + b"p" * (H11_MAX_HEADER_BYTES - 200) + b"\r\n"))
        assert _responses(sock, 1) == [b"HTTP/1.1 200 OK 2"]


def test_incomplete_headers_close_the_connection_after_the_deadline(server) -> None:
    port, _ = server
    with _connect(port) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: t\r\n")
        answer, took = _until_closed(sock)
    assert answer == b""
    assert HEADERS_TIMEOUT_S * 0.8 <= took <= HEADERS_TIMEOUT_S + 3, took


def test_the_deadline_restarts_after_each_response(server) -> None:
    port, _ = server
    with _connect(port) as sock:
        for _ in range(3):  # slower in all than one deadline, each request well within it
            time.sleep(HEADERS_TIMEOUT_S / 3)
            sock.sendall(_post(b"12"))
            assert _responses(sock, 1) == [b"HTTP/1.1 200 OK 2"]
        sock.sendall(b"POST /x HTTP/1.1\r\n")  # then half a head, and nothing
        answer, took = _until_closed(sock)
    assert answer == b"" and took <= HEADERS_TIMEOUT_S + 3


def test_websocket_upgrade_outlives_the_header_deadline(server) -> None:
    """WS /stream goes through the same protocol class: the upgrade works, and the head deadline
    (armed when the connection opened) does not close the WebSocket later."""
    from websockets.sync.client import connect

    port, _ = server
    with connect(f"ws://127.0.0.1:{port}/stream", open_timeout=10) as ws:
        ws.send("a")
        assert ws.recv(timeout=10) == "a"
        time.sleep(HEADERS_TIMEOUT_S * 2)
        ws.send("b")
        assert ws.recv(timeout=10) == "b"
