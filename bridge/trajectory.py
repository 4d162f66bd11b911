"""Camera trajectories: the in-memory form, its JSON form, and its validation.

A trajectory is one camera's evaluated animation: for every sampled frame, a
camera-to-world matrix with an OpenCV camera frame (``c2w_opencv``, see
``cameras.py``), intrinsics in pixels, optionally a lens model with its
distortion (``cameras.Distortion``; none is a pinhole) and the path of the
frame's image. One trajectory has one output resolution (a video has one size).

JSON form (inside a job spec, and as the ``keyframe-worlds`` trajectory file)::

    {"name": "Camera", "fps": 24.0, "width": 832, "height": 480,
     "frames": [{"frame": 1, "c2w_opencv": [[...4 numbers...] x 4],
                 "fx": 900.0, "fy": 900.0, "cx": 416.0, "cy": 240.0,
                 "distortion": {"model": "OPENCV", "params": [k1, k2, p1, p2]},  # optional
                 "image": "images/0001.jpg"}, ...]}                              # optional

``distortion.params`` are in COLMAP's order for the model (``cameras.LENS_MODELS``);
for a single-focal-length model (SIMPLE_RADIAL, ...) ``fx`` equals ``fy``. The
image path is kept as the file it was read from wrote it (COLMAP's image
``NAME``, nerfstudio's ``file_path``). Files without these keys read as pinhole
frames without images, as before.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cameras import LENS_MODELS, Distortion, Intrinsics, intrinsics_matrix
from .errors import Problem, ValidationError

MIN_SIZE_PX = 16
MAX_SIZE_PX = 8192
MAX_FRAMES = 100_000
# Rotation columns must be orthonormal to this; Blender's float32 matrices reach ~1e-7.
ORTHONORMAL_TOLERANCE = 1e-4


@dataclass(frozen=True, eq=False)
class Trajectory:
    """One camera's frames.

    Attributes:
        name: camera name (unique within a job).
        frames: ``(N,)`` int64 scene frame numbers, strictly increasing.
        c2w_opencv: ``(N, 4, 4)`` float64 camera-to-world, OpenCV camera frame, metres.
        fx, fy, cx, cy: ``(N,)`` float64 intrinsics in pixels of ``width`` x ``height``.
        width, height: output resolution in pixels.
        fps: scene frames per second (frame rate / frame rate base).
        distortion: ``(N,)`` per frame, a ``Distortion`` or None (a pinhole). Given as None
            (every frame a pinhole), one ``Distortion`` for every frame, or one entry per frame;
            a ``PINHOLE`` entry becomes None, so a pinhole has one form.
        images: ``(N,)`` per frame, the image's path as its file wrote it, or None (no image known).
    """

    name: str
    frames: np.ndarray
    c2w_opencv: np.ndarray
    fx: np.ndarray
    fy: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    width: int
    height: int
    fps: float = 24.0
    distortion: tuple[Distortion | None, ...] | Distortion | None = None
    images: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.frames)
        object.__setattr__(self, "frames", np.asarray(self.frames, dtype=np.int64).reshape(n))
        object.__setattr__(self, "c2w_opencv", np.asarray(self.c2w_opencv, dtype=np.float64).reshape(n, 4, 4))
        for key in ("fx", "fy", "cx", "cy"):
            object.__setattr__(self, key, np.broadcast_to(np.asarray(getattr(self, key), dtype=np.float64), (n,)).copy())
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "fps", float(self.fps))
        dist = self.distortion
        dist = (dist,) * n if dist is None or isinstance(dist, Distortion) else tuple(dist)
        if len(dist) != n or not all(d is None or isinstance(d, Distortion) for d in dist):
            raise ValueError(f"trajectory {self.name!r}: distortion must be None, a Distortion, or one Distortion or None per frame ({n})")
        object.__setattr__(self, "distortion", tuple(None if d is not None and d.model == "PINHOLE" else d for d in dist))
        images = (None,) * n if self.images is None else tuple(self.images)
        if len(images) != n or not all(i is None or isinstance(i, str) for i in images):
            raise ValueError(f"trajectory {self.name!r}: images must be None or one path (or None) per frame ({n})")
        object.__setattr__(self, "images", images)

    def __len__(self) -> int:
        return len(self.frames)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trajectory):
            return NotImplemented
        return self.allclose(other, atol=0.0)

    def allclose(self, other: "Trajectory", atol: float = 1e-9) -> bool:
        """Same name, size, fps, frames, lens models and images; matrices, intrinsics and distortion within ``atol``."""
        return (
            self.name == other.name
            and (self.width, self.height) == (other.width, other.height)
            and math.isclose(self.fps, other.fps, rel_tol=0, abs_tol=atol)
            and np.array_equal(self.frames, other.frames)
            and all(np.allclose(getattr(self, k), getattr(other, k), rtol=0, atol=atol) for k in ("c2w_opencv", "fx", "fy", "cx", "cy"))
            and self.images == other.images
            and all(_distortion_close(a, b, atol) for a, b in zip(self.distortion, other.distortion))
        )

    @property
    def has_distortion(self) -> bool:
        """Whether any frame's lens does not project like a pinhole (a fisheye, or a non-zero parameter)."""
        return any(d is not None and not d.is_pinhole for d in self.distortion)

    @property
    def k(self) -> np.ndarray:
        """``(N, 3, 3)`` intrinsics matrices."""
        return intrinsics_matrix(self.fx, self.fy, self.cx, self.cy)

    def intrinsics(self, i: int) -> Intrinsics:
        return Intrinsics(float(self.fx[i]), float(self.fy[i]), float(self.cx[i]), float(self.cy[i]), self.width, self.height)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "fps": self.fps,
            "width": self.width,
            "height": self.height,
            "frames": [
                {
                    "frame": int(self.frames[i]),
                    "c2w_opencv": self.c2w_opencv[i].tolist(),
                    "fx": float(self.fx[i]),
                    "fy": float(self.fy[i]),
                    "cx": float(self.cx[i]),
                    "cy": float(self.cy[i]),
                    **self._frame_extras(i),
                }
                for i in range(len(self))
            ],
        }

    def _frame_extras(self, i: int) -> dict:
        # Only present when set, so pinhole frames without images keep the JSON they always had.
        extras: dict[str, Any] = {}
        d = self.distortion[i]
        if d is not None:
            extras["distortion"] = {"model": d.model, "params": list(d.params)}
        if self.images[i] is not None:
            extras["image"] = self.images[i]
        return extras

    @classmethod
    def from_json(cls, doc: Any, path: str = "trajectory") -> "Trajectory":
        """Parse and validate; raises ``ValidationError`` listing every problem."""
        problems = validate_trajectory_json(doc, path)
        if problems:
            raise ValidationError(path, problems)
        frames = doc["frames"]
        return cls(
            name=doc["name"],
            frames=[f["frame"] for f in frames],
            c2w_opencv=[f["c2w_opencv"] for f in frames],
            fx=[f["fx"] for f in frames],
            fy=[f["fy"] for f in frames],
            cx=[f["cx"] for f in frames],
            cy=[f["cy"] for f in frames],
            width=doc["width"],
            height=doc["height"],
            fps=doc.get("fps", 24.0),
            distortion=[Distortion(f["distortion"]["model"], tuple(f["distortion"]["params"])) if f.get("distortion") is not None else None
                        for f in frames],
            images=[f.get("image") for f in frames],
        )

    def problems(self, path: str = "trajectory") -> list[Problem]:
        """Validation of an in-memory trajectory (same rules as its JSON form)."""
        return validate_trajectory_json(self.to_json(), path)


