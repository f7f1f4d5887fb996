"""Alignment geometry: the similarity fit and the warp onto the FER2013 template."""

from __future__ import annotations

import numpy as np
import pytest

from facemodels.face.align import FER_TEMPLATE_48, align_face, resize_face, similarity_transform, template_for


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def test_similarity_recovers_a_known_transform() -> None:
    angle, scale, shift = np.deg2rad(17), 3.2, np.array([40.0, -12.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = FER_TEMPLATE_48
    dst = src @ rot.T + shift
    m = similarity_transform(src, dst)
    assert np.allclose(m[:, :2], rot, atol=1e-9)
    assert np.allclose(m[:, 2], shift, atol=1e-9)
    assert np.allclose(_apply(m, src), dst)


def test_similarity_rejects_degenerate_points() -> None:
    with pytest.raises(ValueError, match="degenerate"):
        similarity_transform(np.ones((5, 2)), FER_TEMPLATE_48)
    with pytest.raises(ValueError, match="matching"):
        similarity_transform(np.ones((5, 2)), np.ones((4, 2)))


def test_template_is_a_plausible_face_layout() -> None:
    t = FER_TEMPLATE_48
    left_eye, right_eye, nose, left_mouth, right_mouth = t
    assert left_eye[0] < nose[0] < right_eye[0]
    assert left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    assert np.allclose(template_for(96), t * 2)


def test_align_undoes_an_upscale_and_paste() -> None:
    """A face scaled x4 and pasted into a canvas comes back as the original 48x48 crop."""
    rng = np.random.default_rng(0)
    face = (rng.random((48, 48)) * 40 + 100).astype(np.uint8)
    face[16:22, 12:20] = 20  # dark "eyes"
    face[16:22, 29:37] = 20
    import cv2

    big = cv2.resize(face, None, fx=4, fy=4, interpolation=cv2.INTER_NEAREST)
    canvas = np.full((400, 500), 128, np.uint8)
    top, left = 60, 150
    canvas[top:top + 192, left:left + 192] = big
    rgb = np.repeat(canvas[..., None], 3, axis=2)
    # pixel (x, y) of the 48 crop covers [4x, 4x+4) in the canvas: centre 4x + 1.5
    landmarks = (FER_TEMPLATE_48 + 0.0) * 4 + 1.5 + np.array([left, top])
    out = align_face(rgb, landmarks, size=48)
    assert out.shape == (48, 48) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - face.astype(int)).mean() < 6


def test_align_handles_rotation_and_big_faces() -> None:
    """Landmarks of a rotated, 20x-scaled face still produce an upright crop of the right size."""
    angle = np.deg2rad(30)
    rot = 20 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = FER_TEMPLATE_48 @ rot.T + np.array([900.0, 300.0])
    img = np.zeros((1500, 1500, 3), np.uint8)
    out = align_face(img, pts, size=64, gray=False)
    assert out.shape == (64, 64, 3)


def test_resize_face_is_gray_and_square() -> None:
    img = np.zeros((120, 80, 3), np.uint8)
    img[..., 1] = 255
    out = resize_face(img, size=48)
    assert out.shape == (48, 48)
    assert abs(int(out[24, 24]) - round(0.587 * 255)) <= 1
