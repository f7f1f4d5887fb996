"""The inference engine's intra-op thread default, and its detect -> align path."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import torch

from facemodels.face.align import align_face
from service.inference.pipeline import InferenceEngine, default_threads, usable_cores


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (16, 8), (64, 8)])
def test_default_threads_is_half_the_cores_between_1_and_8(cores: int, threads: int) -> None:
    assert default_threads(cores) == threads


def test_usable_cores_follows_the_affinity_mask() -> None:
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity here")
    assert usable_cores() == len(os.sched_getaffinity(0))
    assert default_threads() == default_threads(usable_cores())


def test_engine_threads_setting_or_default(make_settings) -> None:
    assert InferenceEngine(make_settings(torch_threads=0)).threads == default_threads()
    assert InferenceEngine(make_settings(torch_threads=3)).threads == 3


@pytest.fixture
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_started_engine_gives_torch_and_every_model_its_threads(make_settings, restore_torch_threads,
                                                                face_image: np.ndarray) -> None:
    engine = InferenceEngine(make_settings(torch_threads=0, backend="torch", warmup=False))

    async def run() -> None:
        await engine.start()
        try:
            assert torch.get_num_threads() == engine.threads == default_threads()
        finally:
            await engine.stop()

    asyncio.run(run())


def test_crops_are_aligned_from_one_gray_conversion_exactly_as_from_rgb(
        make_settings, face_image: np.ndarray) -> None:
    """Two faces in one image: each crop equals align_face on the RGB image (which converts it
    to gray itself), so converting once per image changes no pixel."""
    two = np.concatenate([face_image, face_image[:, ::-1]], axis=1)  # side by side, one mirrored
    engine = InferenceEngine(make_settings(backend="torch", warmup=False))
    seen: list[np.ndarray] = []

    async def run() -> list:
        await engine.start()
        try:
            real_classify = engine.classify

            async def capture(crops: list[np.ndarray], **kwargs: object) -> list[np.ndarray]:
                seen.extend(crops)
                return await real_classify(crops, **kwargs)

            engine.classify = capture  # type: ignore[method-assign]
            return await engine.predict(two, model="default", tta=False, max_faces=None)
        finally:
            await engine.stop()

    results = asyncio.run(run())
    assert len(results) == len(seen) == 2
    size = engine.classifiers["default"].cfg.image_size
    for result, crop in zip(results, seen, strict=True):
        want = align_face(two, np.asarray(result.detection.landmarks), size=size)
        assert crop.shape == (size, size) and crop.dtype == np.uint8
        np.testing.assert_array_equal(crop, want)
