"""Hostile and unlucky requests through the real app (issue 17, items 1-5 and 8): deeply nested
JSON, clients that hang up, one bad image in a JSON batch, limits that hold for every body shape,
a large JSON batch parsed off the event loop, and a full queue refused before the upload is read.

Most tests go through ``TestClient``; those that need a body that arrives in pieces, or a client
that hangs up, drive the same app with raw ASGI messages (:func:`_asgi_post`), and one starts the
real server (``fer-serve``) and hangs up a raw socket mid-upload.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient

from service.main import create_app

JPEG = {"content-type": "image/jpeg"}
ROUTES = ("/predict", "/detect", "/predict/batch")


def _assert_error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def _value(text: str, series: str) -> float:
    """A series' value in a Prometheus exposition; 0 when the series is absent."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def small_client(make_settings) -> Iterator[TestClient]:
    """The app with a 200 kB upload limit and at most 4 images per batch."""
    with TestClient(create_app(make_settings(max_upload_bytes=200_000, max_batch_images=4))) as c:
        yield c


# --- raw ASGI: bodies in pieces, clients that hang up -----------------------------------------


@dataclass
class AsgiResult:
    status: int | None
    body: bytes
    chunks_read: int
    headers: dict[str, str] | None = None


def _asgi_post(client: TestClient, path: str, headers: dict[str, str], chunks: list[bytes], *,
               complete: bool = True, hang_up: bool = False) -> AsgiResult:
    """POST ``chunks`` to the app (lifespan already run by ``client``) as a server would.

    ``complete=False`` leaves the body unfinished (``more_body`` on the last chunk too);
    ``hang_up`` makes every receive after the chunks an ``http.disconnect``, as when the client
    closes its connection. Returns the status and body the app sent and how many chunks it read.
    """
    assert complete or hang_up, "an unfinished body without a hang-up would wait forever"
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "state": {},
    }
    result = AsgiResult(None, b"", 0)

    async def run() -> None:
        done = anyio.Event()

        async def receive() -> dict:
            if result.chunks_read < len(chunks):
                result.chunks_read += 1
                last = result.chunks_read == len(chunks)
                return {"type": "http.request", "body": chunks[result.chunks_read - 1],
                        "more_body": not (last and complete)}
            if not hang_up:
                await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                result.status = message["status"]
                result.headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
            elif message["type"] == "http.response.body":
                result.body += message.get("body", b"")
                if not message.get("more_body", False):
                    done.set()

        with anyio.fail_after(30):
            await client.app(scope, receive, send)

    assert client.portal is not None, "use the client inside its `with` block"
    client.portal.call(run)
    return result


def _multipart(parts: list[tuple[str, str, bytes, str]], boundary: str = "hardening") -> tuple[dict, bytes]:
    """Headers and body of a multipart form: ``(field, filename, data, content type)`` parts."""
    body = b""
    for field, filename, data, ctype in parts:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
                 f"filename=\"{filename}\"\r\nContent-Type: {ctype}\r\n\r\n").encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return {"content-type": f"multipart/form-data; boundary={boundary}"}, body


# --- 1. deeply nested JSON --------------------------------------------------------------------


