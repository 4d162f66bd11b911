"""Image size and type from a file's header, with the stdlib only (PNG, JPEG, WebP).

Upstream example folders name JPEG and WebP files ``image.png``, so the
extension says nothing: the header decides.
"""

from __future__ import annotations

import os
import struct


def image_info(path: str | os.PathLike) -> tuple[str, int, int] | None:
    """``(kind, width, height)`` with kind ``png``/``jpeg``/``webp``, or None if unreadable or another type."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
            if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
                w, h = struct.unpack(">II", head[16:24])
                return "png", w, h
            if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                return _webp(head, fh)
            if head[:2] == b"\xff\xd8":
                fh.seek(2)
                return _jpeg(fh)
    except OSError:
        return None
    return None


def _webp(head: bytes, fh) -> tuple[str, int, int] | None:
    chunk = head[12:16]
    data = head[20:32]
    if chunk == b"VP8 " and len(data) >= 10 and data[3:6] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[6:10])
        return "webp", w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 5 and data[0] == 0x2F:
        bits = int.from_bytes(data[1:5], "little")
        return "webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 10:
        w = int.from_bytes(data[4:7], "little") + 1
        h = int.from_bytes(data[7:10], "little") + 1
        return "webp", w, h
    return None


# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(fh) -> tuple[str, int, int] | None:
    while True:
        byte = fh.read(1)
        if not byte:
            return None
        if byte != b"\xff":
            continue
        marker = fh.read(1)
        while marker == b"\xff":
            marker = fh.read(1)
        if not marker:
            return None
        code = marker[0]
        if code in (0xD8, 0x01) or 0xD0 <= code <= 0xD7:
            continue
        length_bytes = fh.read(2)
        if len(length_bytes) < 2:
            return None
        length = struct.unpack(">H", length_bytes)[0]
        if code in _SOF:
            data = fh.read(5)
            if len(data) < 5:
                return None
            h, w = struct.unpack(">HH", data[1:5])
            return "jpeg", w, h
        fh.seek(length - 2, os.SEEK_CUR)
