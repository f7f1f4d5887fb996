"""Tests for upload decoding: formats, limits, decompression bombs, truncation, EXIF and modes.

Every image is generated in memory with Pillow (or, for the bombs, written chunk by chunk with
zlib so that a 400-megapixel PNG costs a few milliseconds and ~50 KB).
"""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image, ImageFile

from service.inference import decode as decode_module
from service.inference.decode import (
    SUPPORTED_CONTENT_TYPES,
    SUPPORTED_FORMATS,
    CorruptImageError,
    EmptyImageError,
    ImageError,
    NotAnImageError,
    PayloadTooLargeError,
    TooManyPixelsError,
    TruncatedImageError,
    UnsupportedMediaTypeError,
    check_content_type,
    decode_image,
    encode_png,
)

RED = (220, 30, 30)
BLUE = (30, 40, 210)
COLOUR_TOLERANCE = 24


# --------------------------------------------------------------------------- factories


def two_colour_image(width: int = 64, height: int = 48, mode: str = "RGB") -> Image.Image:
    """Left half RED, right half BLUE."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    return image.convert(mode) if mode != "RGB" else image


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise_image(size: int = 128, seed: int = 0) -> Image.Image:
    """Incompressible content so that truncating the file cuts into the pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of ``width x height`` black pixels, built without a pixel buffer.

    Rows are fed to zlib in blocks, so memory stays at one block (~1 MB) whatever the size.
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0 + packed bits
    rows_per_block = max(1, 2**20 // len(row))
    block = row * rows_per_block
    compressor = zlib.compressobj(9)
    parts = []
    remaining = height
    while remaining:
        n = min(rows_per_block, remaining)
        parts.append(compressor.compress(block if n == rows_per_block else row * n))
        remaining -= n
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture
def forbid_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make ``ImageFile.load`` fail loudly: a bomb must be refused before pixels are decoded."""
    calls: list[str] = []

    def load(self: ImageFile.ImageFile) -> None:
        calls.append(f"{self.format} {self.size}")
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


def assert_error(
    func: Callable[[], object], error_type: type[ImageError], status: int, code: str
) -> ImageError:
    with pytest.raises(error_type) as info:
        func()
    error = info.value
    assert error.status == status
    assert error.code == code
    assert error.message and str(error) == error.message
    return error


def region_mean(array: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    return array[rows, cols].reshape(-1, 3).mean(axis=0)


def assert_colour(actual: np.ndarray, expected: tuple[int, int, int]) -> None:
    assert np.all(np.abs(actual - np.array(expected)) <= COLOUR_TOLERANCE), (actual, expected)


# --------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize(
    ("fmt", "content_type", "options"),
    [
        ("JPEG", "image/jpeg", {"quality": 92}),
        ("PNG", "image/png", {}),
        ("WEBP", "image/webp", {"quality": 90}),
        ("BMP", "image/bmp", {}),
        ("BMP", "image/x-ms-bmp", {}),
        ("JPEG", "image/jpg", {"quality": 92}),
        ("PNG", None, {}),
        ("JPEG", "application/octet-stream", {}),
        ("WEBP", "", {"lossless": True}),
    ],
)
def test_supported_formats_round_trip(fmt: str, content_type: str | None, options: dict) -> None:
    data = encode(two_colour_image(), fmt, **options)
    array = decode_image(data, content_type=content_type)
    assert array.shape == (48, 64, 3)
    assert array.dtype == np.uint8
    assert array.flags.c_contiguous and array.flags.writeable
    assert_colour(region_mean(array, slice(4, 44), slice(4, 28)), RED)
    assert_colour(region_mean(array, slice(4, 44), slice(36, 60)), BLUE)


def test_declared_type_may_disagree_with_a_supported_real_format() -> None:
    """The bytes decide: a PNG declared as image/jpeg is still decoded as a PNG."""
    array = decode_image(encode(two_colour_image(), "PNG"), content_type="image/jpeg")
    assert array.shape == (48, 64, 3)


def test_constants() -> None:
    assert {"JPEG", "PNG", "WEBP", "BMP"} == SUPPORTED_FORMATS
    assert {"image/jpeg", "image/jpg", "image/png", "image/webp", "image/bmp", "image/x-ms-bmp"} <= set(
        SUPPORTED_CONTENT_TYPES
    )


# --------------------------------------------------------------------------- content type


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "image/jpeg",
        "IMAGE/PNG",
        "image/png; charset=binary",
        "application/octet-stream",
        " image/webp ",
        "image/x-ms-bmp",
    ],
)
def test_check_content_type_accepts(content_type: str | None) -> None:
    check_content_type(content_type)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain; charset=utf-8",
        "application/pdf",
        "image/gif",
        "image/tiff",
        "application/json",
        "video/mp4",
    ],
)
def test_check_content_type_rejects(content_type: str) -> None:
    error = assert_error(
        lambda: check_content_type(content_type), UnsupportedMediaTypeError, 415, "unsupported_media_type"
    )
    assert content_type.split(";")[0] in error.message


@pytest.mark.parametrize("content_type", ["text/plain", "application/pdf"])
def test_decode_rejects_declared_non_image_type(content_type: str) -> None:
    data = encode(two_colour_image(), "PNG")
    error = assert_error(
        lambda: decode_image(data, content_type=content_type),
        UnsupportedMediaTypeError,
        415,
        "unsupported_media_type",
    )
    assert content_type in error.message


# --------------------------------------------------------------------------- bad bytes


def test_empty_body() -> None:
    assert_error(lambda: decode_image(b""), EmptyImageError, 400, "empty_image")
    # Emptiness is reported before the content type is looked at.
    assert_error(lambda: decode_image(b"", content_type="text/plain"), EmptyImageError, 400, "empty_image")


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(0).bytes(2048),
        b"this is plain text, definitely not an image\n" * 10,
        b"x",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,  # PNG signature, garbage header
        b"\xff\xd8\xff" + b"\x00" * 40,  # JPEG SOI, garbage after
        b"BM" + b"\xff" * 60,  # BMP magic, absurd header
    ],
    ids=["random", "text", "one-byte", "png-signature-only", "jpeg-soi-only", "bmp-magic-only"],
)
def test_not_an_image(data: bytes) -> None:
    error = assert_error(lambda: decode_image(data), NotAnImageError, 400, "not_an_image")
    assert "not" in error.message


def test_truncated_jpeg() -> None:
    data = encode(noise_image(), "JPEG", quality=95)
    error = assert_error(
        lambda: decode_image(data[: len(data) // 2]), TruncatedImageError, 400, "truncated_image"
    )
    assert "JPEG" in error.message and "truncated" in error.message


def test_truncated_png() -> None:
    data = encode(noise_image(), "PNG")
    error = assert_error(
        lambda: decode_image(data[: len(data) // 2]), TruncatedImageError, 400, "truncated_image"
    )
    assert "PNG" in error.message


def test_corrupt_png_pixel_stream() -> None:
    data = bytearray(encode(noise_image(32), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 2 : start + 200] = b"\xff" * 198  # wreck the zlib stream, keep the length
    with pytest.raises(ImageError) as info:
        decode_image(bytes(data))
    assert info.value.status == 400
    assert info.value.code in {CorruptImageError.code, TruncatedImageError.code}


def test_load_truncated_images_stays_off() -> None:
    """Truncation detection depends on Pillow's flag being False; nothing may switch it on."""
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_mutated_files_only_raise_image_errors() -> None:
    """Byte flips and cuts anywhere in small valid files: an array or an ImageError, nothing else."""
    rng = np.random.default_rng(1)
    sources = [encode(noise_image(16, seed=i), fmt) for i, fmt in enumerate(["PNG", "JPEG", "BMP", "WEBP"])]
    for source in sources:
        for _ in range(25):
            data = bytearray(source)
            if rng.random() < 0.5:
                data = data[: int(rng.integers(1, len(data)))]
            else:
                for position in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
                    data[position] = int(rng.integers(0, 256))
            try:
                array = decode_image(bytes(data), max_pixels=1_000_000)
            except ImageError as error:
                assert error.status in {400, 413, 415}
            else:
                assert array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8


# --------------------------------------------------------------------------- unsupported formats


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [
        ("GIF", "image/png"),
        ("GIF", None),
        ("TIFF", None),
        ("TIFF", "application/octet-stream"),
        ("ICO", None),
    ],
)
def test_unsupported_real_format(fmt: str, content_type: str | None) -> None:
    data = encode(two_colour_image(32, 32), fmt)
    error = assert_error(
        lambda: decode_image(data, content_type=content_type),
        UnsupportedMediaTypeError,
        415,
        "unsupported_media_type",
    )
    assert f"{fmt} is not supported" in error.message


