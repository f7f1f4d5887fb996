"""``create_app(settings)``: the FastAPI application. The lifespan loads the models."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.api import detect, docs, frontalize, health, models, page, predict, stream, video
from service.api.responses import error_responses
from service.config import Settings
from service.deps import require_api_key
from service.errors import install_error_handlers
from service.inference.decode import configure_decoding
from service.inference.pipeline import InferenceEngine
from service.metrics import Metrics, install_request_metrics
from service.timeouts import BodyTimeoutMiddleware

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; models are loaded by its lifespan, not here."""
    settings = settings or Settings()
    # Process-wide: the pixels decoded at once, and how far large images are decoded reduced.
    configure_decoding(pixel_budget=settings.decode_pixel_budget,
                       reduce_min_side=round(settings.decode_reduce_margin * settings.detector_max_side))
    # The detector's batches share the histogram: its buckets must reach the larger maximum.
    metrics = Metrics(max_batch_size=max(settings.max_batch_size, settings.detector_batch_size))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine: InferenceEngine = app.state.engine
        await engine.start()
        for clf in engine.classifiers.values():
            metrics.model_info.labels(name=clf.name, arch=clf.arch, version=clf.version,
                                      role=clf.role).set(1)
        if engine.frontalizer is not None:
            info = engine.frontalizer.describe()
            metrics.model_info.labels(name="frontalizer", arch=info["arch"], version=info["version"],
                                      role="frontalizer").set(1)
        for name in engine.queue_depths():
            metrics.queue_capacity.labels(model=name).set(settings.max_queue)
        metrics.ready.set(1)
        try:
            yield
        finally:
            metrics.ready.set(0)
            await engine.stop()

    app = FastAPI(
        title="FER service",
        description="Facial expression recognition: face detection (RetinaFace), alignment and "
                    "seven-class emotion probabilities per face.",
        version=_version(),
        lifespan=lifespan,
        # served by service.api.docs instead: assets from here, and behind the API key
        openapi_url=None, docs_url=None, redoc_url=None,
        **_telemetry(settings),
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = InferenceEngine(settings, observer=metrics)
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"])

    install_request_metrics(app, metrics)
    # Outermost: a stalled body is cut off (408, connection closed) whatever the route does.
    app.add_middleware(BodyTimeoutMiddleware, timeout=settings.timeout_body_s,
                       path_timeouts={"/predict/video": settings.timeout_video_body_s})
    # With FER_API_KEY set, X-API-Key is needed everywhere but on the routes left open by choice:
    # the probes (/healthz, /readyz: Docker and Kubernetes probes send no key), the web page and
    # its files and the docs' bundles (no data in them), and /metrics while FER_METRICS_PUBLIC.
    keyed = _key_guard(settings)
    app.include_router(health.router)
    app.include_router(health.metrics_router, **({} if settings.metrics_public else keyed))
    app.include_router(models.router, **keyed)
    app.include_router(detect.router, **keyed)
    app.include_router(predict.router, **keyed)
    app.include_router(video.router, **keyed)
    app.include_router(frontalize.router, **keyed)
    app.include_router(stream.router)  # WS /stream checks the key itself (header or subprotocol)
    app.include_router(docs.router, **keyed)
    app.include_router(docs.assets_router)
    if settings.web_page:
        app.include_router(page.router)
    return app


def _key_guard(settings: Settings) -> dict[str, Any]:
    """``include_router`` arguments that make a router's routes need ``X-API-Key`` (and say so in
    OpenAPI: the ``ApiKey`` security scheme and a 401), or none when no key is configured."""
    if settings.api_key is None:
        return {}
    return {"dependencies": [Depends(require_api_key)], "responses": error_responses(401)}


def _telemetry(settings: Settings) -> dict[str, Any]:
    """``FastAPI`` arguments for its own OpenTelemetry: off unless ``FER_OTEL``. Off, it skips
    the check of the global providers (and their environment) that it makes on every request.
    FastAPI releases before native telemetry take no ``telemetry`` argument and have none to
    turn off."""
    if "telemetry" not in inspect.signature(FastAPI).parameters:
        if settings.otel:
            log.warning("FER_OTEL=true, but this FastAPI has no built-in OpenTelemetry to turn on")
        return {}
    if settings.otel:
        return {}  # FastAPI's defaults: on wherever a provider is configured
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def _version() -> str:
    from facemodels.checkpoint import code_version

    return code_version()
