"""ONNX export and ONNX Runtime parity: every registry classifier, the ensemble as one graph, the
RetinaFace detector, the ONNX file cache, and the shipped checkpoints on real faces.

Tolerances (float32 on both sides): class probabilities within ``CLASSIFIER_ATOL`` (1e-5),
raw detector outputs within ``DETECTOR_ATOL`` (1e-4), detections within 0.01 px and 1e-4 in
score, and the same top-1 class on every real face. Measured differences are about 1e-7.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facemodels.checkpoint import load_checkpoint, save_checkpoint
from facemodels.face.detector import Detection, RetinaFaceDetector
from facemodels.models import ModelCfg, create_model, list_models
from facemodels.onnx_export import (
    CLASSIFIER_ATOL,
    DETECTOR_ATOL,
    DETECTOR_OUTPUTS,
    OnnxExportError,
    cached_classifier_onnx,
    cached_detector_onnx,
    create_session,
    export_classifier,
    resolve_backend,
)
from facemodels.predict import predict_probs, predict_probs_onnx
from tests.support import REPO, require_shared

pytest.importorskip("onnxruntime", reason="onnxruntime (serve and dev extras) runs the ONNX graphs")
pytest.importorskip("onnx", reason="the onnx package (serve and dev extras) is the exporter's dependency")

SHIPPED = REPO / "checkpoints"
CK_FOLDERS = {"anger": "angry", "disgust": "disgust", "fear": "fear", "happy": "happy",
              "sadness": "sad", "surprise": "surprise", "contempt": None}


def _torch_probs(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(x).float().softmax(1).numpy()


def _onnx_probs(path: Path, x: torch.Tensor) -> np.ndarray:
    (probs,) = create_session(path, threads=1).run(["probs"], {"input": x.numpy()})
    return probs


@pytest.mark.parametrize("arch", list_models(include_ensemble=False))
def test_every_registered_classifier_exports_with_a_dynamic_batch(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(arch).eval()
    info = export_classifier(model, tmp_path / f"{arch}.onnx")
    assert info["max_abs_diff"] is not None and info["max_abs_diff"] <= CLASSIFIER_ATOL
    session = create_session(tmp_path / f"{arch}.onnx", threads=1)
    for n in (1, 3, 9):  # the graph was traced at batch 2
        x = torch.randn(n, 1, 44, 44)
        (got,) = session.run(["probs"], {"input": x.numpy()})
        assert got.shape == (n, 7)
        np.testing.assert_allclose(got, _torch_probs(model, x), atol=CLASSIFIER_ATOL, rtol=0)


def _spinning(session: object) -> dict[str, str]:
    opts = session.get_session_options()  # type: ignore[attr-defined]
    return {pool: opts.get_session_config_entry(f"session.{pool}.allow_spinning")
            for pool in ("intra_op", "inter_op")}


def test_session_threads_sleep_unless_spinning_is_asked_for(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("compact_resnet_s").eval()
    path = tmp_path / "clf.onnx"
    export_classifier(model, path, verify=False)
    x = torch.randn(3, model.cfg.in_chans, model.cfg.input_size, model.cfg.input_size)
    for spinning, flag in ((False, "0"), (True, "1")):
        session = create_session(path, threads=2, spinning=spinning)
        assert _spinning(session) == {"intra_op": flag, "inter_op": flag}
        (got,) = session.run(["probs"], {"input": x.numpy()})
        np.testing.assert_allclose(got, _torch_probs(model, x), atol=CLASSIFIER_ATOL, rtol=0)
    assert _spinning(create_session(path)) == {"intra_op": "0", "inter_op": "0"}


def test_a_custom_cfg_exports_too(tmp_path: Path) -> None:
    """Three channels, three classes, a 40-pixel crop: the graph follows the card's ModelCfg."""
    cfg = ModelCfg(image_size=48, input_size=40, in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                   class_names=("neg", "neu", "pos"))
    torch.manual_seed(1)
    model = create_model("cnn3", num_classes=3, cfg=cfg).eval()
    export_classifier(model, tmp_path / "rgb.onnx")
    x = torch.randn(4, 3, 40, 40)
    np.testing.assert_allclose(_onnx_probs(tmp_path / "rgb.onnx", x), _torch_probs(model, x),
                               atol=CLASSIFIER_ATOL, rtol=0)


