"""``create_app(settings)``: the FastAPI application. The lifespan loads the models."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.api import detect, frontalize, health, page, predict, video
from service.config import Settings
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
    app.include_router(health.router)
    app.include_router(detect.router)
    app.include_router(predict.router)
    app.include_router(video.router)
    app.include_router(frontalize.router)
    if settings.web_page:
        app.include_router(page.router)
    return app


def _version() -> str:
    from facemodels.checkpoint import code_version

    return code_version()