def _nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("depth", [999, 100_000])
def test_deeply_nested_json_is_a_4xx(client: TestClient, face_jpeg: bytes, route: str, depth: int) -> None:
    key = "images" if route == "/predict/batch" else "image"
    for body in (_nested(depth, "list"), f'{{"{key}": {_nested(depth, "list")}}}',
                 f'{{"{key}": {_nested(depth, "dict")}}}'):
        r = client.post(route, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        _assert_error(r, r.status_code, "validation_error")
    # the server keeps serving
    assert client.post(route.replace("/batch", ""), content=face_jpeg, headers=JPEG).status_code == 200


def test_json_numbers_python_refuses_are_a_4xx(client: TestClient) -> None:
    # int() refuses more than 4300 digits with a plain ValueError, not a JSONDecodeError
    body = '{"image": ' + "1" * 5000 + "}"
    _assert_error(client.post("/predict", content=body, headers={"content-type": "application/json"}),
                  422, "validation_error")


# --- 2. clients that hang up ------------------------------------------------------------------


def _bodies(face_jpeg: bytes) -> dict[str, tuple[str, dict, bytes]]:
    """One request per body shape: route, headers, complete body."""
    mp_headers, mp_body = _multipart([("files", "a.jpg", face_jpeg, "image/jpeg")])
    js = json.dumps({"image": _b64(face_jpeg)}).encode()
    return {"raw": ("/predict", JPEG, face_jpeg),
            "multipart": ("/predict/batch", mp_headers, mp_body),
            "json": ("/detect", {"content-type": "application/json"}, js)}


@pytest.mark.parametrize("shape", ["raw", "multipart", "json"])
def test_client_hanging_up_mid_upload_is_a_499_not_a_500(
    client: TestClient, face_jpeg: bytes, shape: str, caplog: pytest.LogCaptureFixture,
) -> None:
    route, headers, body = _bodies(face_jpeg)[shape]
    headers = {**headers, "content-length": str(len(body))}
    before = client.get("/metrics").text
    with caplog.at_level(logging.INFO):
        r = _asgi_post(client, route, headers, [body[:1000], body[1000:5000]], complete=False,
                       hang_up=True)
    assert r.status == 499
    after = client.get("/metrics").text
    series = f'fer_requests_total{{method="POST",route="{route}",status="499"}}'
    assert _value(after, series) == _value(before, series) + 1
    assert _value(after, 'fer_errors_total{kind="client_disconnect"}') == \
        _value(before, 'fer_errors_total{kind="client_disconnect"}') + 1
    assert 'status="500"' not in after
    assert _value(after, 'fer_errors_total{kind="internal_error"}') == 0
    # one INFO line, no ERROR and no traceback
    mine = [rec for rec in caplog.records if rec.name.startswith("service")]
    assert [rec.levelno for rec in mine] == [logging.INFO], [rec.getMessage() for rec in mine]
    assert "disconnected" in mine[0].getMessage() and mine[0].exc_info is None
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


@pytest.mark.parametrize("shape", ["raw", "multipart", "json"])
def test_no_model_runs_for_a_client_that_is_gone(client: TestClient, face_jpeg: bytes, shape: str) -> None:
    """The whole image arrived, then the client hung up: neither the detector nor a classifier runs."""
    route, headers, body = _bodies(face_jpeg)[shape]
    before = client.get("/metrics").text
    r = _asgi_post(client, route, headers, [body], complete=True, hang_up=True)
    assert r.status == 499
    after = client.get("/metrics").text
    for model in ("detector", "default"):
        series = f'fer_batch_size_count{{model="{model}"}}'
        assert _value(after, series) == _value(before, series), f"{model} ran for a gone client"
    series = f'fer_requests_total{{method="POST",route="{route}",status="499"}}'
    assert _value(after, series) == _value(before, series) + 1
    # a client that stays answers as before
    assert _asgi_post(client, route, headers, [body]).status == 200


@pytest.mark.e2e
def test_real_server_counts_a_mid_upload_hang_up_as_499(
    tmp_path: Path, detector_weights: Path, tiny_checkpoint: Path, face_jpeg: bytes,
) -> None:
    """fer-serve on loopback; raw sockets send headers, part of the body, then close."""
    from tests.service.browser.support import run_server

    with run_server(tmp_path, detector_weights, log_level="info",
                    FER_CLASSIFIER_CHECKPOINT=str(tiny_checkpoint), FER_USE_SHIPPED_EXTRAS="false",
                    FER_WEB_PAGE="false") as server:
        port = int(server.origin.rsplit(":", 1)[1])
        bodies = _bodies(face_jpeg)
        for route, headers, body in bodies.values():
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
                          f"Content-Length: 1000000\r\n\r\n".encode() + body[:5000])
                time.sleep(0.3)  # the server is reading the body when the client goes
        deadline = time.monotonic() + 10
        while True:
            text = httpx.get(f"{server.origin}/metrics", timeout=5).text
            gone = [_value(text, f'fer_requests_total{{method="POST",route="{route}",status="499"}}')
                    for route, _, _ in bodies.values()]
            if gone == [1.0] * len(bodies) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert gone == [1.0] * len(bodies), text
        assert 'status="500"' not in text
        assert _value(text, 'fer_errors_total{kind="client_disconnect"}') == len(bodies)
        # still serving
        assert httpx.post(f"{server.origin}/predict", content=face_jpeg, headers=JPEG,
                          timeout=30).status_code == 200
        log = server.tail(200_000)
    assert log.count("client disconnected") == len(bodies), log[-3000:]
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


