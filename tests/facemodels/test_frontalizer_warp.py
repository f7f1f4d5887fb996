"""Warp-only frontaliser: the mesh and its five points, the pose fit, the raster, the warp."""

from __future__ import annotations

from importlib import resources

import cv2
import numpy as np
import pytest
import torch

from facemodels.face.align import align_face, template_for
from facemodels.face.detector import RetinaFaceDetector
from facemodels.face.pose import estimate_yaw
from facemodels.frontalizer.model import default_cfg
from facemodels.frontalizer.warp import (
    DEFAULT_SIZE,
    EYE_CONTOURS,
    LANDMARK_VERTICES,
    MeshWarp,
    WeakPerspectivePose,
    fit_pose,
    load_face_mesh,
    template_y_scale,
)
from tests.support import require_shared

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def warp() -> MeshWarp:
    return MeshWarp()


def _pose(n: int, rng: np.random.Generator, *, max_yaw: float = 80.0) -> WeakPerspectivePose:
    return WeakPerspectivePose(yaw=rng.uniform(-max_yaw, max_yaw, n), roll=rng.uniform(-20, 20, n),
                               scale=rng.uniform(1.0, 6.0, n), t=rng.uniform(20, 200, (n, 2)),
                               rms=np.zeros(n))


def _smooth_texture(size: int, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).uniform(0, 255, (size, size)).astype(np.float32)
    return cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 3), None, 20, 235, cv2.NORM_MINMAX).astype(np.uint8)


# --------------------------------------------------------------------------- mesh


def test_vendored_mesh_loads_with_its_licence() -> None:
    assets = resources.files("facemodels.frontalizer").joinpath("assets")
    assert "Apache License" in assets.joinpath("LICENSE").read_text()
    mesh = load_face_mesh()
    assert mesh.vertices.shape == (468, 3) and mesh.triangles.shape == (898, 3)
    mirror = mesh.mirror_index()
    np.testing.assert_allclose(mesh.vertices[mirror], mesh.vertices * [-1, 1, 1], atol=1e-6)
    assert (mirror[mirror] == np.arange(468)).all()


def test_five_point_mapping_is_in_detector_order() -> None:
    mesh = load_face_mesh()
    mirror = mesh.mirror_index()
    assert sorted(mirror[list(EYE_CONTOURS[0])]) == sorted(EYE_CONTOURS[1])
    assert len(set(EYE_CONTOURS[0])) == 16
    pts = mesh.landmarks5()
    left_eye, right_eye, nose, mouth_l, mouth_r = pts
    assert left_eye[0] < 0 < right_eye[0] and mouth_l[0] < 0 < mouth_r[0]  # image-left first
    np.testing.assert_allclose(left_eye * [-1, 1, 1], right_eye, atol=1e-9)
    np.testing.assert_allclose(mouth_l * [-1, 1, 1], mouth_r, atol=1e-9)
    assert nose[0] == 0 and mouth_l[1] < nose[1] < left_eye[1]  # +y is up
    assert nose[2] > max(left_eye[2], mouth_l[2]) + 3  # the nose stands out
    # each eye centre lies inside its contour's box
    for eye, contour in zip(pts[:2], EYE_CONTOURS, strict=True):
        c = mesh.vertices[list(contour)]
        assert (c.min(0)[:2] < eye[:2]).all() and (eye[:2] < c.max(0)[:2]).all()
    assert [len(v) for v in LANDMARK_VERTICES] == [16, 16, 1, 1, 1]


def test_calibrated_mesh_lands_on_the_fer_template(warp: MeshWarp) -> None:
    assert 0.85 < template_y_scale(load_face_mesh()) < 0.98
    r = warp.raster
    q = warp.model_points
    projected = r.scale * np.stack([q[:, 0], -q[:, 1]], 1) + r.centre
    err = np.linalg.norm(projected - template_for(warp.size), axis=1)
    assert err.max() < 0.6, err  # output pixels at 64


# --------------------------------------------------------------------------- pose


def test_pose_fit_recovers_a_synthetic_pose(warp: MeshWarp) -> None:
    rng = np.random.default_rng(1)
    truth = _pose(40, rng)
    landmarks = truth.project(warp.model_points)
    fit = warp.fit(landmarks)
    np.testing.assert_allclose(fit.yaw, truth.yaw, atol=0.02)
    np.testing.assert_allclose(fit.roll, truth.roll, atol=0.01)
    np.testing.assert_allclose(fit.scale, truth.scale, rtol=1e-3)
    np.testing.assert_allclose(fit.t, truth.t, atol=0.02)
    assert fit.rms.max() < 0.02
    # our yaw sign is estimate_yaw's: positive when the nose points to the image's right
    big = np.abs(truth.yaw) > 10
    assert (np.sign(estimate_yaw(landmarks))[big] == np.sign(truth.yaw)[big]).all()
    # with landmark noise of 2% of the eye-mouth distance the yaw stays within a few degrees
    h = np.linalg.norm(landmarks[:, :2].mean(1) - landmarks[:, 3:].mean(1), axis=1)
    noisy = landmarks + rng.normal(0, 1, landmarks.shape) * 0.02 * h[:, None, None]
    assert np.median(np.abs(warp.fit(noisy).yaw - truth.yaw)) < 4.0


