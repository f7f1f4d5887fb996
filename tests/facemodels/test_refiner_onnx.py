"""The frontaliser refiner's network on ONNX Runtime: the exported graph (dynamic batch), its file
cache, and parity with PyTorch through the whole warp -> refine pipeline on real faces.

The refiner here has non-zero weights (``trained_refiner`` in tests/conftest.py; a fresh one is
warp-only by construction). Tolerances, float32 on both sides: the graph's outputs within
``REFINER_ATOL`` (1e-3 in their own units: flow in pixels, mask, residual on 0..255); the
refined faces within :data:`FACE_ATOL` = 1e-4 of the [0, 1] image range, and the served uint8
faces at most one grey level apart. Measured on 80 CFP faces: at most 2e-4 on the 0..255
residual, 1e-6 px of flow and 1.1e-5 on the [0, 1] faces (the flow's error times the image's
gradient), and 1 uint8 pixel in 300,000 one level off.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facemodels.face.detector import RetinaFaceDetector
from facemodels.frontalizer.refiner import FrontalRefiner, frontalize, load_refiner, onnx_heads
from facemodels.frontalizer.warp import MeshWarp
from facemodels.onnx_export import (
    REFINER_ATOL,
    REFINER_OUTPUTS,
    cached_refiner_onnx,
    create_session,
    export_refiner,
)
from tests.support import require_shared

pytest.importorskip("onnxruntime", reason="onnxruntime (serve and dev extras) runs the ONNX graphs")
pytest.importorskip("onnx", reason="the onnx package (serve and dev extras) is the exporter's dependency")

#: Largest |ONNX - PyTorch| on the refined faces, as a fraction of the [0, 1] image range.
FACE_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def refiner(trained_refiner: Path) -> FrontalRefiner:
    return load_refiner(str(trained_refiner)).eval()


@pytest.fixture(scope="module")
def session(refiner: FrontalRefiner, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("refiner-onnx") / "refiner.onnx"
    info = export_refiner(refiner, path)
    assert info["max_abs_diff"] is not None and info["max_abs_diff"] <= REFINER_ATOL
    return create_session(path, threads=1)


def test_graph_has_a_dynamic_batch_and_matches_heads(refiner: FrontalRefiner, session) -> None:
    gen = torch.Generator().manual_seed(1)
    for n in (1, 3, 16):  # the graph was traced at batch 2
        x = torch.empty(n, 5, 64, 64).uniform_(-1, 1, generator=gen)
        with torch.inference_mode():
            want = refiner.heads(x)
        got = session.run(list(REFINER_OUTPUTS), {"input": x.numpy()})
        for name, g, w in zip(REFINER_OUTPUTS, got, want, strict=True):
            assert g.shape == tuple(w.shape), name
            np.testing.assert_allclose(g, w.numpy(), atol=REFINER_ATOL, rtol=0, err_msg=name)
        assert got[0].shape == (n, 64, 64, 2) and got[1].shape == got[2].shape == (n, 1, 64, 64)


def _detected(detector: RetinaFaceDetector, grays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Gray photos (one size) with their first detected face's landmarks; photos without a face
    are dropped."""
    images, landmarks = [], []
    for img in grays:
        dets = detector.detect([cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)])[0]
        if dets:
            images.append(img)
            landmarks.append(np.asarray(dets[0].landmarks, dtype=np.float64))
    return np.stack(images), np.stack(landmarks)


