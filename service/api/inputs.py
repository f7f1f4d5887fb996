"""Reading the uploaded image from a request: multipart, raw image body, or base64 JSON.

Every limit holds before the body is parsed, whatever its shape: the byte limit is checked on the
declared ``Content-Length`` and again while the body streams in, and the image count is checked
while a multipart body is parsed, or (JSON) on a bound of how many values the body can hold before
``json.loads`` runs and on the ``images`` list right after it, before any base64 is decoded.

A JSON body larger than :data:`INLINE_JSON_BYTES` is parsed and its base64 decoded in a worker
thread, in steps that each hold the GIL briefly (json's pure-Python scanner, so every long string
is its own C call; base64 in 1 MiB pieces): the event loop, and ``/healthz``, stay responsive
while a batch of large images is parsed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import json.scanner
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service.config import Settings
from service.errors import ApiError
from service.inference.decode import (
    ImageError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    check_content_type,
    decode_image,
    decode_small_image,
)

__all__ = ["IMAGES_REQUEST_BODY", "IMAGE_REQUEST_BODY", "Upload", "decode_upload", "ensure_client_connected",
           "read_uploads", "upload_request_body"]

_BINARY: dict[str, Any] = {"type": "string", "format": "binary"}
#: One file part named ``file``: what every single-upload route's multipart body holds.
_ONE_FILE: dict[str, Any] = {"type": "object", "required": ["file"], "properties": {"file": _BINARY}}


def upload_request_body(media_types: tuple[str, ...], *, multipart_schema: dict[str, Any] | None = None,
                        json_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for an upload: multipart (one ``file`` part unless
    ``multipart_schema`` says otherwise), a raw body of one of ``media_types``, and optionally a
    JSON body of ``json_schema``."""
    content: dict[str, Any] = {
        "multipart/form-data": {"schema": multipart_schema or _ONE_FILE},
        **{t: {"schema": dict(_BINARY)} for t in media_types},
    }
    if json_schema is not None:
        content["application/json"] = {"schema": json_schema}
    return {"requestBody": {"required": True, "content": content}}


_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp")
_BASE64_IMAGE: dict[str, Any] = {
    "type": "string", "minLength": 1,
    "description": "the image's bytes in base64, or a data:<image type>;base64,<data> URL"}

#: OpenAPI description of the three accepted request bodies of a one-image route.
IMAGE_REQUEST_BODY: dict[str, Any] = upload_request_body(
    _IMAGE_TYPES,
    json_schema={"type": "object", "required": ["image"], "properties": {"image": _BASE64_IMAGE}},
)

#: An entry of a JSON batch. Its value is not constrained: an entry that is no usable image (not
#: a string, empty, bad base64, another type in its data URL, undecodable) is answered in its own
#: entry of the results, and the other images are still classified.
_BATCH_ENTRY: dict[str, Any] = {
    "description": _BASE64_IMAGE["description"] + "; an entry that is not (or not a usable image) "
                   "gets its own error in the results, not the request's"}

#: ``POST /predict/batch``: several ``files`` parts (or one ``file``), JSON ``images`` (or one
#: ``image``), or one raw image. At most FER_MAX_BATCH_IMAGES images (more is a 413).
IMAGES_REQUEST_BODY: dict[str, Any] = upload_request_body(
    _IMAGE_TYPES,
    multipart_schema={
        "type": "object",
        "properties": {"files": {"type": "array", "items": _BINARY, "minItems": 1,
                                 "description": "one part per image, each named files"},
                       "file": _BINARY},
        "anyOf": [{"required": ["files"]}, {"required": ["file"]}],
    },
    json_schema={
        "type": "object",
        "properties": {"images": {"type": "array", "minItems": 1, "items": _BATCH_ENTRY},
                       "image": {**_BATCH_ENTRY, "description": "one image, when images is absent"}},
        "anyOf": [{"required": ["images"]}, {"required": ["image"]}],
    },
)

_MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around the files
_DATA_URL_SLACK = 256  # per JSON image: quotes, separator, a "data:<type>;base64," prefix
_JSON_SLACK = 1024  # the object around the images
_JSON_EXTRA_COMMAS = 32  # commas a valid body may hold beyond two per image (other keys)
#: JSON bodies up to this size are parsed on the event loop (well under a millisecond); larger
#: ones in a worker thread.
INLINE_JSON_BYTES = 128 * 1024
_B64_PIECE = 1 << 20  # base64 characters decoded per call (a multiple of 4)


class InvalidBase64Error(ImageError):
    """A JSON image that is not base64 (or not a base64 ``data:`` URL)."""

    status = 400
    code = "invalid_base64"


class InvalidEntryError(ImageError):
    """A JSON image that is not a non-empty string."""

    status = 422
    code = "validation_error"


@dataclass(frozen=True, slots=True)
class Upload:
    data: bytes
    content_type: str | None
    filename: str | None = None
    #: Why this image cannot be used (a JSON batch entry that is not base64, say): decoding it
    #: raises this, so a batch answers it in that image's own entry.
    error: ImageError | None = None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"request body exceeds the {limit}-byte upload limit")