def test_pose_fit_with_a_given_yaw_and_bad_input(warp: MeshWarp) -> None:
    truth = _pose(5, np.random.default_rng(2))
    fit = fit_pose(truth.project(warp.model_points), warp.model_points, yaw=truth.yaw)
    np.testing.assert_array_equal(fit.yaw, truth.yaw)
    np.testing.assert_allclose(fit.scale, truth.scale, rtol=1e-6)
    single = fit_pose(truth.project(warp.model_points)[0], warp.model_points)
    assert len(single) == 1
    with pytest.raises(ValueError, match="finite"):
        warp.fit(np.full((1, 5, 2), np.nan))
    with pytest.raises(ValueError, match="degenerate"):
        warp.fit(np.ones((1, 5, 2)))
    with pytest.raises(ValueError, match=r"\(N, 5, 2\)"):
        warp.fit(np.zeros((2, 4, 2)))


# --------------------------------------------------------------------------- raster and warp


def test_raster_covers_the_face_once(warp: MeshWarp) -> None:
    r = warp.raster
    assert r.points.shape == (64, 64, 3) and r.mask.dtype == bool
    assert 0.55 < r.mask.mean() < 0.85  # a face, not the whole square
    assert not r.mask[0].any() and not r.mask[:, 0].any()
    assert (r.alpha[~r.mask] == 0).all() and (r.alpha[r.mask] > 0).all()
    np.testing.assert_allclose(np.linalg.norm(r.normals[r.mask], axis=1), 1, atol=1e-4)
    assert (r.normals[r.mask][:, 2] > 0).mean() > 0.99  # seen from the front
    # the frontal projection of each pixel's point is the pixel itself
    ys, xs = np.mgrid[:64, :64]
    proj = r.scale * np.stack([r.points[..., 0], -r.points[..., 1]], -1) + r.centre
    err = np.abs(proj - np.stack([xs, ys], -1))[r.mask]
    assert err.max() < 1e-3
    assert np.median(warp.visibility(0.0)[0][r.mask]) == 1.0


def test_yaw_zero_is_close_to_identity(warp: MeshWarp) -> None:
    face = _smooth_texture(64)
    landmarks = template_for(64)[None]
    out = warp.warp(face[None], landmarks)
    assert abs(out.pose.yaw[0]) < 3 and abs(out.pose.roll[0]) < 0.5
    own, _, background = warp.grids(out.pose)
    ys, xs = np.mgrid[:64, :64]
    ident = np.stack([xs, ys], -1)
    assert np.abs(own[0] - ident)[warp.raster.mask].max() < 1.0
    assert np.abs(background[0] - ident).max() < 1.0
    assert out.own_weight.min() > 0.8  # nothing is mirrored
    diff = np.abs(out.faces[0].numpy().astype(int) - face.astype(int))
    assert diff.mean() < 1.5, diff.mean()


