"""PLY point clouds and meshes, numpy only: the one module that reads and writes PLY.

Written as ``binary_little_endian`` with a ``vertex`` element of scalar
properties (positions ``x y z`` float32 in world metres, colours
``red green blue`` uchar in sRGB, texture coordinates ``s t`` float32 with
``t`` up as in OpenGL/Blender, anything else by name) and optionally a
``face`` element ``property list uchar int vertex_indices`` of triangles.
Read: binary little/big endian and ascii, any scalar vertex properties, faces
as triangles (a fast path when every face has three vertices).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .errors import KeyframeWorldsError

_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_NAMES = {"i1": "char", "u1": "uchar", "i2": "short", "u2": "ushort", "i4": "int", "u4": "uint", "f4": "float", "f8": "double"}


@dataclass
class PlyData:
    """Vertex properties by name (each ``(N,)``) and triangles ``(F, 3)`` int64 (empty when none)."""

    vertex: dict[str, np.ndarray]
    faces: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))

    @property
    def count(self) -> int:
        return len(next(iter(self.vertex.values()))) if self.vertex else 0

    def positions(self) -> np.ndarray:
        """``(N, 3)`` float32 ``x y z``."""
        return np.stack([self.vertex[k] for k in ("x", "y", "z")], -1).astype(np.float32, copy=False)

    def colors_u8(self) -> np.ndarray | None:
        """``(N, 3)`` uint8 sRGB colours, or None."""
        if not all(k in self.vertex for k in ("red", "green", "blue")):
            return None
        rgb = np.stack([self.vertex[k] for k in ("red", "green", "blue")], -1)
        if rgb.dtype.kind == "f":
            rgb = np.clip(np.round(rgb * 255.0), 0, 255)
        return rgb.astype(np.uint8, copy=False)


def write_ply(path: str | os.PathLike, vertex: dict[str, np.ndarray], faces: np.ndarray | None = None, comments: tuple[str, ...] = ()) -> None:
    """Write a binary little-endian PLY atomically (temporary file, then rename)."""
    path = Path(path)
    if not vertex:
        raise KeyframeWorldsError("a PLY needs at least one vertex property")
    arrays = {name: np.ascontiguousarray(np.asarray(a)).reshape(-1) for name, a in vertex.items()}
    n = len(next(iter(arrays.values())))
    for name, a in arrays.items():
        if len(a) != n:
            raise KeyframeWorldsError(f"PLY vertex property {name!r} has {len(a)} values, expected {n}")
        if a.dtype.str[1:] not in _NAMES:
            raise KeyframeWorldsError(f"PLY vertex property {name!r} has unsupported type {a.dtype}")
    record = np.dtype([(name, "<" + a.dtype.str[1:]) for name, a in arrays.items()])
    table = np.empty(n, dtype=record)
    for name, a in arrays.items():
        table[name] = a
    lines = ["ply", "format binary_little_endian 1.0", *(f"comment {c}" for c in comments), f"element vertex {n}"]
    lines += [f"property {_NAMES[a.dtype.str[1:]]} {name}" for name, a in arrays.items()]
    face_table = None
    if faces is not None and len(faces):
        faces = np.asarray(faces)
        if faces.ndim != 2 or faces.shape[1] != 3:
            raise KeyframeWorldsError(f"PLY faces must be triangles (F, 3), got shape {faces.shape}")
        face_table = np.empty(len(faces), dtype=[("n", "u1"), ("idx", "<i4", (3,))])
        face_table["n"] = 3
        face_table["idx"] = faces
        lines += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    lines.append("end_header")
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        fh.write(("\n".join(lines) + "\n").encode("ascii"))
        fh.write(table.tobytes())
        if face_table is not None:
            fh.write(face_table.tobytes())


def read_ply(path: str | os.PathLike) -> PlyData:
    """Read a PLY's vertices and (triangulated) faces; raises ``KeyframeWorldsError`` naming what is wrong."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyframeWorldsError(f"PLY not found: {path}") from None
    except OSError as exc:
        raise KeyframeWorldsError(f"cannot read PLY {path}: {exc}") from None
    fmt, elements, body_start = _parse_header(data, path)
    if fmt not in ("binary_little_endian", "binary_big_endian", "ascii"):
        raise KeyframeWorldsError(f"{path}: unsupported PLY format {fmt!r}")
    if fmt == "ascii":
        return _read_ascii(data[body_start:].decode("ascii", errors="replace"), elements, path)
    order = "<" if fmt == "binary_little_endian" else ">"
    offset = body_start
    out = PlyData(vertex={})
    for element in elements:
        scalar = all(not isinstance(t, tuple) for _, t in element["props"])
        if scalar:
            dtype = np.dtype([(name, order + t) for name, t in element["props"]])
            size = dtype.itemsize * element["count"]
            if offset + size > len(data):
                raise KeyframeWorldsError(f"{path}: file ends inside element {element['name']!r} (truncated)")
            table = np.frombuffer(data, dtype=dtype, count=element["count"], offset=offset)
            offset += size
            if element["name"] == "vertex":
                out.vertex = {name: table[name].astype(table[name].dtype.newbyteorder("="), copy=True) for name in table.dtype.names}
        elif element["name"] == "face" and len(element["props"]) == 1:
            _name, (_list, count_t, index_t) = element["props"][0]
            out.faces, offset = _read_faces(data, offset, element["count"], order + count_t, order + index_t, path)
        else:
            raise KeyframeWorldsError(f"{path}: element {element['name']!r} with list properties is not supported")
    if not out.vertex:
        raise KeyframeWorldsError(f"{path}: no vertex element")
    return out


