"""WS /stream on the real app (tiny checkpoint, real detector): real JPEG frames of the face photo
through a real WebSocket (Starlette's test client), answers, dropped frames, limits and the key."""

from __future__ import annotations

import queue
import re
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from facemodels.face.tracking import EmaSmoother
from service.api.stream_protocol import StreamLimits
from service.inference.live_tracks import LiveTracks
from service.inference.mailbox import MAX_LISTED_DROPS, Frame, LatestFrameMailbox

cv2 = pytest.importorskip("cv2")

FACE = Path(__file__).resolve().parents[1] / "fixtures" / "astronaut.jpg"
KEY = "stream-test-key"
RECEIVE_S = 120.0  # one answer on a busy 2-core machine takes well under a second


def _frame(i: int, *, step: int = 12, quality: int = 85) -> bytes:
    """A 640x480 JPEG: two copies of the face photo on grey, ``i * step`` px further apart."""
    tile = cv2.resize(cv2.imread(str(FACE)), (200, 200))
    canvas = np.full((480, 640, 3), 90, np.uint8)
    d = i * step
    canvas[140:340, 100 - d:300 - d] = tile
    canvas[140:340, 340 + d:540 + d] = tile
    ok, data = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def _within(fn: Callable[[], Any], timeout: float = RECEIVE_S) -> Any:
    """``fn()`` in a thread, failing the test if it takes longer than ``timeout`` seconds."""
    box: queue.Queue[tuple[bool, Any]] = queue.Queue()

    def run() -> None:
        try:
            box.put((True, fn()))
        except BaseException as e:
            box.put((False, e))

    threading.Thread(target=run, daemon=True).start()
    try:
        ok, value = box.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"no answer within {timeout:.0f} s")
    if not ok:
        raise value
    return value


def _closed(ws) -> tuple[int, str]:
    """Read until the server closes; its close code and reason."""
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect) as info:
        for _ in range(100):
            _within(ws.receive_json)
    return info.value.code, info.value.reason


def _metric(client, name: str) -> float:
    text = client.get("/metrics").text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not exported"
    return float(m.group(1))


@pytest.fixture(scope="module")
def client(make_settings) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from service.main import create_app

    with TestClient(create_app(make_settings(video_smoothing_s=0.5))) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(make_settings) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from service.main import create_app

    with TestClient(create_app(make_settings(api_key=KEY, warmup=False))) as c:
        yield c


# --- answers --------------------------------------------------------------------------------

def test_answers_carry_faces_and_track_ids_stable_across_a_moving_face(client) -> None:
    frames_before = _metric(client, "fer_stream_frames_total")
    answers = []
    with client.websocket_connect("/stream", subprotocols=["fer.stream"]) as ws:
        assert ws.accepted_subprotocol == "fer.stream"
        for i in range(8):
            ws.send_bytes(_frame(i))
            answers.append(_within(ws.receive_json))
        assert _metric(client, "fer_streams_active") == 1
        assert _metric(client, "fer_stream_tracks_active") == 2
    assert [a["seq"] for a in answers] == list(range(8))
    for a in answers:
        assert a["dropped"] == [] and a["dropped_count"] == 0
        assert a["image"] == {"width": 640, "height": 480}
        assert a["model"]["name"] == "default"
        assert a["error"] is None
        assert len(a["faces"]) == 2, a
        for f in a["faces"]:
            assert sum(f["emotions"].values()) == pytest.approx(1.0, abs=1e-3)
            assert sum(f["smoothed"].values()) == pytest.approx(1.0, abs=1e-3)
            assert len(f["landmarks"]) == 5
    # Two tracks, each keeping its id and its face: one moves left, the other right.
    centres: dict[int, list[float]] = {}
    for a in answers:
        for f in a["faces"]:
            centres.setdefault(f["track"], []).append((f["box"][0] + f["box"][2]) / 2)
    assert sorted(centres) == [1, 2]
    left, right = sorted(centres, key=lambda k: centres[k][0])
    assert all(len(c) == 8 for c in centres.values())
    assert np.all(np.diff(centres[left]) < 0) and centres[left][0] - centres[left][-1] > 60
    assert np.all(np.diff(centres[right]) > 0) and centres[right][-1] - centres[right][0] > 60
    # The smoothing is /predict/video's EMA over the arrival times the answers carry.
    times = [a["t"] for a in answers]
    assert times == sorted(times) and times[0] >= 0
    smoother = EmaSmoother(0.5)
    for a in answers:
        for f in a["faces"]:
            names = list(f["emotions"])
            expected = smoother.update(f["track"], a["t"], np.array([f["emotions"][n] for n in names]))
            assert [f["smoothed"][n] for n in names] == pytest.approx(expected, abs=2e-4)
            assert f["smoothed_dominant"] == names[int(np.argmax(expected))]
    # The connection's series: frames answered, and nothing left open once it closed.
    assert _metric(client, "fer_stream_frames_total") == frames_before + 8
    assert _metric(client, "fer_streams_active") == 0
    assert _metric(client, "fer_stream_tracks_active") == 0


