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

from service.inference.frontalizer import parse_yaw_bin
from service.main import create_app
from training.checkpoint import save_checkpoint
from training.models import create_model

pytestmark = pytest.mark.e2e
JPEG = {"content-type": "image/jpeg"}
KWARGS = {"width": 8, "feat_dim": 32, "noise_dim": 8, "d_width": 8}


def _frontalizer(path: Path, helps: list[str]) -> Path:
    torch.manual_seed(0)
    model = create_model("frontalizer", num_classes=3, **KWARGS)
    return save_checkpoint(path, model, arch="frontalizer", model_kwargs=KWARGS,
                           metrics={"FER2013-PublicTest": {"frontalize_helps": helps}})


@pytest.fixture(scope="module")
def frontal_client(make_settings, tmp_path_factory: pytest.TempPathFactory):
    """The frontaliser's card says it helps at every yaw; auto applies from 0 degrees."""
    ckpt = _frontalizer(tmp_path_factory.mktemp("fz") / "fz", ["<15°", "15-30°", "30-45°", ">=45°"])
    with TestClient(create_app(make_settings(frontalizer_checkpoint=ckpt, frontalize_min_yaw=0))) as c:
        yield c


def test_yaw_bins_parse() -> None:
    assert parse_yaw_bin("<15°") == (0.0, 15.0)
    assert parse_yaw_bin("15-30°") == (15.0, 30.0)
    assert parse_yaw_bin(">=45°") == (45.0, float("inf"))
    assert parse_yaw_bin("no face found") is None


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
    ckpt = _frontalizer(tmp_path / "fz", [">=45°"])
    with TestClient(create_app(make_settings(frontalizer_checkpoint=ckpt, frontalize_min_yaw=0))) as c:
        (face,) = c.post("/predict?frontalize=auto", content=face_jpeg, headers=JPEG).json()["faces"]
        assert face["frontalized"] is False  # a near-frontal face is not in the >=45° bin
        (on,) = c.post("/predict?frontalize=on", content=face_jpeg, headers=JPEG).json()["faces"]
        assert on["frontalized"] is True
    assert json.loads(ckpt.with_suffix(".json").read_text())["arch"] == "frontalizer"


def test_without_a_frontalizer(client: TestClient, face_jpeg: bytes) -> None:
    r = client.post("/frontalize", content=face_jpeg, headers=JPEG)
    assert r.status_code == 501 and r.json()["error"]["code"] == "frontalizer_not_loaded"
    r = client.post("/predict?frontalize=on", content=face_jpeg, headers=JPEG)
    assert r.status_code == 501
    (face,) = client.post("/predict", content=face_jpeg, headers=JPEG).json()["faces"]
    assert face["frontalized"] is False and isinstance(face["yaw"], float)


def test_yaw_sign_follows_the_nose(client: TestClient, face_jpeg: bytes) -> None:
    """Mirroring the photo mirrors the yaw estimate."""
    img = np.array(Image.open(io.BytesIO(face_jpeg)))
    buf = io.BytesIO()
    Image.fromarray(img[:, ::-1].copy()).save(buf, format="PNG")
    a = client.post("/detect", content=face_jpeg, headers=JPEG).json()["faces"][0]["yaw"]
    b = client.post("/detect", content=buf.getvalue(), headers={"content-type": "image/png"}).json()
    assert b["faces"][0]["yaw"] == pytest.approx(-a, abs=2.0)
