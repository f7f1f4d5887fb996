"""POST /predict and /predict/batch: seven emotion probabilities per face."""

from __future__ import annotations

import asyncio
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request

from service.api.faces import prediction_out
from service.api.inputs import (
    IMAGE_REQUEST_BODY,
    IMAGES_REQUEST_BODY,
    Upload,
    decode_upload,
    ensure_client_connected,
    read_uploads,
)
from service.api.responses import UPLOAD_ERRORS, error_responses
from service.config import Settings
from service.deps import ReadyEngineDep, SettingsDep, admit
from service.errors import ApiError
from service.inference.decode import ImageError, original_size
from service.inference.pipeline import FrontalizeMode, InferenceEngine
from service.metrics import note_error, note_faces
from service.schemas import BatchItem, BatchPredictResponse, ErrorBody, ImageInfo, ModelRef, PredictResponse

router = APIRouter(tags=["faces"])

#: Any loaded classifier by name: a string, not an enum, since what is loaded depends on the
#: deployment (FER_MODELS, the checkpoints beside FER_CLASSIFIER_CHECKPOINT). An unknown name is
#: a 400 ``unknown_model`` that lists the loaded ones.
ModelName = Annotated[str, Query(
    description="name of a loaded classifier (GET /models lists them): default is "
                "FER_CLASSIFIER_CHECKPOINT, ensemble the ensemble if one is loaded, and each other "
                "name a checkpoint's file stem (model=vgg19 for vgg19.safetensors) or a FER_MODELS key; "
                "an unknown name is a 400 unknown_model listing the loaded ones",
    examples=["default"],
)]


def _admit(engine: InferenceEngine, *, model: str, detect: bool, frontalize: FrontalizeMode) -> None:
    """Refuse before the upload is read: a model that is not loaded (400 ``unknown_model``), or a
    full queue this request needs (503 ``queue_full``)."""
    if model not in engine.classifiers:
        raise ApiError(400, "unknown_model",
                       f"model {model[:100]!r} is not loaded; available: {', '.join(engine.classifiers)}")
    names = (["detector"] if detect else []) + [model]
    if detect and frontalize is FrontalizeMode.ON:
        names.append("frontalizer")
    admit(engine, *names)


async def _predict_image(
    request: Request, image: np.ndarray, engine: InferenceEngine, settings: Settings, *,
    model: str, tta: bool | None, max_faces: int | None, detect: bool, frontalize: FrontalizeMode,
) -> PredictResponse:
    use_tta = settings.tta if tta is None else tta
    await ensure_client_connected(request)
    results = await engine.predict(image, model=model, tta=use_tta, max_faces=max_faces, detect=detect,
                                   frontalize=frontalize)
    if detect:
        note_faces(request, len(results))
    clf = engine.classifier(model)
    w, h = original_size(image)  # a large image may have been decoded reduced
    return PredictResponse(
        image=ImageInfo(width=w, height=h),
        model=ModelRef(name=model, version=clf.version, arch=clf.arch),
        tta=use_tta,
        faces=[prediction_out(r, clf.class_names) for r in results],
    )


@router.post("/predict", response_model=PredictResponse, openapi_extra=IMAGE_REQUEST_BODY,
             responses=error_responses(*UPLOAD_ERRORS, 501),
             summary="Emotion probabilities for every face")
async def predict(
    request: Request, engine: ReadyEngineDep, settings: SettingsDep,
    model: ModelName = "default",
    tta: Annotated[bool | None, Query(description="10-crop TTA; default from settings")] = None,
    max_faces: Annotated[int | None, Query(ge=1, le=1000)] = None,
    detect: Annotated[bool, Query(description="false: the image is one face crop")] = True,
    frontalize: Annotated[FrontalizeMode, Query(
        description="auto: frontalise turned faces where the frontaliser's evaluation says it helps")
    ] = FrontalizeMode.AUTO,
) -> PredictResponse:
    _admit(engine, model=model, detect=detect, frontalize=frontalize)
    (upload,) = await read_uploads(request, settings)
    image = await decode_upload(upload, settings)
    return await _predict_image(request, image, engine, settings, model=model, tta=tta,
                                max_faces=max_faces, detect=detect, frontalize=frontalize)


@router.post("/predict/batch", response_model=BatchPredictResponse, openapi_extra=IMAGES_REQUEST_BODY,
             responses=error_responses(*UPLOAD_ERRORS, 501),
             summary="Several images in one request (multipart 'files', or JSON 'images')")
async def predict_batch(
    request: Request, engine: ReadyEngineDep, settings: SettingsDep,
    model: ModelName = "default",
    tta: bool | None = None,
    max_faces: Annotated[int | None, Query(ge=1, le=1000)] = None,
    detect: bool = True,
    frontalize: FrontalizeMode = FrontalizeMode.AUTO,
) -> BatchPredictResponse:
    _admit(engine, model=model, detect=detect, frontalize=frontalize)
    uploads = await read_uploads(request, settings, many=True)

    async def one(upload: Upload) -> BatchItem:
        try:
            image = await decode_upload(upload, settings)
        except ImageError as e:
            note_error(request, e.code)
            return BatchItem(filename=upload.filename, error=ErrorBody(code=e.code, message=e.message))
        result = await _predict_image(request, image, engine, settings, model=model, tta=tta,
                                      max_faces=max_faces, detect=detect, frontalize=frontalize)
        return BatchItem(filename=upload.filename, result=result)

    return BatchPredictResponse(results=list(await asyncio.gather(*(one(u) for u in uploads))))