def test_query_parameters_reach_the_pipeline(client) -> None:
    with client.websocket_connect("/stream?max_faces=1&smoothing_s=0&frontalize=off") as ws:
        assert ws.accepted_subprotocol is None  # none offered, none chosen
        for i in range(2):
            ws.send_bytes(_frame(i))
            a = _within(ws.receive_json)
            (face,) = a["faces"]
            assert face["smoothed"] == face["emotions"]  # smoothing_s=0 passes values through


# --- backpressure ---------------------------------------------------------------------------

def test_a_fast_sender_gets_the_newest_frames_and_hears_which_were_dropped(client) -> None:
    """30 frames sent without reading: far fewer answers, every other frame named as dropped,
    and never more than one frame at a time in the models' queues."""
    engine = client.app.state.engine
    depths: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            depths.append(max(engine.queue_depths().values()))
            time.sleep(0.0005)

    dropped_before = _metric(client, "fer_stream_dropped_frames_total")
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    answers = []
    try:
        with client.websocket_connect("/stream") as ws:
            for i in range(30):
                ws.send_bytes(_frame(i % 8))
            while not answers or answers[-1]["seq"] != 29:
                answers.append(_within(ws.receive_json))
    finally:
        stop.set()
        watcher.join()
    seqs = [a["seq"] for a in answers]
    assert len(answers) <= 10, f"{len(answers)} of 30 frames were answered: {seqs}"
    assert seqs == sorted(set(seqs))
    previous = -1
    for a in answers:  # each answer names exactly the frames skipped since the previous one
        assert a["dropped"] == list(range(previous + 1, a["seq"]))
        assert a["dropped_count"] == len(a["dropped"])
        previous = a["seq"]
    dropped = [s for a in answers for s in a["dropped"]]
    assert sorted(dropped + seqs) == list(range(30))
    assert _metric(client, "fer_stream_dropped_frames_total") == dropped_before + len(dropped)
    assert depths and max(depths) <= 2, f"queue depths went up to {max(depths)}"


def test_memory_stays_flat_while_a_client_floods_large_frames(client) -> None:
    """64 distinct frames of 1 MiB each, sent as fast as possible: what the server holds stays
    around one frame and its decode, not the 64 MiB sent."""
    base = _frame(0)
    pad = bytes(2**20 - len(base) - 8)  # trailing bytes after the JPEG's end are ignored
    tracemalloc.start()
    try:
        with client.websocket_connect("/stream") as ws:
            ws.send_bytes(base)
            _within(ws.receive_json)  # first frame answered: buffers of the pipeline exist
            baseline, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            for i in range(1, 65):
                ws.send_bytes(base + pad + i.to_bytes(8, "big"))  # a new 1 MiB object each time
            answers = [_within(ws.receive_json)]
            while answers[-1]["seq"] != 64:
                answers.append(_within(ws.receive_json))
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = (peak - baseline) / 2**20
    assert grown < 24, f"the server held {grown:.1f} MiB more while 64 MiB were sent"
    assert len(answers) < 64


