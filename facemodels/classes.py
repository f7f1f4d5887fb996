"""The seven FER2013 expression classes, in the original FER2013 label order."""

from __future__ import annotations

__all__ = ["FER_CLASSES", "NUM_CLASSES"]

#: Index i is the original FER2013 ``emotion`` label i.
FER_CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NUM_CLASSES = len(FER_CLASSES)
