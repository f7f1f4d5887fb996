"""The wire protocol of ``WS /stream``: what a client sends, what it is answered, how it closes.

- Handshake: ``GET /stream?model=&tta=&max_faces=&frontalize=&smoothing_s=`` upgraded to a
  WebSocket. With ``FER_API_KEY`` set, the key goes in the ``X-API-Key`` header or, since
  browsers cannot set headers on a WebSocket, as the subprotocol ``fer.key.<base64url of the
  key, no padding>`` offered beside ``fer.stream`` (the server answers ``fer.stream``, never the
  key). Never in the query string, which access logs record.
- Client to server: one JPEG per binary message. Server to client: one JSON text message per
  answered frame (:class:`StreamAnswer`); ``seq`` counts the client's binary messages from 0.
- Close codes (each with a reason string): 1003 a text message, a non-JPEG or undecodable
  frame; 1008 a wrong or missing key, or an origin not allowed; 1009 a frame over the byte or
  pixel limit; 1011 a server fault; 1013 too many streams open, or the models still loading;
  4400 an invalid query parameter; 4408 no frame for :attr:`StreamLimits.idle_s`.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.websockets import WebSocket

from service.config import Settings
from service.inference.pipeline import FrontalizeMode
from service.schemas import ErrorBody, FacePrediction, ImageInfo, ModelRef

__all__ = [
    "KEY_PROTOCOL_PREFIX",
    "SUBPROTOCOL",
    "Close",
    "CloseCode",
    "StreamAnswer",
    "StreamFace",
    "StreamLimits",
    "StreamParams",
    "check_key",
    "check_origin",
    "chosen_subprotocol",
    "parse_params",
]

SUBPROTOCOL = "fer.stream"
KEY_PROTOCOL_PREFIX = "fer.key."
#: A close reason is at most 123 bytes of UTF-8 (RFC 6455, 5.5: control frames carry 125 bytes).
_MAX_REASON_BYTES = 123


class CloseCode(IntEnum):
    NORMAL = 1000
    UNSUPPORTED_DATA = 1003
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    INVALID_PARAMETER = 4400
    IDLE = 4408


@dataclass(frozen=True, slots=True)
class Close:
    """Why a stream ends: its close code, a short ``kind`` (counted as the error kind
    ``stream_<kind>``) and the reason sent with the code."""

    code: CloseCode
    kind: str
    reason: str

    @property
    def wire_reason(self) -> str:
        """:attr:`reason` cut to what a close frame carries."""
        raw = self.reason.encode()
        if len(raw) <= _MAX_REASON_BYTES:
            return self.reason
        return raw[:_MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Per-stream limits (the ``FER_STREAM_*`` settings)."""

    max_frame_bytes: int
    max_streams: int
    idle_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamLimits:
        return cls(max_frame_bytes=settings.stream_max_frame_bytes, max_streams=settings.stream_max_streams,
                   idle_s=settings.stream_idle_s)


class StreamParams(BaseModel):
    """The handshake's query parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Annotated[str, Field(min_length=1, max_length=64)] = "default"
    tta: bool = False
    max_faces: Annotated[int | None, Field(ge=1, le=1000)] = None
    frontalize: FrontalizeMode = FrontalizeMode.AUTO
    smoothing_s: Annotated[float | None, Field(ge=0, le=60)] = None


def parse_params(ws: WebSocket) -> StreamParams | Close:
    """The query parameters, or the :class:`Close` that names the first invalid one."""
    try:
        return StreamParams.model_validate(dict(ws.query_params))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "query"
        return Close(CloseCode.INVALID_PARAMETER, "invalid_parameter", f"{where}: {err['msg']}")


def chosen_subprotocol(ws: WebSocket) -> str | None:
    """``fer.stream`` when the client offered it (browsers require an offered one back)."""
    return SUBPROTOCOL if SUBPROTOCOL in ws.scope.get("subprotocols", ()) else None


def _offered_key(ws: WebSocket) -> str | None:
    header = ws.headers.get("x-api-key")
    if header is not None:
        return header
    for proto in ws.scope.get("subprotocols", ()):
        if proto.startswith(KEY_PROTOCOL_PREFIX):
            encoded = proto[len(KEY_PROTOCOL_PREFIX):]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except ValueError:  # not base64 (binascii.Error), or not UTF-8
                return None
    return None


def check_key(ws: WebSocket, settings: Settings) -> Close | None:
    """None when no key is required or the right one was given (compared in constant time)."""
    expected = settings.api_key
    if expected is None:
        return None
    given = _offered_key(ws) or ""
    if secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        return None
    return Close(CloseCode.POLICY_VIOLATION, "unauthorized",
                 "missing or wrong API key: send X-API-Key, or the subprotocol fer.key.<base64url key>")


def check_origin(ws: WebSocket, settings: Settings) -> Close | None:
    """A browser's page may open a stream only from this host or from ``FER_CORS_ORIGINS``.

    WebSockets have no CORS: without this, any web page a person visits could stream to a
    server it can reach. Clients that send no ``Origin`` (not browsers) pass. Hosts are compared
    without ports, since a reverse proxy may pass on ``Host`` without one.
    """
    origin = ws.headers.get("origin")
    if origin is None or "*" in settings.cors_origins or origin in settings.cors_origins:
        return None
    host = ws.headers.get("host", "")
    own = urlsplit(f"//{host}").hostname
    if own is not None and urlsplit(origin).hostname == own:
        return None
    return Close(CloseCode.POLICY_VIOLATION, "origin_not_allowed",
                 f"origin {origin[:60]!r} may not open streams here (FER_CORS_ORIGINS)")


# --- answers --------------------------------------------------------------------------------

class StreamFace(FacePrediction):
    track: int = Field(..., description="track id: the same face keeps it from frame to frame")
    smoothed: dict[str, float] = Field(..., description="the track's exponential moving average of "
                                                        "the probabilities (smoothing_s)")
    smoothed_dominant: str


class StreamAnswer(BaseModel):
    seq: int = Field(..., description="which binary message of the client this answers, from 0")
    dropped: list[int] = Field(..., description="frames dropped unanswered since the previous answer "
                                                "(newer ones came first); at most 256 listed")
    dropped_count: int
    t: float = Field(..., description="the frame's arrival, seconds since the stream opened")
    server_ms: float = Field(..., description="from the frame's arrival to this answer")
    image: ImageInfo | None = None
    model: ModelRef
    faces: list[StreamFace] = Field(default_factory=list)
    error: ErrorBody | None = Field(None, description="set when this frame could not be analysed "
                                                      "(queue_full: the server is busy)")
    retry_after_s: float | None = None
