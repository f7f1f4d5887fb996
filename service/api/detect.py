"""POST /detect: face boxes, scores and five landmarks."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from service.api.faces import detection_out
from service.api.inputs import IMAGE_REQUEST_BODY, decode_upload, ensure_client_connected, read_uploads
from service.api.responses import UPLOAD_ERRORS, error_responses
from service.deps import ReadyEngineDep, SettingsDep, admit
from service.inference.decode import original_size
from service.metrics import note_faces
from service.schemas import DetectResponse, ImageInfo

router = APIRouter(tags=["faces"])


@router.post("/detect", response_model=DetectResponse, openapi_extra=IMAGE_REQUEST_BODY,
             responses=error_responses(*UPLOAD_ERRORS), summary="Detect faces")
async def detect(
    request: Request, engine: ReadyEngineDep, settings: SettingsDep,
    max_faces: Annotated[int | None, Query(ge=1, le=1000)] = None,
) -> DetectResponse:
    admit(engine, "detector")  # a full queue is a 503 before the upload is read
    (upload,) = await read_uploads(request, settings)
    image = await decode_upload(upload, settings)
    await ensure_client_connected(request)
    faces = await engine.detect(image, max_faces=max_faces)
    note_faces(request, len(faces))
    w, h = original_size(image)  # a large image may have been decoded reduced
    return DetectResponse(image=ImageInfo(width=w, height=h), faces=[detection_out(f) for f in faces])