# --- bad frames and limits --------------------------------------------------------------------

def test_a_text_message_closes_with_1003(client) -> None:
    with client.websocket_connect("/stream") as ws:
        ws.send_text("hello")
        code, reason = _closed(ws)
    assert code == 1003 and "binary" in reason


@pytest.mark.parametrize(("what", "payload", "words"), [
    ("png", b"\x89PNG\r\n\x1a\n" + bytes(64), "not a JPEG"),
    ("corrupt jpeg", b"\xff\xd8\xff\xe0" + b"this is not JPEG data" * 20, "frame 0"),
])
def test_a_bad_frame_closes_with_1003(client, what: str, payload: bytes, words: str) -> None:
    with client.websocket_connect("/stream") as ws:
        ws.send_bytes(payload)
        code, reason = _closed(ws)
    assert code == 1003, what
    assert words in reason and len(reason.encode()) <= 123


def test_a_good_frame_is_answered_before_a_bad_one_closes(client) -> None:
    with client.websocket_connect("/stream") as ws:
        ws.send_bytes(_frame(0))
        assert _within(ws.receive_json)["seq"] == 0
        ws.send_bytes(b"GIF89a" + bytes(32))
        assert _closed(ws) == (1003, "frame 1 is not a JPEG")


def test_a_frame_over_the_byte_limit_closes_with_1009(client) -> None:
    limit = StreamLimits.from_settings(client.app.state.settings).max_frame_bytes
    frame = _frame(0)
    with client.websocket_connect("/stream") as ws:
        ws.send_bytes(frame + bytes(limit + 1 - len(frame)))
        code, reason = _closed(ws)
    assert code == 1009
    assert f"the limit is {limit}" in reason


def test_too_many_streams_close_with_1013_until_one_ends(client) -> None:
    limit = StreamLimits.from_settings(client.app.state.settings).max_streams
    with client.websocket_connect("/stream") as first:
        others = [client.websocket_connect("/stream").__enter__() for _ in range(limit - 1)]
        try:
            assert _metric(client, "fer_streams_active") == limit
            with client.websocket_connect("/stream") as extra:
                code, reason = _closed(extra)
            assert code == 1013 and f"{limit} streams are open" in reason
        finally:
            for ws in others:
                ws.__exit__(None, None, None)
        first.send_bytes(_frame(0))
        assert _within(first.receive_json)["seq"] == 0
    with client.websocket_connect("/stream") as ws:  # the slots are free again
        ws.send_bytes(_frame(0))
        assert len(_within(ws.receive_json)["faces"]) == 2


def test_a_server_still_loading_closes_with_1013(make_settings) -> None:
    from fastapi.testclient import TestClient

    from service.main import create_app

    app = TestClient(create_app(make_settings(warmup=False)))  # no `with`: the models never load
    with app.websocket_connect("/stream") as ws:
        assert _closed(ws) == (1013, "the models are still loading")


def test_a_stream_without_frames_closes_with_4408_after_the_idle_limit(make_settings) -> None:
    from fastapi.testclient import TestClient

    from service.main import create_app

    with TestClient(create_app(make_settings(stream_idle_s=0.5))) as c, c.websocket_connect("/stream") as ws:
        ws.send_bytes(_frame(0))
        assert _within(ws.receive_json)["seq"] == 0  # a frame resets the clock; then silence
        assert _closed(ws) == (4408, "no frame for 0.5 s")