# --- 3. one bad image in a JSON batch ---------------------------------------------------------


def test_json_batch_keeps_good_images_when_one_is_bad(client: TestClient, face_jpeg: bytes) -> None:
    good = _b64(face_jpeg)
    images = [good, "%%%not-base64%%%", f"data:application/pdf;base64,{good}",
              f"data:image/jpeg;base64,{good}", 42, "data:image/jpeg,rawbytes", ""]
    r = client.post("/predict/batch", json={"images": images})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(images)
    first, bad64, pdf, data_url, number, not_b64_url, empty = results
    assert len(first["result"]["faces"]) == 1 and first["error"] is None
    assert len(data_url["result"]["faces"]) == 1
    assert bad64["result"] is None and bad64["error"]["code"] == "invalid_base64"
    assert "body.images[1]" in bad64["error"]["message"]
    assert pdf["result"] is None and pdf["error"]["code"] == "unsupported_media_type"
    assert "application/pdf" in pdf["error"]["message"]
    assert number["error"]["code"] == "validation_error" and empty["error"]["code"] == "validation_error"
    assert not_b64_url["error"]["code"] == "invalid_base64"


def test_data_url_media_type_is_checked(client: TestClient, face_jpeg: bytes) -> None:
    good = _b64(face_jpeg)
    for route in ("/predict", "/detect"):
        error = _assert_error(client.post(route, json={"image": f"data:application/pdf;base64,{good}"}),
                              415, "unsupported_media_type")
        assert "application/pdf" in error["message"]
        _assert_error(client.post(route, json={"image": f"data:image/gif;base64,{good}"}),
                      415, "unsupported_media_type")
        ok = client.post(route, json={"image": f"data:image/jpeg;base64,{good}"})
        assert ok.status_code == 200 and len(ok.json()["faces"]) == 1
    # an upload-level error is still the request's error on single-image routes
    _assert_error(client.post("/predict", json={"image": "%%%"}), 400, "invalid_base64")


# --- 4. limits for every body shape -----------------------------------------------------------


def test_json_batch_over_the_image_cap_is_413(client: TestClient, face_jpeg: bytes) -> None:
    good = _b64(face_jpeg)
    error = _assert_error(client.post("/predict/batch", json={"images": [good] * 17}),
                          413, "too_many_images")
    assert "17" in error["message"] and "16" in error["message"]
    # far more than the cap: refused on a bound taken before the body is parsed
    _assert_error(client.post("/predict/batch", json={"images": ["AAAA"] * 256}), 413, "too_many_images")
    _assert_error(client.post("/predict/batch", content="[" + "0," * 100_000 + "0]",
                              headers={"content-type": "application/json"}), 413, "too_many_images")
    ok = client.post("/predict/batch", json={"images": [good] * 16})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 16


def test_multipart_over_the_image_cap_is_413(client: TestClient, face_jpeg: bytes) -> None:
    files = [("files", (f"{i}.jpg", face_jpeg, "image/jpeg")) for i in range(17)]
    _assert_error(client.post("/predict/batch", files=files), 413, "too_many_images")
    _assert_error(client.post("/predict", files=files[:2]), 413, "too_many_images")
    assert client.post("/predict/batch", files=files[:16]).status_code == 200