def _assert_parity(refiner: FrontalRefiner, session, images: np.ndarray, lm: np.ndarray) -> float:
    """ONNX and PyTorch refine ``images`` alike; returns the largest difference on [0, 1]."""
    warp = MeshWarp(refiner.cfg.image_size)
    src = torch.from_numpy(images)[:, None].float()
    fields = warp.fields(lm)
    with torch.inference_mode():
        want = refiner.refine(src, fields, warp)
        got = refiner.refine(src, fields, warp, heads=onnx_heads(session))
    # the refiner acts: its outputs are far from warp-only's, so the comparison means something
    assert (want.faces - want.warped).abs().mean() > 1.0 and want.flow.abs().max() > 0.1
    assert float(want.mask.max() - want.mask.min()) > 0.1 and want.residual.abs().mean() > 1.0
    for name in ("flow", "mask", "residual"):
        np.testing.assert_allclose(getattr(got, name).numpy(), getattr(want, name).numpy(),
                                   atol=REFINER_ATOL, rtol=0, err_msg=name)
    diff = float((got.faces - want.faces).abs().max()) / 255.0
    assert diff <= FACE_ATOL, diff
    # the served uint8 faces: at most one grey level where rounding falls either side
    ort_u8 = frontalize(images, lm, refiner, warp=warp, heads=onnx_heads(session)).astype(int)
    torch_u8 = frontalize(images, lm, refiner, warp=warp).astype(int)
    assert np.abs(ort_u8 - torch_u8).max() <= 1 and (ort_u8 != torch_u8).mean() < 0.001
    assert torch_u8.std() > 10  # real faces, not a flat image
    return diff


def test_onnx_refines_like_torch_on_the_fixture_photo(refiner: FrontalRefiner, session,
                                                      detector: RetinaFaceDetector,
                                                      face_image: np.ndarray) -> None:
    """The photo and turned, scaled copies; the close-up is area-shrunk by 2 before sampling, so
    the batch mixes the warp's shrink factors."""
    gray = cv2.cvtColor(face_image, cv2.COLOR_RGB2GRAY)
    turned = []
    for angle, scale, centre in ((0, 1.0, (160, 160)), (20, 1.3, (160, 160)), (-15, 0.8, (160, 160)),
                                 (5, 0.6, (160, 160)), (0, 2.0, (140, 76))):
        m = cv2.getRotationMatrix2D(centre, angle, scale)
        turned.append(cv2.warpAffine(gray, m, (320, 320), borderMode=cv2.BORDER_REFLECT))
    images, lm = _detected(detector, turned)
    assert len(images) == 5
    assert set(MeshWarp().fields(lm).factor.tolist()) == {1, 2}
    _assert_parity(refiner, session, images, lm)


@pytest.mark.shared_data
def test_onnx_refines_like_torch_on_cfp_profiles(refiner: FrontalRefiner, session,
                                                 detector: RetinaFaceDetector) -> None:
    """Real profiles and frontal photos (CFP ids 001-004), where the mirror fill and the
    inpainting matter most."""
    root = require_shared("cfp") / "Data" / "Images"
    paths = sorted(root.glob("00[1-4]/profile/0[1-2].jpg")) + sorted(root.glob("00[1-4]/frontal/01.jpg"))
    grays = [cv2.resize(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2GRAY), (250, 250),
                        interpolation=cv2.INTER_AREA) for p in paths]
    images, lm = _detected(detector, grays)
    assert len(images) >= 8
    assert np.abs(MeshWarp().fit(lm).yaw).max() > 25  # turned faces among them
    _assert_parity(refiner, session, images, lm)


def test_cache_reuses_the_graph_while_the_weights_are_unchanged(trained_refiner: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    first = cached_refiner_onnx(trained_refiner, cache)
    assert first.parent == cache / "onnx" and len(first.stem) == 64
    note = json.loads(first.with_suffix(".json").read_text())
    assert note["kind"] == "refiner" and note["arch"] == "frontal_refiner"
    assert note["model_kwargs"] == {"width": 16, "max_flow": 3.0}
    assert note["max_abs_diff_vs_torch"] <= REFINER_ATOL

    import facemodels.onnx_export as ox

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again although the weights did not change")

    with monkeypatch.context() as m:
        m.setattr(ox, "export_refiner", no_export)
        assert cached_refiner_onnx(trained_refiner, cache) == first
    # other weights (a copy with one weight changed): another key, the first file untouched
    from facemodels.checkpoint import save_checkpoint

    other = load_refiner(str(trained_refiner))
    with torch.no_grad():
        other.net.head.bias[0] += 0.5
    copy = save_checkpoint(tmp_path / "other", other, arch="frontal_refiner",
                           model_kwargs={"width": 16, "max_flow": 3.0})
    second = cached_refiner_onnx(copy, cache, model=other)
    assert second != first and first.is_file()
