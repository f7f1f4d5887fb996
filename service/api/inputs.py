"""Reading the uploaded image from a request: multipart, raw image body, or base64 JSON."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile

from service.config import Settings
from service.errors import ApiError
from service.inference.decode import ImageError, check_content_type, decode_image

__all__ = ["IMAGE_REQUEST_BODY", "Upload", "decode_upload", "read_uploads"]

#: OpenAPI description of the three accepted request bodies.
IMAGE_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}}}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
            "image/bmp": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {"image": {"type": "string", "description": "base64 bytes or data URL"}}}},
        },
    }
}

_MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around the file


@dataclass(frozen=True, slots=True)
class Upload:
    data: bytes
    content_type: str | None
    filename: str | None = None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"request body exceeds the {limit}-byte upload limit")


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _from_base64(text: Any) -> bytes:
    if not isinstance(text, str) or not text:
        raise ApiError(422, "validation_error", "body.image: a non-empty base64 string is required")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "invalid_base64", f"body.image is not valid base64: {e}") from e


async def read_uploads(request: Request, settings: Settings, *, many: bool = False) -> list[Upload]:
    """The image(s) in the request. ``many`` accepts several ``files`` (or ``file``) parts."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = settings.max_upload_bytes * (settings.max_batch_images if many else 1)
    if media == "multipart/form-data":
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit + _MULTIPART_SLACK:
            raise _too_large(limit)
        form = await request.form(max_files=settings.max_batch_images if many else 1, max_fields=16)
        parts = [p for key in ("files", "file", "image") for p in form.getlist(key)]
        files = [p for p in parts if isinstance(p, UploadFile)]
        if not files:
            names = "'files' or 'file'" if many else "'file'"
            raise ApiError(422, "validation_error", f"multipart body has no {names} file field")
        if len(files) > settings.max_batch_images:
            raise ApiError(413, "too_many_images",
                           f"{len(files)} images sent; the limit is {settings.max_batch_images}")
        uploads = []
        for f in files:
            data = await f.read(settings.max_upload_bytes + 1)
            uploads.append(Upload(data, f.content_type, f.filename))
        return uploads
    if media == "application/json":
        raw = await _body(request, limit * 4 // 3 + 1024)
        try:
            payload = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(422, "validation_error", f"body is not valid JSON: {e}") from e
        if not isinstance(payload, dict):
            raise ApiError(422, "validation_error", "JSON body must be an object with an 'image' field")
        items = payload.get("images") if many and "images" in payload else [payload.get("image")]
        if not isinstance(items, list) or not items or items == [None]:
            raise ApiError(422, "validation_error", "body.image: field required")
        return [Upload(_from_base64(t), None) for t in items]
    if not media:
        raise ApiError(422, "validation_error",
                       "no image: send multipart 'file', an image body, or JSON with 'image'")
    try:
        check_content_type(media)
    except ImageError as e:
        raise ApiError(e.status, e.code, e.message) from e
    return [Upload(await _body(request, settings.max_upload_bytes), media)]


async def decode_upload(upload: Upload, settings: Settings) -> np.ndarray:
    """Decode and validate off the event loop (large JPEGs take tens of milliseconds)."""
    return await asyncio.to_thread(
        decode_image, upload.data, content_type=upload.content_type,
        max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels)