def test_json_body_over_the_byte_limit_is_413_before_parsing(small_client: TestClient,
                                                             face_jpeg: bytes) -> None:
    c = small_client
    # not JSON at all, and too large: the size answers, not the parser
    junk = b"{" * 2_000_000
    _assert_error(c.post("/predict", content=junk, headers={"content-type": "application/json"}),
                  413, "payload_too_large")
    _assert_error(c.post("/predict/batch", content=junk, headers={"content-type": "application/json"}),
                  413, "payload_too_large")
    # no Content-Length (chunked): reading stops at the limit
    chunks = [b'{"image": "' + b"A" * 65_536] + [b"A" * 65_536] * 40
    r = _asgi_post(c, "/predict", {"content-type": "application/json"}, chunks)
    assert r.status == 413 and json.loads(r.body)["error"]["code"] == "payload_too_large"
    assert r.chunks_read < len(chunks)
    # one image over the per-image limit, in a batch: its own 413 entry, found before decoding
    big = _b64(b"\xff" * 210_000)
    r = c.post("/predict/batch", json={"images": [_b64(face_jpeg), big]})
    assert r.status_code == 200, r.text
    ok, too_big = r.json()["results"]
    assert len(ok["result"]["faces"]) == 1
    assert too_big["error"]["code"] == "payload_too_large"
    _assert_error(c.post("/predict/batch", json={"images": [_b64(face_jpeg)] * 5}), 413, "too_many_images")


def test_multipart_body_over_the_byte_limit_stops_reading(small_client: TestClient,
                                                          face_jpeg: bytes) -> None:
    headers, body = _multipart([("file", "big.jpg", face_jpeg + b"\xff" * 2_000_000, "image/jpeg")])
    chunks = [body[i:i + 65_536] for i in range(0, len(body), 65_536)]
    r = _asgi_post(small_client, "/predict", headers, chunks)  # no Content-Length
    assert r.status == 413 and json.loads(r.body)["error"]["code"] == "payload_too_large"
    assert r.chunks_read < len(chunks) // 2
    # a malformed form is a 400 in the error shape
    _assert_error(small_client.post("/predict", content=b"--x\r\nContent-Disposition: form-data\r\n\r\n"
                                            b"data\r\n--x--\r\n",
                                    headers={"content-type": "multipart/form-data; boundary=x"}),
                  400, "invalid_multipart")


# --- 5. large JSON bodies are parsed off the event loop ---------------------------------------