@pytest.mark.parametrize("content_type", ["image/gif", "image/tiff"])
def test_unsupported_declared_image_type(content_type: str) -> None:
    data = encode(two_colour_image(32, 32), "PNG")
    assert_error(
        lambda: decode_image(data, content_type=content_type),
        UnsupportedMediaTypeError,
        415,
        "unsupported_media_type",
    )


# --------------------------------------------------------------------------- size limits


def test_body_over_byte_limit_is_checked_first() -> None:
    data = encode(two_colour_image(), "PNG")
    error = assert_error(
        lambda: decode_image(data, max_bytes=len(data) - 1), PayloadTooLargeError, 413, "payload_too_large"
    )
    assert str(len(data)) in error.message and str(len(data) - 1) in error.message
    # Before the content type and before any parsing:
    assert_error(
        lambda: decode_image(b"\x00" * 101, content_type="text/plain", max_bytes=100),
        PayloadTooLargeError,
        413,
        "payload_too_large",
    )
    assert decode_image(data, max_bytes=len(data)).shape == (48, 64, 3)


def test_image_over_pixel_limit() -> None:
    data = encode(two_colour_image(100, 50), "PNG")
    error = assert_error(
        lambda: decode_image(data, max_pixels=4999), TooManyPixelsError, 413, "too_many_pixels"
    )
    assert "100x50" in error.message and "4999" in error.message
    assert decode_image(data, max_pixels=5000).shape == (50, 100, 3)


