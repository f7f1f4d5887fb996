"""Training's aligned views go through the serving detector and land faces on the FER template."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facemodels.face.align import FER_TEMPLATE_48
from facemodels.face.detector import RetinaFaceDetector
from training.data.aligned_views import cached_aligned_views, detect_face_landmarks


class _MustNotDetect:
    """Stands in for the detector where the cache has to answer."""

    def detect(self, images: list[np.ndarray]) -> list:
        raise AssertionError("the cache should have answered")


@pytest.fixture(scope="module")
def fer_like_face(face_image: np.ndarray) -> np.ndarray:
    """The fixture photo's face cropped loosely and shrunk to 48x48 gray, like a FER2013 image."""
    gray = cv2.cvtColor(face_image, cv2.COLOR_RGB2GRAY)
    crop = gray[30:118, 96:184]  # about 1.3x the face box, off-centre as FER crops often are
    return cv2.resize(crop, (48, 48), interpolation=cv2.INTER_AREA)


def test_views_put_the_landmarks_on_the_template_and_are_cached(
    detector: RetinaFaceDetector, fer_like_face: np.ndarray, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blank = np.full((48, 48), 128, np.uint8)  # nothing to detect: kept as it is
    faces = torch.from_numpy(np.stack([fer_like_face, blank]))
    views, found = cached_aligned_views(faces, cache_dir=tmp_path, detector=detector)
    assert found == 0.5
    assert views.shape == faces.shape and views.dtype == torch.uint8
    assert torch.equal(views[1], faces[1])

    before = detect_face_landmarks(faces[:1].numpy(), detector)[0]
    after = detect_face_landmarks(views[:1].numpy(), detector)[0]
    assert before is not None and after is not None
    err_before = np.linalg.norm(before - FER_TEMPLATE_48, axis=1).mean()
    err_after = np.linalg.norm(after - FER_TEMPLATE_48, axis=1).mean()
    # Re-detection is itself a pixel or two off, so: much closer than before, and close.
    assert err_after < 0.7 * err_before and err_after < 2.5, (err_before, err_after)

    again, found_again = cached_aligned_views(faces, cache_dir=tmp_path, detector=_MustNotDetect())
    assert torch.equal(again, views) and found_again == found

    (cache_file,) = tmp_path.glob("aligned-views-*.npz")
    cache_file.write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING, logger="training.data.aligned_views"):
        rebuilt, _ = cached_aligned_views(faces, cache_dir=tmp_path, detector=detector)
    assert torch.equal(rebuilt, views)
    assert str(cache_file) in caplog.text and "rebuilding" in caplog.text