# --- validation helpers shared by the spec and manifest validators -----------


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_number(problems: list[Problem], path: str, value: Any, *, positive: bool = False, minimum: float | None = None,
                 maximum: float | None = None) -> bool:
    """Append a problem unless ``value`` is a finite number within bounds; returns whether it was fine."""
    if not is_number(value):
        problems.append(Problem(path, f"must be a number, got {type_name(value)}"))
        return False
    if not math.isfinite(value):
        problems.append(Problem(path, f"must be finite, got {value!r}"))
        return False
    if positive and value <= 0:
        problems.append(Problem(path, f"must be positive, got {value!r}"))
        return False
    if minimum is not None and value < minimum:
        problems.append(Problem(path, f"must be at least {minimum}, got {value!r}"))
        return False
    if maximum is not None and value > maximum:
        problems.append(Problem(path, f"must be at most {maximum}, got {value!r}"))
        return False
    return True


def check_integer(problems: list[Problem], path: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> bool:
    if not is_integer(value):
        problems.append(Problem(path, f"must be an integer, got {type_name(value)}"))
        return False
    if minimum is not None and value < minimum:
        problems.append(Problem(path, f"must be at least {minimum}, got {value}"))
        return False
    if maximum is not None and value > maximum:
        problems.append(Problem(path, f"must be at most {maximum}, got {value}"))
        return False
    return True


def check_string(problems: list[Problem], path: str, value: Any, *, non_empty: bool = True) -> bool:
    if not isinstance(value, str):
        problems.append(Problem(path, f"must be a string, got {type_name(value)}"))
        return False
    if non_empty and not value.strip():
        problems.append(Problem(path, "must not be empty"))
        return False
    return True


def check_object(problems: list[Problem], path: str, value: Any) -> bool:
    if not isinstance(value, dict):
        problems.append(Problem(path, f"must be an object, got {type_name(value)}"))
        return False
    return True


def check_unknown_keys(problems: list[Problem], path: str, value: dict, allowed: set[str]) -> None:
    for key in value:
        if key not in allowed:
            problems.append(Problem(f"{path}.{key}", f"unknown field (allowed: {', '.join(sorted(allowed))})"))


def safe_text(value: str) -> str:
    """``value`` with anything UTF-8 cannot encode (lone surrogates) written as a backslash escape, for messages."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def text_problems(doc: Any, path: str = "") -> list[Problem]:
    """One problem per string (key or value) in a JSON document that is not valid UTF-8 text; never raises.

    JSON may escape a lone surrogate (``"\\ud800"``), which Python decodes into a ``str`` that cannot be
    written to a UTF-8 file, a response or a terminal; such a document is refused here, at the door, with
    the path of each such field. Checked with one C-speed encode first; walked only when that fails.
    """
    try:
        json.dumps(doc, ensure_ascii=False, check_circular=False).encode("utf-8")
        return []
    except UnicodeEncodeError:
        pass
    except (TypeError, ValueError, RecursionError):
        return []  # not JSON data at all: the type checks report it
    problems: list[Problem] = []
    stack: list[tuple[str, Any]] = [(path, doc)]
    while stack and len(problems) < 100:
        where, value = stack.pop()
        if value is _BAD_KEY:
            problems.append(Problem(where, "this field name is not valid UTF-8 text (a lone surrogate?)"))
        elif isinstance(value, str):
            if not _is_utf8(value):
                problems.append(Problem(where or "(document)", f"is not valid UTF-8 text (a lone surrogate?): {safe_text(value)[:80]!r}"))
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                key_path = f"{where}.{safe_text(key)}".lstrip(".") if isinstance(key, str) else where
                stack.append((key_path, _BAD_KEY if isinstance(key, str) and not _is_utf8(key) else item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return problems


_BAD_KEY = object()


def _is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_rigid_matrix(problems: list[Problem], path: str, value: Any) -> bool:
    """A 4x4 rigid transform: finite, bottom row (0,0,0,1), orthonormal rotation with det +1, no scale."""
    if not (isinstance(value, list) and len(value) == 4 and all(isinstance(r, list) and len(r) == 4 for r in value)):
        problems.append(Problem(path, "must be a 4x4 array of numbers (a list of 4 rows of 4)"))
        return False
    bad = [f"[{i}][{j}]" for i, row in enumerate(value) for j, x in enumerate(row) if not is_number(x)]
    if bad:
        problems.append(Problem(path, f"entries must be numbers (not at {', '.join(bad[:4])})"))
        return False
    m = np.array(value, dtype=np.float64)
    if not np.all(np.isfinite(m)):
        problems.append(Problem(path, "has non-finite entries (NaN or infinity)"))
        return False
    if not np.allclose(m[3], (0, 0, 0, 1), atol=1e-9):
        problems.append(Problem(path, f"bottom row must be [0, 0, 0, 1], got {m[3].tolist()}"))
        return False
    r = m[:3, :3]
    norms = np.linalg.norm(r, axis=0)
    if np.any(norms < 1e-12):
        problems.append(Problem(path, "rotation has a zero column"))
        return False
    gram_unit = (r / norms).T @ (r / norms)
    if np.abs(gram_unit - np.eye(3)).max() > ORTHONORMAL_TOLERANCE:
        problems.append(Problem(path, f"rotation is not orthonormal (columns not perpendicular; max error {np.abs(gram_unit - np.eye(3)).max():.3g})"))
        return False
    if np.abs(norms - 1.0).max() > ORTHONORMAL_TOLERANCE:
        problems.append(Problem(path, f"has scale {np.round(norms, 6).tolist()} in its rotation part; camera matrices must be rigid (remove object scale)"))
        return False
    if np.linalg.det(r) < 0:
        problems.append(Problem(path, "rotation is a reflection (determinant -1), not a proper rotation"))
        return False
    return True


def validate_trajectory_json(doc: Any, path: str = "trajectory") -> list[Problem]:
    """Every problem of a trajectory's JSON form; never raises."""
    problems: list[Problem] = []
    if not check_object(problems, path, doc):
        return problems
    bad_text = text_problems(doc, path)
    if bad_text:
        return bad_text
    check_unknown_keys(problems, path, doc, {"name", "fps", "width", "height", "frames"})
    check_string(problems, f"{path}.name", doc.get("name"))
    if "fps" in doc:
        check_number(problems, f"{path}.fps", doc["fps"], positive=True, maximum=1000)
    for key in ("width", "height"):
        if key not in doc:
            problems.append(Problem(f"{path}.{key}", "is required"))
        else:
            check_integer(problems, f"{path}.{key}", doc[key], minimum=MIN_SIZE_PX, maximum=MAX_SIZE_PX)
    frames = doc.get("frames")
    if not isinstance(frames, list):
        problems.append(Problem(f"{path}.frames", f"must be a list of frames, got {type_name(frames)}"))
        return problems
    if not frames:
        problems.append(Problem(f"{path}.frames", "is empty: a trajectory needs at least one frame"))
        return problems
    if len(frames) > MAX_FRAMES:
        problems.append(Problem(f"{path}.frames", f"has {len(frames)} frames, more than the limit of {MAX_FRAMES}"))
        return problems
    previous = None
    for i, frame in enumerate(frames):
        fpath = f"{path}.frames[{i}]"
        if not check_object(problems, fpath, frame):
            continue
        check_unknown_keys(problems, fpath, frame, {"frame", "c2w_opencv", "fx", "fy", "cx", "cy", "distortion", "image"})
        number = frame.get("frame")
        if check_integer(problems, f"{fpath}.frame", number, minimum=-(2**31), maximum=2**31 - 1):
            if previous is not None and number <= previous:
                problems.append(Problem(f"{fpath}.frame", f"frame numbers must be strictly increasing ({number} follows {previous})"))
            previous = number
        if "c2w_opencv" not in frame:
            problems.append(Problem(f"{fpath}.c2w_opencv", "is required"))
        else:
            check_rigid_matrix(problems, f"{fpath}.c2w_opencv", frame["c2w_opencv"])
        for key in ("fx", "fy"):
            if key not in frame:
                problems.append(Problem(f"{fpath}.{key}", "is required"))
            else:
                check_number(problems, f"{fpath}.{key}", frame[key], positive=True)
        for key in ("cx", "cy"):
            if key not in frame:
                problems.append(Problem(f"{fpath}.{key}", "is required"))
            else:
                check_number(problems, f"{fpath}.{key}", frame[key])
        # null is the same as leaving the key out: a pinhole, no image.
        if frame.get("distortion") is not None:
            _check_distortion(problems, fpath, frame)
        if frame.get("image") is not None:
            check_image_path(problems, f"{fpath}.image", frame["image"])
        if len(problems) > 200:
            problems.append(Problem(f"{path}.frames", "too many problems; stopped checking this trajectory"))
            break
    return problems


def _distortion_close(a: Distortion | None, b: Distortion | None, atol: float) -> bool:
    if a is None or b is None:
        return a is b
    return a.model == b.model and np.allclose(a.params, b.params, rtol=0, atol=atol)


def _check_distortion(problems: list[Problem], fpath: str, frame: dict) -> None:
    """A frame's ``distortion``: a known lens model, its parameter count, finite numbers, ``fx == fy`` where it has one focal length."""
    path = f"{fpath}.distortion"
    value = frame["distortion"]
    if not check_object(problems, path, value):
        return
    check_unknown_keys(problems, path, value, {"model", "params"})
    model = value.get("model")
    if not check_string(problems, f"{path}.model", model):
        return
    if model not in LENS_MODELS:
        problems.append(Problem(f"{path}.model", f"unknown camera model {model!r}; known: {', '.join(LENS_MODELS)}"))
        return
    lens = LENS_MODELS[model]
    params = value.get("params")
    if not isinstance(params, list):
        problems.append(Problem(f"{path}.params", f"must be a list of the {model} parameters ({', '.join(lens.params) or 'none'}), got {type_name(params)}"))
    elif len(params) != len(lens.params):
        problems.append(Problem(f"{path}.params", f"{model} has {len(lens.params)} parameter(s) ({', '.join(lens.params) or 'none'}), got {len(params)}"))
    else:
        for j, p in enumerate(params):
            check_number(problems, f"{path}.params[{j}]", p)
    fx, fy = frame.get("fx"), frame.get("fy")
    if lens.single_focal and is_number(fx) and is_number(fy) and fx != fy:
        problems.append(Problem(f"{fpath}.fy", f"must equal fx for {model}, which has one focal length (fx={fx!r}, fy={fy!r})"))


def check_image_path(problems: list[Problem], path: str, value: Any) -> bool:
    """A frame's image path: a non-empty string every format can write (no control characters, no surrounding spaces)."""
    if not check_string(problems, path, value):
        return False
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        problems.append(Problem(path, f"must not contain control characters such as line breaks, got {value!r}"))
        return False
    if value != value.strip():
        problems.append(Problem(path, f"must not start or end with spaces (COLMAP's text files cannot keep them), got {value!r}"))
        return False
    return True
