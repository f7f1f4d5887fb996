"""The warp-only baseline in ``fer-train eval-frontalizer``: CFP and FER adapters, FF pairs, the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from facemodels.face.align import template_for
from facemodels.face.detector import RetinaFaceDetector
from facemodels.frontalizer.warp import MeshWarp
from tests.support import require_shared
from training.cli import main as cli_main
from training.data.cfp import load_cfp
from training.gan.evaluate import _aligned_control, evaluate_identity
from training.gan.fer_eval import NO_FACE, evaluate_fer
from training.gan.identity import protocol_pairs
from training.gan.warp_eval import WarpFrontaliser, cfp_crop_landmarks, pose_fit_summary


class ShadeEmbedder:
    """A face's mean brightness as a unit 2-vector. Each id of the synthetic CFP tree has its own
    shade under the noise, so this tells the ids apart (pixel correlation does not: AUC 0.5)."""

    name = "shade"

    def embed(self, faces: np.ndarray) -> np.ndarray:
        angle = faces.reshape(len(faces), -1).mean(1) / 255.0 * (np.pi / 2)
        return np.stack([np.cos(angle), np.sin(angle)], 1)


def _add_ff_protocol(root: Path) -> None:
    """FF fold 10 over the tree's evaluation frontals (``Pair_list_F`` rows 10-15 are ids 451-452)."""
    f_list = (root / "Protocol" / "Pair_list_F.txt").read_text().split("\n")
    ev = [int(line.split()[0]) for line in f_list if line and "/45" in line]
    pid = {int(line.split()[0]): line.split("/")[3] for line in f_list if line}
    same = [(a, b) for a in ev for b in ev if a < b and pid[a] == pid[b]]
    diff = [(a, b) for a in ev for b in ev if a < b and pid[a] != pid[b]]
    folder = root / "Protocol" / "Split" / "FF" / "10"
    folder.mkdir(parents=True)
    for name, pairs in (("same", same), ("diff", diff)):
        (folder / f"{name}.txt").write_text("".join(f"{a},{b}\n" for a, b in pairs))


def test_cfp_adapter_identity_and_ff_pairs(make_cfp_tree: Callable[..., Path]) -> None:
    root = make_cfp_tree()
    _add_ff_protocol(root)
    ev = load_cfp(root, size=64, use_cache=False).split("eval")
    frontal, profile = ev.subset(ev.pose == 0), ev.subset(ev.pose != 0)
    pairs, same = protocol_pairs(root, list(frontal.paths), list(frontal.paths), split="FF")
    assert same.sum() == 6 and (~same).sum() == 9
    assert (frontal.identity[pairs[same, 0]] == frontal.identity[pairs[same, 1]]).all()
    with pytest.raises(ValueError, match="FP' or 'FF"):
        protocol_pairs(root, [], [], split="PP")

    warp = MeshWarp(64)
    # landmarks for every frontal crop (the template: the FER framing), none for the profiles
    lms = {p: template_for(64) for p in frontal.paths}
    wf = WarpFrontaliser(warp, lms)
    out = wf.cfp(ev)
    assert out.shape == (len(ev), 64, 64) and out.dtype == torch.uint8
    is_profile = (ev.pose != 0).numpy()
    np.testing.assert_array_equal(out[is_profile].numpy(), ev.images[is_profile].numpy())  # passed through
    assert (out[~is_profile] != ev.images[~is_profile]).any()  # warped (resampled)
    diff = (out[~is_profile].float() - ev.images[~is_profile].float()).abs().mean()
    assert diff < 12  # near-frontal landmarks: close to the input
    res = evaluate_identity(wf.cfp, root, frontal, profile, ShadeEmbedder())
    assert set(res) >= {"FP fold 10", "all F x P pairs", "FF fold 10"}
    for pair_name in ("FP fold 10", "all F x P pairs"):  # profiles without landmarks pass through
        assert res[pair_name]["frontalised"] == res[pair_name]["raw"]
    ff = res["FF fold 10"]
    assert ff["same"] == 6 and ff["different"] == 9
    # both photos warped near yaw 0: each keeps its identity (the raw crops separate the ids)
    assert ff["raw"]["auc"] == 1.0 and ff["frontalised"]["auc"] >= ff["raw"]["auc"] - 0.05
    landmarks = np.stack([lms.get(p, np.full((5, 2), np.nan)) for p in ev.paths])
    fit = pose_fit_summary(warp, ev, landmarks)
    assert fit["frontal"]["found"] == len(frontal) and abs(fit["frontal"]["yaw_median"]) < 3
    assert "left_profile" not in fit  # no landmarks there