@pytest.fixture(scope="module")
def tiny_ensemble(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ensemble checkpoint of two different architectures with unequal weights."""
    torch.manual_seed(0)
    members = [{"arch": "compact_resnet_s"}, {"arch": "cnn3"}]
    model = create_model("ensemble", members=members, weights=[0.7, 0.3])
    return save_checkpoint(tmp_path_factory.mktemp("ens") / "ensemble", model, arch="ensemble",
                           model_kwargs=model.model_kwargs)


def test_ensemble_is_one_graph_and_predicts_like_predict_probs(tiny_ensemble: Path, tmp_path: Path) -> None:
    path = cached_classifier_onnx(tiny_ensemble, tmp_path)
    assert [p.suffix for p in sorted((tmp_path / "onnx").iterdir())] == [".json", ".onnx"]  # one graph
    model, _ = load_checkpoint(tiny_ensemble)
    session = create_session(path, threads=1)
    crops = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 48, 48), dtype=np.uint8))
    for tta in (False, True):
        want = predict_probs(model, crops, tta=tta)
        got = predict_probs_onnx(session, crops, model.cfg, tta=tta, batch_size=4)  # two chunks
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=CLASSIFIER_ATOL, rtol=0)


def test_cache_reuses_while_the_weights_are_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      ) -> None:
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "a", create_model("compact_resnet_s"), arch="compact_resnet_s")
    cache = tmp_path / "cache"
    first = cached_classifier_onnx(ckpt, cache)
    assert first.parent == cache / "onnx" and first.suffix == ".onnx" and len(first.stem) == 64
    note = json.loads(first.with_suffix(".json").read_text())
    assert note["kind"] == "classifier" and note["arch"] == "compact_resnet_s"
    assert note["max_abs_diff_vs_torch"] <= CLASSIFIER_ATOL and len(note["weights_sha256"]) == 64

    import facemodels.onnx_export as ox

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again although the weights did not change")

    with monkeypatch.context() as m:
        m.setattr(ox, "export_classifier", no_export)
        assert cached_classifier_onnx(ckpt, cache) == first
    # Other weights under the same name: a new file, the old one untouched.
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "a", create_model("compact_resnet_s"), arch="compact_resnet_s")
    second = cached_classifier_onnx(ckpt, cache)
    assert second != first and first.is_file()
    # A damaged file no longer matches its note's SHA-256: exported again, same name.
    second.write_bytes(b"not onnx")
    assert cached_classifier_onnx(ckpt, cache) == second
    model, _ = load_checkpoint(ckpt)
    x = torch.randn(2, 1, 44, 44)
    np.testing.assert_allclose(_onnx_probs(second, x), _torch_probs(model, x), atol=CLASSIFIER_ATOL)
    assert not list((cache / "onnx").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_export_refuses_a_graph_that_disagrees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import facemodels.onnx_export as ox

    monkeypatch.setattr(ox, "CLASSIFIER_ATOL", -1.0)  # nothing can pass
    with pytest.raises(OnnxExportError, match="differs from PyTorch"):
        export_classifier(create_model("compact_resnet_s").eval(), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_resolve_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    import facemodels.onnx_export as ox

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu) == "onnx"
    assert resolve_backend("auto", cuda) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    assert resolve_backend("onnx", cpu) == "onnx"
    with pytest.raises(ValueError, match="runs on CPU"):
        resolve_backend("onnx", cuda)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("tensorrt", cpu)
    monkeypatch.setattr(ox, "onnx_available", lambda: False)
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="needs the onnx and onnxruntime"):
        resolve_backend("onnx", cpu)


# --- the detector -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_detector(detector_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> RetinaFaceDetector:
    return RetinaFaceDetector(detector_weights, backend="onnx", threads=1,
                              cache_dir=tmp_path_factory.mktemp("det-cache"))


def _det_array(dets: list[Detection]) -> np.ndarray:
    return np.array([[*d.box, d.score, *np.ravel(d.landmarks)] for d in dets]).reshape(-1, 15)


@pytest.mark.parametrize("shape", [(1, 3, 480, 640), (3, 3, 101, 157)])
def test_detector_graph_matches_torch(detector: RetinaFaceDetector, onnx_detector: RetinaFaceDetector,
                                      shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).uniform(-128, 128, shape).astype(np.float32)
    assert onnx_detector.onnx_path is not None
    got = create_session(onnx_detector.onnx_path, threads=1).run(list(DETECTOR_OUTPUTS), {"input": x})
    with torch.inference_mode():
        want = detector.net(torch.from_numpy(x))
    for name, g, w in zip(DETECTOR_OUTPUTS, got, want, strict=True):
        assert g.shape == tuple(w.shape), name
        np.testing.assert_allclose(g, w.numpy(), atol=DETECTOR_ATOL, rtol=0, err_msg=name)


def test_detector_cache_is_keyed_by_the_weights(detector_weights: Path, onnx_detector: RetinaFaceDetector,
                                                tmp_path: Path) -> None:
    assert onnx_detector.onnx_path is not None
    note = json.loads(onnx_detector.onnx_path.with_suffix(".json").read_text())
    assert note["kind"] == "detector" and note["max_abs_diff_vs_torch"] <= DETECTOR_ATOL
    again = cached_detector_onnx(detector_weights, onnx_detector.onnx_path.parents[1], net=onnx_detector.net)
    assert again == onnx_detector.onnx_path
    with pytest.raises(ValueError, match="CPU"):
        RetinaFaceDetector(detector_weights, backend="onnx", device="meta", cache_dir=tmp_path)


def test_detections_match_torch_on_the_fixture_photo(detector: RetinaFaceDetector,
                                                     onnx_detector: RetinaFaceDetector,
                                                     face_image: np.ndarray) -> None:
    canvas = np.full((480, 640, 3), 40, np.uint8)
    canvas[80:400, 160:480] = face_image
    images = [face_image, canvas, face_image[:200, 60:260].copy()]
    for got, want in zip(onnx_detector.detect(images), detector.detect(images), strict=True):
        assert len(got) == len(want) == 1
        np.testing.assert_allclose(_det_array(got), _det_array(want), atol=0.01)


def _letterbox(rgb: np.ndarray, width: int = 640, height: int = 480) -> np.ndarray:
    scale = min(width / rgb.shape[1], height / rgb.shape[0])
    w, h = round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)
    canvas = np.zeros((height, width, 3), np.uint8)
    top, left = (height - h) // 2, (width - w) // 2
    canvas[top:top + h, left:left + w] = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    return canvas


@pytest.mark.shared_data
@pytest.mark.slow
def test_detections_match_torch_on_cfp_photos(detector: RetinaFaceDetector,
                                              onnx_detector: RetinaFaceDetector) -> None:
    """48 CFP frontal photos letterboxed to 640x480, in batches of 8 as the service runs them."""
    files = sorted((require_shared("cfp") / "Data/Images").glob("*/frontal/01.jpg"))[::10][:48]
    assert len(files) == 48
    images = [_letterbox(cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)) for f in files]
    found = 0
    for start in range(0, len(images), 8):
        chunk = images[start:start + 8]
        for got, want in zip(onnx_detector.detect(chunk), detector.detect(chunk), strict=True):
            assert len(got) == len(want)
            np.testing.assert_allclose(_det_array(got), _det_array(want), atol=0.01)
            found += bool(want)
    assert found == len(images)


# --- the shipped checkpoints on real faces ------------------------------------------------------


def _ck_faces(limit_per_class: int = 45) -> tuple[torch.Tensor, list[str]]:
    root = require_shared("ckplus48")
    crops, labels = [], []
    for folder in sorted(CK_FOLDERS):
        for f in sorted((root / folder).glob("*.png"))[:limit_per_class]:
            img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
            assert img is not None and img.shape == (48, 48), f
            crops.append(img)
            labels.append(folder)
    return torch.from_numpy(np.stack(crops)), labels


@pytest.mark.shared_data
@pytest.mark.slow
@pytest.mark.parametrize("name", ["default", "ensemble"])
def test_shipped_checkpoint_same_top1_on_real_faces(name: str, tmp_path: Path) -> None:
    """315 CK+48 faces (45 per folder) 1-crop, and every third of them 10-crop: same
    probabilities, same top-1."""
    ckpt = SHIPPED / f"{name}.safetensors"
    if not ckpt.is_file():
        pytest.skip(f"{ckpt} is not shipped")
    crops, labels = _ck_faces()
    assert len(crops) == 315
    model, _ = load_checkpoint(ckpt)
    session = create_session(cached_classifier_onnx(ckpt, tmp_path, model=model), threads=1)
    for tta, faces in ((True, crops[::3]), (False, crops)):
        want = predict_probs(model, faces, tta=tta).numpy()
        got = predict_probs_onnx(session, faces, model.cfg, tta=tta).numpy()
        np.testing.assert_allclose(got, want, atol=CLASSIFIER_ATOL, rtol=0)
        assert (got.argmax(1) == want.argmax(1)).all()
    # A sanity check that these are real, recognisable faces for the model (not noise).
    classes = model.cfg.class_names
    hits = [classes[i] == CK_FOLDERS[lab] for i, lab in zip(want.argmax(1), labels, strict=True)
            if CK_FOLDERS[lab] is not None]
    assert np.mean(hits) > 0.4
