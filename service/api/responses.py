"""OpenAPI ``responses`` for the error statuses a route can answer.

Every error has one shape (:class:`service.schemas.ErrorResponse`), 422 included: the app's
handler answers validation errors in it, so the document names it instead of FastAPI's default
``HTTPValidationError``. Routes list exactly the statuses they can return; 401 is added by
:mod:`service.main` to the routes that need ``X-API-Key`` when ``FER_API_KEY`` is set.
"""

from __future__ import annotations

from typing import Any

from service.schemas import ErrorResponse

__all__ = ["ERROR_DESCRIPTIONS", "UPLOAD_ERRORS", "error_responses"]

#: What each error status means, for the document.
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "the upload cannot be used (empty, undecodable or truncated image or video, invalid base64 "
         "or multipart), or `model=` names no loaded classifier (`unknown_model`)",
    401: "`X-API-Key` header missing or wrong (`unauthorized`; only when FER_API_KEY is set)",
    408: "the request body did not arrive in time (`request_timeout`; the connection is closed)",
    413: "over a limit: bytes, pixels, images per request, video length or frames",
    415: "a media type that is not accepted (`unsupported_media_type`)",
    422: "an invalid query parameter or body (`validation_error`), or a face index past the faces "
         "found (`no_face`)",
    501: "the request needs a frontaliser and this server runs without one (`frontalizer_not_loaded`)",
    503: "models still loading (`not_ready`), a batch queue full (`queue_full`) or shutting down "
         "(`shutting_down`): retry after `Retry-After` seconds",
}

_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                                "schema": {"type": "integer", "minimum": 1}}}

#: The statuses of every route that reads an image upload.
UPLOAD_ERRORS = (400, 408, 413, 415, 422, 503)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for ``statuses``, each with the error schema (503 with its header)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        if status == 503:
            entry["headers"] = _RETRY_AFTER
        out[status] = entry
    return out