def test_fer_adapter_resizes_and_passes_misses_through() -> None:
    from facemodels.models import create_model

    torch.manual_seed(0)
    classifier = create_model("compact_resnet_s").eval()
    faces = torch.randint(0, 256, (4, 48, 48), dtype=torch.uint8)
    sym = template_for(48)
    res = evaluate_fer(WarpFrontaliser(MeshWarp(64)).fer, classifier, faces, torch.arange(4),
                       [sym, None, sym, None])
    assert res.frontalised.shape == (4, 48, 48) and res.inputs.shape == (4, 64, 64)
    rows = {name: n for name, n, _, _ in res.rows()}
    assert rows["all"] == 4 and rows[NO_FACE] == 2
    # a face without landmarks comes back as itself (resized up and down again)
    back = res.frontalised[1].float()
    assert (back - faces[1].float()).abs().mean() < 40  # random noise loses its finest detail
    # the framing control: plain 2D alignment of the same faces, untouched where no landmarks
    control = _aligned_control(res, classifier, faces, [sym, None, sym, None])
    assert control.frontalised.shape == (4, 48, 48)
    assert torch.equal(control.frontalised[1], faces[1]) and torch.equal(control.pred_orig, res.pred_orig)


def test_warp_only_cli(make_cfp_tree: Callable[..., Path], detector_weights: Path, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FER_CACHE_DIR", str(detector_weights.parent.parent))
    root = make_cfp_tree()
    sheet, out = tmp_path / "warp.png", tmp_path / "warp.json"
    args = ["eval-frontalizer", "--warp-only", "--data", str(root), "--cache-dir", str(tmp_path / "c"),
            "--skip-identity", "--skip-fer", "--sheet", str(sheet), "--output", str(out), "--threads", "1"]
    assert cli_main(args) == 0
    assert sheet.stat().st_size > 500
    res = json.loads(out.read_text())
    assert res["frontaliser"] == "warp-only" and res["warp"]["cfp_photos"] == 10
    assert "cfp_pose_accuracy" not in res  # no pose head without a GAN
    assert cli_main([*args, "--update-card"]) == 2  # no checkpoint card to update


@pytest.mark.shared_data
def test_detected_landmarks_map_into_the_cfp_crops(detector: RetinaFaceDetector, tmp_path: Path) -> None:
    """Detector points from the full photo, mapped by the crop's framing: on frontal crops (the
    FER framing) they sit near the template, on profiles the nose is on the side it points to."""
    data = load_cfp(require_shared("cfp"), size=64, ids=(451,), cache_dir=tmp_path)
    lm = cfp_crop_landmarks(data, detector)
    found = np.isfinite(lm).all((1, 2))
    assert found.sum() >= 13
    front = found & (data.pose == 0).numpy()
    h = np.linalg.norm(template_for(64)[:2].mean(0) - template_for(64)[3:].mean(0))
    err = np.linalg.norm(lm[front] - template_for(64), axis=2) / h
    assert np.median(err) < 0.2, np.median(err, 0)  # faces differ; the framing fixes 3 anchors
    # the framing scales the eye-mouth distance to the template's: so do the mapped points
    ratio = np.linalg.norm(lm[front, :2].mean(1) - lm[front, 3:].mean(1), axis=1) / h
    assert np.abs(np.median(ratio) - 1) < 0.1, ratio
    for cls, sign in ((1, -1), (2, 1)):
        prof = found & (data.pose == cls).numpy()
        if prof.any():  # the nose tip lies beyond the eye centre on the side the face points to
            assert (np.sign(lm[prof, 2, 0] - lm[prof, :2, 0].mean(1)) == sign).all()