@pytest.fixture(scope="module")
def bomb_64mp() -> bytes:
    """8000 x 8000 = 64 megapixels (under Pillow's own thresholds), ~10 KB on the wire."""
    start = time.perf_counter()
    data = bomb_png(8_000, 8_000)
    assert time.perf_counter() - start < 1.0, "bomb generation must stay cheap"
    assert len(data) < 100_000
    return data


@pytest.fixture(scope="module")
def bomb_400mp() -> bytes:
    """20000 x 20000 = 400 megapixels (over Pillow's error threshold), ~50 KB on the wire."""
    start = time.perf_counter()
    data = bomb_png(20_000, 20_000)
    assert time.perf_counter() - start < 2.0, "bomb generation must stay cheap"
    assert len(data) < 500_000
    return data


def test_bomb_factory_makes_real_pngs(bomb_64mp: bytes, bomb_400mp: bytes) -> None:
    with Image.open(io.BytesIO(bomb_png(70, 40))) as small:
        small.load()
        assert small.size == (70, 40) and small.format == "PNG" and small.mode == "1"
        assert not np.asarray(small).any()
    for data, side in ((bomb_64mp, 8_000), (bomb_400mp, 20_000)):
        assert data[12:16] == b"IHDR"
        assert struct.unpack(">II", data[16:24]) == (side, side)


@pytest.mark.parametrize("max_pixels", [1_000_000, None], ids=["small-limit", "default-limit"])
def test_bomb_rejected_by_our_pixel_limit(
    bomb_64mp: bytes, forbid_pixel_decoding: list[str], max_pixels: int | None
) -> None:
    """Our own limit trips on the header size, before any pixel is decoded."""
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    start = time.perf_counter()
    error = assert_error(
        lambda: decode_image(bomb_64mp, **kwargs), TooManyPixelsError, 413, "too_many_pixels"
    )
    assert time.perf_counter() - start < 1.0
    assert "8000x8000" in error.message
    assert str(max_pixels or decode_module.DEFAULT_MAX_PIXELS) in error.message
    assert forbid_pixel_decoding == []


