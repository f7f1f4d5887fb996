"""POST /frontalize: every detected face re-rendered frontally (a trained frontaliser, else the warp)."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response

from service.api.faces import detection_out
from service.api.inputs import IMAGE_REQUEST_BODY, decode_upload, ensure_client_connected, read_uploads
from service.api.responses import UPLOAD_ERRORS, error_responses
from service.deps import ReadyEngineDep, SettingsDep, admit
from service.errors import ApiError
from service.inference.decode import encode_png, original_size
from service.inference.pipeline import FrontalizerUnavailableError
from service.metrics import note_faces
from service.schemas import FrontalFace, FrontalizeResponse, ImageInfo, ModelRef

router = APIRouter(tags=["faces"])


@router.post("/frontalize", response_model=FrontalizeResponse, openapi_extra=IMAGE_REQUEST_BODY,
             responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                              "description": "JSON, or with format=png the one face's PNG"},
                        **error_responses(*UPLOAD_ERRORS, 501)},
             summary="Frontalised face crops (JSON with base64 PNGs, or ?format=png for one face)")
async def frontalize(
    request: Request, engine: ReadyEngineDep, settings: SettingsDep,
    format: Literal["json", "png"] = "json",
    face: Annotated[int, Query(ge=0, description="which face (best first) for format=png")] = 0,
    max_faces: Annotated[int | None, Query(ge=1, le=1000)] = None,
) -> FrontalizeResponse | Response:
    if engine.frontalizer is None:
        raise FrontalizerUnavailableError(FrontalizerUnavailableError.MESSAGE)
    admit(engine, "detector", "frontalizer")  # a full queue is a 503 before the upload is read
    (upload,) = await read_uploads(request, settings)
    image = await decode_upload(upload, settings)
    await ensure_client_connected(request)
    faces = await engine.detect(image, max_faces=max_faces)
    note_faces(request, len(faces))
    if format == "png":
        if face >= len(faces):
            raise ApiError(422, "no_face", f"face {face} requested but {len(faces)} face(s) detected")
        (frontal,) = await engine.frontalize(image, [faces[face]])
        return Response(await asyncio.to_thread(encode_png, frontal), media_type="image/png")
    frontals = await engine.frontalize(image, faces)
    pngs = await asyncio.to_thread(lambda: [encode_png(f) for f in frontals])
    w, h = original_size(image)  # a large image may have been decoded reduced
    fz = engine.frontalizer
    return FrontalizeResponse(
        image=ImageInfo(width=w, height=h),
        model=ModelRef(name="frontalizer", version=fz.version, arch=str(fz.card["arch"])),
        faces=[FrontalFace(**detection_out(d).model_dump(), image_png=base64.b64encode(p).decode())
               for d, p in zip(faces, pngs, strict=True)],
    )
