"""OpenEXR scanline files, numpy and zlib only: float32 depth maps out, depth maps in.

Writes single-part scanline images with FLOAT channels, compression NONE or
ZIP (16-line blocks, zlib over the byte-split, delta-predicted data, as the
OpenEXR library does). Reads single-part scanline images with HALF/FLOAT/UINT
channels and NONE, RLE, ZIPS or ZIP compression, which covers what Blender
writes with its default codec; other compressions (PIZ, DWA...) get a clear
error. Depth is written in a channel named ``Z`` (z-depth in metres).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ...bridge.atomic import atomic_write
from ...bridge.errors import KeyframeWorldsError

_MAGIC = 20000630
_NONE, _RLE, _ZIPS, _ZIP = 0, 1, 2, 3
_LINES_PER_BLOCK = {_NONE: 1, _RLE: 1, _ZIPS: 1, _ZIP: 16}
_PIXEL_TYPES = {0: np.dtype("<u4"), 1: np.dtype("<f2"), 2: np.dtype("<f4")}
_COMPRESSION_NAMES = {0: "NONE", 1: "RLE", 2: "ZIPS", 3: "ZIP", 4: "PIZ", 5: "PXR24", 6: "B44", 7: "B44A", 8: "DWAA", 9: "DWAB"}


def _attribute(name: str, type_name: str, value: bytes) -> bytes:
    return name.encode() + b"\0" + type_name.encode() + b"\0" + struct.pack("<i", len(value)) + value


def _predict_and_split(raw: bytes) -> bytes:
    """OpenEXR's ZIP preprocessing: odd/even byte split, then byte deltas (+128)."""
    data = np.frombuffer(raw, dtype=np.uint8)
    split = np.concatenate([data[0::2], data[1::2]])
    out = split.copy()
    out[1:] = (split[1:].astype(np.int16) - split[:-1].astype(np.int16) + 128).astype(np.uint8)
    return out.tobytes()


def _unpredict_and_merge(data: bytes) -> bytes:
    d = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    d[1:] -= 128
    t = (np.cumsum(d) & 0xFF).astype(np.uint8)
    half = (len(t) + 1) // 2
    out = np.empty(len(t), dtype=np.uint8)
    out[0::2] = t[:half]
    out[1::2] = t[half:]
    return out.tobytes()


def write_exr(path: str | os.PathLike, channels: dict[str, np.ndarray], compression: str = "zip") -> None:
    """Write (H, W) float arrays as FLOAT channels, atomically (temporary file, then rename).

    compression: "zip" (lossless, 16-line blocks) or "none".
    """
    if not channels:
        raise KeyframeWorldsError("an EXR needs at least one channel")
    code = {"none": _NONE, "zip": _ZIP}.get(compression)
    if code is None:
        raise KeyframeWorldsError(f"unsupported EXR compression {compression!r}; use 'zip' or 'none'")
    names = sorted(channels)
    arrays = [np.ascontiguousarray(np.asarray(channels[n], dtype="<f4")) for n in names]
    height, width = arrays[0].shape
    for n, a in zip(names, arrays):
        if a.shape != (height, width):
            raise KeyframeWorldsError(f"EXR channel {n!r} has shape {a.shape}, expected {(height, width)}")
    chlist = b"".join(n.encode() + b"\0" + struct.pack("<iB3xii", 2, 0, 1, 1) for n in names) + b"\0"
    box = struct.pack("<iiii", 0, 0, width - 1, height - 1)
    header = struct.pack("<ii", _MAGIC, 2) + b"".join([
        _attribute("channels", "chlist", chlist),
        _attribute("compression", "compression", bytes([code])),
        _attribute("dataWindow", "box2i", box),
        _attribute("displayWindow", "box2i", box),
        _attribute("lineOrder", "lineOrder", b"\0"),
        _attribute("pixelAspectRatio", "float", struct.pack("<f", 1.0)),
        _attribute("screenWindowCenter", "v2f", struct.pack("<ff", 0.0, 0.0)),
        _attribute("screenWindowWidth", "float", struct.pack("<f", 1.0)),
    ]) + b"\0"
    lines = _LINES_PER_BLOCK[code]
    # Pixel data per scanline: each channel's row in turn (channels in name order).
    rows = np.stack(arrays, axis=1)  # (H, C, W)
    chunks = []
    for y0 in range(0, height, lines):
        raw = rows[y0 : y0 + lines].tobytes()
        if code == _ZIP:
            packed = zlib.compress(_predict_and_split(raw), 1)  # level 1: most of the gain, a fraction of the time
            data = packed if len(packed) < len(raw) else raw
        else:
            data = raw
        chunks.append(struct.pack("<ii", y0, len(data)) + data)
    offsets, position = [], len(header) + 8 * len(chunks)
    for chunk in chunks:
        offsets.append(position)
        position += len(chunk)
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        fh.write(header)
        fh.write(np.asarray(offsets, dtype="<u8").tobytes())
        for chunk in chunks:
            fh.write(chunk)


