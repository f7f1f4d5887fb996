"""Fixtures for the service tests: a tiny real checkpoint, settings and the app's client.

The detector weights, the detector and the face photo come from ``tests/conftest.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

# --- the app -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (untrained, seeded) compact classifier checkpoint."""
    import torch

    from facemodels.checkpoint import save_checkpoint
    from facemodels.models import create_model

    torch.manual_seed(0)
    model = create_model("compact_resnet_s")
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", model, arch="compact_resnet_s",
                           metrics={"PublicTest": {"acc": 0.0}})


@pytest.fixture(scope="session")
def test_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root for the app under test (the onnx backend exports its graphs there)."""
    return tmp_path_factory.mktemp("fer-cache")


@pytest.fixture(scope="session")
def make_settings(detector_weights: Path, tiny_checkpoint: Path, test_cache_dir: Path):
    """Factory for Settings pointing at the tiny checkpoint, the converted detector and a
    temporary cache root (so the backend's ONNX files never land in ~/.cache)."""
    from service.config import Settings

    def make(**overrides: object) -> Settings:
        base = dict(classifier_checkpoint=tiny_checkpoint, detector_weights=detector_weights,
                    device="cpu", max_wait_ms=2.0, use_shipped_extras=False, cache_dir=test_cache_dir)
        return Settings(**{**base, **overrides})

    return make


@pytest.fixture(scope="module")
def client(make_settings):
    """A TestClient whose lifespan has loaded the models."""
    from fastapi.testclient import TestClient

    from service.main import create_app

    with TestClient(create_app(make_settings())) as c:
        yield c
