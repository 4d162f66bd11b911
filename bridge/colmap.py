"""COLMAP sparse models, text and binary, record for record: ``cameras``, ``images``, ``points3D``.

This module knows COLMAP's files and nothing of trajectories (``formats.py``
turns a model into trajectories and back). The layouts, from COLMAP's
documentation ("Output Format") and its model reader and writer:

Text (``#`` starts a comment line):

- ``cameras.txt``: ``CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]``, one camera a line.
- ``images.txt``: two lines an image: ``IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME``,
  then ``POINTS2D[]`` as ``X Y POINT3D_ID`` triples (``-1``: no 3D point), possibly empty.
  The pose is world-to-camera (quaternion w, x, y, z and translation), OpenCV camera frame.
- ``points3D.txt``: ``POINT3D_ID X Y Z R G B ERROR TRACK[]``, the track as ``IMAGE_ID POINT2D_IDX`` pairs.

Binary (little endian; ``uint64`` counts first):

- ``cameras.bin``: per camera ``uint32 camera_id, int32 model_id, uint64 width, uint64 height,
  float64 params[n]`` (``n`` from the model).
- ``images.bin``: per image ``uint32 image_id, float64 qw qx qy qz, float64 tx ty tz,
  uint32 camera_id``, the name as bytes ending in NUL, ``uint64 num_points2D``, then per point
  ``float64 x, float64 y, uint64 point3D_id`` (``2**64 - 1``: none).
- ``points3D.bin``: per point ``uint64 point3D_id, float64 x y z, uint8 r g b, float64 error,
  uint64 track_length``, then per element ``uint32 image_id, uint32 point2D_idx``.

Only the camera models of ``cameras.LENS_MODELS`` are read; others are refused by name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .cameras import LENS_MODEL_IDS, LENS_MODELS
from .errors import KeyframeWorldsError

TEXT_FILES = ("cameras.txt", "images.txt", "points3D.txt")
BINARY_FILES = ("cameras.bin", "images.bin", "points3D.bin")
# COLMAP models this project does not carry, for naming them in the refusal (ids from COLMAP's models.h).
_OTHER_MODEL_IDS = {7: "FOV", 10: "THIN_PRISM_FISHEYE", 11: "RAD_TAN_THIN_PRISM_FISHEYE"}
_NO_POINT3D = 2**64 - 1
_POINT2D = np.dtype([("x", "<f8"), ("y", "<f8"), ("point3d", "<u8")])


@dataclass(frozen=True)
class ColmapCamera:
    """One ``cameras`` record: every parameter of the model in COLMAP's order (focal length(s), principal point, distortion)."""

    camera_id: int
    model: str
    width: int
    height: int
    params: tuple[float, ...]


@dataclass(frozen=True, eq=False)
class ColmapImage:
    """One ``images`` record. ``qvec`` (w, x, y, z) and ``tvec`` are world-to-camera; ``xy`` ``(M, 2)`` pixels, ``point3d_ids`` ``(M,)`` (-1: none)."""

    image_id: int
    qvec: tuple[float, float, float, float]
    tvec: tuple[float, float, float]
    camera_id: int
    name: str
    xy: np.ndarray
    point3d_ids: np.ndarray


@dataclass(frozen=True, eq=False)
class ColmapPoints:
    """Every ``points3D`` record as arrays: N points, T track elements (CSR layout, see ``sparse.SparsePoints``)."""

    ids: np.ndarray  # (N,) int64
    xyz: np.ndarray  # (N, 3) float64
    rgb: np.ndarray  # (N, 3) uint8
    error: np.ndarray  # (N,) float64
    track_offsets: np.ndarray  # (N + 1,) int64
    track_image_ids: np.ndarray  # (T,) int64
    track_point2d: np.ndarray  # (T,) int64

    @classmethod
    def empty(cls) -> "ColmapPoints":
        z = np.zeros(0, np.int64)
        return cls(z, np.zeros((0, 3)), np.zeros((0, 3), np.uint8), np.zeros(0), np.zeros(1, np.int64), z, z)


