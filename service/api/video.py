"""POST /predict/video: a video in, one emotion timeline per tracked face out.

The upload streams into a temporary file (bounded by ``FER_VIDEO_MAX_BYTES``), OpenCV decodes it
frame by frame, and the frames sampled at ``fps`` go one at a time through the same engine and
batchers as ``/predict`` (the next frame is decoded while the current one is classified); each
frame is dropped once classified. Faces are tracked across the sampled frames by IoU
(:class:`facemodels.face.tracking.IouTracker`) and each track's probabilities smoothed by an
exponential moving average (:class:`facemodels.face.tracking.EmaSmoother`).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import cv2
import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from facemodels.face.tracking import EmaSmoother, IouTracker
from service.api.inputs import ensure_client_connected, upload_request_body
from service.api.predict import ModelName
from service.api.responses import UPLOAD_ERRORS, error_responses
from service.config import Settings
from service.deps import ReadyEngineDep, SettingsDep, admit
from service.errors import ApiError
from service.inference.decode import release_memory
from service.inference.pipeline import FrontalizeMode, InferenceEngine
from service.metrics import note_faces
from service.schemas import ModelRef

__all__ = ["router"]

router = APIRouter(tags=["video"])

_CHUNK = 1 << 20
_MULTIPART_SLACK = 64 * 1024
#: Leading bytes of the video containers accepted (AVI, Matroska/WebM, Ogg, FLV, MPEG-PS): anything
#: else (a still image, which FFmpeg would happily open as a one-frame video, text, ...) is a 415
#: before OpenCV sees it; a file that starts so but does not open is a corrupt video (400).
_MAGIC = (b"RIFF", b"\x1a\x45\xdf\xa3", b"OggS", b"FLV", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")
#: ISO-BMFF / QuickTime (MP4, MOV, 3GP): an atom type at bytes 4-8.
_ATOMS = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")

VIDEO_REQUEST_BODY: dict[str, Any] = upload_request_body(
    ("video/mp4", "video/webm", "video/x-msvideo", "video/quicktime", "application/octet-stream"))


# --- response -------------------------------------------------------------------------------

class VideoInfo(BaseModel):
    width: int
    height: int
    source_fps: float
    source_frames: int  # frames decoded
    duration_s: float
    fps: float  # the sampling rate used
    frames: int  # sampled frames
    processing_s: float


class TrackFrame(BaseModel):
    frame: int  # index of the sampled frame (0-based)
    t: float  # seconds from the start
    box: list[float]
    score: float
    emotions: dict[str, float]
    smoothed: dict[str, float]
    dominant: str  # of the smoothed probabilities


class TrackSummary(BaseModel):
    dominant: str  # the emotion dominant (smoothed) for the largest share of the track's frames
    time_share: dict[str, float]
    mean: dict[str, float]  # mean raw probabilities


class Track(BaseModel):
    id: int
    frames_seen: int
    first_t: float
    last_t: float
    timeline: list[TrackFrame]
    summary: TrackSummary


class VideoResponse(BaseModel):
    model: ModelRef
    smoothing_s: float
    video: VideoInfo
    tracks: list[Track]


# --- reading the upload ---------------------------------------------------------------------

def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"video exceeds the {limit}-byte upload limit")


async def _save_upload(request: Request, settings: Settings, out: Any) -> None:
    """Stream the request's video into the open binary file ``out``, within the byte limit."""
    limit = settings.video_max_bytes
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    slack = _MULTIPART_SLACK if media == "multipart/form-data" else 0
    if declared is not None and declared.isdigit() and int(declared) > limit + slack:
        raise _too_large(limit)

    async def body() -> Any:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit + slack:
                raise _too_large(limit)
            yield chunk

    if media == "multipart/form-data":
        parser = MultiPartParser(request.headers, body(), max_files=1, max_fields=16)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise ApiError(400, "invalid_multipart", f"multipart body: {e.message}") from e
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(422, "validation_error", "multipart body has no 'file' file field")
            # The part's own type is not checked (clients guess it from the file name, e.g.
            # application/x-troff-msvideo for .avi): the container's leading bytes decide.
            while chunk := await upload.read(_CHUNK):
                out.write(chunk)
        finally:
            await form.close()
        return
    _check_media(media)
    async for chunk in body():
        out.write(chunk)


def _check_media(media: str | None) -> None:
    media = (media or "").split(";")[0].strip().lower()
    if media and not (media.startswith("video/") or media == "application/octet-stream"):
        raise ApiError(415, "unsupported_media_type",
                       f"content type {media[:100]!r} is not a video; send video/* or "
                       "application/octet-stream (or multipart 'file')")


