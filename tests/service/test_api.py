"""The real app through an HTTP client, with real image bytes and a real checkpoint."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from facemodels.classes import FER_CLASSES
from service.main import create_app
from service.metrics import batch_buckets

JPEG = {"content-type": "image/jpeg"}


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _assert_error(resp, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"] == ["default"]


def test_not_ready_before_startup(make_settings) -> None:
    c = TestClient(create_app(make_settings()))  # no `with`: the lifespan has not run
    _assert_error(c.get("/readyz"), 503, "not_ready")
    assert c.get("/healthz").status_code == 200


def test_detect_multipart_finds_the_face(client: TestClient, face_jpeg: bytes) -> None:
    r = client.post("/detect", files={"file": ("face.jpg", face_jpeg, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"width": 320, "height": 320}
    (face,) = body["faces"]
    x1, y1, x2, y2 = face["box"]
    assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 320
    assert face["score"] > 0.9
    assert len(face["landmarks"]) == 5
    (lx, ly), (rx, _) = face["landmarks"][:2]
    assert lx < rx and x1 < lx < x2 and y1 < ly < y2


@pytest.mark.parametrize("form", ["raw", "json", "data_url"])
def test_detect_accepts_raw_and_base64_bodies(client: TestClient, face_jpeg: bytes, form: str) -> None:
    if form == "raw":
        r = client.post("/detect", content=face_jpeg, headers=JPEG)
    else:
        b64 = base64.b64encode(face_jpeg).decode()
        image = b64 if form == "json" else f"data:image/jpeg;base64,{b64}"
        r = client.post("/detect", json={"image": image})
    assert r.status_code == 200, r.text
    assert len(r.json()["faces"]) == 1


def test_predict_returns_seven_probabilities(client: TestClient, face_jpeg: bytes) -> None:
    r = client.post("/predict", files={"file": ("face.jpg", face_jpeg, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["name"] == "default" and body["model"]["arch"] == "compact_resnet_s"
    assert body["tta"] is False
    (face,) = body["faces"]
    assert list(face["emotions"]) == list(FER_CLASSES)
    assert sum(face["emotions"].values()) == pytest.approx(1.0, abs=1e-3)
    assert face["dominant"] == max(face["emotions"], key=face["emotions"].get)
    assert {"box", "score", "landmarks"} <= set(face)


def test_predict_options(client: TestClient, face_jpeg: bytes) -> None:
    whole = client.post("/predict?detect=false&tta=true", content=face_jpeg,
                        headers=JPEG).json()
    assert whole["tta"] is True
    (face,) = whole["faces"]
    assert face["box"] == [0.0, 0.0, 320.0, 320.0] and face["landmarks"] == []
    plain = client.post("/predict?detect=false", content=face_jpeg,
                        headers=JPEG).json()
    assert plain["faces"][0]["emotions"] != face["emotions"]  # 10-crop averages other views
    _assert_error(client.post("/predict?model=ensemble", content=face_jpeg,
                              headers=JPEG), 400, "unknown_model")
    unknown = client.post("/predict?model=nope", content=face_jpeg, headers=JPEG)
    _assert_error(unknown, 400, "unknown_model")  # any string names a model; only loaded ones answer
    assert unknown.json()["error"]["message"] == "model 'nope' is not loaded; available: default"
    _assert_error(client.post("/predict?max_faces=0", content=face_jpeg,
                              headers=JPEG), 422, "validation_error")


def test_no_face_is_an_empty_list(client: TestClient) -> None:
    grey = _png(np.full((200, 300, 3), 128, np.uint8))
    r = client.post("/predict", content=grey, headers={"content-type": "image/png"})
    assert r.status_code == 200
    assert r.json()["faces"] == [] and r.json()["image"] == {"width": 300, "height": 200}


def test_batch_keeps_good_images_when_one_is_bad(client: TestClient, face_jpeg: bytes) -> None:
    files = [("files", ("a.jpg", face_jpeg, "image/jpeg")),
             ("files", ("bad.jpg", b"not an image at all", "image/jpeg")),
             ("files", ("c.png", _png(np.full((64, 64, 3), 200, np.uint8)), "image/png"))]
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 200, r.text
    a, bad, c = r.json()["results"]
    assert a["filename"] == "a.jpg" and len(a["result"]["faces"]) == 1
    assert bad["error"]["code"] == "not_an_image" and bad["result"] is None
    assert c["result"]["faces"] == []


def _bomb_png(side: int) -> bytes:
    """A 1-bit PNG of side x side pixels built chunk by chunk (tiny file, huge pixel count)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    raw = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