@dataclass(frozen=True)
class ColmapModel:
    """A sparse model: cameras, images (in file order), points, and the comment lines of ``images.txt`` (text only, without ``#``)."""

    cameras: tuple[ColmapCamera, ...]
    images: tuple[ColmapImage, ...]
    points: ColmapPoints
    image_comments: tuple[str, ...] = ()


def model_kind(folder: Path) -> str | None:
    """``"text"`` or ``"binary"`` when ``folder`` holds that model's cameras and images (text first), else None."""
    if (folder / "cameras.txt").is_file() and (folder / "images.txt").is_file():
        return "text"
    if (folder / "cameras.bin").is_file() and (folder / "images.bin").is_file():
        return "binary"
    return None


def read_model(folder: Path, binary: bool) -> ColmapModel:
    """Read the text or binary model in ``folder``; a missing ``points3D`` file reads as no points."""
    if binary:
        return ColmapModel(tuple(_read_cameras_bin(folder / "cameras.bin")), tuple(_read_images_bin(folder / "images.bin")),
                           _read_points_bin(folder / "points3D.bin"))
    images, comments = _read_images_txt(folder / "images.txt")
    return ColmapModel(tuple(_read_cameras_txt(folder / "cameras.txt")), tuple(images), _read_points_txt(folder / "points3D.txt"),
                       tuple(comments))


def write_model(model: ColmapModel, folder: Path, binary: bool) -> list[Path]:
    """Write the three files of ``model`` into ``folder`` (each atomically); returns their paths."""
    if binary:
        contents = [_cameras_bin(model.cameras), _images_bin(model.images), _points_bin(model.points)]
        names = BINARY_FILES
    else:
        contents = [_cameras_txt(model.cameras), _images_txt(model.images, model.image_comments), _points_txt(model.points)]
        contents = [c.encode("utf-8") for c in contents]
        names = TEXT_FILES
    written = []
    for name, content in zip(names, contents):
        with atomic_write(folder / name) as tmp:
            tmp.write_bytes(content)
        written.append(folder / name)
    return written


# --- checks shared by both layouts ---------------------------------------------------


def _camera(where: str, camera_id: int, model: str, width: int, height: int, params: list[float]) -> ColmapCamera:
    if model not in LENS_MODELS:
        raise KeyframeWorldsError(f"{where}: camera {camera_id} uses the COLMAP camera model {model}, which is not supported "
                                  f"(supported: {', '.join(LENS_MODELS)})")
    names = LENS_MODELS[model].colmap_param_names
    if len(params) != len(names):
        raise KeyframeWorldsError(f"{where}: camera {camera_id} ({model}) needs {len(names)} parameters ({', '.join(names)}), got {len(params)}")
    if not all(np.isfinite(params)):
        raise KeyframeWorldsError(f"{where}: camera {camera_id} has non-finite parameters {params}")
    return ColmapCamera(camera_id, model, width, height, tuple(params))


