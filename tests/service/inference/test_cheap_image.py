"""The byte gate that keeps expensive-to-parse small uploads off the event loop."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service.inference.cheap_image import MAX_JPEG_MARKERS, is_plainly_cheap
from service.inference.decode import decode_image, decode_small_image

LIMITS = {"content_type": None, "max_bytes": 10 * 1024 * 1024, "max_pixels": 40_000_000}


def _image(face_image: np.ndarray, size: int = 48) -> Image.Image:
    return Image.fromarray(face_image).resize((size, size))


def _png(image: Image.Image, info: PngImagePlugin.PngInfo | None = None) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _jpeg(image: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _text_bomb_png(image: Image.Image, chunks: int = 40) -> bytes:
    """Small on disk, but each zTXt chunk inflates to 1 MB when Pillow parses the header."""
    info = PngImagePlugin.PngInfo()
    for i in range(chunks):
        info.add_text(f"k{i}", "a" * 1_000_000, zip=True)
    return _png(image, info)


def _marker_padded_jpeg(image: Image.Image, markers: int = 4000) -> bytes:
    """A valid JPEG with thousands of empty APP5 segments after SOI."""
    data = _jpeg(image)
    return data[:2] + b"\xff\xe5\x00\x02" * markers + data[2:]


def test_ordinary_png_and_jpeg_are_cheap(face_image: np.ndarray) -> None:
    image = _image(face_image, 128)
    assert is_plainly_cheap(_png(image))
    assert is_plainly_cheap(_jpeg(image))
    assert is_plainly_cheap(_jpeg(image, progressive=True))
    assert is_plainly_cheap(_jpeg(image.convert("L")))


@pytest.mark.parametrize("make", [_text_bomb_png, _marker_padded_jpeg], ids=["ztxt_png", "padded_jpeg"])
def test_expensive_small_files_are_left_to_the_worker(face_image: np.ndarray, make) -> None:
    data = make(_image(face_image))
    assert len(data) < 64 * 1024, len(data)  # small enough that only the gate stops them
    assert not is_plainly_cheap(data)
    assert decode_small_image(data, **LIMITS) is None
    decoded = decode_image(data, **LIMITS)  # still valid images, decoded in the worker
    assert decoded.shape == (48, 48, 3)


def test_other_formats_go_to_the_worker(face_image: np.ndarray) -> None:
    buf = io.BytesIO()
    _image(face_image).save(buf, format="BMP")
    assert not is_plainly_cheap(buf.getvalue())
    assert decode_small_image(buf.getvalue(), **LIMITS) is None


def test_marker_count_bound_is_inclusive(face_image: np.ndarray) -> None:
    data = _jpeg(_image(face_image))
    base = len([i for i in range(len(data) - 1)
                if data[i] == 0xFF and data[i + 1] not in (0x00, *range(0xD0, 0xD8))])
    spare = MAX_JPEG_MARKERS - base
    assert spare > 0
    padded = data[:2] + b"\xff\xe5\x00\x02" * spare + data[2:]
    assert is_plainly_cheap(padded)
    assert not is_plainly_cheap(data[:2] + b"\xff\xe5\x00\x02" + padded[2:])