BAD_INPUTS = [
    ("zero bytes", dict(content=b"", headers=JPEG), 400, "empty_image"),
    ("not an image", dict(content=b"hello world" * 10, headers=JPEG),
     400, "not_an_image"),
    ("unsupported type", dict(content=b"hello", headers={"content-type": "text/plain"}),
     415, "unsupported_media_type"),
    ("missing field", dict(files={"other": ("x.jpg", b"abc", "image/jpeg")}), 422, "validation_error"),
    ("json without image", dict(json={"picture": "abc"}), 422, "validation_error"),
    ("bad base64", dict(json={"image": "%%%not-base64%%%"}), 400, "invalid_base64"),
    ("no body", dict(), 422, "validation_error"),
]


@pytest.mark.parametrize(("name", "kwargs", "status", "code"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_table(client: TestClient, face_jpeg: bytes, name: str, kwargs: dict, status: int,
                         code: str) -> None:
    _assert_error(client.post("/predict", **kwargs), status, code)
    # the server keeps serving afterwards
    assert client.post("/predict", content=face_jpeg, headers=JPEG).status_code == 200


def test_truncated_gif_and_limits(make_settings, face_jpeg: bytes) -> None:
    gif = io.BytesIO()
    Image.new("RGB", (32, 32)).save(gif, format="GIF")
    with TestClient(create_app(make_settings(max_upload_bytes=200_000, max_image_pixels=1_000_000))) as c:
        _assert_error(c.post("/predict", content=face_jpeg[: len(face_jpeg) // 2],
                             headers=JPEG), 400, "truncated_image")
        _assert_error(c.post("/predict", files={"file": ("a.gif", gif.getvalue(), "image/png")}),
                      415, "unsupported_media_type")
        _assert_error(c.post("/predict", content=b"\xff" * 300_000, headers=JPEG),
                      413, "payload_too_large")
        _assert_error(c.post("/predict", files={"file": ("big.jpg", b"\xff" * 300_000, "image/jpeg")}),
                      413, "payload_too_large")
        _assert_error(c.post("/predict", content=_bomb_png(20_000), headers={"content-type": "image/png"}),
                      413, "too_many_pixels")
        assert c.post("/predict", content=face_jpeg, headers=JPEG).status_code == 200


def test_metrics_after_requests(client: TestClient, face_jpeg: bytes) -> None:
    client.post("/predict", content=face_jpeg, headers=JPEG)
    client.post("/predict", content=b"", headers=JPEG)
    text = client.get("/metrics").text
    assert 'fer_requests_total{method="POST",route="/predict",status="200"}' in text
    assert 'fer_requests_total{method="POST",route="/predict",status="400"}' in text
    assert 'fer_request_latency_seconds_bucket{le="0.005",method="POST",route="/predict"}' in text
    assert _value(text, 'fer_batch_size_count{model="default"}') >= 1
    assert _value(text, 'fer_model_compute_seconds_count{model="default"}') >= 1
    assert _value(text, 'fer_queue_wait_seconds_count{model="default"}') >= 1
    assert _value(text, 'fer_faces_per_image_count') >= 1
    assert _value(text, 'fer_errors_total{kind="empty_image"}') >= 1
    assert 'fer_queue_depth{model="default"} 0.0' in text
    assert 'fer_model_info{arch="compact_resnet_s"' in text
    assert "fer_ready 1.0" in text


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in metrics")


def test_models_lists_cards(client: TestClient) -> None:
    m, frontalizer = client.get("/models").json()["models"]
    assert frontalizer["name"] == "frontalizer" and frontalizer["arch"] == "mesh_warp"
    assert m["name"] == "default" and m["arch"] == "compact_resnet_s"
    assert m["card"]["cfg"]["input_size"] == 44
    assert m["card"]["metrics"]["PublicTest"]["acc"] == 0.0


def test_openapi_documents_the_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/detect", "/predict", "/predict/batch", "/healthz", "/readyz", "/models"} <= set(spec["paths"])
    content = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/jpeg", "application/json"} <= set(content)


def test_api_key(make_settings, face_jpeg: bytes) -> None:
    with TestClient(create_app(make_settings(api_key="s3cret"))) as c:
        _assert_error(c.post("/detect", content=face_jpeg, headers=JPEG),
                      401, "unauthorized")
        ok = c.post("/detect", content=face_jpeg, headers={**JPEG, "x-api-key": "s3cret"})
        assert ok.status_code == 200
        assert c.get("/healthz").status_code == 200


def test_missing_checkpoint_stops_startup(make_settings, tmp_path) -> None:
    from facemodels.checkpoint import CheckpointError

    app = create_app(make_settings(classifier_checkpoint=tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="missing"), TestClient(app):
        pass


def test_unknown_route_uses_error_shape(client: TestClient) -> None:
    _assert_error(client.get("/nope"), 404, "not_found")


def test_default_settings_serve_the_shipped_model(detector_weights: Path, face_jpeg: bytes,
                                                  test_cache_dir: Path) -> None:
    from service.config import DEFAULT_CHECKPOINTS, Settings

    # nothing else set: the shipped default (the cache only keeps ONNX files out of ~/.cache)
    settings = Settings(detector_weights=detector_weights, cache_dir=test_cache_dir)
    assert settings.classifier_checkpoint == DEFAULT_CHECKPOINTS / "default.safetensors"
    with TestClient(create_app(settings)) as c:
        models = {m["name"]: m for m in c.get("/models").json()["models"]}
        assert models["default"]["card"]["metrics"]["PublicTest"]["acc_tta"] > 0.6
        if c.app.state.engine.backend == "onnx" and (DEFAULT_CHECKPOINTS / "default.int8.onnx").is_file():
            assert models["default"]["precision"] == "int8"  # the shipped int8 graph, by default on CPU
        body = c.post("/predict", content=face_jpeg, headers=JPEG).json()
        shipped_ensemble = (DEFAULT_CHECKPOINTS / "ensemble.safetensors").is_file()
        assert ("ensemble" in models) == shipped_ensemble
        if shipped_ensemble:
            voted = c.post("/predict?model=ensemble", content=face_jpeg, headers=JPEG).json()
            (ensemble_face,) = voted["faces"]
            assert ensemble_face["dominant"] == "happy"
    (face,) = body["faces"]
    assert face["dominant"] == "happy"  # the astronaut photo is a broad smile


def test_shipped_extras_are_found_beside_a_moved_classifier(
    tmp_path: Path, detector_weights: Path, face_jpeg: bytes, test_cache_dir: Path,
) -> None:
    """A container bakes checkpoints/ elsewhere: the extras come from the classifier's folder."""
    import shutil

    from service.config import DEFAULT_CHECKPOINTS, Settings

    if not (DEFAULT_CHECKPOINTS / "ensemble.safetensors").is_file():
        pytest.skip("no shipped ensemble in checkpoints/")
    for name in ("default", "ensemble"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(DEFAULT_CHECKPOINTS / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    settings = Settings(detector_weights=detector_weights, cache_dir=test_cache_dir,
                        classifier_checkpoint=tmp_path / "default.safetensors")
    with TestClient(create_app(settings)) as c:
        names = {m["name"] for m in c.get("/models").json()["models"]}
        assert names == {"default", "ensemble", "frontalizer"}
        (tmp_path / "ensemble.safetensors").unlink()
        assert c.post("/predict?model=ensemble", content=face_jpeg, headers=JPEG).status_code == 200
    with TestClient(create_app(settings)) as c:
        assert {m["name"] for m in c.get("/models").json()["models"]} == {"default", "frontalizer"}


def test_request_metrics_count_unhandled_errors_and_bound_method_labels(make_settings) -> None:
    app = create_app(make_settings(max_batch_size=8, detector_batch_size=16))

    @app.get("/boom")
    def boom() -> None:  # a route that fails the way a bug would
        raise RuntimeError("bug")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom")
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert c.request("BREW", "/healthz").status_code == 405
        text = c.get("/metrics").text
    assert _value(text, 'fer_requests_total{method="GET",route="/boom",status="500"}') == 1
    assert _value(text, 'fer_errors_total{kind="internal_error"}') == 1
    assert 'method="other"' in text and "BREW" not in text
    # buckets reach the larger of the classifier and detector batch limits
    batch_lines = [ln for ln in text.splitlines() if ln.startswith("fer_batch_size_bucket")]
    assert any('le="16.0"' in ln for ln in batch_lines)
    assert batch_buckets(8) == (1, 2, 4, 8) and batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
