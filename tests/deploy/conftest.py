"""Fixtures for the deployment tests: a tiny checkpoint, detector weights and the real app."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.support import REPO, REQUIRE_TOOLS

FACE_IMAGE = REPO / "tests" / "fixtures" / "astronaut.jpg"


@pytest.fixture(scope="session")
def face_jpeg() -> bytes:
    """JPEG bytes of a photo with one face."""
    return FACE_IMAGE.read_bytes()


@pytest.fixture(scope="session")
def detector_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RetinaFace weights converted once per session into a temporary cache."""
    from facemodels.face.retinaface_convert import (
        INSTALL_HINT,
        SOURCE_DISTRIBUTION,
        ConversionError,
        ensure_detector_weights,
        source_weights_file,
    )

    try:
        source_weights_file()
    except ConversionError:
        message = f"{SOURCE_DISTRIBUTION} is not installed (`{INSTALL_HINT}`)"
        if REQUIRE_TOOLS:
            pytest.fail(message)
        pytest.skip(message)
    return ensure_detector_weights(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (untrained, seeded) compact classifier checkpoint."""
    import torch

    from facemodels.checkpoint import save_checkpoint
    from facemodels.models import create_model

    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", create_model("compact_resnet_s"),
                           arch="compact_resnet_s", metrics={"PublicTest": {"acc": 0.0}})


@pytest.fixture(scope="module")
def app_client(tiny_checkpoint: Path, detector_weights: Path) -> Iterator[object]:
    """A TestClient on the real app (lifespan run: models loaded and warmed up)."""
    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    settings = Settings(classifier_checkpoint=tiny_checkpoint, detector_weights=detector_weights,
                        device="cpu", max_wait_ms=2.0)
    with TestClient(create_app(settings)) as client:
        yield client
