"""FER_API_KEY through the real app: which routes need X-API-Key, which stay open by choice, and
that the key is read from the header only."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api.docs import ASSETS, ASSETS_PREFIX
from service.config import Settings
from service.main import create_app

KEY = "k3y-for-tests"
JPEG = {"content-type": "image/jpeg"}
KEYED_GETS = ("/models", "/docs", "/redoc", "/openapi.json")
OPEN_GETS = ("/healthz", "/readyz", "/", "/static/app.js", *(f"{ASSETS_PREFIX}/{name}" for name in ASSETS))


def _unauthorized(response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"


@pytest.fixture(scope="module")
def keyed(make_settings):
    with TestClient(create_app(make_settings(api_key=KEY))) as c:
        yield c


@pytest.fixture(scope="module")
def keyed_private_metrics(make_settings):
    with TestClient(create_app(make_settings(api_key=KEY, metrics_public=False))) as c:
        yield c


@pytest.mark.parametrize("path", KEYED_GETS)
def test_models_and_the_docs_need_the_key(keyed: TestClient, path: str) -> None:
    _unauthorized(keyed.get(path))
    _unauthorized(keyed.get(path, headers={"X-API-Key": KEY + "x"}))
    assert keyed.get(path, headers={"X-API-Key": KEY}).status_code == 200


def test_the_api_needs_the_key(keyed: TestClient, face_jpeg: bytes) -> None:
    for route in ("/detect", "/predict", "/predict/batch", "/frontalize"):
        _unauthorized(keyed.post(route, content=face_jpeg, headers=JPEG))
        ok = keyed.post(route, content=face_jpeg, headers={**JPEG, "X-API-Key": KEY})
        assert ok.status_code == 200, (route, ok.text)


@pytest.mark.parametrize("path", OPEN_GETS)
def test_probes_the_page_and_the_docs_bundles_stay_open(keyed: TestClient, path: str) -> None:
    assert keyed.get(path).status_code == 200


def test_metrics_are_open_by_default_and_keyed_when_not_public(
        keyed: TestClient, keyed_private_metrics: TestClient) -> None:
    assert keyed.get("/metrics").status_code == 200
    _unauthorized(keyed_private_metrics.get("/metrics"))
    r = keyed_private_metrics.get("/metrics", headers={"X-API-Key": KEY})
    assert r.status_code == 200 and "fer_requests_total" in r.text
    assert keyed_private_metrics.get("/healthz").status_code == 200  # probes stay open


@pytest.mark.parametrize("name", ["api_key", "x-api-key", "X-API-Key", "key", "token"])
def test_a_key_in_the_query_string_is_refused(keyed: TestClient, face_jpeg: bytes, name: str) -> None:
    """URLs are logged (access logs, proxies): the key is taken from the header only."""
    _unauthorized(keyed.get(f"/models?{name}={KEY}"))
    _unauthorized(keyed.get(f"/openapi.json?{name}={KEY}"))
    _unauthorized(keyed.post(f"/predict?{name}={KEY}", content=face_jpeg, headers=JPEG))


def test_a_key_in_a_cookie_is_refused(keyed: TestClient) -> None:
    keyed.cookies.set("X-API-Key", KEY)
    try:
        _unauthorized(keyed.get("/models"))
    finally:
        keyed.cookies.clear()


def test_without_a_key_everything_is_open(client: TestClient) -> None:
    for path in (*KEYED_GETS, "/metrics"):
        assert client.get(path).status_code == 200, path


def test_metrics_public_reads_fer_metrics_public(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FER_METRICS_PUBLIC", raising=False)
    assert Settings().metrics_public is True
    monkeypatch.setenv("FER_METRICS_PUBLIC", "false")
    assert Settings().metrics_public is False
    description = Settings.model_fields["metrics_public"].description
    assert "FER_METRICS_PUBLIC" in description and "Prometheus" in description