def ply_vertex_count(path: str | os.PathLike, max_vertices: int | None = None, header_limit: int = 65536) -> int:
    """The vertex count a PLY's header declares, reading the header only (at most ``header_limit`` bytes).

    More than ``max_vertices`` is refused. A binary file whose elements all have scalar properties (a point cloud) must also be long enough to hold them:
    a truncated one is refused here, before anything is decoded.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(header_limit)
        size = path.stat().st_size
    except OSError as exc:
        raise KeyframeWorldsError(f"cannot read PLY {path}: {exc}") from None
    fmt, parsed, body_start = _parse_header(head, path)
    # [name, count, bytes a row (None where a property is a list)]
    elements = [[e["name"], e["count"], None if any(isinstance(t, tuple) for _n, t in e["props"])
                 else sum(np.dtype(t).itemsize for _n, t in e["props"])] for e in parsed]
    vertex = [e for e in elements if e[0] == "vertex"]
    if not vertex:
        raise KeyframeWorldsError(f"{path}: no vertex element")
    if max_vertices is not None and vertex[0][1] > max_vertices:
        raise KeyframeWorldsError(f"{path} has {vertex[0][1]} points, more than the limit of {max_vertices}")
    if fmt in ("binary_little_endian", "binary_big_endian") and all(e[2] is not None for e in elements):
        needed = body_start + sum(count * row for _name, count, row in elements)
        if size < needed:
            raise KeyframeWorldsError(f"{path}: the header declares {needed - body_start} bytes of data but the file holds "
                                      f"{size - body_start} (truncated)")
    return vertex[0][1]


def _parse_header(data: bytes, path: Path) -> tuple[str | None, list[dict], int]:
    """A PLY header from the start of ``data``: its format, its elements (``name``, ``count``, ``props``: (name,
    numpy type) or (name, ("list", count type, item type))) and where the body starts; one line naming what is wrong."""
    end = data.find(b"end_header")
    newline = data.find(b"\n", end) if end >= 0 else -1
    if not data.startswith(b"ply") or end < 0 or newline < 0:
        raise KeyframeWorldsError(f"{path} is not a PLY file (no 'ply' magic or no end_header)")
    fmt, elements = None, []
    for line in data[:end].decode("ascii", errors="replace").splitlines():
        words = line.split()
        if not words or words[0] in ("ply", "comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) >= 2:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3:
            if not words[2].isdigit():
                raise KeyframeWorldsError(f"{path}: element {words[1]!r} count {words[2]!r} is not a number")
            elements.append({"name": words[1], "count": int(words[2]), "props": []})
        elif words[0] == "property" and elements:
            if words[1:2] == ["list"] and len(words) >= 5:
                elements[-1]["props"].append((words[4], ("list", _type(words[2], path), _type(words[3], path))))
            elif len(words) >= 3:
                elements[-1]["props"].append((words[2], _type(words[1], path)))
    return fmt, elements, newline + 1


def _type(name: str, path: Path) -> str:
    if name not in _TYPES:
        raise KeyframeWorldsError(f"{path}: unknown PLY property type {name!r}")
    return _TYPES[name]


def _read_faces(data: bytes, offset: int, count: int, count_t: str, index_t: str, path: Path) -> tuple[np.ndarray, int]:
    tri = np.dtype([("n", count_t), ("idx", index_t, (3,))])
    if offset + tri.itemsize * count <= len(data):
        table = np.frombuffer(data, dtype=tri, count=count, offset=offset)
        if np.all(table["n"] == 3):
            return table["idx"].astype(np.int64), offset + tri.itemsize * count
    # General polygons: walk them and fan-triangulate.
    cs, isz = np.dtype(count_t), np.dtype(index_t)
    faces = []
    try:
        for _ in range(count):
            n = int(np.frombuffer(data, cs, 1, offset)[0])
            idx = np.frombuffer(data, isz, n, offset + cs.itemsize)
            offset += cs.itemsize + n * isz.itemsize
            faces.extend((idx[0], idx[k], idx[k + 1]) for k in range(1, n - 1))
    except ValueError:
        raise KeyframeWorldsError(f"{path}: file ends inside element 'face' (truncated)") from None
    return np.array(faces, dtype=np.int64).reshape(-1, 3), offset


def _read_ascii(text: str, elements: list[dict], path: Path) -> PlyData:
    tokens = iter(text.split())
    out = PlyData(vertex={})
    try:
        for element in elements:
            if element["name"] == "vertex":
                rows = np.array([[float(next(tokens)) for _ in element["props"]] for _ in range(element["count"])])
                out.vertex = {name: rows[:, i].astype(t) for i, (name, t) in enumerate(element["props"])}
            elif element["name"] == "face":
                faces = []
                for _ in range(element["count"]):
                    idx = [int(next(tokens)) for _ in range(int(next(tokens)))]
                    faces.extend((idx[0], idx[k], idx[k + 1]) for k in range(1, len(idx) - 1))
                out.faces = np.array(faces, dtype=np.int64).reshape(-1, 3)
            else:
                for _ in range(element["count"] * len(element["props"])):
                    next(tokens)
    except (StopIteration, ValueError):
        raise KeyframeWorldsError(f"{path}: ascii PLY body is shorter than its header says or malformed") from None
    return out
