"""Safe decoding and validation of uploaded images.

This is the first stage of every request: untrusted bytes go in, an RGB ``uint8`` array of shape
``(H, W, 3)`` comes out, or an :class:`ImageError` carrying the HTTP status and a machine-readable
``code`` is raised. The module knows nothing about FastAPI; the app maps :class:`ImageError` to the
shared JSON error shape ``{"error": {"code": ..., "message": ...}}``.

The checks run cheapest first, so hostile input is refused before any pixel is decoded:

1. body size against ``max_bytes`` (413 ``payload_too_large``), before anything else;
2. empty body (400 ``empty_image``);
3. declared content type (415 ``unsupported_media_type``);
4. Pillow parses the header only; bytes it cannot identify are 400 ``not_an_image``;
5. the *detected* format must be in :data:`SUPPORTED_FORMATS` (415, naming that format), whatever
   the declared content type said;
6. ``width * height`` against ``max_pixels`` (413 ``too_many_pixels``), still before decoding;
   this is the decompression-bomb defence. Pillow's own ``DecompressionBombError`` (and its
   warning, when warnings are turned into errors) becomes the same 413;
7. pixels are decoded; a truncated file is 400 ``truncated_image``, other decoder failures are
   400 ``corrupt_image``;
8. the EXIF orientation is applied, then the mode is converted to RGB.

Memory (see :func:`configure_decoding`, set from ``FER_DECODE_*`` by the app):

- a process-wide :class:`PixelBudget` bounds the pixels being decoded at once across all
  requests: a decode waits until its pixels fit (an image larger than the whole budget runs
  alone). Small images (:func:`decode_small_image`, up to 128x128, plain PNG or JPEG) are decoded on
  the event loop outside it;
- an image whose long side exceeds ``reduce_min_side`` is decoded reduced, never below that long
  side: a JPEG straight to 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's ``draft``), any
  other format by an integer box reduction before the RGB array is made. The detector shrinks it
  further anyway, and its faces stay large enough to align from. The result is a
  :class:`DecodedImage` that knows its original size and its scale, so the pipeline reports boxes
  and landmarks in original-image pixels;
- after a decode of many pixels, freed memory is handed back to the OS (``malloc_trim`` on glibc).

Mode conversion: transparent images (``RGBA``, ``LA``, ``PA``, palettes or grey/RGB images with
a ``transparency`` key) are alpha-composited onto a **white** background, so transparent pixels
come out white rather than whatever colour happens to sit under alpha 0. 16-bit greyscale is
scaled to 8 bits (the high byte), not clipped. Animated images yield their first frame.

Pillow's global ``MAX_IMAGE_PIXELS`` and ``ImageFile.LOAD_TRUNCATED_IMAGES`` are never changed
here; the latter must stay ``False`` for truncation to be detected, and a warning is logged if
some other code has switched it on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import logging
import sys
import threading
from typing import ClassVar

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from service.inference.cheap_image import is_plainly_cheap

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_PIXEL_BUDGET",
    "SMALL_IMAGE_BYTES",
    "SMALL_IMAGE_PIXELS",
    "SNIFF_CONTENT_TYPES",
    "SUPPORTED_CONTENT_TYPES",
    "SUPPORTED_FORMATS",
    "CorruptImageError",
    "DecodedImage",
    "EmptyImageError",
    "ImageError",
    "NotAnImageError",
    "PayloadTooLargeError",
    "PixelBudget",
    "TooManyPixelsError",
    "TruncatedImageError",
    "UnsupportedMediaTypeError",
    "check_content_type",
    "configure_decoding",
    "decode_image",
    "decode_small_image",
    "encode_png",
    "image_scale",
    "original_size",
    "release_memory",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 * 2**20
"""Default upload limit: 10 MiB."""

DEFAULT_MAX_PIXELS = 40_000_000
"""Default pixel limit (about 7300 x 5500); an RGB array of this size is 120 MB."""

DEFAULT_PIXEL_BUDGET = 48_000_000
"""Default budget of pixels decoded at once across all requests (one maximal image fits)."""

SUPPORTED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "BMP"})
"""Pillow format names that are decoded; anything else Pillow recognises is a 415."""

SUPPORTED_CONTENT_TYPES: frozenset[str] = frozenset(
    {"image/jpeg", "image/jpg", "image/png", "image/webp", "image/bmp", "image/x-ms-bmp"}
)
"""Declared image types that are accepted (the real format is still sniffed from the bytes)."""

SNIFF_CONTENT_TYPES: frozenset[str] = frozenset({"", "application/octet-stream"})
"""Declared types that say nothing about the format: the bytes are sniffed. ``None`` counts too."""

SMALL_IMAGE_BYTES = 64 * 1024
"""Largest upload :func:`decode_small_image` decodes (on the event loop)."""

SMALL_IMAGE_PIXELS = 128 * 128
"""Most pixels :func:`decode_small_image` decodes: about 0.2 ms for a 48x48 JPEG, 0.4 ms for
128x128 here, against 1.3 ms at 256x256."""


class ImageError(Exception):
    """An upload that cannot be turned into an image.

    Attributes:
        status: HTTP status code the app should answer with.
        code: Machine-readable error code, distinct for each subclass.
        message: Human-readable explanation naming the problem.
    """

    status: ClassVar[int] = 400
    code: ClassVar[str] = "invalid_image"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, message={self.message!r})"


class EmptyImageError(ImageError):
    """The request body is empty."""

    status = 400
    code = "empty_image"


class NotAnImageError(ImageError):
    """The bytes are not an image Pillow can identify (or its header is unreadable)."""

    status = 400
    code = "not_an_image"


class TruncatedImageError(ImageError):
    """The header parsed but the pixel data ends early."""

    status = 400
    code = "truncated_image"


class CorruptImageError(ImageError):
    """The header parsed but the pixel data is damaged (bad checksum, broken stream...)."""

    status = 400
    code = "corrupt_image"


class UnsupportedMediaTypeError(ImageError):
    """The declared content type or the detected format is not supported."""

    status = 415
    code = "unsupported_media_type"


class PayloadTooLargeError(ImageError):
    """The body is larger than the byte limit."""

    status = 413
    code = "payload_too_large"


class TooManyPixelsError(ImageError):
    """The image has more pixels than allowed (including decompression bombs)."""

    status = 413
    code = "too_many_pixels"


class PixelBudget:
    """A counting semaphore weighted by pixels, shared by every thread that decodes.

    ``acquire(n)`` waits (FIFO) until ``n`` more pixels fit in ``capacity``; a request for more
    than the whole capacity waits until nothing else is held and then runs alone. Decoding runs
    in worker threads, so this is a :mod:`threading` primitive.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"pixel budget must be at least 1, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self._cond = threading.Condition()
        self._queue: list[object] = []

    def acquire(self, pixels: int, timeout: float | None = None) -> bool:
        """Take ``pixels`` of the budget; ``False`` if ``timeout`` seconds passed first."""
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                ok = self._cond.wait_for(lambda: self._queue[0] is ticket and self._fits(pixels), timeout)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()
            if ok:
                self.in_use += pixels
            return ok

    def release(self, pixels: int) -> None:
        with self._cond:
            self.in_use -= pixels
            self._cond.notify_all()

    def _fits(self, pixels: int) -> bool:
        return self.in_use == 0 or self.in_use + pixels <= self.capacity