def _looks_like_video(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(189)
    if head[:1] == b"\x47" and head[188:189] == b"\x47":  # MPEG transport stream
        return True
    return head.startswith(_MAGIC) or head[4:8] in _ATOMS


# --- decoding -------------------------------------------------------------------------------

class _Reader:
    """Sampled RGB frames of a video file; every method blocks (run them in a worker thread)."""

    def __init__(self, path: str, settings: Settings, fps: float) -> None:
        if not _looks_like_video(path):
            raise ApiError(415, "unsupported_media_type",
                           "the upload is not a video (MP4, MOV, WebM, MKV, AVI, Ogg, FLV or MPEG); "
                           "images go to /predict")
        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            cap.release()
            raise ApiError(400, "invalid_video", "the video cannot be decoded (corrupt or truncated)")
        self.cap = cap
        self.settings = settings
        src_fps = cap.get(cv2.CAP_PROP_FPS)
        if not math.isfinite(src_fps) or src_fps <= 0 or src_fps > 1000:
            cap.release()
            raise ApiError(400, "invalid_video", "the video declares no usable frame rate")
        self.src_fps = float(src_fps)
        self.fps = min(fps, self.src_fps)
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.declared = int(count) if math.isfinite(count) and count > 0 else 0
        self.width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if self.width * self.height > settings.max_image_pixels:
            cap.release()
            raise ApiError(413, "image_too_large", f"frames of {self.width}x{self.height} exceed "
                                                   f"{settings.max_image_pixels} pixels")
        duration = self.declared / self.src_fps
        if duration > settings.video_max_seconds:
            cap.release()
            raise ApiError(413, "video_too_long", f"the video lasts {duration:.1f} s; the limit is "
                                                  f"{settings.video_max_seconds:g} s")
        if math.ceil(duration * self.fps - 1e-9) > settings.video_max_frames:
            cap.release()
            raise ApiError(413, "too_many_frames", f"{duration:.1f} s at {self.fps:g} fps is more than "
                                                   f"{settings.video_max_frames} sampled frames; lower fps")
        self.decoded = 0  # frames grabbed
        self.sampled = 0

    def next(self) -> tuple[float, np.ndarray] | None:
        """The next sampled frame as ``(t, rgb)``, or None at the end."""
        while self.cap.grab():
            i = self.decoded
            self.decoded += 1
            t = i / self.src_fps
            if t > self.settings.video_max_seconds:
                raise ApiError(413, "video_too_long",
                               f"the video runs past the {self.settings.video_max_seconds:g} s limit")
            if t + 1e-6 < self.sampled / self.fps:
                continue
            ok, frame = self.cap.retrieve()
            if not ok or frame is None:
                raise ApiError(400, "invalid_video", f"frame {i} cannot be decoded")
            if self.sampled >= self.settings.video_max_frames:
                raise ApiError(413, "too_many_frames",
                               f"more than {self.settings.video_max_frames} sampled frames; lower fps")
            self.sampled += 1
            return t, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        return None

    def check_complete(self) -> None:
        if self.decoded == 0:
            raise ApiError(400, "invalid_video", "the video holds no decodable frame")
        if self.declared and self.decoded < self.declared - max(2, int(0.05 * self.declared)):
            raise ApiError(400, "truncated_video", f"the video declares {self.declared} frames but only "
                                                   f"{self.decoded} could be decoded (truncated?)")

    def close(self) -> None:
        self.cap.release()


# --- tracks ---------------------------------------------------------------------------------

@dataclass(slots=True)
class _TrackLog:
    frames: list[TrackFrame] = field(default_factory=list)
    raw: list[np.ndarray] = field(default_factory=list)


def _probs(names: tuple[str, ...], p: np.ndarray) -> dict[str, float]:
    return {n: round(float(v), 5) for n, v in zip(names, p, strict=True)}


def _summary(log: _TrackLog, names: tuple[str, ...]) -> TrackSummary:
    counts = dict.fromkeys(names, 0)
    for f in log.frames:
        counts[f.dominant] += 1
    n = len(log.frames)
    share = {k: round(v / n, 4) for k, v in counts.items()}
    return TrackSummary(dominant=max(names, key=lambda k: counts[k]), time_share=share,
                        mean=_probs(names, np.mean(log.raw, axis=0)))


async def _analyse(request: Request, path: str, engine: InferenceEngine, settings: Settings, *,
                   model: str, fps: float, smoothing_s: float, max_faces: int | None,
                   frontalize: FrontalizeMode) -> VideoResponse:
    start = time.perf_counter()
    clf = engine.classifier(model)
    names = clf.class_names
    tracker = IouTracker(min_iou=settings.video_track_min_iou, max_missed=settings.video_track_max_missed)
    smoother = EmaSmoother(smoothing_s)
    logs: dict[int, _TrackLog] = {}
    reader = await asyncio.to_thread(_Reader, path, settings, fps)
    pending: asyncio.Future | None = None
    try:
        pending = asyncio.ensure_future(asyncio.to_thread(reader.next))
        index = 0
        while True:
            item = await pending
            pending = None
            if item is None:
                break
            pending = asyncio.ensure_future(asyncio.to_thread(reader.next))  # decode ahead
            t, image = item
            if index % 10 == 0:
                await ensure_client_connected(request)
            results = await engine.predict(image, model=model, tta=False, max_faces=max_faces,
                                           frontalize=frontalize)
            del image
            note_faces(request, len(results))
            ids = tracker.update([r.detection.box for r in results])
            for tid, r in zip(ids, results, strict=True):
                smoothed = smoother.update(tid, t, r.probs)
                log = logs.setdefault(tid, _TrackLog())
                log.raw.append(np.asarray(r.probs, dtype=np.float64))
                log.frames.append(TrackFrame(
                    frame=index, t=round(t, 4), box=[round(float(v), 2) for v in r.detection.box],
                    score=round(float(r.detection.score), 4), emotions=_probs(names, r.probs),
                    smoothed=_probs(names, smoothed), dominant=names[int(np.argmax(smoothed))]))
            index += 1
        reader.check_complete()
    finally:
        if pending is not None:  # the decode thread must finish before the capture is released
            with contextlib.suppress(Exception):
                await pending
        await asyncio.to_thread(reader.close)
        # Hand the freed frame and decoder buffers back to the OS, as a large image decode does:
        # four concurrent 4K videos left the process 285-341 MiB larger without it, 17-73 MiB
        # with it (benchmarks/video.py, docs/results.md "Video and streams").
        await asyncio.to_thread(release_memory)
    tracks = [Track(id=tid, frames_seen=len(log.frames), first_t=log.frames[0].t, last_t=log.frames[-1].t,
                    timeline=log.frames, summary=_summary(log, names))
              for tid, log in sorted(logs.items())]
    info = VideoInfo(width=reader.width, height=reader.height, source_fps=round(reader.src_fps, 4),
                     source_frames=reader.decoded, duration_s=round(reader.decoded / reader.src_fps, 4),
                     fps=round(reader.fps, 4), frames=reader.sampled,
                     processing_s=round(time.perf_counter() - start, 4))
    return VideoResponse(model=ModelRef(name=model, version=clf.version, arch=clf.arch),
                         smoothing_s=smoothing_s, video=info, tracks=tracks)


def _csv(result: VideoResponse) -> str:
    """The long table: one row per sampled frame and track."""
    names = list(result.tracks[0].summary.mean) if result.tracks else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["frame", "t", "track", "x1", "y1", "x2", "y2", "score", "dominant",
                *names, *(f"smoothed_{n}" for n in names)])
    rows = sorted(((f.frame, tr.id, f) for tr in result.tracks for f in tr.timeline), key=lambda r: r[:2])
    for _, tid, f in rows:
        w.writerow([f.frame, f.t, tid, *f.box, f.score, f.dominant,
                    *(f.emotions[n] for n in names), *(f.smoothed[n] for n in names)])
    return buf.getvalue()


