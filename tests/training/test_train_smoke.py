"""End-to-end smoke training through ``fer-train``: loss falls, outputs exist, resume is exact."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from facemodels.checkpoint import load_checkpoint, save_checkpoint
from facemodels.models import create_model
from training.cli import main as cli_main
from training.data.fer2013 import load_fer2013
from training.engine import evaluate

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ARCH = "compact_resnet"


def _train(data: Path, out: Path, cache: Path, *extra: str) -> int:
    return cli_main([
        "classify", "--model", ARCH, "--data", str(data), "--output-dir", str(out),
        "--cache-dir", str(cache), "--batch-size", "32", "--lr", "0.05", "--no-progress",
        "--seed", "1", *extra,
    ])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:

    base = tmp_path_factory.mktemp("smoke")
    import cv2
    import numpy as np

    from tests.support import synthetic_face  # local import keeps collection light

    rng = np.random.default_rng(0)
    data = base / "fer2013"
    i = 0
    for split, prefix, n in (("train", "Training", 40), ("test", "PublicTest", 10)):
        for label, name in enumerate(("angry", "disgust", "fear", "happy", "sad", "surprise",
                                      "neutral")):
            (data / split / name).mkdir(parents=True)
            for _ in range(n):
                i += 1
                cv2.imwrite(str(data / split / name / f"{prefix}_{i}.png"),
                            synthetic_face(label, rng))
    out = base / "run"
    assert _train(data, out, base / "cache", "--epochs", "3") == 0
    return {"data": data, "out": out, "cache": base / "cache", "base": base}


def test_outputs_exist(trained: dict[str, Path]) -> None:
    out = trained["out"]
    for name in ("args.json", "metrics.jsonl", "curves.png", "last.safetensors", "last.json",
                 "last_state.safetensors", "last_state.json", "best.safetensors", "best.json",
                 "best_confusion.png", "best_confusion.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all(r["val_split"] == "PublicTest" for r in rows)
    card = json.loads((out / "best.json").read_text())
    assert set(card["metrics"]) == {"PublicTest"}
    assert 0 <= card["metrics"]["PublicTest"]["acc_tta"] <= 1
    assert card["data_fingerprint"]
    assert json.loads((out / "args.json").read_text())["model"] == ARCH


def test_loss_falls_below_untrained(trained: dict[str, Path]) -> None:
    data = load_fer2013(trained["data"], cache_dir=trained["cache"]).split("PublicTest")
    torch.manual_seed(1)
    untrained = evaluate(create_model(ARCH), data.images, data.labels)
    rows = [json.loads(line) for line in (trained["out"] / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    best_val = min(r["val_loss"] for r in rows)
    assert best_val < untrained.loss
    assert best_val < math.log(7)
    assert max(r["val_acc"] for r in rows) > 2 / 7  # chance is 1/7


def test_resume_continues_exactly(trained: dict[str, Path]) -> None:
    """2 epochs in one go == 1 epoch, stop, then --resume for the second."""
    base, data, cache = trained["base"], trained["data"], trained["cache"]
    straight, split = base / "straight", base / "split"
    assert _train(data, straight, cache, "--epochs", "2", "--amp", "none") == 0
    assert _train(data, split, cache, "--epochs", "2", "--amp", "none", "--epoch-budget", "1") == 0
    assert len((split / "metrics.jsonl").read_text().splitlines()) == 1
    assert _train(data, split, cache, "--epochs", "2", "--amp", "none", "--resume") == 0
    a, b = load_file(str(straight / "last.safetensors")), load_file(str(split / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    assert len((split / "metrics.jsonl").read_text().splitlines()) == 2


def test_ema_run_selects_the_average_and_resumes_exactly(trained: dict[str, Path]) -> None:
    """--ema: the card and metrics say so, best is the average, and resume restores it."""
    base, data, cache = trained["base"], trained["data"], trained["cache"]
    straight, split = base / "ema_straight", base / "ema_split"
    common = ["--epochs", "2", "--amp", "none", "--ema", "0.9"]
    assert _train(data, straight, cache, *common) == 0
    assert _train(data, split, cache, *common, "--epoch-budget", "1") == 0
    assert _train(data, split, cache, *common, "--resume") == 0
    a, b = load_file(str(straight / "last_ema.safetensors")), load_file(str(split / "last_ema.safetensors"))
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    raw = load_file(str(straight / "last.safetensors"))
    assert any(not torch.equal(raw[k], a[k]) for k in a), "the average equals the raw weights"
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all("val_acc_raw" in r for r in rows)
    card = json.loads((straight / "best.json").read_text())
    assert card["ema_decay"] == 0.9
    best_epoch = card["metrics"]["PublicTest"]["epoch"]
    if best_epoch == 1:  # then best holds the same weights as last_ema
        best = load_file(str(straight / "best.safetensors"))
        assert all(torch.equal(best[k], a[k]) for k in a)


def test_eval_command_reports_both_crops(trained: dict[str, Path]) -> None:
    out = trained["base"] / "eval"
    # the precision training evaluated its best checkpoint with (bf16 where the CPU has it): an fp32
    # evaluation may flip a borderline face of these 70 and differ by one image
    rc = cli_main(["eval", str(trained["out"] / "best"), "--data", str(trained["data"]),
                   "--cache-dir", str(trained["cache"]), "--output-dir", str(out), "--amp", "auto"])
    assert rc == 0
    report = json.loads((out / "eval_PublicTest.json").read_text())
    assert report["images"] == 70
    card = json.loads((trained["out"] / "best.json").read_text())
    assert report["acc_10crop"] == pytest.approx(card["metrics"]["PublicTest"]["acc_tta"], abs=1e-6)
    assert report["acc_1crop"] == pytest.approx(card["metrics"]["PublicTest"]["acc"], abs=1e-6)
    assert (out / "eval_PublicTest_confusion.png").stat().st_size > 1000
    assert sum(map(sum, report["confusion_matrix"])) == 70


def test_selection_refuses_data_without_publictest(tmp_path: Path,
                                                   make_fer_folder: Callable[..., Path]) -> None:
    root = make_fer_folder(per_class_train=3, per_class_test=2)
    for f in (root / "test").rglob("PublicTest_*.png"):  # only PrivateTest left beside Training
        f.rename(f.with_name(f.name.replace("PublicTest", "PrivateTest")))
    rc = _train(root, tmp_path / "run", tmp_path / "cache", "--epochs", "1")
    assert rc == 2
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_ensemble_command_fits_on_publictest_and_loads(trained: dict[str, Path]) -> None:
    out = trained["base"] / "ens"
    rc = cli_main(["ensemble", str(trained["out"] / "best"), str(trained["out"] / "last"),
                   "--output", str(out / "best"), "--data", str(trained["data"]),
                   "--cache-dir", str(trained["cache"])])
    assert rc == 0
    card = json.loads((out / "best.json").read_text())
    assert card["arch"] == "ensemble"
    weights = card["metrics"]["PublicTest"]["weights"]
    assert len(weights) == 2 and sum(weights) == pytest.approx(1.0, abs=1e-5)
    rc = cli_main(["eval", str(out / "best"), "--data", str(trained["data"]),
                   "--cache-dir", str(trained["cache"]), "--output-dir", str(out)])
    assert rc == 0
    report = json.loads((out / "eval_PublicTest.json").read_text())
    assert 0 <= report["acc_1crop"] <= 1 and report["images"] == 70
    assert card["metrics"]["PublicTest"]["note"] == (
        "weights fitted on PublicTest; report another split for unbiased accuracy")


def test_plain_average_ensemble_says_so_in_its_card(trained: dict[str, Path]) -> None:
    out = trained["base"] / "ens_average"
    rc = cli_main(["ensemble", str(trained["out"] / "best"), str(trained["out"] / "last"),
                   "--output", str(out), "--weights", "average", "--data", str(trained["data"]),
                   "--cache-dir", str(trained["cache"])])
    assert rc == 0
    card = json.loads(out.with_suffix(".json").read_text())
    metrics = card["metrics"]["PublicTest"]
    assert metrics["weights"] is None and metrics["acc_weighted"] == metrics["acc_average"]
    assert metrics["note"] == (
        "plain average; members chosen on PublicTest; report another split for unbiased accuracy")
    model, _ = load_checkpoint(out)
    torch.testing.assert_close(model.member_weights.float(), torch.full((2,), 0.5))


def test_uniform_soup_is_the_mean_of_its_ingredients(trained: dict[str, Path]) -> None:
    out = trained["base"] / "soup_uniform"
    ingredients = [trained["out"] / "best", trained["out"] / "last"]
    rc = cli_main(["soup", *map(str, ingredients), "--recipe", "uniform", "--output", str(out),
                   "--data", str(trained["data"]), "--cache-dir", str(trained["cache"])])
    assert rc == 0
    soup, card = load_checkpoint(out)
    states = [load_checkpoint(p)[0].state_dict() for p in ingredients]
    for key, value in soup.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (states[0][key] + states[1][key]) / 2)
        else:
            assert torch.equal(value, states[0][key])
    assert sorted(card["soup_of"]) == sorted(str(p) for p in ingredients)
    lineage = {r["path"]: r for r in card["ingredients"]}
    assert lineage[str(ingredients[1])]["train_args"]["model"] == ARCH
    assert lineage[str(ingredients[1])]["weights_sha256"] == hashlib.sha256(
        (trained["out"] / "last.safetensors").read_bytes()).hexdigest()
    val = load_fer2013(trained["data"], cache_dir=trained["cache"]).split("PublicTest")
    assert card["metrics"]["PublicTest"]["acc_tta"] == pytest.approx(
        evaluate(soup, val.images, val.labels, tta=True).accuracy)


def test_greedy_soup_never_scores_below_its_best_ingredient(trained: dict[str, Path]) -> None:
    out = trained["base"] / "soup_greedy"
    ingredients = [trained["out"] / "last", trained["out"] / "best", trained["base"] / "noisy"]
    model, _ = load_checkpoint(trained["out"] / "best")
    with torch.no_grad():  # an ingredient far outside the basin: the greedy recipe must skip it
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 5)
    save_checkpoint(trained["base"] / "noisy", model, arch=ARCH)
    rc = cli_main(["soup", *map(str, ingredients), "--output", str(out),
                   "--data", str(trained["data"]), "--cache-dir", str(trained["cache"])])
    assert rc == 0
    metrics = json.loads((out.with_suffix(".json")).read_text())["metrics"]["PublicTest"]
    own = metrics["ingredient_acc"]
    assert metrics["acc_tta"] >= max(m["acc_tta"] for m in own.values())
    kept = json.loads((out.with_suffix(".json")).read_text())["soup_of"]
    assert kept[0] == max(own, key=lambda p: own[p]["acc_tta"])
    assert str(trained["base"] / "noisy") not in kept


def test_soup_refuses_ingredients_of_another_architecture(trained: dict[str, Path],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    other = trained["base"] / "cnn3_untrained"
    save_checkpoint(other, create_model("cnn3"), arch="cnn3")
    rc = cli_main(["soup", str(trained["out"] / "best"), str(other), "--output",
                   str(trained["base"] / "bad_soup"), "--data", str(trained["data"]),
                   "--cache-dir", str(trained["cache"])])
    assert rc == 2
    assert str(other) in caplog.text and "arch differs" in caplog.text
    assert not (trained["base"] / "bad_soup.safetensors").exists()


def test_ckplus_cross_validation_runs_per_subject(tmp_path: Path) -> None:
    import cv2
    import numpy as np

    from tests.support import synthetic_face
    from training.data.ckplus import CK_CLASSES

    rng = np.random.default_rng(0)
    root = tmp_path / "ck"
    for label, name in enumerate(CK_CLASSES):
        (root / name).mkdir(parents=True)
        for subject in range(1, 7):
            for frame in range(2):
                cv2.imwrite(str(root / name / f"S{subject:03d}_{label + 1:03d}_{frame:08d}.png"),
                            synthetic_face(label, rng))
    out = tmp_path / "cv.json"
    rc = cli_main(["cv", "--model", "compact_resnet_s", "--data", str(root), "--folds", "3",
                   "--epochs", "2", "--batch-size", "16", "--no-progress", "--output", str(out)])
    assert rc == 0
    summary = json.loads(out.read_text())
    assert summary["folds"] == 3 and len(summary["fold_acc"]) == 3
    assert 0 <= summary["mean_acc"] <= 1 and summary["std_acc"] >= 0


def test_bad_image_fails_by_name_or_is_skipped_on_request(tmp_path: Path,
                                                          make_fer_folder: Callable[..., Path]) -> None:
    root = make_fer_folder(per_class_train=3, per_class_test=2)
    bad = root / "train" / "happy" / "Training_999999.png"
    bad.write_bytes(b"not a png")
    common = ["--epochs", "1", "--batch-size", "8"]
    assert _train(root, tmp_path / "strict", tmp_path / "cache", *common) == 2
    assert not (tmp_path / "strict" / "best.safetensors").exists()
    assert _train(root, tmp_path / "lenient", tmp_path / "cache", *common, "--skip-bad") == 0
    assert (tmp_path / "lenient" / "best.safetensors").is_file()


def test_aligned_views_go_through_the_detector_once_and_are_cached(
    tmp_path: Path, make_fer_folder: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from facemodels.face.retinaface_convert import (
        INSTALL_HINT,
        SOURCE_DISTRIBUTION,
        ConversionError,
        source_weights_file,
    )

    try:
        source_weights_file()
    except ConversionError:
        pytest.skip(f"{SOURCE_DISTRIBUTION} is not installed (`{INSTALL_HINT}`)")
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "fer-cache"))  # detector weights go here
    root = make_fer_folder(per_class_train=3, per_class_test=2)
    cache = tmp_path / "cache"
    common = ["--epochs", "1", "--batch-size", "8", "--aligned-views", "0.5"]
    assert _train(root, tmp_path / "run", cache, *common) == 0
    (views_file,) = cache.glob("aligned-views-*.npz")
    assert json.loads((tmp_path / "run" / "args.json").read_text())["aligned_views"] == 0.5
    stamp = views_file.stat().st_mtime_ns
    assert _train(root, tmp_path / "again", cache, *common) == 0
    assert views_file.stat().st_mtime_ns == stamp, "the second run recomputed the views"


def test_camera_augmentation_trains_and_is_recorded(trained: dict[str, Path], tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "camera"
    with caplog.at_level("INFO", logger="training.train_classifier"):
        assert _train(trained["data"], out, trained["cache"], "--epochs", "1",
                      "--camera-aug", "0.5") == 0
    assert "camera augmentation p=0.5" in caplog.text
    card = json.loads((out / "best.json").read_text())
    assert card["train_args"]["camera_aug"] == 0.5
    model, _ = load_checkpoint(out / "best")
    assert model.cfg.num_classes == 7


def test_stored_teacher_views_train_and_resume_exactly(trained: dict[str, Path]) -> None:
    """--teacher-views: the teacher runs once per stored view, and resume stays exact."""
    base, data, cache = trained["base"], trained["data"], trained["cache"]
    straight, split = base / "tv_straight", base / "tv_split"
    common = ["--epochs", "2", "--amp", "none", "--teacher", str(trained["out"] / "best"),
              "--teacher-views", "2", "--distill-alpha", "0.7"]
    assert _train(data, straight, cache, *common) == 0
    (folder,) = cache.glob("teacher-views-*")
    assert sorted(p.name for p in folder.iterdir()) == ["view-0.safetensors", "view-1.safetensors"]
    stamps = [p.stat().st_mtime_ns for p in sorted(folder.iterdir())]
    assert _train(data, split, cache, *common, "--epoch-budget", "1") == 0
    assert _train(data, split, cache, *common, "--resume") == 0
    assert [p.stat().st_mtime_ns for p in sorted(folder.iterdir())] == stamps  # reused, not rebuilt
    a, b = load_file(str(straight / "last.safetensors")), load_file(str(split / "last.safetensors"))
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    card = json.loads((straight / "best.json").read_text())
    assert card["train_args"]["teacher_views"] == 2


@pytest.mark.parametrize(("extra", "message"), [
    ((), "--teacher-views needs --teacher"),
    (("--teacher", "unused", "--mixup", "0.2"), "cannot mix them"),
])
def test_stored_teacher_views_refuse_what_they_cannot_do(
    trained: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    extra: tuple[str, ...], message: str,
) -> None:
    out = tmp_path / "refused"
    assert _train(trained["data"], out, trained["cache"], "--epochs", "1", "--teacher-views", "2",
                  *extra) != 0
    assert message in caplog.text
    assert not (out / "last.safetensors").exists()