def _too_many(detail: str, limit: int, many: bool) -> ApiError:
    hint = "" if many else " (this route takes one image; POST /predict/batch takes several)"
    return ApiError(413, "too_many_images", f"{detail}; the limit is {limit}{hint}")


def _b64_len(n: int) -> int:
    """Length of the base64 text of ``n`` bytes (padded)."""
    return 4 * -(-n // 3)


async def _limited_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body as it arrives; a 413 as soon as it passes ``limit`` bytes (chunked bodies too)."""
    size = 0
    async with aclosing(request.stream()) as stream:
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            yield chunk


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)


async def _chunks(request: Request, limit: int) -> list[bytes]:
    _check_declared_length(request, limit)
    chunks = []
    async with aclosing(_limited_stream(request, limit)) as stream:
        async for chunk in stream:
            chunks.append(chunk)
    return chunks


async def _body(request: Request, limit: int) -> bytes:
    return b"".join(await _chunks(request, limit))


async def _form(request: Request, *, max_files: int, limit: int, many: bool) -> FormData:
    """The multipart form, parsed as it streams in: the byte limit and the image count hold while
    parsing (the 17th file of a 16-image batch is a 413 ``too_many_images`` at once)."""
    _check_declared_length(request, limit)
    async with aclosing(_limited_stream(request, limit)) as stream:
        parser = MultiPartParser(request.headers, stream, max_files=max_files, max_fields=16)
        try:
            return await parser.parse()
        except MultiPartException as e:
            if e.message.startswith("Too many files"):
                raise _too_many(f"more than {max_files} image(s) sent", max_files, many) from e
            raise ApiError(400, "invalid_multipart", f"multipart body: {e.message}") from e


def _stepwise_loads(raw: bytes) -> Any:
    """``json.loads`` for a large body, in steps that each hold the GIL briefly: the pure-Python
    scanner walks the (few, as the comma bound ensures) values and hands each string to the C
    ``scanstring`` on its own, where the C scanner would parse the whole body in one call."""
    text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    decoder = json.JSONDecoder()
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    return decoder.decode(text)


def _parse_json(raw: bytes, *, max_commas: int, many: bool, max_images: int) -> Any:
    """``json.loads`` with its cost bounded first, and every failure a 4xx.

    Every JSON value but the first of its container follows a comma, so the commas in the bytes
    (structural ones, and any inside strings) bound how many objects parsing can build: a body
    with far more values than images is refused before it is parsed. Nesting is bounded by the
    interpreter's recursion limit, which ``json`` enforces: too deep is a 422, not a
    ``RecursionError``.
    """
    commas = raw.count(b",")
    if commas > max_commas:
        if many:
            raise _too_many(f"the JSON body holds up to {commas + 1} values, more than "
                            f"{max_images} images need", max_images, many)
        raise ApiError(422, "validation_error",
                       f"JSON body holds {commas + 1} values; send {{\"image\": \"<base64>\"}}")
    try:
        if len(raw) > INLINE_JSON_BYTES:
            return _stepwise_loads(raw)
        return json.loads(raw or b"null")
    except RecursionError as e:
        raise ApiError(422, "validation_error", "JSON body is nested too deeply") from e
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, int digit limits, encodings
        raise ApiError(422, "validation_error", f"body is not valid JSON: {e}") from e


def _b64decode(text: str) -> bytes:
    """``base64.b64decode(text, validate=True)``, in pieces of :data:`_B64_PIECE` characters so
    that no single call holds the GIL for long; padding is only accepted at the very end."""
    if len(text) <= _B64_PIECE:
        return base64.b64decode(text, validate=True)
    pieces = []
    for start in range(0, len(text), _B64_PIECE):
        piece = text[start:start + _B64_PIECE]
        if start + _B64_PIECE < len(text) and piece.endswith("="):
            raise binascii.Error("padding before the end of the data")
        pieces.append(base64.b64decode(piece, validate=True))
    return b"".join(pieces)


def _decode_text(text: Any, where: str, max_bytes: int) -> Upload:
    """One JSON image (base64, or a ``data:<type>;base64,`` URL whose type is checked) to bytes."""
    if not isinstance(text, str) or not text:
        raise InvalidEntryError(f"{where}: a non-empty base64 string is required")
    content_type = None
    if text.startswith("data:"):
        header, comma, text = text[len("data:"):].partition(",")
        params = [p.strip().lower() for p in header.split(";")]
        if not comma or params[-1] != "base64":
            raise InvalidBase64Error(f"{where}: a data URL must be data:<type>;base64,<data>")
        content_type = params[0] or None
        try:
            check_content_type(content_type)
        except UnsupportedMediaTypeError as e:
            raise UnsupportedMediaTypeError(f"{where}: data URL {e.message}") from e
    if len(text) > _b64_len(max_bytes):
        raise PayloadTooLargeError(f"{where} holds more than the {max_bytes}-byte upload limit")
    try:
        data = _b64decode(text)
    except (binascii.Error, ValueError) as e:
        raise InvalidBase64Error(f"{where} is not valid base64: {e}") from e
    return Upload(data, content_type)


def _json_entry(text: Any, where: str, max_bytes: int) -> Upload:
    try:
        return _decode_text(text, where, max_bytes)
    except ImageError as e:
        return Upload(b"", None, error=e)


def _json_uploads(chunks: list[bytes], max_images: int, many: bool, max_bytes: int) -> list[Upload]:
    """The image(s) of a JSON body: parsed, checked and base64-decoded (synchronous: a large body
    runs it in a worker thread, a small one on the event loop)."""
    raw = b"".join(chunks)
    payload = _parse_json(raw, max_commas=2 * max_images + _JSON_EXTRA_COMMAS, many=many,
                          max_images=max_images)
    if not isinstance(payload, dict):
        raise ApiError(422, "validation_error", "JSON body must be an object with an 'image' field")
    if many and "images" in payload:
        items, where = payload["images"], "body.images[{}]"
        if not isinstance(items, list) or not items:
            raise ApiError(422, "validation_error", "body.images: a non-empty list is required")
        if len(items) > max_images:
            raise _too_many(f"{len(items)} images sent", max_images, many)
    elif "image" in payload:
        items, where = [payload["image"]], "body.image"
    else:
        raise ApiError(422, "validation_error", "body.image: field required")
    uploads = [_json_entry(t, where.format(i), max_bytes) for i, t in enumerate(items)]
    if not many and uploads[0].error is not None:
        raise uploads[0].error
    return uploads


async def read_uploads(request: Request, settings: Settings, *, many: bool = False) -> list[Upload]:
    """The image(s) in the request. ``many`` accepts several ``files`` (or ``file``) parts, or a
    JSON ``images`` list; there an image that cannot be used carries its error in
    :attr:`Upload.error` (raised by :func:`decode_upload`) instead of failing the request."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    max_images = settings.max_batch_images if many else 1
    if media == "multipart/form-data":
        limit = settings.max_upload_bytes * max_images
        form = await _form(request, max_files=max_images, limit=limit + _MULTIPART_SLACK, many=many)
        try:
            parts = [(key, p) for key in ("files", "file", "image") for p in form.getlist(key)]
            text = next((key for key, p in parts if not isinstance(p, UploadFile)), None)
            if text is not None:  # e.g. curl -F file=photo.jpg, which sends the name, not the file
                raise ApiError(422, "validation_error",
                               f"multipart field {text!r} is text, not a file (curl: -F {text}=@photo.jpg)")
            files = [p for _, p in parts]
            if not files:
                names = "'files' or 'file'" if many else "'file'"
                raise ApiError(422, "validation_error", f"multipart body has no {names} file field")
            if len(files) > max_images:
                raise _too_many(f"{len(files)} images sent", max_images, many)
            uploads = []
            for f in files:
                data = await f.read(settings.max_upload_bytes + 1)
                uploads.append(Upload(data, f.content_type, f.filename))
            return uploads
        finally:
            await form.close()
    if media == "application/json":
        per_image = _b64_len(settings.max_upload_bytes) + _DATA_URL_SLACK
        chunks = await _chunks(request, max_images * per_image + _JSON_SLACK)
        size = sum(len(c) for c in chunks)
        args = (chunks, max_images, many, settings.max_upload_bytes)
        if size <= INLINE_JSON_BYTES:
            return _json_uploads(*args)
        return await asyncio.to_thread(_json_uploads, *args)
    if not media:
        raise ApiError(422, "validation_error",
                       "no image: send multipart 'file', an image body, or JSON with 'image'")
    try:
        check_content_type(media)
    except ImageError as e:
        raise ApiError(e.status, e.code, e.message) from e
    return [Upload(await _body(request, settings.max_upload_bytes), media)]


async def decode_upload(upload: Upload, settings: Settings) -> np.ndarray:
    """Decode and validate: a small image (a face crop) right here, where it takes less than the
    hop to a worker thread would, anything larger off the event loop (large JPEGs take tens of
    milliseconds). The checks are the same either way."""
    if upload.error is not None:
        raise upload.error
    data, content_type = upload.data, upload.content_type
    max_bytes, max_pixels = settings.max_upload_bytes, settings.max_image_pixels
    image = decode_small_image(data, content_type=content_type, max_bytes=max_bytes, max_pixels=max_pixels)
    if image is not None:
        return image
    return await asyncio.to_thread(decode_image, data, content_type=content_type, max_bytes=max_bytes,
                                   max_pixels=max_pixels)


async def ensure_client_connected(request: Request) -> None:
    """Raise :class:`ClientDisconnect` when the client has hung up: the models are not run for
    an answer nobody will read (the app records it as a client disconnect, status 499)."""
    if await request.is_disconnected():
        raise ClientDisconnect()
