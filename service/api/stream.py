"""WS /stream: live camera frames in, faces with track ids and smoothed emotions out.

Two tasks serve a connection. The reader receives every message as it comes, checks it
cheaply (binary, within the byte limit, a JPEG's first bytes) and leaves it in a one-slot
mailbox (:class:`~service.inference.mailbox.LatestFrameMailbox`), replacing a frame still
waiting there. The worker takes the newest frame, decodes it, runs it through the same engine
and batchers as ``/predict`` and answers it; its faces keep their ids across frames, and their
probabilities are smoothed, by the tracker and smoother of ``/predict/video``
(:class:`~service.inference.live_tracks.LiveTracks`). So a client that sends faster than the
server answers gets answers for the newest frames, each naming the frames dropped before it,
and the server holds at most one waiting frame per connection.

The protocol (handshake, key, answers, close codes) is :mod:`service.api.stream_protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import numpy as np
from fastapi import APIRouter
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from service.api.faces import prediction_out
from service.api.stream_protocol import (
    Close,
    CloseCode,
    StreamAnswer,
    StreamFace,
    StreamLimits,
    StreamParams,
    check_key,
    check_origin,
    chosen_subprotocol,
    parse_params,
)
from service.config import Settings
from service.inference.batcher import BatcherStoppedError, QueueFullError
from service.inference.decode import (
    ImageError,
    PayloadTooLargeError,
    TooManyPixelsError,
    decode_image,
    original_size,
)
from service.inference.live_tracks import LiveTracks
from service.inference.mailbox import Frame, LatestFrameMailbox
from service.inference.pipeline import FrontalizeMode, InferenceEngine
from service.metrics import Metrics
from service.schemas import ErrorBody, ImageInfo, ModelRef

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(tags=["stream"])

#: A JPEG starts with the SOI marker and the first marker's 0xFF.
_JPEG_MAGIC = b"\xff\xd8\xff"


class _OpenStreams:
    """How many streams the app serves now, against ``max_streams``."""

    def __init__(self) -> None:
        self.count = 0

    def try_open(self, limit: int) -> bool:
        if self.count >= limit:
            return False
        self.count += 1
        return True

    def close(self) -> None:
        self.count -= 1


def _open_streams(ws: WebSocket) -> _OpenStreams:
    state = ws.app.state
    streams = getattr(state, "open_streams", None)
    if streams is None:
        streams = state.open_streams = _OpenStreams()
    return streams


def _refusal(ws: WebSocket, settings: Settings, engine: InferenceEngine,
             params: StreamParams | Close) -> Close | None:
    """Why this connection may not stream (origin, key, readiness, parameters), or None."""
    for check in (check_origin(ws, settings), check_key(ws, settings)):
        if check is not None:
            return check
    if not engine.ready:
        return Close(CloseCode.TRY_AGAIN_LATER, "not_ready", "the models are still loading")
    if isinstance(params, Close):
        return params
    if params.model not in engine.classifiers:
        return Close(CloseCode.INVALID_PARAMETER, "unknown_model",
                     f"model {params.model!r} is not loaded; available: {', '.join(engine.classifiers)}")
    if params.frontalize is FrontalizeMode.ON and engine.frontalizer is None:
        return Close(CloseCode.INVALID_PARAMETER, "frontalizer_unavailable",
                     "frontalize=on needs a frontaliser (FER_FRONTALIZER_CHECKPOINT)")
    return None


@router.websocket("/stream")
async def stream(ws: WebSocket) -> None:
    """Answer each JPEG frame with its faces, track ids and smoothed probabilities."""
    settings: Settings = ws.app.state.settings
    engine: InferenceEngine = ws.app.state.engine
    metrics: Metrics = ws.app.state.metrics
    limits = StreamLimits.from_settings(settings)
    await ws.accept(subprotocol=chosen_subprotocol(ws))
    params = parse_params(ws)
    refusal = _refusal(ws, settings, engine, params)
    if refusal is None and not _open_streams(ws).try_open(limits.max_streams):
        refusal = Close(CloseCode.TRY_AGAIN_LATER, "too_many_streams",
                        f"{limits.max_streams} streams are open, the most this server serves")
    if refusal is not None:
        await _close(ws, refusal, metrics)
        return
    assert isinstance(params, StreamParams)
    metrics.streams_active.inc()
    try:
        await _serve(ws, params, limits, settings, engine, metrics)
    finally:
        metrics.streams_active.dec()
        _open_streams(ws).close()


async def _serve(ws: WebSocket, params: StreamParams, limits: StreamLimits, settings: Settings,
                 engine: InferenceEngine, metrics: Metrics) -> None:
    mailbox = LatestFrameMailbox()
    tracks = LiveTracks(min_iou=settings.video_track_min_iou, max_missed=settings.video_track_max_missed,
                        smoothing_s=settings.video_smoothing_s if params.smoothing_s is None
                        else params.smoothing_s)
    opened_at = asyncio.get_running_loop().time()
    worker = _Worker(ws, params, limits, settings, engine, metrics, tracks, opened_at)
    tasks = {asyncio.create_task(_read(ws, mailbox, limits, metrics, opened_at)),
             asyncio.create_task(worker.run(mailbox))}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when the server cancels this handler: then nothing more is awaited here
        for task in tasks:
            task.cancel()
    await asyncio.wait(tasks)  # not gather: its CancelledError would not be the server's own
    outcome = _outcome(next(iter(done)))
    log.info("stream closed after %d answered frame(s), %d dropped: %s", worker.answered,
             worker.dropped, outcome.reason if outcome else "the client left")
    if outcome is not None:
        await _close(ws, outcome, metrics)


def _outcome(task: asyncio.Task[Close | None]) -> Close | None:
    """How the first task to end ends the stream: its :class:`Close`, or None if the client left."""
    try:
        return task.result()
    except WebSocketDisconnect:
        return None
    except Exception:
        log.exception("a stream failed")
        return Close(CloseCode.INTERNAL_ERROR, "internal_error", "the server failed on this stream")


async def _read(ws: WebSocket, mailbox: LatestFrameMailbox, limits: StreamLimits, metrics: Metrics,
                opened_at: float) -> Close | None:
    """Receive every message into ``mailbox``; end on the client's leaving or a bad message."""
    loop = asyncio.get_running_loop()
    seq = 0
    while True:
        try:
            async with asyncio.timeout(limits.idle_s):
                message = await ws.receive()
        except TimeoutError:
            return Close(CloseCode.IDLE, "idle", f"no frame for {limits.idle_s:g} s")
        if message["type"] == "websocket.disconnect":
            return None
        data = message.get("bytes")
        if data is None:
            return Close(CloseCode.UNSUPPORTED_DATA, "text_message",
                         "send each frame as a binary message of JPEG bytes; text is not accepted")
        if len(data) > limits.max_frame_bytes:
            return Close(CloseCode.MESSAGE_TOO_BIG, "frame_too_large",
                         f"frame {seq} is {len(data)} bytes; the limit is {limits.max_frame_bytes}")
        if not data.startswith(_JPEG_MAGIC):
            return Close(CloseCode.UNSUPPORTED_DATA, "not_jpeg", f"frame {seq} is not a JPEG")
        if mailbox.put(Frame(seq, data, loop.time() - opened_at)):
            metrics.stream_dropped.inc()
        seq += 1


