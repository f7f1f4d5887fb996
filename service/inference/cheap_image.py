"""A byte-level gate: is a small upload plainly cheap to decode on the event loop?

A few KiB can still cost tens of milliseconds to *parse*, before any pixel is decoded: PNG
text chunks that each inflate to 1 MB, thousands of empty ancillary chunks, JPEG files padded
with thousands of markers or fill bytes, a progressive scan repeated a thousand times. In a
worker thread that is harmless; on the event loop it stalls every connection. So only files
whose structure is plainly ordinary are decoded inline: a PNG with few chunks, all of them
critical or small fixed-size ones, and a JPEG with few markers. Everything else (WebP, BMP,
anything unusual) goes to the worker thread, where the same checks run. The gate reads the
bytes only; it never inflates or decodes anything.
"""

from __future__ import annotations

import re
import struct

__all__ = ["MAX_JPEG_MARKERS", "MAX_PNG_CHUNKS", "PLAIN_PNG_CHUNKS", "is_plainly_cheap"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"

PLAIN_PNG_CHUNKS: frozenset[bytes] = frozenset(
    {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"bKGD", b"sBIT"}
)
"""PNG chunks whose parsing costs nothing: image data and small fixed-size fields (no text, no
compressed profiles)."""

MAX_PNG_CHUNKS = 32
"""More chunks than this is not an ordinary small PNG (encoders split IDAT at 8-64 KiB)."""

MAX_JPEG_MARKERS = 64
"""An ordinary JPEG has 10-30 markers (progressive ones up to about 40): SOI, APPn, DQT, SOF,
DHT, SOS per scan, EOI. Restart markers (RST0-7) and stuffed bytes (FF 00) are not counted."""

# 0xFF followed by anything but a stuffed zero or a restart marker: a marker or a fill byte.
_JPEG_MARKER = re.compile(rb"\xff(?![\x00\xd0-\xd7])")


def is_plainly_cheap(data: bytes) -> bool:
    """True if ``data`` is a PNG or JPEG whose structure is plainly ordinary (see module docs)."""
    if data.startswith(PNG_SIGNATURE):
        return _plain_png(data)
    if data.startswith(JPEG_SOI):
        return len(_JPEG_MARKER.findall(data)) <= MAX_JPEG_MARKERS
    return False


def _plain_png(data: bytes) -> bool:
    offset, chunks = len(PNG_SIGNATURE), 0
    while offset + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        chunks += 1
        if kind not in PLAIN_PNG_CHUNKS or chunks > MAX_PNG_CHUNKS:
            return False
        if kind == b"IEND":
            return True
        offset += 12 + length  # length, type, data, CRC
    return True  # truncated: the decoder reports it, cheaply