def write_depth_exr(path: str | os.PathLike, depth_z_m: np.ndarray) -> None:
    """A (H, W) z-depth map in metres as a one-channel (``Z``) float32 EXR."""
    write_exr(path, {"Z": depth_z_m})


#: The largest side read (the job spec's own limit, bridge/trajectory.py MAX_SIZE_PX).
MAX_EXR_SIDE = 8192


def exr_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an EXR's data window from its header alone."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 20)
    except OSError as exc:
        raise KeyframeWorldsError(f"cannot read EXR {path}: {exc}") from None
    _channels, _compression, (xmin, ymin, xmax, ymax), _pos = _read_header(head, path)
    return xmax - xmin + 1, ymax - ymin + 1


def _read_header(data: bytes, path: Path):
    """(channels, compression, data window, offset of the chunk table) of a scanline EXR's bytes."""
    if len(data) < 8 or struct.unpack("<i", data[:4])[0] != _MAGIC:
        raise KeyframeWorldsError(f"{path} is not an OpenEXR file")
    flags = struct.unpack("<i", data[4:8])[0]
    if flags & 0x200 or flags & 0x1000:
        raise KeyframeWorldsError(f"{path}: tiled or multi-part EXR files are not supported; save a scanline EXR")
    pos, attrs = 8, {}
    try:
        while data[pos] != 0:
            name_end = data.index(b"\0", pos)
            type_end = data.index(b"\0", name_end + 1)
            size = struct.unpack("<i", data[type_end + 1 : type_end + 5])[0]
            attrs[data[pos:name_end].decode()] = data[type_end + 5 : type_end + 5 + size]
            pos = type_end + 5 + size
        pos += 1
        channels = []
        chl, i = attrs["channels"], 0
        while chl[i] != 0:
            end = chl.index(b"\0", i)
            ptype, _linear, xs, ys = struct.unpack("<iB3xii", chl[end + 1 : end + 17])
            channels.append((chl[i:end].decode(), ptype, xs, ys))
            i = end + 17
        compression = attrs["compression"][0]
        xmin, ymin, xmax, ymax = struct.unpack("<iiii", attrs["dataWindow"])
    except (KeyError, IndexError, ValueError, struct.error):
        raise KeyframeWorldsError(f"{path}: EXR header is malformed") from None
    if compression not in _LINES_PER_BLOCK:
        raise KeyframeWorldsError(
            f"{path}: EXR compression {_COMPRESSION_NAMES.get(compression, compression)} is not supported; "
            "save it with ZIP, ZIPS, RLE or no compression"
        )
    if any(xs != 1 or ys != 1 for _n, _t, xs, ys in channels) or any(t not in _PIXEL_TYPES for _n, t, _x, _y in channels):
        raise KeyframeWorldsError(f"{path}: subsampled or unknown EXR channel types are not supported")
    return channels, compression, (xmin, ymin, xmax, ymax), pos