class DecodedImage(np.ndarray):
    """An RGB array decoded at a reduced size, that knows the image it stands for.

    ``original_size`` is the full image's ``(width, height)`` (after EXIF orientation) and
    ``scale`` the ``(sx, sy)`` factors from this array's pixels to the original's. Views and
    copies of it are plain arrays: only :func:`decode_image` makes one.
    """

    original_size: tuple[int, int]
    scale: tuple[float, float]

    def __array_finalize__(self, obj: object) -> None:
        # A view or a result computed from this array is not the decoded image: unscaled.
        self.original_size = (self.shape[1], self.shape[0]) if self.ndim >= 2 else (0, 0)
        self.scale = (1.0, 1.0)


def original_size(image: np.ndarray) -> tuple[int, int]:
    """``(width, height)`` of the uploaded image that ``image`` was decoded from."""
    if type(image) is DecodedImage:
        return image.original_size
    return image.shape[1], image.shape[0]


def image_scale(image: np.ndarray) -> tuple[float, float]:
    """``(sx, sy)``: original-image pixels per pixel of ``image`` (1, 1 unless decoded reduced)."""
    return image.scale if type(image) is DecodedImage else (1.0, 1.0)


_budget = PixelBudget(DEFAULT_PIXEL_BUDGET)
_reduce_min_side: int | None = None
_TRIM_AFTER_PIXELS = 4_000_000  # hand memory back after decodes at least this large
_libc_trim = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc_trim = _libc.malloc_trim
        _libc_trim.argtypes = [ctypes.c_size_t]
        _libc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        _libc_trim = None


