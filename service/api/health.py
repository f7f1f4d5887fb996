"""Liveness, readiness, Prometheus metrics and the loaded models."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import EngineDep, MetricsDep
from service.errors import error_response
from service.schemas import ModelInfo, ModelsResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: models loaded and warmed up", response_model=None)
async def readyz(engine: EngineDep) -> dict[str, object] | Response:
    if not engine.ready:
        return error_response(503, "not_ready", "models are still loading", {"Retry-After": "5"})
    return {"status": "ready", "models": sorted(engine.classifiers), "device": str(engine.device),
            "backend": engine.backend}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(engine: EngineDep, m: MetricsDep) -> Response:
    for name, depth in engine.queue_depths().items():
        m.queue_depth.labels(model=name).set(depth)
    gpu = engine.gpu_memory()
    if gpu is not None:
        m.gpu_memory.labels(device=str(engine.device)).set(gpu)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/models", response_model=ModelsResponse, summary="Loaded models and their cards")
async def models(engine: EngineDep) -> ModelsResponse:
    infos = [c.describe() for c in engine.classifiers.values()]
    if engine.frontalizer is not None:
        infos.append(engine.frontalizer.describe())
    return ModelsResponse(models=[ModelInfo(**i) for i in infos])
