"""Trajectory files: read and write every format the project exchanges cameras in.

Formats (``FORMATS``):

- ``keyframe-worlds``: JSON ``{"format": "keyframe-worlds/trajectories", "version": 1,
  "trajectories": [<trajectory JSON>]}`` (see ``trajectory.py``); a bare trajectory
  object is read too. Lossless.
- ``worldstereo``: the upstream ``camera.json``: ``extrinsic`` = list of world-to-camera
  4x4 (OpenCV camera frame), ``intrinsic`` = list of 3x3 pixel K. One camera per file.
  Upstream files may lack the size; it is then taken from ``width``/``height`` keys,
  an ``image.png`` beside the file (any of PNG/JPEG/WebP, whatever its name says), or ``2 * (cx, cy)``. We also write ``width``,
  ``height``, ``frames``, ``fps`` and ``name`` (upstream readers ignore them).
- ``nerfstudio``: ``transforms.json`` with per-frame ``transform_matrix``
  (camera-to-world, OpenGL camera frame) and per-frame ``fl_x fl_y cx cy w h``.
- ``colmap``: a folder with ``cameras.txt`` (PINHOLE), ``images.txt`` (world-to-camera
  quaternion + translation, OpenCV frame) and an empty ``points3D.txt``.

Camera names and frame numbers travel in image names (``<camera>/<frame:06d>.png``)
for nerfstudio and COLMAP; fps in a ``keyframe_worlds`` key or comment.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from . import cameras
from .atomic import atomic_write
from .errors import KeyframeWorldsError, ValidationError
from .imageinfo import image_info
from .spec import read_json
from .trajectory import Trajectory

FORMATS = ("keyframe-worlds", "worldstereo", "nerfstudio", "colmap")
KW_FORMAT_TAG = "keyframe-worlds/trajectories"
# Upstream WorldStereo trajectories are generated for Wan2.1, which runs at 16 fps.
WORLDSTEREO_DEFAULT_FPS = 16.0
DEFAULT_FPS = 24.0


# --- detection, dispatch ----------------------------------------------------------


def detect_format(path: str | os.PathLike) -> str:
    """Which trajectory format a file or folder holds; raises ``KeyframeWorldsError`` if none."""
    p = Path(path)
    if p.is_dir():
        if (p / "cameras.txt").is_file() and (p / "images.txt").is_file():
            return "colmap"
        if (p / "transforms.json").is_file():
            return "nerfstudio"
        if (p / "camera.json").is_file() or any(p.glob("*/camera.json")):
            return "worldstereo"
        raise KeyframeWorldsError(f"{p} is a folder with no trajectory file (cameras.txt + images.txt, transforms.json or camera.json)")
    if not p.exists():
        raise KeyframeWorldsError(f"trajectory file not found: {p}")
    if p.name in ("cameras.txt", "images.txt"):
        return "colmap"
    doc = read_json(p, "trajectory file")
    if isinstance(doc, dict):
        if doc.get("format") == KW_FORMAT_TAG or "trajectories" in doc:
            return "keyframe-worlds"
        if "extrinsic" in doc:
            return "worldstereo"
        frames = doc.get("frames")
        if isinstance(frames, list) and frames and isinstance(frames[0], dict):
            if "transform_matrix" in frames[0]:
                return "nerfstudio"
            if "c2w_opencv" in frames[0]:
                return "keyframe-worlds"
    raise KeyframeWorldsError(f"cannot tell the trajectory format of {p}; give it with --from ({', '.join(FORMATS)})")


def read_trajectories(path: str | os.PathLike, fmt: str | None = None) -> list[Trajectory]:
    """Read every camera trajectory in a file or folder of format ``fmt`` (detected when None)."""
    fmt = fmt or detect_format(path)
    readers = {"keyframe-worlds": read_keyframe_worlds, "worldstereo": read_worldstereo, "nerfstudio": read_nerfstudio, "colmap": read_colmap}
    if fmt not in readers:
        raise KeyframeWorldsError(f"unknown trajectory format {fmt!r}; known: {', '.join(FORMATS)}")
    trajectories = readers[fmt](Path(path))
    for i, traj in enumerate(trajectories):
        problems = traj.problems(f"{Path(path).name}: trajectory {traj.name!r}")
        if problems:
            raise ValidationError(f"trajectory {i} read from {path}", problems)
    return trajectories


def write_trajectories(trajectories: Sequence[Trajectory], path: str | os.PathLike, fmt: str) -> list[Path]:
    """Write trajectories in format ``fmt``; returns the files written.

    ``worldstereo`` holds one camera per file: with several cameras, ``path`` is
    a folder that gets ``<camera>/camera.json`` each (a folder ``path`` with one
    camera gets ``path/camera.json``). ``colmap`` writes into the
    folder ``path``. The others write the single file ``path``.
    """
    trajectories = list(trajectories)
    if not trajectories:
        raise KeyframeWorldsError("no trajectories to write")
    writers = {"keyframe-worlds": write_keyframe_worlds, "worldstereo": write_worldstereo, "nerfstudio": write_nerfstudio, "colmap": write_colmap}
    if fmt not in writers:
        raise KeyframeWorldsError(f"unknown trajectory format {fmt!r}; known: {', '.join(FORMATS)}")
    names = [t.name for t in trajectories]
    if len(set(names)) != len(names):
        raise KeyframeWorldsError(f"camera names must be unique, got {names}")
    return writers[fmt](trajectories, Path(path))


def _write_text(path: Path, text: str) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _matrix(value: Any, shape: tuple[int, int], where: str) -> np.ndarray:
    try:
        m = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise KeyframeWorldsError(f"{where}: must be a {shape[0]}x{shape[1]} array of numbers") from None
    if m.shape != shape:
        raise KeyframeWorldsError(f"{where}: must be {shape[0]}x{shape[1]}, got shape {list(m.shape)}")
    if not np.all(np.isfinite(m)):
        raise KeyframeWorldsError(f"{where}: has non-finite entries")
    return m


def _image_name(camera: str, frame: int) -> str:
    return f"{camera}/{frame:06d}.png"


_TRAILING_NUMBER = re.compile(r"(-?\d+)(?=\.[A-Za-z0-9]+$|$)")


def _parse_image_name(name: str, fallback_camera: str, index: int) -> tuple[str, int]:
    """Camera name and frame number from ``<camera>/<frame>.png``; generic names use their digits or the index."""
    pure = PurePosixPath(name.replace("\\", "/"))
    match = _TRAILING_NUMBER.search(pure.name)
    frame = int(match.group(1)) if match else index
    parent = pure.parent.name
    camera = parent if parent and parent not in ("images", ".") else fallback_camera
    return camera, frame


def _group_sorted(entries: list[tuple[str, int, np.ndarray, tuple]], fps: dict[str, float]) -> list[Trajectory]:
    """Build trajectories from (camera, frame, c2w_opencv, (fx, fy, cx, cy, w, h)) entries, sorted by frame."""
    groups: dict[str, list] = defaultdict(list)
    for entry in entries:
        groups[entry[0]].append(entry)
    out = []
    for name, items in groups.items():
        items.sort(key=lambda e: e[1])
        sizes = {(e[3][4], e[3][5]) for e in items}
        if len(sizes) != 1:
            raise KeyframeWorldsError(f"camera {name!r}: frames have different image sizes {sorted(sizes)}; a trajectory has one size")
        (w, h), = sizes
        out.append(
            Trajectory(
                name=name,
                frames=[e[1] for e in items],
                c2w_opencv=np.stack([e[2] for e in items]),
                fx=[e[3][0] for e in items],
                fy=[e[3][1] for e in items],
                cx=[e[3][2] for e in items],
                cy=[e[3][3] for e in items],
                width=w,
                height=h,
                fps=fps.get(name, DEFAULT_FPS),
            )
        )
    return out


# --- keyframe-worlds ---------------------------------------------------------------


def read_keyframe_worlds(path: Path) -> list[Trajectory]:
    doc = read_json(path, "trajectory file")
    if isinstance(doc, dict) and "trajectories" in doc:
        if doc.get("version", 1) != 1:
            raise KeyframeWorldsError(f"{path}: unsupported keyframe-worlds trajectory file version {doc.get('version')!r}")
        items = doc["trajectories"]
        if not isinstance(items, list) or not items:
            raise KeyframeWorldsError(f"{path}: 'trajectories' must be a non-empty list")
        return [Trajectory.from_json(t, f"{path.name}: trajectories[{i}]") for i, t in enumerate(items)]
    return [Trajectory.from_json(doc, path.name)]


def write_keyframe_worlds(trajectories: list[Trajectory], path: Path) -> list[Path]:
    doc = {"format": KW_FORMAT_TAG, "version": 1, "trajectories": [t.to_json() for t in trajectories]}
    return [_write_text(path, json.dumps(doc, indent=1) + "\n")]


# --- worldstereo camera.json ------------------------------------------------------


def read_worldstereo(path: Path) -> list[Trajectory]:
    """One ``camera.json``, or a folder holding one or one per camera sub-folder (``<camera>/camera.json``)."""
    if path.is_dir():
        if (path / "camera.json").is_file():
            path = path / "camera.json"
        else:
            files = sorted(path.glob("*/camera.json"))
            if not files:
                raise KeyframeWorldsError(f"{path}: no camera.json in the folder or its sub-folders")
            return [t for f in files for t in read_worldstereo(f)]
    doc = read_json(path, "trajectory file")
    if not isinstance(doc, dict) or "extrinsic" not in doc or "intrinsic" not in doc:
        raise KeyframeWorldsError(f"{path}: a WorldStereo camera.json needs 'extrinsic' and 'intrinsic' lists")
    ext, intr = doc["extrinsic"], doc["intrinsic"]
    if not isinstance(ext, list) or not isinstance(intr, list) or not ext:
        raise KeyframeWorldsError(f"{path}: 'extrinsic' and 'intrinsic' must be non-empty lists")
    if len(ext) != len(intr):
        raise KeyframeWorldsError(f"{path}: {len(ext)} extrinsics but {len(intr)} intrinsics")
    w2c = np.stack([_matrix(m, (4, 4), f"{path.name}: extrinsic[{i}]") for i, m in enumerate(ext)])
    k = np.stack([_matrix(m, (3, 3), f"{path.name}: intrinsic[{i}]") for i, m in enumerate(intr)])
    if "width" in doc and "height" in doc:
        width, height = int(doc["width"]), int(doc["height"])
    elif (info := image_info(path.parent / "image.png")) is not None:
        width, height = info[1], info[2]
    else:
        width, height = int(round(2 * k[0, 0, 2])), int(round(2 * k[0, 1, 2]))
    frames = doc.get("frames", list(range(len(ext))))
    if not isinstance(frames, list) or len(frames) != len(ext):
        raise KeyframeWorldsError(f"{path}: 'frames' must list one frame number per extrinsic")
    return [
        Trajectory(
            name=str(doc.get("name") or path.parent.name or "camera"),
            frames=frames,
            c2w_opencv=cameras.w2c_to_c2w(w2c),
            fx=k[:, 0, 0],
            fy=k[:, 1, 1],
            cx=k[:, 0, 2],
            cy=k[:, 1, 2],
            width=width,
            height=height,
            fps=float(doc.get("fps", WORLDSTEREO_DEFAULT_FPS)),
        )
    ]


def write_worldstereo(trajectories: list[Trajectory], path: Path) -> list[Path]:
    if len(trajectories) == 1:
        targets = [(trajectories[0], path if path.suffix == ".json" else path / "camera.json")]
    else:
        targets = [(t, path / t.name / "camera.json") for t in trajectories]
    written = []
    for traj, target in targets:
        doc = {
            "name": traj.name,
            "width": traj.width,
            "height": traj.height,
            "fps": traj.fps,
            "frames": traj.frames.tolist(),
            "extrinsic": cameras.c2w_to_w2c(traj.c2w_opencv).tolist(),
            "intrinsic": traj.k.tolist(),
        }
        written.append(_write_text(target, json.dumps(doc, indent=1) + "\n"))
    return written


# --- nerfstudio transforms.json -----------------------------------------------------

_NERFSTUDIO_DISTORTION = ("k1", "k2", "k3", "k4", "p1", "p2")


def read_nerfstudio(path: Path) -> list[Trajectory]:
    if path.is_dir():
        path = path / "transforms.json"
    doc = read_json(path, "trajectory file")
    if not isinstance(doc, dict) or not isinstance(doc.get("frames"), list) or not doc["frames"]:
        raise KeyframeWorldsError(f"{path}: a nerfstudio transforms.json needs a non-empty 'frames' list")
    model = doc.get("camera_model", "OPENCV")
    if model not in ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE"):
        raise KeyframeWorldsError(f"{path}: camera_model {model!r} is not a pinhole model; only OPENCV/PINHOLE without distortion is supported")
    extra = doc.get("keyframe_worlds", {}) if isinstance(doc.get("keyframe_worlds"), dict) else {}
    fallback = str(extra.get("camera") or path.parent.name or "camera")
    entries = []
    for i, frame in enumerate(doc["frames"]):
        where = f"{path.name}: frames[{i}]"
        if not isinstance(frame, dict):
            raise KeyframeWorldsError(f"{where}: must be an object")

        def get(key: str):
            value = frame.get(key, doc.get(key))
            if value is None:
                raise KeyframeWorldsError(f"{where}: missing '{key}' (neither per frame nor at the top level)")
            return value

        for key in _NERFSTUDIO_DISTORTION:
            value = frame.get(key, doc.get(key, 0.0))
            if value not in (0, 0.0, None):
                raise KeyframeWorldsError(f"{where}: lens distortion {key}={value} is not supported (undistort the images first)")
        c2w = cameras.c2w_nerfstudio_to_opencv(_matrix(frame.get("transform_matrix"), (4, 4), f"{where}.transform_matrix"))
        camera, number = _parse_image_name(str(frame.get("file_path", "")), fallback, i)
        camera = str(frame.get("keyframe_worlds_camera", camera))
        intr = (float(get("fl_x")), float(get("fl_y")), float(get("cx")), float(get("cy")), int(get("w")), int(get("h")))
        entries.append((camera, number, c2w, intr))
    fps = extra.get("fps", {}) if isinstance(extra.get("fps"), dict) else {}
    return _group_sorted(entries, {k: float(v) for k, v in fps.items()})


def write_nerfstudio(trajectories: list[Trajectory], path: Path) -> list[Path]:
    if path.suffix != ".json":
        path = path / "transforms.json"
    first = trajectories[0]
    frames = []
    for traj in trajectories:
        c2w_gl = cameras.c2w_opencv_to_nerfstudio(traj.c2w_opencv)
        for i in range(len(traj)):
            frames.append({
                "file_path": f"images/{_image_name(traj.name, int(traj.frames[i]))}",
                "keyframe_worlds_camera": traj.name,
                "transform_matrix": c2w_gl[i].tolist(),
                "fl_x": float(traj.fx[i]), "fl_y": float(traj.fy[i]),
                "cx": float(traj.cx[i]), "cy": float(traj.cy[i]),
                "w": traj.width, "h": traj.height,
            })
    doc = {
        "camera_model": "OPENCV",
        "fl_x": float(first.fx[0]), "fl_y": float(first.fy[0]), "cx": float(first.cx[0]), "cy": float(first.cy[0]),
        "w": first.width, "h": first.height,
        "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
        "keyframe_worlds": {"fps": {t.name: t.fps for t in trajectories}},
        "frames": frames,
    }
    return [_write_text(path, json.dumps(doc, indent=1) + "\n")]


# --- COLMAP text --------------------------------------------------------------------

_COLMAP_FPS = re.compile(r"^#\s*keyframe-worlds fps\s+(.+?)=([0-9.eE+-]+)\s*$")


def _colmap_lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyframeWorldsError(f"COLMAP file not found: {path}") from None
    return list(enumerate(text.splitlines(), start=1))


def read_colmap(path: Path) -> list[Trajectory]:
    folder = path if path.is_dir() else path.parent
    cams: dict[int, tuple] = {}
    for lineno, line in _colmap_lines(folder / "cameras.txt"):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        where = f"cameras.txt line {lineno}"
        try:
            cam_id, model, w, h = int(parts[0]), parts[1], int(parts[2]), int(parts[3])
            params = [float(x) for x in parts[4:]]
        except (ValueError, IndexError):
            raise KeyframeWorldsError(f"{where}: expected 'CAMERA_ID MODEL WIDTH HEIGHT PARAMS...', got {line!r}") from None
        if model == "PINHOLE" and len(params) == 4:
            fx, fy, cx, cy = params
        elif model == "SIMPLE_PINHOLE" and len(params) == 3:
            fx, cx, cy = params
            fy = fx
        elif model in ("SIMPLE_RADIAL", "RADIAL") and len(params) >= 4 and all(p == 0 for p in params[3:]):
            fx, cx, cy = params[:3]
            fy = fx
        elif model == "OPENCV" and len(params) == 8 and all(p == 0 for p in params[4:]):
            fx, fy, cx, cy = params[:4]
        else:
            raise KeyframeWorldsError(f"{where}: camera model {model} with parameters {params} is not a pinhole camera without distortion")
        cams[cam_id] = (fx, fy, cx, cy, w, h)
    fps: dict[str, float] = {}
    entries = []
    lines = _colmap_lines(folder / "images.txt")
    expect_points = False
    index = 0
    for lineno, line in lines:
        match = _COLMAP_FPS.match(line.strip())
        if match:
            fps[match.group(1)] = float(match.group(2))
            continue
        if line.lstrip().startswith("#"):
            continue
        if expect_points:  # the POINTS2D line after every image line, possibly empty
            expect_points = False
            continue
        if not line.strip():
            continue
        parts = line.split()
        where = f"images.txt line {lineno}"
        try:
            qvec = [float(x) for x in parts[1:5]]
            tvec = [float(x) for x in parts[5:8]]
            cam_id = int(parts[8])
            name = " ".join(parts[9:])
        except (ValueError, IndexError):
            raise KeyframeWorldsError(f"{where}: expected 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME', got {line!r}") from None
        if cam_id not in cams:
            raise KeyframeWorldsError(f"{where}: camera id {cam_id} is not in cameras.txt")
        if not all(math.isfinite(v) for v in qvec + tvec):
            raise KeyframeWorldsError(f"{where}: non-finite pose")
        w2c = np.eye(4)
        w2c[:3, :3] = cameras.quaternion_wxyz_to_rotation(np.array(qvec))
        w2c[:3, 3] = tvec
        camera, number = _parse_image_name(name, folder.name or "camera", index)
        entries.append((camera, number, cameras.w2c_to_c2w(w2c), cams[cam_id]))
        expect_points = True
        index += 1
    if not entries:
        raise KeyframeWorldsError(f"{folder / 'images.txt'}: no images")
    return _group_sorted(entries, fps)


def write_colmap(trajectories: list[Trajectory], path: Path) -> list[Path]:
    folder = path.parent if path.name in ("cameras.txt", "images.txt") else path
    cam_ids: dict[tuple, int] = {}
    cam_lines = ["# Camera list with one line of data per camera:", "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]"]
    img_lines = ["# Image list with two lines of data per image:", "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME", "#   POINTS2D[] as (X, Y, POINT3D_ID)"]
    img_lines += [f"# keyframe-worlds fps {t.name}={t.fps!r}" for t in trajectories]
    image_id = 0
    for traj in trajectories:
        w2c = cameras.c2w_to_w2c(traj.c2w_opencv)
        q = cameras.rotation_to_quaternion_wxyz(w2c[:, :3, :3])
        for i in range(len(traj)):
            # One COLMAP camera per distinct intrinsics, so animated lenses survive.
            key = (traj.width, traj.height, float(traj.fx[i]), float(traj.fy[i]), float(traj.cx[i]), float(traj.cy[i]))
            if key not in cam_ids:
                cam_ids[key] = len(cam_ids) + 1
                cam_lines.append(f"{cam_ids[key]} PINHOLE {key[0]} {key[1]} {key[2]!r} {key[3]!r} {key[4]!r} {key[5]!r}")
            image_id += 1
            qw, qx, qy, qz = (repr(float(v)) for v in q[i])
            tx, ty, tz = (repr(float(v)) for v in w2c[i, :3, 3])
            img_lines.append(f"{image_id} {qw} {qx} {qy} {qz} {tx} {ty} {tz} {cam_ids[key]} {_image_name(traj.name, int(traj.frames[i]))}")
            img_lines.append("")
    return [
        _write_text(folder / "cameras.txt", "\n".join(cam_lines) + "\n"),
        _write_text(folder / "images.txt", "\n".join(img_lines) + "\n"),
        _write_text(folder / "points3D.txt", "# 3D point list (empty: cameras only)\n"),
    ]
