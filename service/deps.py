"""Annotated dependencies that routes declare; tests may swap them with overrides."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from service.config import Settings
from service.errors import ApiError
from service.inference.batcher import MIN_RETRY_AFTER_S, QueueFullError
from service.inference.pipeline import InferenceEngine
from service.metrics import Metrics

__all__ = ["EngineDep", "MetricsDep", "ReadyEngineDep", "SettingsDep", "admit", "require_api_key"]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_engine(request: Request) -> InferenceEngine:
    return request.app.state.engine


def get_ready_engine(request: Request) -> InferenceEngine:
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


def require_api_key(request: Request) -> None:
    """When ``FER_API_KEY`` is set, requests must carry it in ``X-API-Key``."""
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    given = request.headers.get("x-api-key", "")
    if not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EngineDep = Annotated[InferenceEngine, Depends(get_engine)]
ReadyEngineDep = Annotated[InferenceEngine, Depends(get_ready_engine)]