@router.post("/predict/video", response_model=VideoResponse, openapi_extra=VIDEO_REQUEST_BODY,
             responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                              "description": "JSON, or with format=csv one row per frame and track"},
                        **error_responses(*UPLOAD_ERRORS, 501)},
             summary="Emotion timelines per tracked face in a video")
async def predict_video(
    request: Request, engine: ReadyEngineDep, settings: SettingsDep,
    model: ModelName = "default",
    fps: Annotated[float, Query(gt=0, description="frames sampled per second (at most the video's "
                                                  "own rate and FER_VIDEO_MAX_FPS)")] = 5.0,
    smoothing_s: Annotated[float | None, Query(
        ge=0, le=60, description="EMA time constant in seconds; default FER_VIDEO_SMOOTHING_S, 0 = off")
    ] = None,
    max_faces: Annotated[int | None, Query(ge=1, le=1000)] = None,
    frontalize: FrontalizeMode = FrontalizeMode.AUTO,
    format: Annotated[Literal["json", "csv"], Query(description="csv: one row per frame and track")
                      ] = "json",
) -> Any:
    admit(engine, "detector", model, *(["frontalizer"] if frontalize is FrontalizeMode.ON else []))
    if model not in engine.classifiers:
        raise ApiError(400, "unknown_model",
                       f"model {model[:100]!r} is not loaded; available: {', '.join(engine.classifiers)}")
    if fps > settings.video_max_fps:
        raise ApiError(422, "validation_error", f"fps must be at most {settings.video_max_fps:g}")
    tau = settings.video_smoothing_s if smoothing_s is None else smoothing_s
    fd, path = tempfile.mkstemp(prefix="fer-video-", suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as out:
            await _save_upload(request, settings, out)
        result = await _analyse(request, path, engine, settings, model=model, fps=fps, smoothing_s=tau,
                                max_faces=max_faces, frontalize=frontalize)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    if format == "csv":
        return Response(_csv(result), media_type="text/csv")
    return result