def test_bomb_rejected_by_pillow_threshold(bomb_400mp: bytes, forbid_pixel_decoding: list[str]) -> None:
    """With our limit out of the way, Pillow's DecompressionBombError becomes our 413, not a 500."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or 2 * limit >= 20_000 * 20_000:
        pytest.skip(f"Pillow's MAX_IMAGE_PIXELS ({limit}) does not flag a 400 MP image")
    start = time.perf_counter()
    error = assert_error(
        lambda: decode_image(bomb_400mp, max_pixels=10**12), TooManyPixelsError, 413, "too_many_pixels"
    )
    assert "400000000" in error.message
    assert time.perf_counter() - start < 1.0
    assert forbid_pixel_decoding == []
    assert limit == Image.MAX_IMAGE_PIXELS  # Pillow's global was not touched


@pytest.fixture(scope="module")
def bomb_100mp() -> Iterator[bytes]:
    """10000 x 10000 = 100 MP: between Pillow's warning and error thresholds (by default)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or not limit < 10_000 * 10_000 <= 2 * limit:
        pytest.skip(f"Pillow's MAX_IMAGE_PIXELS ({limit}) is not the default")
    yield bomb_png(10_000, 10_000)


def test_bomb_warning_as_error_becomes_413(bomb_100mp: bytes, forbid_pixel_decoding: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert_error(
            lambda: decode_image(bomb_100mp, max_pixels=10**12), TooManyPixelsError, 413, "too_many_pixels"
        )
    assert forbid_pixel_decoding == []


def test_bomb_in_warning_range_rejected_by_default_limit(
    bomb_100mp: bytes, forbid_pixel_decoding: list[str]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        error = assert_error(lambda: decode_image(bomb_100mp), TooManyPixelsError, 413, "too_many_pixels")
    assert "10000x10000" in error.message
    assert forbid_pixel_decoding == []


# --------------------------------------------------------------------------- EXIF orientation


def marked_jpeg(orientation: int) -> bytes:
    """60 wide x 40 high, BLUE with a RED 12x12 block in the stored top-left corner."""
    image = Image.new("RGB", (60, 40), BLUE)
    image.paste(RED, (0, 0, 12, 12))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize(
    ("orientation", "shape", "red_corner"),
    [
        (1, (40, 60, 3), "top-left"),
        (3, (40, 60, 3), "bottom-right"),
        (6, (60, 40, 3), "top-right"),  # stored image must be turned 90 degrees clockwise
        (8, (60, 40, 3), "bottom-left"),  # ... 90 degrees anticlockwise
    ],
)
def test_exif_orientation_applied(orientation: int, shape: tuple[int, int, int], red_corner: str) -> None:
    array = decode_image(marked_jpeg(orientation), content_type="image/jpeg")
    assert array.shape == shape
    corners = {
        "top-left": (slice(2, 8), slice(2, 8)),
        "top-right": (slice(2, 8), slice(-8, -2)),
        "bottom-left": (slice(-8, -2), slice(2, 8)),
        "bottom-right": (slice(-8, -2), slice(-8, -2)),
    }
    for name, (rows, cols) in corners.items():
        assert_colour(region_mean(array, rows, cols), RED if name == red_corner else BLUE)


# --------------------------------------------------------------------------- mode conversion


def test_rgba_png_composited_on_white() -> None:
    image = Image.new("RGBA", (20, 10), (*RED, 255))
    image.paste((0, 0, 0, 0), (10, 0, 20, 10))  # right half fully transparent black
    array = decode_image(encode(image, "PNG"))
    assert array.shape == (10, 20, 3) and array.dtype == np.uint8
    assert (array[:, :10] == RED).all()
    assert (array[:, 10:] == 255).all()


def test_half_transparent_pixels_blend_with_white() -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    array = decode_image(encode(image, "PNG"))
    assert np.all(np.abs(array.astype(int) - 127) <= 1)


def test_palette_png() -> None:
    image = two_colour_image().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    data = encode(image, "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "P"
    array = decode_image(data)
    assert array.shape == (48, 64, 3)
    assert_colour(region_mean(array, slice(None), slice(0, 30)), RED)
    assert_colour(region_mean(array, slice(None), slice(34, None)), BLUE)


def test_palette_png_with_transparency() -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, *RED] + [0] * (3 * 254))
    image.paste(0, (0, 0, 4, 8))
    data = encode(image, "PNG", transparency=0)
    array = decode_image(data)
    assert (array[:, :4] == 255).all()
    assert (array[:, 4:] == RED).all()


@pytest.mark.parametrize("mode", ["L", "LA", "1"])
def test_grey_modes(mode: str) -> None:
    image = Image.new("L", (16, 8), 0)
    image.paste(255, (8, 0, 16, 8))
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "1":
        image = image.convert("1")
    data = encode(image, "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == mode
    array = decode_image(data)
    assert array.shape == (8, 16, 3) and array.dtype == np.uint8
    assert (array[:, :8] == 0).all() and (array[:, 8:] == 255).all()


def test_grey_jpeg() -> None:
    array = decode_image(encode(Image.new("L", (16, 16), 100), "JPEG"))
    assert array.shape == (16, 16, 3)
    assert np.all(np.abs(array.astype(int) - 100) <= 2)


def test_cmyk_jpeg() -> None:
    array = decode_image(encode(two_colour_image(mode="CMYK"), "JPEG", quality=95))
    assert array.shape == (48, 64, 3)
    assert_colour(region_mean(array, slice(4, 44), slice(4, 28)), RED)


def test_16_bit_grey_png_scaled_not_clipped() -> None:
    values = np.array([[0, 0x4000, 0x8000, 0xFFFF]], dtype=np.uint16).repeat(3, axis=0)
    data = encode(Image.fromarray(values), "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode.startswith("I")
    array = decode_image(data)
    assert array.shape == (3, 4, 3) and array.dtype == np.uint8
    np.testing.assert_array_equal(array[0, :, 0], [0, 0x40, 0x80, 0xFF])
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()


def test_rgba_webp_and_bmp() -> None:
    image = Image.new("RGBA", (8, 8), (*BLUE, 255))
    image.paste((0, 0, 0, 0), (0, 0, 4, 8))
    for fmt in ("WEBP", "BMP"):
        options = {"lossless": True} if fmt == "WEBP" else {}
        array = decode_image(encode(image, fmt, **options))
        assert array.shape == (8, 8, 3), fmt
        assert_colour(region_mean(array, slice(None), slice(5, 8)), BLUE)


# --------------------------------------------------------------------------- encode_png


def test_encode_png_round_trips_rgb_and_grey() -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    data = encode_png(rgb)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(decode_image(data, content_type="image/png"), rgb)

    grey = rng.integers(0, 256, (9, 5), dtype=np.uint8)
    with Image.open(io.BytesIO(encode_png(grey))) as image:
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), grey)
    np.testing.assert_array_equal(decode_image(encode_png(grey)), np.repeat(grey[:, :, None], 3, axis=2))


def test_encode_png_accepts_non_contiguous_views() -> None:
    rgb = np.random.default_rng(4).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    view = rgb[:, ::2]
    np.testing.assert_array_equal(decode_image(encode_png(view)), view)
    bgr_view = rgb[..., ::-1]
    np.testing.assert_array_equal(decode_image(encode_png(bgr_view)), bgr_view)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4, 3), dtype=np.float32),
        np.zeros((4, 4, 4), dtype=np.uint8),
        np.zeros(4, dtype=np.uint8),
        np.zeros((0, 4), dtype=np.uint8),
    ],
    ids=["float", "four-channels", "1d", "empty"],
)
def test_encode_png_rejects_bad_arrays(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_png(bad)


# --------------------------------------------------------------------------- the error type


def test_error_codes_are_distinct_and_statuses_match() -> None:
    expected = {
        EmptyImageError: (400, "empty_image"),
        NotAnImageError: (400, "not_an_image"),
        TruncatedImageError: (400, "truncated_image"),
        CorruptImageError: (400, "corrupt_image"),
        UnsupportedMediaTypeError: (415, "unsupported_media_type"),
        PayloadTooLargeError: (413, "payload_too_large"),
        TooManyPixelsError: (413, "too_many_pixels"),
    }
    for cls, (status, code) in expected.items():
        assert issubclass(cls, ImageError)
        error = cls("boom")
        assert (error.status, error.code, error.message) == (status, code, "boom")
        assert code in repr(error)
    assert len({code for _, code in expected.values()}) == len(expected)


def test_module_exports() -> None:
    for name in decode_module.__all__:
        assert hasattr(decode_module, name), name