def _padded_jpeg(jpeg: bytes, size: int) -> bytes:
    """``jpeg`` grown to about ``size`` bytes with comment (COM) segments: still a valid JPEG of
    the same picture, as large as a camera photo."""
    pad = b"\xff\xfe" + (65535).to_bytes(2, "big") + b"\0" * 65533
    return jpeg[:2] + pad * max(0, (size - len(jpeg)) // len(pad)) + jpeg[2:]


@pytest.fixture(scope="module")
def big_json_batch(face_jpeg: bytes) -> bytes:
    """A JSON /predict/batch body of 16 face photos of 9 MB each (under the 10 MiB limit): 192 MB
    of base64."""
    return json.dumps({"images": [_b64(_padded_jpeg(face_jpeg, 9_000_000))] * 16}).encode()


def test_stepwise_parsing_matches_json_and_base64() -> None:
    from service.api import inputs

    body = json.dumps({"images": ["A" * 300_000, "data:image/png;base64,AAAA"], "x": [1, 2.5, None,
                                                                                    {"y": True}]})
    assert inputs._stepwise_loads(body.encode()) == json.loads(body)
    data = bytes(range(256)) * 20_000  # 5 MB: several base64 pieces
    assert inputs._b64decode(_b64(data)) == data
    for n in (1, 2, 3, 4):  # padding at the end only
        assert inputs._b64decode(_b64(data[:n] + data)) == data[:n] + data
    bad = "AA==" + "A" * (inputs._B64_PIECE - 4) + "AAAA"  # padding ending a middle piece
    with pytest.raises(ValueError):
        inputs._b64decode(bad)
    with pytest.raises(ValueError):
        base64.b64decode(bad, validate=True)


def test_large_json_body_is_parsed_off_the_event_loop(client: TestClient, face_jpeg: bytes,
                                                      big_json_batch: bytes,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic: which thread parses the JSON and decodes its base64."""
    from service.api import inputs

    threads: list[tuple[str, int]] = []
    for name in ("_parse_json", "_b64decode"):
        real = getattr(inputs, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            threads.append((_name, threading.get_ident()))
            return _real(*args, **kwargs)

        monkeypatch.setattr(inputs, name, spy)
    assert client.portal is not None
    loop_thread = client.portal.call(threading.get_ident)
    json_headers = {"content-type": "application/json"}
    # a small body stays on the loop: no thread hop for a 25 kB photo
    small = json.dumps({"image": _b64(face_jpeg)}).encode()
    assert len(small) <= inputs.INLINE_JSON_BYTES
    assert client.post("/predict", content=small, headers=json_headers).status_code == 200
    assert {t for _, t in threads} == {loop_thread} and {n for n, _ in threads} == {"_parse_json",
                                                                                   "_b64decode"}
    threads.clear()
    r = client.post("/predict/batch", content=big_json_batch, headers=json_headers)
    assert r.status_code == 200, r.text[:300]
    assert all(len(item["result"]["faces"]) == 1 for item in r.json()["results"])
    assert len([n for n, _ in threads if n == "_b64decode"]) >= 16  # in pieces
    assert loop_thread not in {t for _, t in threads}


# --- 8. a full queue is refused before the upload is read --------------------------------------


@pytest.fixture
def queue_client(make_settings) -> Iterator[TestClient]:
    """The app with room for two queued items per model."""
    with TestClient(create_app(make_settings(max_queue=2, max_faces=2))) as c:
        yield c


def test_full_queue_is_a_503_before_the_upload_is_read(queue_client: TestClient, face_jpeg: bytes,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    c = queue_client
    engine = c.app.state.engine
    entered, release = threading.Event(), threading.Event()
    real_detect = engine.detector.detect

    def blocked_detect(images):
        entered.set()
        assert release.wait(30), "the test never released the detector"
        return real_detect(images)

    monkeypatch.setattr(engine.detector, "detect", blocked_detect)
    statuses: list[int] = []

    def post() -> None:
        statuses.append(c.post("/detect", content=face_jpeg, headers=JPEG).status_code)

    # one request computing (blocked), two queued behind it: the detector's queue of 2 is full
    workers = [threading.Thread(target=post) for _ in range(3)]
    try:
        workers[0].start()
        assert entered.wait(30), "the detector never started"
        for w in workers[1:]:
            w.start()
        deadline = time.monotonic() + 30
        while engine.queue_depths()["detector"] < 2:
            assert time.monotonic() < deadline, engine.queue_depths()
            time.sleep(0.01)
        before = c.get("/metrics").text
        mp_headers, mp_body = _multipart([("files", "a.jpg", face_jpeg, "image/jpeg")])
        for route, headers, body in (("/detect", JPEG, face_jpeg), ("/predict", JPEG, face_jpeg),
                                     ("/predict/batch", mp_headers, mp_body)):
            t0 = time.perf_counter()
            r = _asgi_post(c, route, {**headers, "content-length": str(len(body))}, [body])
            elapsed = time.perf_counter() - t0
            assert r.status == 503, (route, r.status, r.body)
            assert json.loads(r.body)["error"]["code"] == "queue_full"
            assert r.headers is not None and int(r.headers["retry-after"]) >= 1
            assert r.chunks_read == 0, f"{route} read the upload before refusing it"
            assert elapsed < 2.0, elapsed
        after = c.get("/metrics").text
        assert _value(after, 'fer_requests_total{method="POST",route="/detect",status="503"}') == \
            _value(before, 'fer_requests_total{method="POST",route="/detect",status="503"}') + 1
        assert _value(after, 'fer_errors_total{kind="detector:queue_full"}') == \
            _value(before, 'fer_errors_total{kind="detector:queue_full"}') + 3
        # a request that needs only the classifier's queue, which has room, is admitted
        r = c.post("/predict", params={"detect": "false"}, content=face_jpeg, headers=JPEG)
        assert r.status_code == 200, r.text
    finally:
        release.set()
        for w in workers:
            if w.ident is not None:
                w.join(30)
    assert statuses == [200, 200, 200]
    # room again: admitted and answered
    assert c.post("/detect", content=face_jpeg, headers=JPEG).status_code == 200
