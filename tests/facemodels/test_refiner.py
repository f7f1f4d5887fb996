"""The warp refiner: exact warp-only at init, bounded flow that re-samples the input, the
uint8 pipeline and its checkpoint."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facemodels.checkpoint import load_checkpoint, save_checkpoint
from facemodels.face.align import template_for
from facemodels.face.detector import RetinaFaceDetector
from facemodels.frontalizer.refiner import (
    REFINER_ARCH,
    FrontalRefiner,
    displace_grid,
    frontal_refiner,
    frontalize,
    load_refiner,
)
from facemodels.frontalizer.warp import MeshWarp, WeakPerspectivePose, sample_input
from facemodels.models import ModelCfg, create_model
from tests.support import require_shared

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def warp() -> MeshWarp:
    return MeshWarp()


def _turned_photos(face_image: np.ndarray, detector: RetinaFaceDetector) -> tuple[np.ndarray, np.ndarray]:
    """The fixture photo and three similarity-transformed copies (gray), with detected landmarks."""
    gray = cv2.cvtColor(face_image, cv2.COLOR_RGB2GRAY)
    images, landmarks = [], []
    for angle, scale in ((0, 1.0), (20, 1.3), (-15, 0.8), (5, 0.6)):
        m = cv2.getRotationMatrix2D((160, 160), angle, scale)
        img = cv2.warpAffine(gray, m, (320, 320), borderMode=cv2.BORDER_REFLECT)
        dets = detector.detect([cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)])[0]
        assert dets, (angle, scale)
        images.append(img)
        landmarks.append(np.asarray(dets[0].landmarks, dtype=np.float64))
    return np.stack(images), np.stack(landmarks)


def _assert_warp_only(refiner: FrontalRefiner, warp: MeshWarp, images: np.ndarray, lm: np.ndarray) -> None:
    refined = frontalize(images, lm, refiner, warp=warp).astype(int)
    plain = warp.frontalize(images, lm).astype(int)
    assert refined.shape == plain.shape
    diff = np.abs(refined - plain)
    assert diff.max() <= 1, diff.max()  # 1/255
    assert diff.mean() < 0.01
    assert plain.std() > 10  # real faces, not a flat image


def test_fresh_refiner_is_warp_only_on_real_faces(warp: MeshWarp, detector: RetinaFaceDetector,
                                                  face_image: np.ndarray) -> None:
    images, lm = _turned_photos(face_image, detector)
    _assert_warp_only(frontal_refiner(), warp, images, lm)


@pytest.mark.shared_data
def test_fresh_refiner_is_warp_only_on_cfp_profiles(warp: MeshWarp, detector: RetinaFaceDetector) -> None:
    """Real profiles, where the mirror fill matters: CFP training ids 001-003, full photos."""
    root = require_shared("cfp")
    paths = sorted((root / "Data" / "Images").glob("00[1-3]/profile/0[1-2].jpg"))
    images, landmarks = [], []
    for path in paths:
        img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2GRAY)
        dets = detector.detect([cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)])[0]
        if dets:
            images.append(cv2.resize(img, (250, 250), interpolation=cv2.INTER_AREA))
            landmarks.append(np.asarray(dets[0].landmarks) * [250 / img.shape[1], 250 / img.shape[0]])
    assert len(images) >= 4
    lm = np.stack(landmarks)
    assert np.abs(warp.fit(lm).yaw).min() > 25  # turned faces
    _assert_warp_only(frontal_refiner(), warp, np.stack(images), lm)


def test_zero_flow_keeps_the_grid_and_a_flow_shifts_it() -> None:
    rng = np.random.default_rng(0)
    for s in (64, 48):
        grid = torch.from_numpy(rng.uniform(0, 100, (2, 3 * s, s, 2)).astype(np.float32))
        same = displace_grid(grid, torch.zeros(2, s, s, 2))
        tol = 0.0 if s == 64 else 1e-3
        assert (same - grid).abs().max() <= tol
    # an affine grid read at p + (1.5, -0.5) is the grid's value there
    s = 64
    ys, xs = np.mgrid[:s, :s].astype(np.float32)
    affine = np.stack([2 * xs + 3, -ys + 7], -1)[None]
    grid = torch.from_numpy(np.concatenate([affine] * 3, 1))
    moved = displace_grid(grid, torch.tensor([1.5, -0.5]).expand(1, s, s, 2)).numpy()
    inner = (slice(None), slice(4, s - 4), slice(4, s - 4))
    np.testing.assert_allclose(moved[:, :s][inner][..., 0], (2 * (xs + 1.5) + 3)[4:-4, 4:-4][None], atol=1e-4)
    np.testing.assert_allclose(moved[:, :s][inner][..., 1], (-(ys - 0.5) + 7)[4:-4, 4:-4][None], atol=1e-4)


def _poses(n: int, seed: int) -> WeakPerspectivePose:
    rng = np.random.default_rng(seed)
    return WeakPerspectivePose(yaw=rng.uniform(-70, 70, n), roll=rng.uniform(-10, 10, n),
                               scale=rng.uniform(2.5, 4.0, n), t=rng.uniform(45, 55, (n, 2)), rms=np.zeros(n))


def test_flow_is_bounded_and_resamples_the_input(warp: MeshWarp) -> None:
    refiner = frontal_refiner(max_flow=2.5)
    head = refiner.net.head
    with torch.no_grad():  # a wild head: large random weights on every channel
        head.weight.normal_(0, 5.0)
        head.bias.normal_(0, 5.0)
    pose = _poses(4, 1)
    lm = pose.project(warp.model_points)
    src = torch.from_numpy(np.random.default_rng(2).uniform(0, 255, (4, 1, 100, 100)).astype(np.float32))
    out = refiner.refine(src, warp.fields(lm), warp)
    assert out.flow.shape == (4, 64, 64, 2)
    assert out.flow.abs().max() <= 2.5 + 1e-5
    assert out.flow.abs().max() > 2.0  # the bound is reached, not just respected by a tiny net
    assert ((out.mask > 0) & (out.mask < 1)).all()
    # the faces are the input re-sampled at the displaced grids (plus the masked residual)
    fields = warp.fields(lm)
    moved = sample_input(src, displace_grid(fields.grid, out.flow), fields.factor)
    expect = warp.blend(moved, fields.own_weight)
    torch.testing.assert_close(out.faces, expect + out.mask * out.residual)
    assert (out.faces - out.warped).abs().mean() > 1.0


def test_training_signal_reaches_flow_and_inpainting_at_init(warp: MeshWarp) -> None:
    """The zero-initialised head must still get gradients, or training could not leave warp-only."""
    refiner = frontal_refiner(width=8)
    lm = _poses(3, 3).project(warp.model_points)
    src = torch.from_numpy(cv2.GaussianBlur(np.random.default_rng(4).uniform(0, 255, (100, 100)), (0, 0), 3)
                           .astype(np.float32))[None, None].expand(3, 1, 100, 100)
    out = refiner.refine(src, warp.fields(lm), warp)
    (out.faces - 128).pow(2).mean().backward()
    grad = refiner.net.head.weight.grad
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0  # flow
    assert grad[3].abs().sum() > 0  # inpainting residual


def test_parameters_checkpoint_and_loading(tmp_path: Path, warp: MeshWarp) -> None:
    refiner = frontal_refiner()
    assert sum(p.numel() for p in refiner.parameters()) <= 1_000_000
    with torch.no_grad():
        for p in refiner.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(tmp_path / "refiner", refiner, arch=REFINER_ARCH,
                    model_kwargs={"width": 16, "max_flow": 3.0})
    loaded = load_refiner(str(tmp_path / "refiner"))
    model, card = load_checkpoint(tmp_path / "refiner")
    assert card["arch"] == REFINER_ARCH and isinstance(model, FrontalRefiner)
    lm = _poses(2, 5).project(warp.model_points)
    faces = np.random.default_rng(6).integers(0, 256, (2, 100, 100), dtype=np.uint8)
    a, b = frontalize(faces, lm, refiner, warp=warp), frontalize(faces, lm, loaded, warp=warp)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - warp.frontalize(faces, lm)).mean() > 0.5  # trained weights act
    other = create_model("compact_resnet_s")
    save_checkpoint(tmp_path / "classifier", other, arch="compact_resnet_s")
    with pytest.raises(ValueError, match="not a frontal_refiner"):
        load_refiner(str(tmp_path / "classifier"))
    with pytest.raises(ValueError, match="one output"):
        frontal_refiner(num_classes=7)
    with pytest.raises(ValueError, match="gray"):
        FrontalRefiner(ModelCfg(image_size=64, input_size=60, in_chans=1, mean=(0.5,), std=(0.5,),
                                class_names=("frontal",)))


def test_frontalize_types_and_warp_only_fallback(warp: MeshWarp) -> None:
    lm = _poses(3, 7).project(warp.model_points)
    gray = np.random.default_rng(8).integers(0, 256, (3, 100, 100), dtype=np.uint8)
    refiner = frontal_refiner(width=8)
    out = frontalize(gray, lm, refiner, warp=warp)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (3, 64, 64)
    t = frontalize(torch.from_numpy(gray), lm, refiner, warp=warp)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8
    np.testing.assert_array_equal(t.numpy(), out)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    np.testing.assert_array_equal(frontalize(rgb, lm, refiner, warp=warp), out)  # gray in, gray out
    np.testing.assert_array_equal(frontalize(gray, lm, None, warp=warp), warp.frontalize(gray, lm))
    np.testing.assert_array_equal(frontalize(gray, lm, refiner, warp=warp, batch_size=2), out)
    assert frontalize(gray[:0], lm[:0], refiner, warp=warp).shape == (0, 64, 64)
    with pytest.raises(ValueError, match="landmarks"):
        frontalize(gray, lm[:2], refiner, warp=warp)
    with pytest.raises(ValueError, match="uint8"):
        frontalize(gray.astype(np.float32), lm, refiner, warp=warp)
    with pytest.raises(ValueError, match="px"):
        frontalize(gray, lm, refiner, warp=MeshWarp(48))
    # a frontal face at yaw 0 passes nearly unchanged through a fresh refiner
    face = cv2.GaussianBlur(np.random.default_rng(9).uniform(0, 255, (64, 64)), (0, 0), 3).astype(np.uint8)
    back = frontalize(face[None], template_for(64)[None], frontal_refiner(), warp=warp)[0]
    assert np.abs(back.astype(int) - face).mean() < 2.0
