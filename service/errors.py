"""One JSON error shape for every failure: ``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.inference.batcher import BatcherStoppedError, QueueFullError
from service.inference.decode import ImageError
from service.inference.pipeline import FrontalizerUnavailableError
from service.metrics import CLIENT_CLOSED_REQUEST, note_client_disconnect, note_error

__all__ = ["ApiError", "error_response", "install_error_handlers"]

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with an HTTP status and a machine-readable code, raised by routes."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=headers)


def _record(request: Request, code: str) -> None:
    note_error(request, code)


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception the app can raise onto the error shape and a meaningful status."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        _record(request, exc.code)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(ImageError)
    async def _image(request: Request, exc: ImageError) -> JSONResponse:
        _record(request, exc.code)
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(QueueFullError)
    async def _busy(request: Request, exc: QueueFullError) -> JSONResponse:
        _record(request, "queue_full")
        retry = str(max(1, math.ceil(exc.retry_after)))
        return error_response(503, "queue_full", str(exc), {"Retry-After": retry})

    @app.exception_handler(BatcherStoppedError)
    async def _stopping(request: Request, exc: BatcherStoppedError) -> JSONResponse:
        _record(request, "shutting_down")
        return error_response(503, "shutting_down", str(exc), {"Retry-After": "5"})

    @app.exception_handler(FrontalizerUnavailableError)
    async def _no_frontalizer(request: Request, exc: FrontalizerUnavailableError) -> JSONResponse:
        _record(request, "frontalizer_not_loaded")
        return error_response(501, "frontalizer_not_loaded", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        _record(request, "validation_error")
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(422, "validation_error", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(
            exc.status_code, "http_error")
        _record(request, code)
        return error_response(exc.status_code, code, str(exc.detail),
                              getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client hung up (mid-upload, or before the models ran): nobody reads this answer.
        # Not a server error: one INFO line, and the metrics count it under its own status.
        note_client_disconnect(request)
        log.info("client disconnected before the answer to %s %s; request dropped",
                 request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Counted by the request-metrics middleware, which saw the exception pass.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")
