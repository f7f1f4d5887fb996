"""/frontalize, yaw in responses and frontalize=auto|on|off on /predict, with a real checkpoint."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from facemodels.checkpoint import CheckpointError, save_checkpoint
from facemodels.frontalizer.yaw import YawRange
from facemodels.models import create_model
from service.inference.frontalizer import FrontalizerModel
from service.main import create_app

JPEG = {"content-type": "image/jpeg"}
KWARGS = {"width": 8, "feat_dim": 32, "noise_dim": 8, "d_width": 8}


def _frontalizer(path: Path, helps: list[YawRange] | list[str]) -> Path:
    torch.manual_seed(0)
    model = create_model("frontalizer", num_classes=3, **KWARGS)
    return save_checkpoint(path, model, arch="frontalizer", model_kwargs=KWARGS,
                           metrics={"FER2013-PublicTest": {"frontalize_helps": [
                               h.to_json() if isinstance(h, YawRange) else h for h in helps]}})


@pytest.fixture(scope="module")
def frontal_client(make_settings, tmp_path_factory: pytest.TempPathFactory):
    """The frontaliser's card says it helps at every yaw; auto applies from 0 degrees."""
    every_bin = [YawRange(0, 15), YawRange(15, 30), YawRange(30, 45), YawRange(45)]
    ckpt = _frontalizer(tmp_path_factory.mktemp("fz") / "fz", every_bin)
    with TestClient(create_app(make_settings(frontalizer_checkpoint=ckpt, frontalize_min_yaw=0))) as c:
        yield c


def test_yaw_ranges_are_numbers_in_the_card(tmp_path: Path) -> None:
    ckpt = _frontalizer(tmp_path / "fz", [YawRange(15, 30), YawRange(45)])
    card = json.loads(ckpt.with_suffix(".json").read_text())
    assert card["metrics"]["FER2013-PublicTest"]["frontalize_helps"] == [
        {"min_abs_yaw": 15.0, "max_abs_yaw": 30.0}, {"min_abs_yaw": 45.0, "max_abs_yaw": None}]
    model = FrontalizerModel(ckpt, device=torch.device("cpu"))
    assert [model.helps_at(y) for y in (0, 14.9, 15, -29.9, 30, 44, 45, -90)] == [
        False, False, True, True, False, False, True, True]


def test_a_display_string_in_the_card_is_a_clear_error(tmp_path: Path) -> None:
    ckpt = _frontalizer(tmp_path / "fz", [">=45°"])
    with pytest.raises(CheckpointError, match=r"fz\.json.*frontalize_helps"):
        FrontalizerModel(ckpt, device=torch.device("cpu"))


def test_frontalize_json_returns_a_png_per_face(frontal_client: TestClient, face_jpeg: bytes) -> None:
    r = frontal_client.post("/frontalize", content=face_jpeg, headers=JPEG)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["arch"] == "frontalizer"
    (face,) = body["faces"]
    png = Image.open(io.BytesIO(base64.b64decode(face["image_png"])))
    assert png.format == "PNG" and png.size == (64, 64)
    assert abs(face["yaw"]) < 20  # the fixture photo is near-frontal
    assert len(face["landmarks"]) == 5


def test_frontalize_png_format(frontal_client: TestClient, face_jpeg: bytes) -> None:
    r = frontal_client.post("/frontalize?format=png", content=face_jpeg, headers=JPEG)
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    miss = frontal_client.post("/frontalize?format=png&face=3", content=face_jpeg, headers=JPEG)
    assert miss.status_code == 422 and miss.json()["error"]["code"] == "no_face"


