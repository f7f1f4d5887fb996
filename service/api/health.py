"""Liveness, readiness and Prometheus metrics.

``/healthz`` and ``/readyz`` never need the API key: container probes (Docker ``HEALTHCHECK``,
Kubernetes liveness and readiness) send none, and the answers hold no data. ``/metrics`` is its
own router so that :mod:`service.main` can require the key on it (``FER_METRICS_PUBLIC=false``).
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.responses import error_responses
from service.deps import EngineDep, MetricsDep
from service.errors import error_response
from service.schemas import HealthResponse, ReadyResponse

__all__ = ["metrics_router", "router"]

router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="Liveness")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=ReadyResponse, responses=error_responses(503),
            summary="Readiness: models loaded and warmed up")
async def readyz(engine: EngineDep) -> ReadyResponse | JSONResponse:
    if not engine.ready:
        return error_response(503, "not_ready", "models are still loading", {"Retry-After": "5"})
    return ReadyResponse(status="ready", models=sorted(engine.classifiers), device=str(engine.device),
                         backend=engine.backend)


@metrics_router.get(
    "/metrics", response_class=Response, summary="Prometheus metrics",
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                     "description": "the Prometheus text exposition format"}})
async def metrics(engine: EngineDep, m: MetricsDep) -> Response:
    for name, depth in engine.queue_depths().items():
        m.queue_depth.labels(model=name).set(depth)
    gpu = engine.gpu_memory()
    if gpu is not None:
        m.gpu_memory.labels(device=str(engine.device)).set(gpu)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