def test_a_turned_similarity_is_undone(warp: MeshWarp) -> None:
    """A frontal face rotated, scaled and shifted in 2D comes back to the FER framing."""
    face = _smooth_texture(64, seed=3)
    m = cv2.getRotationMatrix2D((32, 32), 25, 1.7)
    m[:, 2] += (30, 40)
    big = cv2.warpAffine(face, m, (180, 180), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    lm = template_for(64) @ m[:, :2].T + m[:, 2]
    back = warp.frontalize(big[None], lm[None])[0]
    inner = (slice(8, 56), slice(8, 56))
    assert np.abs(back[inner].astype(int) - face[inner].astype(int)).mean() < 3.0


def test_large_photos_are_shrunk_before_sampling(warp: MeshWarp) -> None:
    face = _smooth_texture(64, seed=4)
    big = cv2.resize(face, (256, 256), interpolation=cv2.INTER_NEAREST)
    lm = template_for(64)
    small = warp.frontalize(face[None], lm[None])[0].astype(int)
    large = warp.frontalize(big[None], (lm * 4 + 1.5)[None])[0].astype(int)
    assert np.abs(small - large).mean() < 2.0


def test_hidden_pixels_take_the_mirror(warp: MeshWarp) -> None:
    """At yaw 50 (nose to the image's right) the image-right half is hidden: it is sampled at
    the mirror point, on the visible side. The input is a horizontal ramp, so a pixel's value
    says where in the input it came from."""
    truth = WeakPerspectivePose(yaw=np.array([50.0]), roll=np.zeros(1), scale=np.array([3.0]),
                                t=np.array([[64.0, 60.0]]), rms=np.zeros(1))
    ramp = np.tile(np.arange(128, dtype=np.uint8) * 2, (128, 1))
    out = warp.warp(ramp[None], truth.project(warp.model_points))
    assert abs(out.pose.yaw[0] - 50) < 0.05
    w, mask = out.own_weight[0].numpy(), warp.raster.mask
    cx = round(float(warp.raster.centre[0]))
    right, left = mask.copy(), mask.copy()
    right[:, :cx + 4], left[:, cx - 4:] = False, False
    assert (w[right] < 0.1).mean() > 0.5  # most of the far side is mirrored
    assert (w[left] > 0.99).mean() > 0.95  # the near side is not
    own, mirror, _ = warp.grids(out.pose)
    hidden = mask & (w < 0.01) & (warp.raster.alpha == 1)
    assert hidden.sum() > 200
    got = out.faces[0].numpy()[hidden].astype(float)
    np.testing.assert_allclose(got, 2 * mirror[0][hidden][:, 0], atol=1.0)
    assert np.abs(got - 2 * own[0][hidden][:, 0]).mean() > 10  # not the own sample
    vis = out.visibility[0].numpy()
    assert vis[right].mean() < 0.4 < 0.9 < vis[left].mean()


def test_output_types_and_shapes(warp: MeshWarp) -> None:
    rng = np.random.default_rng(5)
    pose = _pose(3, rng, max_yaw=60)
    pose = WeakPerspectivePose(pose.yaw, pose.roll, np.full(3, 2.0), np.full((3, 2), 50.0), pose.rms)
    lm = pose.project(warp.model_points)
    gray = rng.integers(0, 256, (3, 100, 100), dtype=np.uint8)
    out = warp.frontalize(gray, lm)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (3, 64, 64)
    assert warp.size == DEFAULT_SIZE == default_cfg().image_size  # the GAN's framing, not imported
    t = warp.frontalize(torch.from_numpy(gray), lm)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8
    np.testing.assert_array_equal(t.numpy(), out)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    out_rgb = warp.frontalize(rgb, lm)
    assert out_rgb.shape == (3, 64, 64, 3)
    np.testing.assert_array_equal(out_rgb[..., 1], out)
    assert warp.frontalize(gray[:0], lm[:0]).shape == (0, 64, 64)
    assert MeshWarp(48).frontalize(gray[:1], lm[:1]).shape == (1, 48, 48)
    with pytest.raises(ValueError, match="uint8"):
        warp.frontalize(gray.astype(np.float32), lm)
    with pytest.raises(ValueError, match="landmarks"):
        warp.frontalize(gray, lm[:2])


# --------------------------------------------------------------------------- real photos


def _fit_error(warp: MeshWarp, landmarks: np.ndarray, model: np.ndarray | None = None) -> np.ndarray:
    """Per face and landmark: distance from the fitted projection, over the eye-mouth distance."""
    model = warp.model_points if model is None else model
    pose = fit_pose(landmarks, model)
    h = np.linalg.norm(landmarks[:, :2].mean(1) - landmarks[:, 3:].mean(1), axis=1)
    return np.linalg.norm(pose.project(model) - landmarks, axis=2) / h[:, None]


def test_mesh_fits_a_real_frontal_face(warp: MeshWarp, detector: RetinaFaceDetector,
                                       face_image: np.ndarray) -> None:
    dets = detector.detect([face_image])[0]
    lm = np.asarray(dets[0].landmarks, dtype=np.float64)[None]
    err = _fit_error(warp, lm)
    assert err.max() < 0.12, err
    gray = cv2.cvtColor(face_image, cv2.COLOR_RGB2GRAY)
    out = warp.warp(gray[None], lm)
    assert abs(out.pose.yaw[0]) < 20
    # near-frontal: the warp is close to the plain 2D alignment the classifiers get
    aligned = align_face(gray, lm[0], size=64).astype(float)
    corr = np.corrcoef(out.faces[0].numpy().astype(float).ravel(), aligned.ravel())[0, 1]
    assert corr > 0.9, corr


@pytest.mark.shared_data
def test_mesh_fits_cfp_frontal_photos(warp: MeshWarp, detector: RetinaFaceDetector) -> None:
    """The five-point mapping checked on real frontal photos: fitted, the mesh's eye centres land
    within a few percent of the eye-mouth distance of the detector's, nose and mouth corners
    within about a tenth (face shape and expression vary), and vertex 1 is the better nose tip."""
    root = require_shared("cfp")
    paths = sorted((root / "Data" / "Images").glob("45[1-4]/frontal/0[1-5].jpg"))
    assert len(paths) == 20
    found = []
    for path in paths:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        dets = detector.detect([image])[0]
        if dets:
            found.append(np.asarray(dets[0].landmarks, dtype=np.float64))
    lm = np.stack(found)
    assert len(lm) >= 18
    err = _fit_error(warp, lm)
    med = np.median(err, 0)
    assert med[:2].max() < 0.05 and med[2:].max() < 0.15 and np.median(err.max(1)) < 0.2, med
    assert np.median(np.abs(warp.fit(lm).yaw)) < 8
    other_nose = warp.model_points.copy()
    other_nose[2] = warp.mesh.vertices[4]
    assert np.median(_fit_error(warp, lm, other_nose)[:, 2]) > np.median(err[:, 2])
