"""Issue 17 item 6: a process-wide pixel budget on decoding, and large images decoded reduced with
boxes still reported in original-image pixels."""

from __future__ import annotations

import io
import threading
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from service.inference import decode
from service.inference.decode import (
    DEFAULT_PIXEL_BUDGET,
    DecodedImage,
    PixelBudget,
    configure_decoding,
    decode_image,
    image_scale,
    original_size,
)


@pytest.fixture
def restore_decoding():
    yield
    configure_decoding(pixel_budget=DEFAULT_PIXEL_BUDGET, reduce_min_side=None)


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_budget_blocks_decodes_beyond_it_and_lets_an_oversized_one_run_alone() -> None:
    budget = PixelBudget(100)
    assert budget.acquire(60)
    assert not budget.acquire(60, timeout=0.1)  # 120 > 100: waits
    assert budget.acquire(40, timeout=0.1)  # exactly fits
    got = threading.Event()

    def big() -> None:
        budget.acquire(500)  # larger than the whole budget: runs once nothing else is held
        got.set()

    t = threading.Thread(target=big)
    t.start()
    time.sleep(0.1)
    assert not got.is_set()
    budget.release(60)
    time.sleep(0.05)
    assert not got.is_set()
    budget.release(40)
    assert got.wait(2)
    assert budget.in_use == 500
    budget.release(500)
    t.join(2)


def test_budget_bounds_concurrent_decodes(restore_decoding, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encode(np.full((1000, 1000, 3), 90, np.uint8), "PNG")
    configure_decoding(pixel_budget=2_000_000)  # two 1-Mpx images at once
    peak = 0
    lock = threading.Lock()
    original = decode._load_rgb

    def slow_load(*args, **kwargs):
        nonlocal peak
        with lock:
            peak = max(peak, decode._budget.in_use)
        time.sleep(0.05)
        return original(*args, **kwargs)

    monkeypatch.setattr(decode, "_load_rgb", slow_load)
    threads = [threading.Thread(target=decode_image, args=(data,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert peak == 2_000_000
    assert decode._budget.in_use == 0


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_6000_px_image_is_decoded_reduced_and_knows_its_size(restore_decoding, fmt: str) -> None:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (60, 40, 3), dtype=np.uint8)
    big = cv2.resize(small, (4000, 6000), interpolation=cv2.INTER_LINEAR)
    configure_decoding(reduce_min_side=2560)
    out = decode_image(_encode(big, fmt), max_bytes=2**27)
    assert isinstance(out, DecodedImage)
    assert out.shape == (3000, 2000, 3)
    assert original_size(out) == (4000, 6000)
    assert image_scale(out) == (2.0, 2.0)
    expected = cv2.resize(big, (2000, 3000), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - expected).mean() < 3
    configure_decoding(reduce_min_side=None)
    full = decode_image(_encode(big, fmt), max_bytes=2**27)
    assert type(full) is np.ndarray and full.shape == (6000, 4000, 3)


def test_exif_rotated_reduced_jpeg_reports_the_oriented_size(restore_decoding) -> None:
    image = Image.fromarray(np.full((3000, 6000, 3), 120, np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif)
    configure_decoding(reduce_min_side=2560)
    out = decode_image(buf.getvalue())
    assert out.shape == (3000, 1500, 3)
    assert original_size(out) == (3000, 6000)


def test_detect_on_a_6000_px_photo_reports_original_pixels(make_settings, face_image,
                                                           restore_decoding) -> None:
    from fastapi.testclient import TestClient

    from service.main import create_app

    big = cv2.resize(face_image, (6000, 6000), interpolation=cv2.INTER_CUBIC)
    body = _encode(big, "JPEG")
    answers = {}
    for margin in (4.0, 0.0):  # reduced (3000 px decode), then full size
        with TestClient(create_app(make_settings(decode_reduce_margin=margin, max_upload_bytes=2**26))) as c:
            r = c.post("/detect", content=body, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
        answers[margin] = r.json()
    for answer in answers.values():
        assert answer["image"] == {"width": 6000, "height": 6000}
        assert len(answer["faces"]) >= 1
    reduced, full = answers[4.0]["faces"][0], answers[0.0]["faces"][0]
    scale = 6000 / face_image.shape[1]
    assert np.allclose(reduced["box"], full["box"], atol=0.01 * 6000)
    assert np.allclose(reduced["landmarks"], full["landmarks"], atol=0.01 * 6000)
    assert reduced["box"][2] > 100 * scale  # original pixels, not the 3000-px decode's
