"""Annotated dependencies that routes declare; tests may swap them with overrides.

They are ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop
per dependency per request (about 16 % of the event loop's time on small requests, measured
2026-12-02), for what is an attribute lookup.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from starlette.requests import HTTPConnection

from service.config import Settings
from service.errors import ApiError
from service.inference.batcher import MIN_RETRY_AFTER_S, QueueFullError
from service.inference.pipeline import InferenceEngine
from service.metrics import Metrics

__all__ = ["API_KEY_HEADER", "EngineDep", "MetricsDep", "ReadyEngineDep", "SettingsDep", "admit",
           "require_api_key"]

#: The one place the API key is read from, declared in OpenAPI as the ``ApiKey`` security scheme.
#: Never the query string: URLs end up in access logs, proxies' logs and browser histories.
API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key", scheme_name="ApiKey", auto_error=False,
    description="the value of FER_API_KEY; only this header is read (a key in the query string is "
                "ignored, so such a request is a 401)")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_engine(request: Request) -> InferenceEngine:
    return request.app.state.engine


async def get_ready_engine(request: Request) -> InferenceEngine:
    engine: InferenceEngine = request.app.state.engine
    if not engine.ready:
        raise ApiError(503, "not_ready", "models are still loading", {"Retry-After": "5"})
    return engine


def admit(engine: InferenceEngine, *models: str) -> None:
    """Admit a request only while every batch queue it will use has room: called at the start
    of a route, before the upload is read, so that under overload the 503 ``queue_full`` (with
    ``Retry-After``) costs no reading or decoding. ``models`` are batcher names (``detector``, a
    classifier, ``frontalizer``); a name that is not loaded is left to the route to refuse.

    A request admitted here can still meet a full queue later (others filled it meanwhile): the
    batcher then refuses it the same way.
    """
    capacity = engine.settings.max_queue  # every batcher's queue holds max_queue items
    depths = engine.queue_depths()
    for name in models:
        depth = depths.get(name)
        if depth is not None and depth >= capacity:
            if engine.observer is not None:
                engine.observer.on_error(name, "queue_full")
            raise QueueFullError(
                f"batcher {name!r} queue is full ({depth}/{capacity} queued); request refused before "
                "reading it", retry_after=MIN_RETRY_AFTER_S)


async def require_api_key(conn: HTTPConnection,
                    given: Annotated[str | None, Security(API_KEY_HEADER)] = None) -> None:
    """When ``FER_API_KEY`` is set, requests must carry it in the ``X-API-Key`` header (compared
    in constant time). Takes an :class:`HTTPConnection`, so WebSocket routes can use it too."""
    expected = conn.app.state.settings.api_key
    if expected is None:
        return
    if not secrets.compare_digest((given or "").encode(), expected.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EngineDep = Annotated[InferenceEngine, Depends(get_engine)]
ReadyEngineDep = Annotated[InferenceEngine, Depends(get_ready_engine)]