def test_predict_frontalize_modes(frontal_client: TestClient, face_jpeg: bytes) -> None:
    def face(mode: str) -> dict:
        r = frontal_client.post(f"/predict?frontalize={mode}", content=face_jpeg, headers=JPEG)
        assert r.status_code == 200, r.text
        return r.json()["faces"][0]

    off, on, auto = face("off"), face("on"), face("auto")
    assert off["frontalized"] is False and on["frontalized"] is True and auto["frontalized"] is True
    assert on["emotions"] != off["emotions"]  # a different crop was classified
    assert on["yaw"] == off["yaw"]
    text = frontal_client.get("/metrics").text
    assert 'fer_batch_size_count{model="frontalizer"}' in text
    assert 'fer_model_info{arch="frontalizer"' in text
    names = [m["name"] for m in frontal_client.get("/models").json()["models"]]
    assert names == ["default", "frontalizer"]


def test_auto_only_where_the_card_says_it_helps(make_settings, tmp_path: Path,
                                                face_jpeg: bytes) -> None:
    ckpt = _frontalizer(tmp_path / "fz", [YawRange(45)])
    with TestClient(create_app(make_settings(frontalizer_checkpoint=ckpt, frontalize_min_yaw=0))) as c:
        (face,) = c.post("/predict?frontalize=auto", content=face_jpeg, headers=JPEG).json()["faces"]
        assert face["frontalized"] is False  # a near-frontal face is not in the >=45° bin
        (on,) = c.post("/predict?frontalize=on", content=face_jpeg, headers=JPEG).json()["faces"]
        assert on["frontalized"] is True
    assert json.loads(ckpt.with_suffix(".json").read_text())["arch"] == "frontalizer"


def test_without_a_frontalizer(make_settings, face_jpeg: bytes) -> None:
    with TestClient(create_app(make_settings(frontalizer_warp=False))) as client:
        r = client.post("/frontalize", content=face_jpeg, headers=JPEG)
        assert r.status_code == 501 and r.json()["error"]["code"] == "frontalizer_not_loaded"
        assert "FER_FRONTALIZER_WARP" in r.json()["error"]["message"]
        r = client.post("/predict?frontalize=on", content=face_jpeg, headers=JPEG)
        assert r.status_code == 501
        (face,) = client.post("/predict", content=face_jpeg, headers=JPEG).json()["faces"]
        assert face["frontalized"] is False and isinstance(face["yaw"], float)


def test_warp_only_out_of_the_box(client: TestClient, face_jpeg: bytes) -> None:
    """With no checkpoint the warp-only frontaliser answers, through its batcher and metrics."""
    r = client.post("/frontalize", content=face_jpeg, headers=JPEG)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["arch"] == "mesh_warp" and len(body["faces"]) == 1
    face = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["faces"][0]["image_png"]))))
    assert face.shape == (64, 64) and face.dtype == np.uint8
    assert face.std() > 10  # a real face, not a flat fill
    # auto never picks the warp (its evaluation found it lowers accuracy); on uses it
    (auto,) = client.post("/predict", content=face_jpeg, headers=JPEG).json()["faces"]
    (on,) = client.post("/predict?frontalize=on", content=face_jpeg, headers=JPEG).json()["faces"]
    assert auto["frontalized"] is False and on["frontalized"] is True
    models = client.get("/models").json()
    assert any(m.get("arch") == "mesh_warp" for m in models["models"]), models
    metrics = client.get("/metrics").text
    assert 'fer_batch_size_count{model="frontalizer"}' in metrics


def test_yaw_sign_follows_the_nose(client: TestClient, face_jpeg: bytes) -> None:
    """Mirroring the photo mirrors the yaw estimate."""
    img = np.array(Image.open(io.BytesIO(face_jpeg)))
    buf = io.BytesIO()
    Image.fromarray(img[:, ::-1].copy()).save(buf, format="PNG")
    a = client.post("/detect", content=face_jpeg, headers=JPEG).json()["faces"][0]["yaw"]
    b = client.post("/detect", content=buf.getvalue(), headers={"content-type": "image/png"}).json()
    assert b["faces"][0]["yaw"] == pytest.approx(-a, abs=2.0)


def _png_faces(response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(f["image_png"]))))
            for f in response.json()["faces"]]