def read_exr(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every channel of a scanline EXR as (H, W) float32 arrays, by channel name."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyframeWorldsError(f"cannot read EXR {path}: {exc}") from None
    channels, compression, (xmin, ymin, xmax, ymax), pos = _read_header(data, path)
    if not (0 < xmax - xmin + 1 <= MAX_EXR_SIDE and 0 < ymax - ymin + 1 <= MAX_EXR_SIDE):
        # Checked before the arrays are made: a small file may declare any size.
        raise KeyframeWorldsError(f"{path}: EXR data window is {xmax - xmin + 1}x{ymax - ymin + 1}; "
                                  f"each side must be 1-{MAX_EXR_SIDE} px")
    width, height = xmax - xmin + 1, ymax - ymin + 1
    lines = _LINES_PER_BLOCK[compression]
    n_chunks = (height + lines - 1) // lines
    try:
        offsets = np.frombuffer(data, dtype="<u8", count=n_chunks, offset=pos)
    except ValueError:
        raise KeyframeWorldsError(f"{path}: EXR is truncated (its chunk table is incomplete)") from None
    out = {name: np.empty((height, width), dtype=np.float32) for name, *_ in channels}
    try:
        _read_chunks(data, path, offsets, out, channels, compression, width, lines, ymin, ymax)
    except (struct.error, zlib.error, ValueError, IndexError, OverflowError):
        raise KeyframeWorldsError(f"{path}: EXR data is corrupt or truncated") from None
    return out


def _read_chunks(data, path, offsets, out, channels, compression, width, lines, ymin, ymax) -> None:
    row_bytes = sum(_PIXEL_TYPES[t].itemsize for _n, t, _x, _y in channels) * width
    for offset in offsets.tolist():
        y, size = struct.unpack("<ii", data[offset : offset + 8])
        block = data[offset + 8 : offset + 8 + size]
        n_lines = min(lines, ymax - y + 1)
        expected = row_bytes * n_lines
        if len(block) != expected:
            if compression in (_ZIP, _ZIPS):
                # At most the bytes the block should hold (+1 to tell too many): no zip bomb inflates past it.
                block = _unpredict_and_merge(zlib.decompressobj().decompress(block, expected + 1))
            elif compression == _RLE:
                block = _unpredict_and_merge(_rle_decode(block))
        if len(block) != expected:
            raise KeyframeWorldsError(f"{path}: EXR block at line {y} is corrupt or truncated")
        cursor = 0
        for line in range(n_lines):
            for name, ptype, _x, _y in channels:
                dt = _PIXEL_TYPES[ptype]
                row = np.frombuffer(block, dtype=dt, count=width, offset=cursor)
                out[name][y - ymin + line] = row.astype(np.float32)
                cursor += dt.itemsize * width


def _rle_decode(data: bytes) -> bytes:
    out, i = bytearray(), 0
    while i < len(data):
        count = struct.unpack("b", data[i : i + 1])[0]
        if count < 0:
            out += data[i + 1 : i + 1 - count]
            i += 1 - count
        else:
            out += data[i + 1 : i + 2] * (count + 1)
            i += 2
    return bytes(out)


def read_depth_exr(path: str | os.PathLike) -> np.ndarray:
    """A (H, W) float32 z-depth from an EXR: channel ``Z``, or ``*.Z``/``Depth``/``R``, in that order."""
    channels = read_exr(path)
    for name in ("Z", "Depth", "depth", "R", "Y"):
        if name in channels:
            return channels[name]
    for name in channels:
        if name.endswith(".Z") or name.endswith("Depth.Z"):
            return channels[name]
    if len(channels) == 1:
        return next(iter(channels.values()))
    raise KeyframeWorldsError(f"{path}: no depth channel (looked for Z, *.Z, Depth, R); channels: {', '.join(channels)}")
