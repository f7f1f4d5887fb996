"""Request and response models (pydantic). Routes return these; OpenAPI documents them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = [
    "BatchItem",
    "BatchPredictResponse",
    "DetectResponse",
    "DetectorInfo",
    "ErrorBody",
    "ErrorResponse",
    "FaceDetection",
    "FacePrediction",
    "FrontalFace",
    "FrontalizeResponse",
    "HealthResponse",
    "ImageInfo",
    "ModelInfo",
    "ModelsResponse",
    "PredictResponse",
    "ReadyResponse",
]


class ImageInfo(BaseModel):
    width: int
    height: int


class FaceDetection(BaseModel):
    box: list[float] = Field(..., description="x1, y1, x2, y2 in image pixels")
    score: float = Field(..., description="face detection confidence")
    landmarks: list[list[float]] = Field(
        ..., description="5 (x, y) points: image-left eye, image-right eye, nose, "
                         "image-left mouth corner, image-right mouth corner")
    yaw: float | None = Field(
        None, description="estimated head yaw in degrees from the landmarks (+ = nose towards the "
                          "image's right); null without landmarks")


class FacePrediction(FaceDetection):
    emotions: dict[str, float] = Field(..., description="probability per class, summing to 1")
    dominant: str
    frontalized: bool = Field(False, description="classified after GAN frontalisation")


class FrontalFace(FaceDetection):
    image_png: str = Field(..., description="the frontalised grayscale face, base64 PNG")


class FrontalizeResponse(BaseModel):
    image: ImageInfo
    model: ModelRef
    faces: list[FrontalFace]


class ModelRef(BaseModel):
    name: str
    version: str
    arch: str


class DetectResponse(BaseModel):
    image: ImageInfo
    faces: list[FaceDetection]


class PredictResponse(BaseModel):
    image: ImageInfo
    model: ModelRef
    tta: bool
    faces: list[FacePrediction]


class ErrorBody(BaseModel):
    code: str = Field(..., description="machine-readable kind, e.g. not_an_image, queue_full")
    message: str = Field(..., description="what went wrong, for people")


class ErrorResponse(BaseModel):
    """Every error answer: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorBody


class BatchItem(BaseModel):
    filename: str | None = None
    result: PredictResponse | None = None
    error: ErrorBody | None = None


class BatchPredictResponse(BaseModel):
    results: list[BatchItem]


class ModelInfo(BaseModel):
    name: str
    role: str
    arch: str
    version: str
    device: str
    backend: str = Field("torch", description="torch (PyTorch) or onnx (ONNX Runtime on the CPU)")
    precision: str = Field("fp32", description="int8 (the onnx backend serving the checkpoint's "
                                               "quantised graph, FER_INT8) or fp32")
    card: dict[str, Any]


class DetectorInfo(BaseModel):
    name: str = "detector"
    arch: str
    device: str
    backend: str = Field(..., description="torch (PyTorch) or onnx (ONNX Runtime on the CPU)")
    precision: str = Field(..., description="int8 (the onnx backend running the detector's int8 graph, "
                                            "FER_INT8 and FER_DETECTOR_INT8_GRAPH) or fp32")
    graph: str | None = Field(None, description="file name of the int8 graph, when precision is int8")
    max_side: int | None = Field(..., description="long side images are shrunk to (FER_DETECTOR_MAX_SIDE)")
    adaptive_side: int | None = Field(
        None, description="FER_DETECTOR_ADAPTIVE_SIDE: long side of the first pass; null when off")
    closeup_fraction: float | None = Field(
        None, description="FER_DETECTOR_CLOSEUP_FRACTION when adaptive_side is on")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    detector: DetectorInfo | None = Field(None, description="the face detector, which every "
                                                            "classifier's /predict runs first")


class HealthResponse(BaseModel):
    status: str = Field("ok", description="always ok: the process answers")


class ReadyResponse(BaseModel):
    status: str = Field("ready", description="always ready (until then the answer is a 503)")
    models: list[str] = Field(..., description="the loaded classifiers, the names model= takes")
    device: str
    backend: str = Field(..., description="torch (PyTorch) or onnx (ONNX Runtime on the CPU)")