def test_a_refiner_checkpoint_is_served_on_the_warp(make_settings, client: TestClient, face_jpeg: bytes,
                                                    tmp_path: Path) -> None:
    """A fresh refiner reproduces warp-only, so the served faces equal the warp's; the card's
    yaw ranges steer frontalize=auto as a GAN card's do."""
    from facemodels.frontalizer.refiner import REFINER_ARCH, frontal_refiner

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "refiner", frontal_refiner(width=8), arch=REFINER_ARCH,
                           model_kwargs={"width": 8}, metrics={"FER2013-PublicTest": {
                               "frontalize_helps": [YawRange(0).to_json()]}})
    warp_only = _png_faces(client.post("/frontalize", content=face_jpeg, headers=JPEG))
    with TestClient(create_app(make_settings(frontalizer_checkpoint=ckpt, frontalize_min_yaw=0))) as c:
        r = c.post("/frontalize", content=face_jpeg, headers=JPEG)
        assert r.json()["model"]["arch"] == REFINER_ARCH
        (refined,) = _png_faces(r)
        (face,) = c.post("/predict", content=face_jpeg, headers=JPEG).json()["faces"]
        assert face["frontalized"] is True  # auto: the card says it helps at every |yaw|
    assert np.abs(refined.astype(int) - warp_only[0].astype(int)).max() <= 1


def test_the_shipped_frontalizer_is_served_beside_the_shipped_classifier(
        make_settings, client: TestClient, face_jpeg: bytes) -> None:
    """A fresh clone's configuration: checkpoints/default brings checkpoints/frontalizer (the
    trained warp refiner) along; it changes the warp's pixels, and since its card's evaluation
    found no yaw bin where it raises accuracy, frontalize=auto leaves every face alone."""
    from service.config import DEFAULT_CHECKPOINTS

    shipped = make_settings(classifier_checkpoint=DEFAULT_CHECKPOINTS / "default.safetensors",
                            use_shipped_extras=True, frontalize_min_yaw=0)
    with TestClient(create_app(shipped)) as c:
        r = c.post("/frontalize", content=face_jpeg, headers=JPEG)
        assert r.json()["model"]["arch"] == "frontal_refiner"
        (refined,) = _png_faces(r)
        roles = {m["name"]: m for m in c.get("/models").json()["models"]}
        assert roles["frontalizer"]["arch"] == "frontal_refiner"
        (auto,) = c.post("/predict?frontalize=auto", content=face_jpeg, headers=JPEG).json()["faces"]
        (on,) = c.post("/predict?frontalize=on", content=face_jpeg, headers=JPEG).json()["faces"]
        assert auto["frontalized"] is False and on["frontalized"] is True
    (warp_only,) = _png_faces(client.post("/frontalize", content=face_jpeg, headers=JPEG))
    assert refined.shape == warp_only.shape == (64, 64)
    assert np.abs(refined.astype(int) - warp_only.astype(int)).mean() > 0.5, "the refiner changed nothing"


@pytest.mark.parametrize(("mode", "arch"), [("warp", "mesh_warp"), ("off", None)])
def test_frontalizer_setting_overrides_the_shipped_checkpoint(make_settings, face_jpeg: bytes,
                                                              mode: str, arch: str | None) -> None:
    """FER_FRONTALIZER=warp serves the warp-only frontaliser although a checkpoint is shipped;
    off turns frontalising off with a 501 that names the setting."""
    from service.config import DEFAULT_CHECKPOINTS

    settings = make_settings(classifier_checkpoint=DEFAULT_CHECKPOINTS / "default.safetensors",
                             use_shipped_extras=True, frontalizer=mode)
    with TestClient(create_app(settings)) as c:
        r = c.post("/frontalize", content=face_jpeg, headers=JPEG)
        roles = {m["role"] for m in c.get("/models").json()["models"]}
        if arch is None:
            assert r.status_code == 501 and "FER_FRONTALIZER=off" in r.json()["error"]["message"]
            assert "frontalizer" not in roles
        else:
            assert r.status_code == 200 and r.json()["model"]["arch"] == arch
            assert "frontalizer" in roles