def _lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyframeWorldsError(f"COLMAP file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyframeWorldsError(f"cannot read COLMAP file {path}: {exc}") from None
    return list(enumerate(text.splitlines(), start=1))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyframeWorldsError(f"COLMAP file not found: {path}") from None
    except OSError as exc:
        raise KeyframeWorldsError(f"cannot read COLMAP file {path}: {exc}") from None


# --- text ----------------------------------------------------------------------------


def _read_cameras_txt(path: Path) -> list[ColmapCamera]:
    cameras = []
    for lineno, line in _lines(path):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        where = f"{path.name} line {lineno}"
        try:
            camera_id, model, width, height = int(parts[0]), parts[1], int(parts[2]), int(parts[3])
            params = [float(x) for x in parts[4:]]
        except (ValueError, IndexError):
            raise KeyframeWorldsError(f"{where}: expected 'CAMERA_ID MODEL WIDTH HEIGHT PARAMS...', got {line!r}") from None
        cameras.append(_camera(where, camera_id, model, width, height, params))
    return cameras


def _read_images_txt(path: Path) -> tuple[list[ColmapImage], list[str]]:
    images, comments = [], []
    lines = _lines(path)
    i = 0
    while i < len(lines):
        lineno, line = lines[i]
        i += 1
        stripped = line.strip()
        if stripped.startswith("#"):
            comments.append(stripped[1:].strip())
            continue
        if not stripped:
            continue
        parts = stripped.split(maxsplit=9)
        where = f"{path.name} line {lineno}"
        try:
            image_id = int(parts[0])
            qvec = tuple(float(x) for x in parts[1:5])
            tvec = tuple(float(x) for x in parts[5:8])
            camera_id = int(parts[8])
            name = parts[9]
        except (ValueError, IndexError):
            raise KeyframeWorldsError(f"{where}: expected 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME', got {line!r}") from None
        if not all(np.isfinite(qvec + tvec)):
            raise KeyframeWorldsError(f"{where}: image {image_id} has a non-finite pose")
        # As COLMAP reads it: the line after an image line is its POINTS2D, whatever it holds.
        points_line = ""
        if i < len(lines):
            points_line = lines[i][1]
            i += 1
        tokens = points_line.split()
        if len(tokens) % 3:
            raise KeyframeWorldsError(f"{path.name} line {lineno + 1}: POINTS2D must be 'X Y POINT3D_ID' triples, got {len(tokens)} values")
        try:
            xy = np.array([float(t) for t in tokens[0::3]] + [float(t) for t in tokens[1::3]], dtype=np.float64).reshape(2, -1).T
            ids = np.array([int(t) for t in tokens[2::3]], dtype=np.int64)
        except ValueError:
            raise KeyframeWorldsError(f"{path.name} line {lineno + 1}: POINTS2D must be numbers 'X Y POINT3D_ID'") from None
        images.append(ColmapImage(image_id, qvec, tvec, camera_id, name, np.ascontiguousarray(xy), ids))
    return images, comments


def _read_points_txt(path: Path) -> ColmapPoints:
    if not path.is_file():
        return ColmapPoints.empty()
    ids, xyz, rgb, error, lengths, track = [], [], [], [], [], []
    for lineno, line in _lines(path):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        try:
            if len(parts) < 8 or (len(parts) - 8) % 2:
                raise ValueError
            ids.append(int(parts[0]))
            xyz.append([float(x) for x in parts[1:4]])
            rgb.append([int(x) for x in parts[4:7]])
            error.append(float(parts[7]))
            lengths.append((len(parts) - 8) // 2)
            track.extend(int(x) for x in parts[8:])
        except ValueError:
            raise KeyframeWorldsError(f"{path.name} line {lineno}: expected 'POINT3D_ID X Y Z R G B ERROR (IMAGE_ID POINT2D_IDX)...', "
                                      f"got {line[:120]!r}") from None
        if not all(0 <= c <= 255 for c in rgb[-1]):
            raise KeyframeWorldsError(f"{path.name} line {lineno}: colour {rgb[-1]} is outside 0-255")
    track_arr = np.array(track, dtype=np.int64).reshape(-1, 2)
    return ColmapPoints(np.array(ids, np.int64), np.array(xyz, np.float64).reshape(-1, 3), np.array(rgb, np.uint8).reshape(-1, 3),
                        np.array(error, np.float64), np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
                        track_arr[:, 0].copy(), track_arr[:, 1].copy())


def _cameras_txt(cameras: tuple[ColmapCamera, ...]) -> str:
    lines = ["# Camera list with one line of data per camera:", "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
             f"# Number of cameras: {len(cameras)}"]
    # repr() of a float is the shortest text that reads back to the same double: the files stay lossless.
    lines += [" ".join([str(c.camera_id), c.model, str(c.width), str(c.height)] + [repr(float(p)) for p in c.params]) for c in cameras]
    return "\n".join(lines) + "\n"


def _images_txt(images: tuple[ColmapImage, ...], comments: tuple[str, ...]) -> str:
    lines = ["# Image list with two lines of data per image:", "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
             "#   POINTS2D[] as (X, Y, POINT3D_ID)", f"# Number of images: {len(images)}"]
    lines += [f"# {c}" for c in comments]
    for im in images:
        pose = " ".join(repr(float(v)) for v in tuple(im.qvec) + tuple(im.tvec))
        lines.append(f"{im.image_id} {pose} {im.camera_id} {im.name}")
        lines.append(" ".join(f"{x!r} {y!r} {int(p)}" for (x, y), p in zip(im.xy.tolist(), im.point3d_ids.tolist())))
    return "\n".join(lines) + "\n"


def _points_txt(points: ColmapPoints) -> str:
    n = len(points.ids)
    mean = (len(points.track_image_ids) / n) if n else 0.0
    lines = ["# 3D point list with one line of data per point:",
             "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
             f"# Number of points: {n}, mean track length: {mean:g}"]
    off = points.track_offsets.tolist()
    images, p2d = points.track_image_ids.tolist(), points.track_point2d.tolist()
    for i, (pid, (x, y, z), (r, g, b), err) in enumerate(zip(points.ids.tolist(), points.xyz.tolist(), points.rgb.tolist(),
                                                             points.error.tolist())):
        track = " ".join(f"{images[j]} {p2d[j]}" for j in range(off[i], off[i + 1]))
        lines.append(f"{pid} {x!r} {y!r} {z!r} {r} {g} {b} {err!r}" + (f" {track}" if track else ""))
    return "\n".join(lines) + "\n"


# --- binary --------------------------------------------------------------------------


class _Bytes:
    """A cursor over a binary file that names the file and record when it runs out."""

    def __init__(self, path: Path):
        self.path = path
        self.data = _read_bytes(path)
        self.offset = 0

    def unpack(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.data):
            raise KeyframeWorldsError(f"{self.path.name}: truncated in {what} (needs {size} bytes at byte {self.offset}, "
                                      f"the file has {len(self.data)})")
        values = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += size
        return values

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        size = dtype.itemsize * count
        if self.offset + size > len(self.data):
            raise KeyframeWorldsError(f"{self.path.name}: truncated in {what} (needs {size} bytes at byte {self.offset})")
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset)
        self.offset += size
        return out

    def c_string(self, what: str) -> str:
        end = self.data.find(b"\0", self.offset)
        if end < 0:
            raise KeyframeWorldsError(f"{self.path.name}: truncated in {what} (no NUL after the name)")
        raw = self.data[self.offset:end]
        self.offset = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise KeyframeWorldsError(f"{self.path.name}: {what} has a name that is not UTF-8: {raw!r}") from None

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise KeyframeWorldsError(f"{self.path.name}: {len(self.data) - self.offset} bytes left over after the last record")


def _read_cameras_bin(path: Path) -> list[ColmapCamera]:
    f = _Bytes(path)
    (count,) = f.unpack("<Q", "the camera count")
    cameras = []
    for i in range(count):
        what = f"camera record {i}"
        camera_id, model_id, width, height = f.unpack("<IiQQ", what)
        lens = LENS_MODEL_IDS.get(model_id)
        if lens is None:
            name = _OTHER_MODEL_IDS.get(model_id, f"with id {model_id}")
            raise KeyframeWorldsError(f"{path.name}: camera {camera_id} uses the COLMAP camera model {name}, which is not supported "
                                      f"(supported: {', '.join(LENS_MODELS)})")
        params = list(f.unpack(f"<{len(lens.colmap_param_names)}d", what))
        cameras.append(_camera(path.name, camera_id, lens.name, width, height, params))
    f.finish()
    return cameras


def _read_images_bin(path: Path) -> list[ColmapImage]:
    f = _Bytes(path)
    (count,) = f.unpack("<Q", "the image count")
    images = []
    for i in range(count):
        what = f"image record {i}"
        image_id, qw, qx, qy, qz, tx, ty, tz, camera_id = f.unpack("<I7dI", what)
        name = f.c_string(what)
        (m,) = f.unpack("<Q", what)
        pts = f.array(_POINT2D, m, what)
        ids = pts["point3d"].astype(np.int64)
        ids[pts["point3d"] == np.uint64(_NO_POINT3D)] = -1
        if not all(np.isfinite((qw, qx, qy, qz, tx, ty, tz))):
            raise KeyframeWorldsError(f"{path.name}: image {image_id} has a non-finite pose")
        images.append(ColmapImage(image_id, (qw, qx, qy, qz), (tx, ty, tz), camera_id, name,
                                  np.stack([pts["x"], pts["y"]], -1).astype(np.float64), ids))
    f.finish()
    return images


def _read_points_bin(path: Path) -> ColmapPoints:
    if not path.is_file():
        return ColmapPoints.empty()
    f = _Bytes(path)
    (count,) = f.unpack("<Q", "the point count")
    ids = np.empty(count, np.int64)
    xyz = np.empty((count, 3))
    rgb = np.empty((count, 3), np.uint8)
    error = np.empty(count)
    offsets = np.zeros(count + 1, np.int64)
    tracks = []
    for i in range(count):
        what = f"point record {i}"
        pid, x, y, z, r, g, b, err, length = f.unpack("<Q3d3BdQ", what)
        ids[i], xyz[i], rgb[i], error[i] = pid, (x, y, z), (r, g, b), err
        tracks.append(f.array(np.dtype("<u4"), 2 * length, what))
        offsets[i + 1] = offsets[i] + length
    f.finish()
    track = np.concatenate(tracks).astype(np.int64).reshape(-1, 2) if tracks else np.zeros((0, 2), np.int64)
    return ColmapPoints(ids, xyz, rgb, error, offsets, track[:, 0].copy(), track[:, 1].copy())


def _cameras_bin(cameras: tuple[ColmapCamera, ...]) -> bytes:
    out = [struct.pack("<Q", len(cameras))]
    for c in cameras:
        out.append(struct.pack("<IiQQ", c.camera_id, LENS_MODELS[c.model].colmap_id, c.width, c.height))
        out.append(struct.pack(f"<{len(c.params)}d", *c.params))
    return b"".join(out)


def _images_bin(images: tuple[ColmapImage, ...]) -> bytes:
    out = [struct.pack("<Q", len(images))]
    for im in images:
        out.append(struct.pack("<I7dI", im.image_id, *im.qvec, *im.tvec, im.camera_id))
        out.append(im.name.encode("utf-8") + b"\0")
        pts = np.empty(len(im.xy), _POINT2D)
        pts["x"], pts["y"] = im.xy[:, 0], im.xy[:, 1]
        ids = im.point3d_ids.astype(np.uint64)
        ids[im.point3d_ids < 0] = np.uint64(_NO_POINT3D)
        pts["point3d"] = ids
        out.append(struct.pack("<Q", len(pts)) + pts.tobytes())
    return b"".join(out)


def _points_bin(points: ColmapPoints) -> bytes:
    out = [struct.pack("<Q", len(points.ids))]
    track = np.stack([points.track_image_ids, points.track_point2d], -1).astype("<u4")
    off = points.track_offsets
    for i in range(len(points.ids)):
        out.append(struct.pack("<Q3d3BdQ", int(points.ids[i]), *points.xyz[i].tolist(), *points.rgb[i].tolist(),
                               float(points.error[i]), int(off[i + 1] - off[i])))
        out.append(track[off[i]:off[i + 1]].tobytes())
    return b"".join(out)
