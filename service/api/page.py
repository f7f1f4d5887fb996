"""GET /: the web page for people (plain HTML, CSS and JavaScript from ``service/static``).

No build step and nothing fetched from elsewhere: the page, its script, its style sheet and its
icon are the only files, each served from here, and the Content-Security-Policy lets the page
talk to this server only. The page itself needs no API key (it holds no data, like ``/docs``);
the requests it makes carry the key the user types when the server answers 401. ``FER_WEB_PAGE``
off leaves these routes out, so ``/`` is a 404.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from service.errors import ApiError

__all__ = ["STATIC_DIR", "STATIC_FILES", "router"]

#: The page's files, shipped inside the package (package-data in pyproject.toml).
STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
#: Every file the page may load, with its content type; nothing else under /static is served.
STATIC_FILES: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

#: Same-origin only: the page cannot load or send anything anywhere but this server.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "media-src 'self' blob: mediastream:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["page"], include_in_schema=False)


def _file(name: str, media_type: str) -> Response:
    return Response((STATIC_DIR / name).read_bytes(), media_type=media_type, headers=_HEADERS)


@router.get("/")
async def index() -> Response:
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/static/{name}")
async def static(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", f"no static file {name[:100]!r}")
    return _file(name, media_type)