def test_invalid_parameters_close_with_4400(client) -> None:
    for query, words in (("model=nope", "model 'nope' is not loaded"), ("max_faces=0", "max_faces"),
                         ("colour=red", "colour"), ("smoothing_s=-1", "smoothing_s")):
        with client.websocket_connect(f"/stream?{query}") as ws:
            code, reason = _closed(ws)
        assert code == 4400 and words in reason, (query, reason)


def test_an_origin_other_than_the_server_closes_with_1008(client) -> None:
    with client.websocket_connect("/stream", headers={"origin": "http://testserver"}) as ws:
        ws.send_bytes(_frame(0))
        assert _within(ws.receive_json)["seq"] == 0
    with client.websocket_connect("/stream", headers={"origin": "https://elsewhere.example"}) as ws:
        code, reason = _closed(ws)
    assert code == 1008 and "elsewhere.example" in reason


# --- the API key ------------------------------------------------------------------------------

def _key_protocol(key: str) -> str:
    import base64

    return "fer.key." + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


@pytest.mark.parametrize("how", ["none", "wrong header", "wrong subprotocol", "query string"])
def test_a_missing_or_wrong_key_closes_with_1008(keyed, how: str) -> None:
    kwargs: dict[str, Any] = {
        "none": {}, "wrong header": {"headers": {"x-api-key": "nope"}},
        "wrong subprotocol": {"subprotocols": ["fer.stream", _key_protocol("nope")]},
        "query string": {},
    }[how]
    url = f"/stream?api_key={KEY}" if how == "query string" else "/stream"
    with keyed.websocket_connect(url, **kwargs) as ws:
        ws.send_bytes(_frame(0))
        code, reason = _closed(ws)
    assert code == 1008 and "API key" in reason


@pytest.mark.parametrize("how", ["header", "subprotocol"])
def test_the_right_key_in_a_header_or_subprotocol_streams(keyed, how: str) -> None:
    kwargs: dict[str, Any] = ({"headers": {"x-api-key": KEY}} if how == "header"
                              else {"subprotocols": ["fer.stream", _key_protocol(KEY)]})
    with keyed.websocket_connect("/stream", **kwargs) as ws:
        if how == "subprotocol":
            assert ws.accepted_subprotocol == "fer.stream"  # never the key itself
        ws.send_bytes(_frame(0))
        answer = _within(ws.receive_json)
    assert answer["seq"] == 0 and len(answer["faces"]) == 2


# --- the parts on their own -------------------------------------------------------------------

def test_the_mailbox_keeps_only_the_newest_frame() -> None:
    import asyncio

    async def run() -> None:
        box = LatestFrameMailbox()
        assert box.put(Frame(0, b"a", 0.0)) is False
        assert box.put(Frame(1, b"b", 0.1)) is True
        assert box.put(Frame(2, b"c", 0.2)) is True
        assert box.pending == 1
        d = await box.take()
        assert (d.frame.seq, d.dropped, d.dropped_count) == (2, [0, 1], 2)
        assert box.pending == 0
        waiting = asyncio.ensure_future(box.take())
        await asyncio.sleep(0)
        assert not waiting.done()
        for seq in range(3, 3 + MAX_LISTED_DROPS + 11):
            box.put(Frame(seq, b"x", 0.3))
        d = await waiting
        assert d.frame.seq == 3 + MAX_LISTED_DROPS + 10
        assert d.dropped == list(range(3, 3 + MAX_LISTED_DROPS))  # listed up to the limit
        assert d.dropped_count == MAX_LISTED_DROPS + 10  # counted past it

    asyncio.run(run())


def test_live_tracks_forget_the_faces_that_left() -> None:
    live = LiveTracks(min_iou=0.3, max_missed=2, smoothing_s=1.0)
    p = np.array([0.5, 0.5])
    for k in range(20):  # a new face every frame, far from the others: each track ends soon
        live.update(float(k), [[100.0 * k, 0, 100.0 * k + 50, 50]], [p])
        assert live.remembered == live.active <= 3
    assert len(live.smoother._state) == live.active
