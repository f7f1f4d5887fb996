"""Evaluation pieces: ROC AUC and TAR@FAR, CFP pairs, identity with a stand-in embedder, FER, CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from facemodels.checkpoint import save_checkpoint
from facemodels.frontalizer.yaw import YawRange
from facemodels.models import create_model
from training.cli import main as cli_main
from training.data.cfp import load_cfp
from training.gan.evaluate import evaluate_identity
from training.gan.fer_eval import NO_FACE, FerResult, evaluate_fer, mcnemar_helps_p, yaw_ranges
from training.gan.identity import all_pairs, protocol_pairs, roc_auc, tar_at_far
from training.gan.recipe import GanNets
from training.gan.train import inference_model


def test_roc_auc_and_tar() -> None:
    same = np.array([1, 1, 1, 0, 0, 0], bool)
    assert roc_auc(np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1]), same) == 1.0
    assert roc_auc(np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), same) == 0.0
    assert roc_auc(np.ones(6), same) == 0.5
    scores = np.r_[np.linspace(0.5, 1.0, 100), np.linspace(0.0, 0.6, 200)]
    labels = np.r_[np.ones(100, bool), np.zeros(200, bool)]
    # 1% of 200 impostors = 2 may pass: threshold is the 3rd highest impostor score
    thr = np.sort(scores[~labels])[::-1][2]
    assert tar_at_far(scores, labels, 0.01) == pytest.approx((scores[labels] > thr).mean())
    assert np.isnan(roc_auc(np.ones(3), np.ones(3, bool)))


class PixelEmbedder:
    name = "pixels"

    def embed(self, faces: np.ndarray) -> np.ndarray:
        x = faces.reshape(len(faces), -1).astype(np.float32)
        x -= x.mean(1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-6)


def test_pairs_and_identity_eval(make_cfp_tree: Callable[..., Path], tiny_nets: GanNets) -> None:
    root = make_cfp_tree()
    ev = load_cfp(root, size=32, use_cache=False).split("eval")
    frontal, profile = ev.subset(ev.pose == 0), ev.subset(ev.pose != 0)
    pairs, same = protocol_pairs(root, list(frontal.paths), list(profile.paths))
    assert same.sum() == 12 and (~same).sum() == 12
    assert (frontal.identity[pairs[same, 0]] == profile.identity[pairs[same, 1]]).all()
    _, same_all = all_pairs(frontal.identity.numpy(), profile.identity.numpy())
    assert same_all.sum() == 12 and len(same_all) == 24
    model = inference_model(tiny_nets, 32).eval()
    res = evaluate_identity(model, root, frontal, profile, PixelEmbedder())
    for key in ("FP fold 10", "all F x P pairs"):
        for kind in ("raw", "frontalised"):
            assert 0.0 <= res[key][kind]["auc"] <= 1.0


def test_fer_eval_bins(tiny_nets: GanNets) -> None:
    torch.manual_seed(0)
    classifier = create_model("compact_resnet_s").eval()
    model = inference_model(tiny_nets, 32).eval()
    faces = torch.randint(0, 256, (6, 48, 48), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    sym = np.array([[15.0, 18.0], [33.0, 18.0], [24.0, 28.0], [17.0, 36.5], [31.0, 36.5]])
    turned = sym.copy()
    turned[2, 0] += 7.0
    res = evaluate_fer(model, classifier, faces, labels, [sym, turned, None, None, sym, sym])
    rows = {name: (n, a, b) for name, n, a, b in res.rows()}
    assert rows["all"][0] == 6 and rows[NO_FACE][0] == 2
    assert rows[yaw_ranges()[0].label][0] == 3 and rows[yaw_ranges()[-1].label][0] == 1
    assert res.frontalised.shape == (6, 48, 48) and 0 <= res.agreement <= 1


def test_eval_cli_pose_and_sheet(make_cfp_tree: Callable[..., Path], tiny_nets: GanNets,
                                 tmp_path: Path) -> None:
    root = make_cfp_tree()
    ckpt = tmp_path / "g" / "final"
    save_checkpoint(ckpt, inference_model(tiny_nets, 32), arch="frontalizer",
                    model_kwargs={"width": 8, "feat_dim": 16, "noise_dim": 4, "d_width": 8})
    sheet = tmp_path / "sheet.png"
    rc = cli_main(["eval-frontalizer", str(ckpt), "--data", str(root), "--cache-dir", str(tmp_path / "c"),
                   "--skip-identity", "--skip-fer", "--sheet", str(sheet), "--update-card", "--threads", "1"])
    assert rc == 0 and sheet.stat().st_size > 500
    out = json.loads((tmp_path / "g" / "final_eval.json").read_text())
    assert 0 <= out["cfp_pose_accuracy"] <= 1
    # the DR-GAN is measured beside warp-only, against the same bars (unmeasured ones: no verdict)
    assert out["frontaliser"] == "frontalizer" and set(out["rows"]) == {"raw", "warp-only", "drgan"}
    assert [b["bar"] for b in out["bars"]] == list(range(1, 9))
    assert all(set(b["pass"]) == {"warp-only", "drgan"} for b in out["bars"])
    card = json.loads(ckpt.with_suffix(".json").read_text())
    assert "CFP-eval-ids-451-500" in card["metrics"]


def test_dlib_embedder_if_installed() -> None:
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("dlib", "face_recognition_models")):
        pytest.skip("dlib-bin and face-recognition-models (the optional eval extra) are not installed")
    from training.gan.identity import DlibEmbedder

    emb = DlibEmbedder().embed(np.random.default_rng(0).integers(0, 256, (2, 64, 64), dtype=np.uint8))
    assert emb.shape == (2, 128) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)


def test_mcnemar_p_matches_the_binomial_tail() -> None:
    assert mcnemar_helps_p(0, 0) == 1.0
    assert mcnemar_helps_p(3, 0) == 0.125  # all three discordant faces fixed: 1/2^3
    assert mcnemar_helps_p(5, 5) == pytest.approx(0.623046875)
    assert mcnemar_helps_p(9, 1) < 0.05 < mcnemar_helps_p(7, 3)


def _result(orig: list[int], front: list[int], yaw: list[float]) -> FerResult:
    n = len(orig)
    return FerResult(labels=torch.zeros(n, dtype=torch.long), pred_orig=torch.tensor(orig),
                     pred_front=torch.tensor(front), yaw=np.array(yaw),
                     inputs=torch.zeros(n, 4, 4, dtype=torch.uint8),
                     frontalised=torch.zeros(n, 4, 4, dtype=torch.uint8))


def test_helps_needs_more_fixed_than_broken_beyond_chance() -> None:
    # >=45°: 10 faces, frontalising fixes 9 and breaks none; 30-45°: fixes 2, breaks 1;
    # <15°: breaks 5. Label 0 is right, 1 is wrong.
    orig = [1] * 9 + [0] + [1, 1, 0] + [0] * 5
    front = [0] * 9 + [0] + [0, 0, 1] + [1] * 5
    yaw = [50.0] * 10 + [35.0] * 3 + [0.0] * 5
    res = _result(orig, front, yaw)
    d = res.discordant()
    assert d[">=45°"][:2] == (9, 0) and d["30-45°"][:2] == (2, 1) and d["<15°"][:2] == (0, 5)
    assert res.helps() == [YawRange(45)]  # 2 fixed vs 1 broken is not evidence; "all" is never listed
    assert res.helps(alpha=1.0) == [YawRange(30, 45), YawRange(45)]
