"""Turning pipeline results into response models (shared by /detect, /predict, /frontalize)."""

from __future__ import annotations

import numpy as np

from facemodels.face.detector import Detection
from service.inference.pipeline import FaceResult, face_yaw
from service.schemas import FaceDetection, FacePrediction

__all__ = ["detection_out", "prediction_out"]


def detection_out(d: Detection, *, yaw: float | None = None) -> FaceDetection:
    """``d`` as a response item; ``yaw`` when the pipeline already estimated it, else estimated here."""
    return FaceDetection(box=[round(float(v), 2) for v in d.box], score=round(float(d.score), 4),
                         landmarks=[[round(float(x), 2), round(float(y), 2)] for x, y in d.landmarks],
                         yaw=face_yaw(d) if yaw is None else yaw)


def prediction_out(r: FaceResult, class_names: tuple[str, ...]) -> FacePrediction:
    emotions = {name: round(float(p), 5) for name, p in zip(class_names, r.probs, strict=True)}
    base = detection_out(r.detection, yaw=r.yaw)
    return FacePrediction(**base.model_dump(), emotions=emotions, frontalized=r.frontalized,
                          dominant=class_names[int(np.argmax(r.probs))])
