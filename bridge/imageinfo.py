"""Image size and type from a file's header, with the stdlib only (PNG, JPEG, WebP), the kind of the
other image files (TIFF, OpenEXR), and a ``.npy`` file's shape and dtype from its header (numpy's own
reader), all without decoding, so a file that would decode to gigabytes is refused for its size first.

Upstream example folders name JPEG and WebP files ``image.png``, so the
extension says nothing: the header decides.
"""

from __future__ import annotations

import math
import os
import struct

#: The first bytes of the image kinds only known by their magic here.
MAGIC_KINDS = {b"\x76\x2f\x31\x01": "exr", b"II*\x00": "tiff", b"MM\x00*": "tiff", b"II+\x00": "tiff", b"MM\x00+": "tiff"}


def file_kind(path: str | os.PathLike) -> str | None:
    """``png``/``jpeg``/``webp``/``tiff``/``exr`` by the file's first bytes, or None (unreadable, or another kind)."""
    info = image_info(path)
    if info is not None:
        return info[0]
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return None
    return MAGIC_KINDS.get(head)


def npy_info(path: str | os.PathLike, min_side: int, max_side: int) -> tuple[tuple[int, ...], str]:
    """``(shape, dtype)`` of a depth ``.npy`` from its header alone; ValueError naming what is wrong.

    A depth map must be a real-number array of (H, W) or (H, W, 1), each side within
    ``min_side``-``max_side``, and the file must hold all of its data (not truncated).
    Object arrays (pickles) are refused without being loaded.
    """
    import numpy as np

    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            try:
                version = fmt.read_magic(fh)
            except ValueError:
                raise ValueError("is not a .npy file (no numpy header)") from None
            if version == (1, 0):
                shape, _fortran, dtype = fmt.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _fortran, dtype = fmt.read_array_header_2_0(fh)
            else:
                raise ValueError(f"has .npy format version {version[0]}.{version[1]}; save it with numpy.save (version 1.0 or 2.0)")
            offset = fh.tell()
        size = os.path.getsize(path)
    except OSError as exc:
        raise ValueError(f"cannot be read: {exc.strerror or exc}") from None
    except (SyntaxError, TypeError) as exc:
        raise ValueError(f"has a malformed .npy header: {exc}") from None
    if dtype.hasobject:
        raise ValueError("holds Python objects (a pickle), which are not read; save the depths as a float32 array")
    if dtype.fields is not None or dtype.kind not in "fiu":
        raise ValueError(f"must hold real numbers (float32 depths in metres), got dtype {dtype}")
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] == 1)):
        raise ValueError(f"must be a 2-D array (height, width) of depths, got shape {tuple(shape)}")
    height, width = shape[0], shape[1]
    if not (min_side <= width <= max_side and min_side <= height <= max_side):
        raise ValueError(f"is {width}x{height} (shape {tuple(shape)}); each side must be {min_side}-{max_side} px")
    need = math.prod(shape) * dtype.itemsize
    if size - offset < need:
        raise ValueError(f"is truncated: {size - offset} bytes of data for shape {tuple(shape)} {dtype}, which needs {need}")
    return tuple(int(n) for n in shape), str(dtype)


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
