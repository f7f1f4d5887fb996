"""The refiner GAN's data streams and training loop on tiny synthetic data: rendering, pools,
state size, and a 3-step run that resumes bit-identically (also from a copied snapshot)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from facemodels.checkpoint import CheckpointError
from facemodels.face.align import template_for
from facemodels.frontalizer.warp import MeshWarp
from facemodels.models import ModelCfg
from facemodels.models.resnet import ResNet
from training.cli import build_parser
from training.data.cfp import CfpDataset
from training.gan.refiner_data import (
    RefinerData,
    RenderConfig,
    RotateRenderer,
    aligned_targets,
    build_refiner_data,
    flip_faces,
    pad_to,
)
from training.gan.refiner_train import (
    RefinerRun,
    _check_teacher,
    get_args_parser,
    load_state,
    save_state,
    state_size,
    train,
)

_FLAT = RenderConfig(max_yaw=0, max_pitch=0, max_roll=0, width=(1, 1), height=(1, 1), depth=(1, 1),
                     nose_depth=(1, 1), nose_width=(1, 1), scale=(1, 1), shift_px=0, jitter=0,
                     contrast=(1, 1), brightness=0, gamma=(1, 1), blur_p=0, noise=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def warp() -> MeshWarp:
    return MeshWarp()


def _texture(size: int, seed: int) -> np.ndarray:
    """A smooth random face-sized texture with dark eyes and mouth at the template points."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.uniform(0, 255, (size, size)).astype(np.float32), (0, 0), size / 20)
    img = cv2.normalize(img, None, 60, 200, cv2.NORM_MINMAX)
    for x, y in template_for(size)[[0, 1, 3, 4]]:
        cv2.circle(img, (round(x), round(y)), max(1, size // 24), 20, -1)
    return img.astype(np.uint8)


def _frontals(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    faces = np.stack([_texture(size, seed * 100 + i) for i in range(n)])
    lm = template_for(size)[None] + rng.normal(0, 0.3, (n, 5, 2))
    return faces, lm


@pytest.fixture(scope="module")
def tiny_data(warp: MeshWarp) -> tuple[CfpDataset, np.ndarray, torch.Tensor, np.ndarray]:
    """A CFP-like set (ids 1-3 train, 426 held out; 3 frontals and 2 rendered profiles each) and
    16 FER-like 48x48 faces, all with landmarks."""
    renderer = RotateRenderer(warp)
    images, lms, pose, ident = [], [], [], []
    for k, pid in enumerate((1, 2, 3, 426)):
        faces, lm = _frontals(3, 64, k)
        images.append(faces)
        lms.append(lm)
        pose += [0, 0, 0]
        ident += [pid] * 3
        for j, yaw in enumerate((-70.0, 70.0)):  # profiles: the frontal turned by the renderer
            g = torch.Generator().manual_seed(10 * k + j)
            turned = renderer.render(torch.from_numpy(faces[:1]), lm[:1], g, yaw=np.array([yaw]))
            images.append(turned.images.numpy())
            lms.append(turned.landmarks)
            pose.append(1 if yaw < 0 else 2)
            ident.append(pid)
    cfp = CfpDataset(images=torch.from_numpy(np.concatenate(images)), pose=torch.tensor(pose),
                     identity=torch.tensor(ident), paths=tuple(f"p{i}" for i in range(len(pose))),
                     fingerprint="synthetic", source="synthetic")
    fer, fer_lm = _frontals(16, 48, 9)
    fer_lm[3] = np.nan  # one face without landmarks: dropped
    return cfp, np.concatenate(lms), torch.from_numpy(fer), fer_lm


def _data(tiny: tuple) -> RefinerData:
    cfp, cfp_lm, fer, fer_lm = tiny
    return build_refiner_data(cfp, cfp_lm, fer, fer_lm, val_ids=range(426, 451), fer_val=4)


def test_pools_split_ids_and_drop_faces_without_landmarks(tiny_data: tuple) -> None:
    data = _data(tiny_data)
    assert data.id_list == (1, 2, 3) and data.num_identities == 3
    assert set(data.val_frontal_cfp.person.tolist()) == {426} == set(data.val_profile.person.tolist())
    assert 426 not in data.frontal.person.tolist() and 426 not in data.profile.person.tolist()
    assert len(data.val_frontal_fer) == 4 and int((data.frontal.person < 0).sum()) == 11  # 15 found - 4
    assert data.frontal.images.shape[1:] == (64, 64)  # FER faces padded
    assert (data.frontal.identity[data.frontal.person < 0] == -1).all()
    cfp, cfp_lm, fer, fer_lm = tiny_data
    bad = CfpDataset(images=cfp.images, pose=cfp.pose, identity=cfp.identity.clone().fill_(451),
                     paths=cfp.paths, fingerprint="x", source="x")
    with pytest.raises(ValueError, match="001-450"):
        build_refiner_data(bad, cfp_lm, fer, fer_lm)


def test_padding_samples_like_the_small_face(warp: MeshWarp) -> None:
    faces, lm = _frontals(2, 48, 3)
    padded, plm = pad_to(torch.from_numpy(faces), lm)
    small = warp.frontalize(faces, lm)
    big = warp.frontalize(padded.numpy(), plm)
    np.testing.assert_array_equal(small, big)


def test_flip_twice_is_identity_and_swaps_sides() -> None:
    faces, lm = _frontals(3, 64, 4)
    t = torch.from_numpy(faces)
    flip = np.array([True, False, True])
    f1, l1 = flip_faces(t, lm, flip)
    assert torch.equal(f1[1], t[1]) and torch.equal(f1[0], t[0].flip(-1))
    np.testing.assert_allclose(l1[0, 0, 0], 63 - lm[0, 1, 0])  # new image-left eye = old right eye
    assert (l1[:, 0, 0] < l1[:, 1, 0]).all()  # still image-left first
    f2, l2 = flip_faces(f1, l1, flip)
    assert torch.equal(f2, t)
    np.testing.assert_allclose(l2, lm)


def test_render_round_trip_and_turning(warp: MeshWarp) -> None:
    faces, lm = _frontals(4, 64, 5)
    src = torch.from_numpy(faces)
    flat = RotateRenderer(warp, _FLAT).render(src, lm, torch.Generator().manual_seed(0))
    assert flat.images.dtype == torch.uint8 and flat.targets.shape == (4, 1, 64, 64)
    back = warp.frontalize(flat.images.numpy(), flat.landmarks).astype(float)
    err = np.abs(back - flat.targets[:, 0].numpy())[:, warp.raster.mask].mean()
    assert err < 6.0, err  # render + warp back = the aligned original, up to resampling
    np.testing.assert_allclose(flat.targets, aligned_targets(warp, src, lm), atol=3.0)

    renderer = RotateRenderer(warp)
    a = renderer.render(src, lm, torch.Generator().manual_seed(1))
    b = renderer.render(src, lm, torch.Generator().manual_seed(1))
    assert torch.equal(a.images, b.images) and np.array_equal(a.landmarks, b.landmarks)  # seeded
    turned = a.yaw
    assert np.abs(turned).max() > 20
    fit = warp.fit(a.landmarks).yaw
    big = np.abs(turned) > 30
    assert (np.sign(fit[big]) == np.sign(turned[big])).all()  # the warp sees the turn
    assert np.isfinite(a.landmarks).all() and (a.landmarks > -5).all() and (a.landmarks < 69).all()
    assert np.abs(a.images.float().numpy() - faces).mean() > 5  # not the source


def _tiny_args(**over: object) -> argparse.Namespace:
    args = get_args_parser().parse_args([])
    settings = dict(width=4, d_width=4, embed_width=4, embed_dim=8, batch_size=6, embedder_steps=2,
                    embedder_batch=4, steps=3, save_every=1, eval_every=3, log_every=1, val_renders=4,
                    fer_val=4, seed=5)
    settings.update(over)
    for k, v in settings.items():
        setattr(args, k, v)
    return args


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return ResNet((1, 1), (8, 8), num_classes=7, cfg=ModelCfg(), stem_chs=(8,), stem_strides=(2,))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.mark.slow
def test_three_steps_write_state_and_resume_bit_identically(tiny_data: tuple, tmp_path: Path) -> None:
    data = _data(tiny_data)
    straight, split, copy = tmp_path / "straight", tmp_path / "split", tmp_path / "copy"
    row = train(_tiny_args(), data, _teacher(), straight)
    assert row["step"] == 3 and np.isfinite(row["g_loss"])
    state = json.loads((straight / "state" / "state.json").read_text())
    assert state["step"] == 3 and state["embedder_trained"] and state["ema_updates"] == 3
    for name in ("g", "g_ema", "d", "embedder", "opt_g_state", "opt_d_state"):
        assert (straight / "state" / f"{name}.safetensors").is_file(), name
    for name in ("best.safetensors", "best.json", "last.json", "final.json", "losses.jsonl",
                 "selection.jsonl"):
        assert (straight / name).is_file(), name
    card = json.loads((straight / "final.json").read_text())
    assert card["arch"] == "frontal_refiner" and card["steps_trained"] == 3
    assert state["baseline"]["score"] == pytest.approx(state["baseline"]["score"])  # recorded (not NaN)
    g = load_file(str(straight / "state" / "g.safetensors"))
    assert g["net.head.weight"][:2].abs().sum() > 0  # the flow head has left zero

    # stop after 2 steps, then resume in place for the third
    train(_tiny_args(step_budget=2), data, _teacher(), split)
    assert json.loads((split / "state" / "state.json").read_text())["step"] == 2
    shutil.copytree(split / "state", tmp_path / "snapshot")  # e.g. committed to the repository
    train(_tiny_args(), data, _teacher(), split)
    # and from the copied snapshot into a fresh run folder
    train(_tiny_args(resume_from=tmp_path / "snapshot"), data, _teacher(), copy)
    want = _tensors(straight / "state")
    for other in (split, copy):
        got = _tensors(other / "state")
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(want[k], got[k]), (other.name, k)
        rows = [json.loads(x) for x in (other / "losses.jsonl").read_text().splitlines()]
        ref = [json.loads(x) for x in (straight / "losses.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == ([1, 2, 3] if other is split else [3])
        assert rows[-1]["g_loss"] == ref[-1]["g_loss"]
        assert json.loads((other / "state" / "state.json").read_text())["step"] == 3


def test_state_size_at_default_width(tmp_path: Path) -> None:
    args = get_args_parser().parse_args([])
    run = RefinerRun.build(args, num_identities=425, generator=torch.Generator())
    assert sum(p.numel() for p in run.g.parameters()) <= 1_000_000
    for opt in (run.opt_g, run.opt_d):  # materialise Adam's moments
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
    save_state(tmp_path / "state", run)
    size = state_size(tmp_path / "state")
    assert 8e6 < size < 15e6, size
    save_state(tmp_path / "state", run)  # a second save swaps the folder in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    # a save cut off between its two renames leaves only the previous state: it is used
    (tmp_path / "state").rename(tmp_path / ".state.old")
    fresh = RefinerRun.build(args, num_identities=425, generator=torch.Generator())
    assert load_state(tmp_path / "state", fresh)["step"] == 0
    torch.testing.assert_close(fresh.g.state_dict(), run.g.state_dict())
    other = RefinerRun.build(_tiny_args(), num_identities=425, generator=torch.Generator())
    with pytest.raises(CheckpointError, match="made with"):
        load_state(tmp_path / ".state.old", other)
    with pytest.raises(CheckpointError, match="no refiner state"):
        load_state(tmp_path / "nowhere", fresh)


def test_command_and_teacher_guard() -> None:
    args = build_parser().parse_args(["refiner", "--steps", "5", "--name", "r1"])
    assert args.steps == 5 and args.name == "r1" and args.w_adv == pytest.approx(0.05)
    with pytest.raises(ValueError, match="checkpoints/default"):
        _check_teacher(Path("checkpoints/default"))
    _check_teacher(Path("results/weights/ensemble_2026-11-25"))
