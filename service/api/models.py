"""GET /models: the loaded models with their cards (which include their training arguments), and
what runs the face detector."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import EngineDep
from service.schemas import ModelInfo, ModelsResponse

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/models", response_model=ModelsResponse, summary="Loaded models and their cards")
async def models(engine: EngineDep) -> ModelsResponse:
    infos = [c.describe() for c in engine.classifiers.values()]
    if engine.frontalizer is not None:
        infos.append(engine.frontalizer.describe())
    return ModelsResponse(models=[ModelInfo(**i) for i in infos], detector=engine.detector_info())