def configure_decoding(*, pixel_budget: int | None = None, reduce_min_side: int | None = None) -> None:
    """Set the process-wide decode limits (the app calls it from its settings).

    Args:
        pixel_budget: Pixels decoded at once across all threads; ``None`` keeps the current one.
        reduce_min_side: Decode images whose long side is larger than this reduced, to a long
            side of at least this; ``None`` or 0 decodes at full size.
    """
    global _budget, _reduce_min_side
    if pixel_budget is not None and pixel_budget != _budget.capacity:
        _budget = PixelBudget(pixel_budget)
    _reduce_min_side = reduce_min_side or None


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    if _libc_trim is not None:
        _libc_trim(0)


def _reduction(width: int, height: int, min_side: int | None) -> int:
    """Integer factor to reduce by so that the long side stays at least ``min_side``."""
    if not min_side:
        return 1
    return max(1, max(width, height) // min_side)


def _media_type(content_type: str | None) -> str:
    """``"Image/PNG; charset=x"`` -> ``"image/png"``; ``None`` -> ``""``."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def check_content_type(content_type: str | None) -> None:
    """Refuse a declared content type that cannot be a supported image.

    ``None``, empty and ``application/octet-stream`` mean "unknown, sniff the bytes" and pass.
    Parameters such as ``; charset=utf-8`` and letter case are ignored.

    Raises:
        UnsupportedMediaTypeError: for non-image types (``text/plain``, ``application/pdf``...)
            and unsupported image types (``image/gif``, ``image/tiff``...).
    """
    media_type = _media_type(content_type)
    if media_type in SNIFF_CONTENT_TYPES or media_type in SUPPORTED_CONTENT_TYPES:
        return
    supported = ", ".join(sorted(SUPPORTED_CONTENT_TYPES))
    raise UnsupportedMediaTypeError(
        f"content type {media_type!r} is not supported; send one of {supported} "
        "(or application/octet-stream to have the format detected)"
    )


def _is_truncation(exc: BaseException) -> bool:
    """Whether a decoder failure means the data ended early."""
    return isinstance(exc, EOFError) or "truncated" in str(exc).lower()


def _bomb_error(width: int, height: int, max_pixels: int, detail: str = "") -> TooManyPixelsError:
    suffix = f" ({detail})" if detail else ""
    return TooManyPixelsError(
        f"image is {width}x{height} = {width * height} pixels, more than the limit of "
        f"{max_pixels} pixels{suffix}"
    )


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Convert any decoded Pillow mode to a C-contiguous RGB ``uint8`` array.

    Transparency is composited onto white; 16/32-bit greyscale keeps its high byte.
    """
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(image)
        if mode == "I":
            grey = np.clip(grey, 0, 65535)
        grey8 = (grey >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[:, :, None], 3, axis=2))
    if mode == "F":
        grey8 = np.clip(np.asarray(image), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[:, :, None], 3, axis=2))

    has_alpha = "A" in image.getbands() or mode in ("RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    elif mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.array(image, dtype=np.uint8))


def _load_rgb(image: Image.Image, fmt: str, width: int, height: int, size: int,
              max_pixels: int) -> tuple[np.ndarray, int | None]:
    """Decode the pixels, apply the EXIF orientation, reduce by an integer factor while the long
    side stays at least :data:`_reduce_min_side`, and convert to RGB. Also returns the EXIF
    orientation that was applied (``None``: none)."""
    try:
        image.load()
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:
        raise _bomb_error(width, height, max_pixels, str(exc)) from exc
    except Exception as exc:
        logger.debug("Pillow failed to decode %s upload", fmt, exc_info=True)
        if _is_truncation(exc):
            raise TruncatedImageError(
                f"{fmt} image ({width}x{height}, {size} bytes) is truncated: {exc}"
            ) from exc
        raise CorruptImageError(
            f"{fmt} image ({width}x{height}, {size} bytes) is corrupt: {exc}"
        ) from exc

    orientation = None
    try:
        orientation = image.getexif().get(0x0112)
        ImageOps.exif_transpose(image, in_place=True)
    except MemoryError:
        raise
    except Exception:
        # A malformed EXIF block should not cost the user their request: keep the pixels as stored.
        orientation = None
        logger.warning("ignoring unreadable EXIF orientation in %s upload", fmt, exc_info=True)

    factor = _reduction(*image.size, _reduce_min_side)
    if factor > 1 and image.mode not in ("P", "1"):  # palettes cannot be averaged
        image = image.reduce(factor)
    try:
        array = _to_rgb(image)
    except MemoryError:
        raise
    except Exception as exc:
        logger.debug("converting %s mode %s to RGB failed", fmt, image.mode, exc_info=True)
        raise NotAnImageError(f"{fmt} image in mode {image.mode} cannot be converted to RGB") from exc
    return array, orientation


def decode_image(
    data: bytes,
    *,
    content_type: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Validate and decode uploaded image bytes.

    Args:
        data: The raw request body.
        content_type: The declared ``Content-Type``; ``None``/``application/octet-stream`` sniff.
        max_bytes: Largest accepted body, checked before anything else.
        max_pixels: Largest accepted ``width * height``, checked before pixels are decoded.

    Returns:
        The image after EXIF orientation, as a C-contiguous ``uint8`` array of shape ``(H, W, 3)``
        in RGB order.

    Raises:
        ImageError: a subclass whose ``status``/``code`` say what went wrong (see module docs).
    """
    with _open_checked(data, content_type=content_type, max_bytes=max_bytes,
                       max_pixels=max_pixels) as image:
        return _decode_opened(image, size=len(data), max_pixels=max_pixels, budget=_budget)


def decode_small_image(
    data: bytes,
    *,
    content_type: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    small_bytes: int = SMALL_IMAGE_BYTES,
    small_pixels: int = SMALL_IMAGE_PIXELS,
) -> np.ndarray | None:
    """:func:`decode_image` for an image small enough to decode on the event loop, else ``None``.

    An upload of at most ``small_bytes`` whose header declares at most ``small_pixels`` pixels
    (a face crop of up to 128x128, a fraction of a millisecond), and whose bytes are a plainly
    ordinary PNG or JPEG (:func:`~service.inference.cheap_image.is_plainly_cheap`: no text chunks or
    runs of markers, which can take tens of milliseconds to parse), is validated and decoded here,
    by the same checks as :func:`decode_image`, outside the :class:`PixelBudget` (a thread's wait
    for it must never block the event loop; such an image is at most 48 KB of pixels). Anything
    else returns ``None`` before a pixel is decoded: pass it to :func:`decode_image` in a worker
    thread.
    Invalid bytes of at most ``small_bytes`` raise at once, as :func:`decode_image` would.

    Raises:
        ImageError: as :func:`decode_image`.
    """
    if len(data) > min(small_bytes, max_bytes) or not is_plainly_cheap(data):
        return None
    with _open_checked(data, content_type=content_type, max_bytes=max_bytes,
                       max_pixels=max_pixels) as image:
        width, height = image.size
        if width * height > small_pixels:
            return None
        return _decode_opened(image, size=len(data), max_pixels=max_pixels, budget=None)


def _open_checked(data: bytes, *, content_type: str | None, max_bytes: int,
                  max_pixels: int) -> Image.Image:
    """Checks 1-6 of the module docs on ``data``: the opened image (its header parsed, no pixels
    decoded; close it), or an :class:`ImageError`."""
    size = len(data)
    if size > max_bytes:
        raise PayloadTooLargeError(f"body is {size} bytes, more than the limit of {max_bytes} bytes")
    if size == 0:
        raise EmptyImageError("body is empty; send the image bytes")
    check_content_type(content_type)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True somewhere in this process; "
            "truncated uploads will not be detected"
        )

    declared = _media_type(content_type) or "unspecified"
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning is only raised when warnings are turned into errors.
        logger.info("rejected decompression bomb (%s bytes): %s", size, exc)
        raise TooManyPixelsError(
            f"image has too many pixels (limit {max_pixels}); "
            f"Pillow refused it as a decompression bomb: {exc}"
        ) from exc
    except UnidentifiedImageError as exc:
        raise NotAnImageError(
            f"body ({size} bytes, declared content type {declared}) is not a recognisable image"
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:
        logger.debug("Pillow failed to open upload", exc_info=True)
        raise NotAnImageError(
            f"body ({size} bytes, declared content type {declared}) is not a readable image: {exc}"
        ) from exc

    try:
        fmt = image.format or "unknown"
        if fmt not in SUPPORTED_FORMATS:
            raise UnsupportedMediaTypeError(
                f"{fmt} is not supported (declared content type {declared}); "
                f"send one of {', '.join(sorted(SUPPORTED_FORMATS))}"
            )
        width, height = image.size
        if width <= 0 or height <= 0:
            raise NotAnImageError(f"{fmt} image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            logger.info("rejected %s of %dx%d pixels (limit %d)", fmt, width, height, max_pixels)
            raise _bomb_error(width, height, max_pixels)
    except BaseException:
        image.close()
        raise
    return image


def _decode_opened(image: Image.Image, *, size: int, max_pixels: int,
                   budget: PixelBudget | None) -> np.ndarray:
    """Checks 7-8 of the module docs: the pixels of an image :func:`_open_checked` accepted,
    decoded while holding their share of ``budget`` (``None``: outside any budget)."""
    fmt = image.format or "unknown"
    width, height = image.size
    factor = _reduction(width, height, _reduce_min_side)
    if factor > 1 and fmt == "JPEG":
        # libjpeg decodes straight to 1/2, 1/4 or 1/8 scale, no smaller than asked.
        image.draft("RGB", (-(-width // factor), -(-height // factor)))
    decoded_w, decoded_h = image.size
    pixels = decoded_w * decoded_h
    if budget is not None:
        budget.acquire(pixels)
    try:
        array, orientation = _load_rgb(image, fmt, width, height, size, max_pixels)
    finally:
        if budget is not None:
            budget.release(pixels)
        if pixels >= _TRIM_AFTER_PIXELS:
            release_memory()

    full = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    if (array.shape[1], array.shape[0]) != full:
        reduced = array.view(DecodedImage)
        reduced.original_size = full
        reduced.scale = (full[0] / array.shape[1], full[1] / array.shape[0])
        logger.debug("decoded %s %dx%d reduced to %dx%d (%d bytes)", fmt, full[0], full[1],
                     array.shape[1], array.shape[0], size)
        return reduced
    logger.debug("decoded %s %dx%d (%d bytes)", fmt, array.shape[1], array.shape[0], size)
    return array


def encode_png(image: np.ndarray, *, compress_level: int = 6) -> bytes:
    """Encode a greyscale ``(H, W)`` or RGB ``(H, W, 3)`` ``uint8`` array as PNG bytes.

    Args:
        image: The pixels; any memory layout is accepted.
        compress_level: zlib level 0-9 (lower is faster, larger).

    Returns:
        The PNG file as bytes.

    Raises:
        ValueError: if the array is not ``uint8`` or not one of the two shapes.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8 pixels, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"encode_png expects an (H, W) or (H, W, 3) array, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"encode_png cannot encode an empty image of shape {image.shape}")
    pil = Image.fromarray(np.ascontiguousarray(image))  # uint8 (H, W) -> "L", (H, W, 3) -> "RGB"
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
