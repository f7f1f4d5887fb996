"""``/openapi.json``, ``/docs`` (Swagger UI) and ``/redoc``, with every file they load served from
this server: they work offline and behind a firewall, and nothing is fetched from a CDN.

The Swagger UI and ReDoc bundles are the copies that the ``fastapi-offline`` package ships (a
``serve`` dependency); nothing of it runs but those files. :data:`router` (the document and the two
pages) needs the API key when one is set (:mod:`service.main` adds it); :data:`assets_router`
(the bundles and the icon: public library files, no data) stays open like the web page's files.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from service.errors import ApiError

__all__ = ["ASSETS", "ASSETS_PREFIX", "assets_router", "router"]

#: Where the bundles are served.
ASSETS_PREFIX = "/docs/assets"
#: The bundled files, each with its content type; nothing else under ASSETS_PREFIX is served.
ASSETS: dict[str, str] = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
_ASSET_DIR = Path(str(files("fastapi_offline") / "static"))
#: Swagger UI asks no validator service about the document (its default is an outside one).
_SWAGGER_UI_PARAMETERS: dict[str, Any] = {"validatorUrl": None}
_NO_STORE = {"Cache-Control": "no-store"}  # the document may change with the settings
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def _page(html: HTMLResponse) -> HTMLResponse:
    """``html`` with a Content-Security-Policy that lets it load from and talk to this server only
    (ReDoc's menu shows a logo from its maker's CDN: the browser does not fetch it). The page's own
    inline script (Swagger UI's start-up) is allowed by its hash; both UIs style inline."""
    body = bytes(html.body).decode()
    hashes = "".join(f" 'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                     for s in _INLINE_SCRIPT.findall(body))
    html.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src 'self'{hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    html.headers["X-Content-Type-Options"] = "nosniff"
    return html


router = APIRouter(include_in_schema=False)
assets_router = APIRouter(include_in_schema=False)


def _prefix(request: Request) -> str:
    """The path prefix a reverse proxy serves the app under (``--root-path``), or ""."""
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    document = request.app.openapi()
    if prefix := _prefix(request):
        document = {**document, "servers": [{"url": prefix}]}
    return JSONResponse(document, headers=_NO_STORE)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _prefix(request)
    return _page(get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json", title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{ASSETS_PREFIX}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_PREFIX}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_PREFIX}/favicon.png",
        oauth2_redirect_url=None, swagger_ui_parameters=_SWAGGER_UI_PARAMETERS))


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = _prefix(request)
    return _page(get_redoc_html(
        openapi_url=f"{root}/openapi.json", title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_PREFIX}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_PREFIX}/favicon.png", with_google_fonts=False))


@assets_router.get(ASSETS_PREFIX + "/{name}")
async def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", f"no docs asset {name[:100]!r}")
    return FileResponse(_ASSET_DIR / name, media_type=media_type,
                        headers={"Cache-Control": "public, max-age=86400"})
