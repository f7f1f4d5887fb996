"""The OpenAPI document the app serves, and the /docs and /redoc pages that show it offline."""

from __future__ import annotations

from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from service.schemas import ErrorResponse

KEY = "k3y-for-tests"
ERROR_REF = "#/components/schemas/ErrorResponse"
#: Every operation and the error statuses it can answer (401 comes with FER_API_KEY).
STATUSES = {
    ("get", "/healthz"): set(),
    ("get", "/readyz"): {503},
    ("get", "/metrics"): set(),
    ("get", "/models"): set(),
    ("post", "/detect"): {400, 408, 413, 415, 422, 503},
    ("post", "/predict"): {400, 408, 413, 415, 422, 501, 503},
    ("post", "/predict/batch"): {400, 408, 413, 415, 422, 501, 503},
    ("post", "/predict/video"): {400, 408, 413, 415, 422, 501, 503},
    ("post", "/frontalize"): {400, 408, 413, 415, 422, 501, 503},
}
OPEN = {("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics")}


def _spec(client: TestClient, **headers: str) -> dict:
    r = client.get("/openapi.json", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def _operations(spec: dict) -> dict[tuple[str, str], dict]:
    return {(method, path): op for path, item in spec["paths"].items() for method, op in item.items()}


@pytest.fixture(scope="module")
def keyed(make_settings):
    with TestClient(create_app(make_settings(api_key=KEY))) as c:
        yield c


def test_every_operation_documents_the_errors_it_answers(client: TestClient) -> None:
    spec = _spec(client)
    operations = _operations(spec)
    assert set(operations) == set(STATUSES)
    for key, op in operations.items():
        errors = {int(s) for s in op["responses"] if int(s) >= 400}
        assert errors == STATUSES[key], key
        for status in errors:
            (schema,) = [c["schema"] for c in op["responses"][str(status)]["content"].values()]
            assert schema == {"$ref": ERROR_REF}, (key, status)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert set(spec["components"]["schemas"]["ErrorResponse"]["properties"]) == {"error"}
    retry = operations[("post", "/predict")]["responses"]["503"]["headers"]["Retry-After"]
    assert retry["schema"]["type"] == "integer"


def test_the_documented_422_is_the_shape_the_app_answers(client: TestClient, face_jpeg: bytes) -> None:
    spec = _spec(client)
    schema = spec["paths"]["/predict"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": ERROR_REF}
    for r in (client.post("/predict?max_faces=0", content=face_jpeg, headers={"content-type": "image/jpeg"}),
              client.post("/predict", json={"no": "image"}),
              client.post("/predict/video?fps=-1", content=b"x", headers={"content-type": "video/mp4"})):
        assert r.status_code == 422, r.text
        body = ErrorResponse.model_validate(r.json())
        assert body.error.code == "validation_error" and set(r.json()) == {"error"}


def test_content_other_than_json_is_documented(client: TestClient) -> None:
    ops = _operations(_spec(client))
    assert "text/plain" in ops[("get", "/metrics")]["responses"]["200"]["content"]
    assert "text/csv" in ops[("post", "/predict/video")]["responses"]["200"]["content"]
    assert "image/png" in ops[("post", "/frontalize")]["responses"]["200"]["content"]
    ready = ops[("get", "/readyz")]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ready == {"$ref": "#/components/schemas/ReadyResponse"}


def test_batch_declares_its_multipart_json_and_raw_bodies(client: TestClient) -> None:
    body = _spec(client)["paths"]["/predict/batch"]["post"]["requestBody"]
    assert body["required"] is True
    content = body["content"]
    assert {"multipart/form-data", "application/json", "image/jpeg", "image/png"} <= set(content)
    files = content["multipart/form-data"]["schema"]["properties"]["files"]
    assert files["type"] == "array" and files["items"]["format"] == "binary"
    images = content["application/json"]["schema"]["properties"]["images"]
    assert images["type"] == "array" and images["minItems"] == 1


def test_without_a_key_no_security_is_declared(client: TestClient) -> None:
    spec = _spec(client)
    assert "securitySchemes" not in spec.get("components", {})
    for key, op in _operations(spec).items():
        assert "security" not in op and "401" not in op["responses"], key


@pytest.mark.parametrize("metrics_public", [True, False])
def test_with_a_key_the_api_key_is_a_security_scheme(make_settings, metrics_public: bool) -> None:
    app = create_app(make_settings(api_key=KEY, metrics_public=metrics_public))
    spec = _spec(TestClient(app), **{"X-API-Key": KEY})  # the document itself needs the key
    assert spec["components"]["securitySchemes"] == {"ApiKey": {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": spec["components"]["securitySchemes"]["ApiKey"]["description"]}}
    open_ = OPEN if metrics_public else OPEN - {("get", "/metrics")}
    for key, op in _operations(spec).items():
        if key in open_:
            assert "security" not in op and "401" not in op["responses"], key
        else:
            assert op["security"] == [{"ApiKey": []}], key
            assert op["responses"]["401"]["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}


# --- /docs and /redoc: every file from this server -------------------------------------------


class _Refs(HTMLParser):
    """Every src and href in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def _refs(html: str) -> list[str]:
    parser = _Refs()
    parser.feed(html)
    return parser.refs


@pytest.mark.parametrize(("page", "bundle"), [("/docs", "swagger-ui-bundle.js"),
                                              ("/redoc", "redoc.standalone.js")])
def test_doc_pages_load_nothing_from_another_host(client: TestClient, page: str, bundle: str) -> None:
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    refs = _refs(r.text)
    assert any(ref.endswith(bundle) for ref in refs), refs
    origin = urlsplit(str(client.base_url))
    for ref in refs:
        url = urlsplit(urljoin(str(client.base_url) + page, ref))
        assert (url.scheme, url.netloc) == (origin.scheme, origin.netloc), ref
        asset = client.get(url.path)
        assert asset.status_code == 200 and len(asset.content) > 100, ref
    for host in ("cdn.jsdelivr.net", "unpkg.com", "fonts.googleapis.com", "fastapi.tiangolo.com"):
        assert host not in r.text
    assert "'/openapi.json'" in r.text or '"/openapi.json"' in r.text  # the document, same origin
    csp = r.headers["content-security-policy"]  # and the browser may load nothing from elsewhere
    assert "default-src 'none'" in csp and "connect-src 'self';" in csp and "http" not in csp


def test_swagger_ui_asks_no_outside_validator(client: TestClient) -> None:
    assert '"validatorUrl": null' in client.get("/docs").text


def test_docs_assets_have_their_types_and_nothing_else_is_served(client: TestClient) -> None:
    js = client.get("/docs/assets/swagger-ui-bundle.js")
    assert js.headers["content-type"].startswith("text/javascript") and b"SwaggerUIBundle" in js.content
    assert client.get("/docs/assets/swagger-ui.css").headers["content-type"].startswith("text/css")
    assert client.get("/docs/assets/favicon.png").content.startswith(b"\x89PNG")
    for name in ("core.py", "..%2F__init__.py", "nope.js"):
        r = client.get(f"/docs/assets/{name}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_doc_pages_behind_a_path_prefix(make_settings) -> None:
    """Behind a reverse proxy's prefix (uvicorn --root-path) every URL carries it."""
    with TestClient(create_app(make_settings()), root_path="/fer") as c:
        html = c.get("/docs").text
        assert "/fer/docs/assets/swagger-ui-bundle.js" in html and "/fer/openapi.json" in html
        assert c.get("/openapi.json").json()["servers"] == [{"url": "/fer"}]
