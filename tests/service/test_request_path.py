"""The per-request path of the real app: no wait for company at the batchers for a lone request,
small uploads decoded on the event loop with the same checks, and FastAPI's own OpenTelemetry
off unless FER_OTEL asks for it."""

from __future__ import annotations

import asyncio
import inspect
import statistics
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry import trace
from PIL import Image

from service.config import Settings
from service.inference import decode
from service.inference.decode import ImageError, decode_image
from service.main import create_app

JPEG = {"content-type": "image/jpeg"}


def _jpeg(face_image: np.ndarray, width: int, height: int) -> bytes:
    bgr = cv2.resize(cv2.cvtColor(face_image, cv2.COLOR_RGB2BGR), (width, height))
    return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels, with no pixel data (a bomb's
    shape in a few dozen bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


# --- the batchers: a lone request never waits for company --------------------------------------


@pytest.fixture(scope="module")
def patient_client(make_settings) -> Iterator[TestClient]:
    """An app whose batchers may wait 1 s for company (FER_MAX_WAIT_MS=1000)."""
    with TestClient(create_app(make_settings(max_wait_ms=1000.0))) as c:
        yield c


@pytest.mark.parametrize("query", ["detect=false", "detect=true"])
def test_a_lone_request_does_not_wait_for_company(patient_client: TestClient, face_jpeg: bytes,
                                                  query: str) -> None:
    """Waiting for company would cost 1 s per batcher (one without detection, two with); the
    bound leaves a busy CI machine ample room for the real work."""
    took = []
    for _ in range(5):
        started = time.perf_counter()
        r = patient_client.post(f"/predict?{query}", content=face_jpeg, headers=JPEG)
        took.append(time.perf_counter() - started)
        assert r.status_code == 200, r.text
        assert len(r.json()["faces"]) == 1
    assert statistics.median(took) < 0.6, took


# --- decoding: small uploads on the event loop, the same checks --------------------------------


def test_small_upload_is_decoded_on_the_event_loop_and_a_large_one_in_a_worker(
    client: TestClient, face_image: np.ndarray, monkeypatch: pytest.MonkeyPatch,
) -> None:
    where: list[str] = []
    real = decode._decode_opened

    def spy(image: Image.Image, **kwargs: Any) -> np.ndarray:
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:  # a worker thread runs no event loop
            where.append("worker thread")
        return real(image, **kwargs)

    monkeypatch.setattr(decode, "_decode_opened", spy)
    r = client.post("/predict?detect=false", content=_jpeg(face_image, 48, 48), headers=JPEG)
    assert r.status_code == 200, r.text
    assert r.json()["image"] == {"width": 48, "height": 48}
    assert len(r.json()["faces"]) == 1
    r = client.post("/predict?detect=false", content=_jpeg(face_image, 320, 240), headers=JPEG)
    assert r.status_code == 200, r.text
    assert r.json()["image"] == {"width": 320, "height": 240}
    assert where == ["event loop", "worker thread"]


def _invalid_small_uploads() -> list:
    """Small bodies that fail validation at different checks."""
    gif = bytes.fromhex("474946383961010001000000002c00000000010001000002024401003b")
    return [
        pytest.param(b"this is not an image", "image/jpeg", id="not_an_image"),
        pytest.param(gif, "image/gif", id="declared_gif"),
        pytest.param(gif, "image/png", id="gif_declared_png"),
        pytest.param(_png_header_only(10_000, 10_000), "image/png", id="too_many_pixels"),
        pytest.param(b"", "image/jpeg", id="empty"),
    ]


@pytest.mark.parametrize(("body", "content_type"), _invalid_small_uploads())
def test_small_invalid_upload_answers_as_decode_image_says(client: TestClient, body: bytes,
                                                           content_type: str) -> None:
    settings: Settings = client.app.state.settings
    with pytest.raises(ImageError) as caught:
        decode_image(body, content_type=content_type, max_bytes=settings.max_upload_bytes,
                     max_pixels=settings.max_image_pixels)
    want = caught.value
    r = client.post("/predict?detect=false", content=body, headers={"content-type": content_type})
    assert r.status_code == want.status, r.text
    assert r.json() == {"error": {"code": want.code, "message": want.message}}


def test_small_truncated_jpeg_is_a_truncated_image(client: TestClient, face_image: np.ndarray) -> None:
    whole = _jpeg(face_image, 48, 48)
    r = client.post("/predict?detect=false", content=whole[: len(whole) // 2], headers=JPEG)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "truncated_image"


# --- FastAPI's OpenTelemetry -------------------------------------------------------------------


class _RecordingTracer(trace.NoOpTracer):
    def __init__(self, spans: list[str]) -> None:
        self.spans = spans

    def start_span(self, name: str, *args: object, **kwargs: object) -> trace.Span:  # type: ignore[override]
        self.spans.append(name)
        return trace.INVALID_SPAN


class _RecordingTracerProvider(trace.TracerProvider):
    """A configured provider, as opentelemetry-sdk would install, that records span names."""

    def __init__(self) -> None:
        self.spans: list[str] = []

    def get_tracer(self, *args: object, **kwargs: object) -> trace.Tracer:  # type: ignore[override]
        return _RecordingTracer(self.spans)


@pytest.mark.parametrize("otel", [False, True])
def test_fastapi_telemetry_follows_fer_otel(make_settings, monkeypatch: pytest.MonkeyPatch,
                                             otel: bool) -> None:
    if otel and "telemetry" not in inspect.signature(FastAPI).parameters:
        pytest.skip("this FastAPI has no built-in OpenTelemetry")
    provider = _RecordingTracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    with TestClient(create_app(make_settings(otel=otel, warmup=False))) as c:
        for _ in range(3):
            assert c.get("/healthz").status_code == 200
    assert bool(provider.spans) is otel, provider.spans


def test_fer_otel_is_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().otel is False
    monkeypatch.setenv("FER_OTEL", "true")
    assert Settings().otel is True
