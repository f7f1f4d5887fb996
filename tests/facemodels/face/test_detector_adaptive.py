"""RetinaFaceDetector(adaptive_side=...): a small pass first, the full pass only where it found no
close-up. Real photos (the fixture, a close-up cut from it, and a frame of small faces pasted from
it), the real network; which passes ran is read from the detector's own ``runs`` counter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facemodels.face.detector import Detection, RetinaFaceDetector
from tests.support import SMALL_FACE_SPOTS, close_up_photo, small_faces_photo

OPTS = dict(score_threshold=0.6, min_face_size=16)


def _same(got: list[Detection], want: list[Detection]) -> None:
    """The same faces, to float noise (a batch of several may round differently from one)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose([*g.box, g.score, *np.ravel(g.landmarks)],
                                   [*w.box, w.score, *np.ravel(w.landmarks)], atol=0.01)


@pytest.fixture(scope="module")
def fixed(detector_weights: Path) -> RetinaFaceDetector:
    return RetinaFaceDetector(detector_weights, max_side=640, **OPTS)


def _adaptive(weights: Path, **kwargs: object) -> RetinaFaceDetector:
    return RetinaFaceDetector(weights, max_side=640, adaptive_side=320, **{**OPTS, **kwargs})


def test_close_up_runs_once_at_the_small_side(detector_weights: Path, face_image: np.ndarray) -> None:
    detector = _adaptive(detector_weights)
    (faces,) = detector.detect([close_up_photo(face_image)])
    assert detector.runs == {320: 1}  # no pass at 640
    assert len(faces) == 1 and faces[0].box[3] - faces[0].box[1] > 0.2 * 640


def test_small_faces_get_the_full_pass(detector_weights: Path, face_image: np.ndarray,
                                       fixed: RetinaFaceDetector) -> None:
    frame = small_faces_photo(face_image)
    assert RetinaFaceDetector(detector_weights, max_side=320, **OPTS).detect([frame]) == [[]]  # 320 alone
    detector = _adaptive(detector_weights)
    (faces,) = detector.detect([frame])
    assert detector.runs == {320: 1, 640: 1}
    assert len(faces) == len(SMALL_FACE_SPOTS)
    _same(faces, fixed.detect([frame])[0])  # what a fixed 640 finds


def test_one_batch_takes_both_paths(detector_weights: Path, face_image: np.ndarray,
                                    fixed: RetinaFaceDetector) -> None:
    """Photos of one batch are split after the first pass: only those without a close-up run
    again, together; every photo gets its own answer, in order."""
    near, far = close_up_photo(face_image), small_faces_photo(face_image)
    detector = _adaptive(detector_weights)
    alone = [_adaptive(detector_weights).detect([image])[0] for image in (near, far, near)]
    together = detector.detect([near, far, near])
    for got, want in zip(together, alone, strict=True):
        _same(got, want)
    assert detector.runs == {320: 3, 640: 1}
    _same(together[1], fixed.detect([far])[0])


def test_a_face_under_the_fraction_pays_for_both_passes(detector_weights: Path,
                                                        face_image: np.ndarray) -> None:
    detector = _adaptive(detector_weights, close_up=0.5)  # the close-up's face is 0.37 tall
    (faces,) = detector.detect([close_up_photo(face_image)])
    assert detector.runs == {320: 1, 640: 1} and len(faces) == 1


def test_images_already_small_run_once(detector_weights: Path, face_image: np.ndarray) -> None:
    """The 320x320 fixture is seen whole by the first pass: a second one would see the same."""
    detector = _adaptive(detector_weights, close_up=0.9)
    (faces,) = detector.detect([face_image])
    assert detector.runs == {320: 1} and len(faces) == 1


def test_off_by_default_and_checked(detector_weights: Path, face_image: np.ndarray) -> None:
    detector = RetinaFaceDetector(detector_weights, **OPTS)
    detector.detect([close_up_photo(face_image)])
    assert detector.adaptive_side is None and detector.runs == {640: 1}
    for bad in (dict(adaptive_side=640), dict(adaptive_side=700), dict(adaptive_side=16),
                dict(adaptive_side=320, close_up=0.0), dict(adaptive_side=320, close_up=1.5)):
        with pytest.raises(ValueError):
            RetinaFaceDetector(detector_weights, max_side=640, **bad)
