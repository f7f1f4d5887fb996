"""GET / and /static/*: the web page's files, its headers, FER_WEB_PAGE, the API key and CORS.

No models are needed (the app's lifespan does not run); the page itself is tested in a real
browser in tests/service/browser.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.page import STATIC_DIR, STATIC_FILES
from service.config import Settings
from service.main import create_app

REPO = Path(__file__).resolve().parents[2]


def _client(**settings: object) -> TestClient:
    return TestClient(create_app(Settings(device="cpu", **settings)))  # no `with`: no models loaded


def test_the_page_and_its_files_are_served() -> None:
    client = _client()
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>FER service" in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    for name, media_type in STATIC_FILES.items():
        r = client.get(f"/static/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"] == media_type
        assert r.content == (STATIC_DIR / name).read_bytes()


@pytest.mark.parametrize("path", ["/static/index.html", "/static/nope.js", "/static/..%2Fmain.py",
                                  "/static/../main.py", "/index.html"])
def test_nothing_else_is_served(path: str) -> None:
    r = _client().get(path)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_the_page_asks_only_for_its_own_files() -> None:
    """index.html loads exactly the listed static files; no file names a URL elsewhere."""
    html = (STATIC_DIR / "index.html").read_text()
    loaded = set(re.findall(r'(?:src|href)="static/([^"]+)"', html))
    assert loaded == set(STATIC_FILES)
    assert {p.name for p in STATIC_DIR.iterdir()} == set(STATIC_FILES) | {"index.html"}
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        urls = set(re.findall(r"""(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s"'`)]*""", text, flags=re.I))
        assert urls <= {"http://www.w3.org/2000/svg"}, f"{path.name} names {urls}"  # an XML namespace
        assert "@import" not in text and "url(" not in text.replace("URL(", ""), path.name


def test_web_page_off_is_a_404() -> None:
    client = _client(web_page=False)
    for path in ("/", "/static/app.js"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found"
    assert client.get("/healthz").status_code == 200


def test_web_page_setting_reads_fer_web_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FER_WEB_PAGE", raising=False)
    assert Settings().web_page is True
    monkeypatch.setenv("FER_WEB_PAGE", "false")
    assert Settings().web_page is False


def test_with_an_api_key_the_page_loads_and_its_api_calls_need_the_key() -> None:
    """The page holds no data (like /docs); what it sends to the API carries X-API-Key."""
    client = _client(api_key="k3y")
    assert client.get("/").status_code == 200
    assert client.get("/static/app.js").status_code == 200
    r = client.post("/predict", content=b"x", headers={"content-type": "image/jpeg"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert "X-API-Key" in (STATIC_DIR / "app.js").read_text()


def test_cors_applies_to_the_page_like_to_every_route() -> None:
    client = _client(cors_origins=["https://app.example"])
    r = client.get("/", headers={"Origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = client.get("/", headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in _client().get("/", headers={"Origin": "https://app.example"}).headers


def test_the_static_files_are_package_data() -> None:
    """A non-editable install (the Docker images) ships service/static: pyproject says so."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["service"]
    for path in STATIC_DIR.iterdir():
        rel = path.relative_to(STATIC_DIR.parent).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not package data of service"
