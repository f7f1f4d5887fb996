"""Shared fixture factories: synthetic FER2013-style datasets and tiny checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.support import synthetic_face
from training.classes import FER_CLASSES


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