class _Worker:
    """Answers the newest frame, one at a time, until a frame is bad or the server stops."""

    def __init__(self, ws: WebSocket, params: StreamParams, limits: StreamLimits, settings: Settings,
                 engine: InferenceEngine, metrics: Metrics, tracks: LiveTracks, opened_at: float) -> None:
        self.ws, self.params, self.limits, self.settings = ws, params, limits, settings
        self.engine, self.metrics, self.tracks = engine, metrics, tracks
        clf = engine.classifier(params.model)
        self.names = clf.class_names
        self.model = ModelRef(name=params.model, version=clf.version, arch=clf.arch)
        self.opened_at = opened_at  # loop time; frames arrive at seconds after it
        self.answered = self.dropped = 0
        self.tracks_counted = 0  # what this stream added to the active-tracks gauge

    async def run(self, mailbox: LatestFrameMailbox) -> Close | None:
        try:
            return await self._answer_frames(mailbox)
        finally:
            self.metrics.stream_tracks.dec(self.tracks_counted)
            self.tracks_counted = 0

    async def _answer_frames(self, mailbox: LatestFrameMailbox) -> Close | None:
        loop = asyncio.get_running_loop()
        while True:
            delivery = await mailbox.take()
            frame = delivery.frame
            self.dropped += delivery.dropped_count
            answer = StreamAnswer(seq=frame.seq, dropped=delivery.dropped,
                                  dropped_count=delivery.dropped_count, t=round(frame.arrived, 4),
                                  server_ms=0.0, model=self.model)
            try:
                image = await asyncio.to_thread(
                    decode_image, frame.data, content_type="image/jpeg",
                    max_bytes=self.limits.max_frame_bytes, max_pixels=self.settings.max_image_pixels)
            except (TooManyPixelsError, PayloadTooLargeError) as e:
                return Close(CloseCode.MESSAGE_TOO_BIG, "frame_too_large", f"frame {frame.seq}: {e}")
            except ImageError as e:
                return Close(CloseCode.UNSUPPORTED_DATA, "bad_frame", f"frame {frame.seq}: {e}")
            try:
                answer = await self._analyse(image, answer, frame.arrived)
            except QueueFullError as e:
                self.metrics.errors.labels(kind="stream_queue_full").inc()
                answer.error = ErrorBody(code="queue_full", message=str(e))
                answer.retry_after_s = round(e.retry_after, 3)
            except BatcherStoppedError:
                return Close(CloseCode.TRY_AGAIN_LATER, "stopping", "the server is stopping")
            del image
            answer.server_ms = round((loop.time() - self.opened_at - frame.arrived) * 1000, 1)
            await self.ws.send_text(answer.model_dump_json())
            if answer.error is None:
                self.answered += 1
                self.metrics.stream_frames.inc()
                self.metrics.stream_latency.observe(answer.server_ms / 1000)

    async def _analyse(self, image: np.ndarray, answer: StreamAnswer, t: float) -> StreamAnswer:
        p = self.params
        results = await self.engine.predict(image, model=p.model, tta=p.tta, max_faces=p.max_faces,
                                            frontalize=p.frontalize)
        smoothed = self.tracks.update(t, [r.detection.box for r in results], [r.probs for r in results])
        faces = []
        for r, (tid, probs) in zip(results, smoothed, strict=True):
            face = prediction_out(r, self.names)
            faces.append(StreamFace(
                **face.model_dump(), track=tid,
                smoothed={n: round(float(v), 5) for n, v in zip(self.names, probs, strict=True)},
                smoothed_dominant=self.names[int(np.argmax(probs))]))
        self.metrics.stream_tracks.inc(self.tracks.active - self.tracks_counted)
        self.tracks_counted = self.tracks.active
        w, h = original_size(image)
        answer.image = ImageInfo(width=w, height=h)
        answer.faces = faces
        return answer


async def _close(ws: WebSocket, close: Close, metrics: Metrics) -> None:
    """Close with ``close``'s code and reason (unless the client is gone already)."""
    metrics.errors.labels(kind=f"stream_{close.kind}").inc()
    log.info("closing a stream: %d %s", close.code, close.reason)
    if ws.application_state is WebSocketState.DISCONNECTED or ws.client_state is WebSocketState.DISCONNECTED:
        return
    with contextlib.suppress(RuntimeError, OSError):
        await ws.close(code=int(close.code), reason=close.wire_reason)
