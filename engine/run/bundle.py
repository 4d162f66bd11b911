"""Writing the result bundle: frames, depth, video, cameras, meshes, point cloud, manifest.

Layout (every path in the manifest is relative to the bundle folder)::

    manifest.json                       result manifest v1 (bridge/spec.py), written last
    frames/<camera>/<frame:06d>.png     generated frames (RGB)
    depth/<camera>/<frame:06d>.npy      z-depth in metres, float32 (H, W)
    depth/<camera>/<frame:06d>.exr      the same as a one-channel (Z) float32 OpenEXR
    video/<camera>.mp4                  H.264, at the trajectory's fps
    cameras/<camera>.json               the trajectory in the keyframe-worlds format
    meshes/<camera>_<frame:06d>.ply     depth-textured mesh of a keyframe (UVs ``s t``), texture = its PNG
    points.ply                          the fused world point cloud with colours

Every file is written through a temporary name and a rename, so a bundle
interrupted mid-way holds only complete files (and no manifest).
"""

from __future__ import annotations

import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...bridge import ply
from ...bridge.errors import KeyframeWorldsError, ValidationError
from ...bridge.formats import write_trajectories
from ...bridge.spec import (MANIFEST_FILENAME, ResultFrame, ResultManifest, ResultMesh, ResultTrajectory, validate_manifest, write_json_atomic)
from ...bridge.trajectory import Trajectory
from ..io.exr import write_depth_exr
from ..io.images import write_npy, write_png
from ..io.video import Mp4Writer


def _ascii(text: str) -> str:
    """PLY headers are ASCII, one line per comment."""
    return text.encode("ascii", "replace").decode().replace("\n", " ")


def safe_name(name: str, taken: set[str]) -> str:
    """A file-name-safe, unique version of a camera name (letters, digits, ``._-``)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "camera"
    candidate, i = base, 1
    while candidate.lower() in taken:
        i += 1
        candidate = f"{base}_{i}"
    taken.add(candidate.lower())
    return candidate


def depth_mesh(
    depth_z_m: np.ndarray,
    c2w_opencv: np.ndarray,
    intrinsics: np.ndarray,
    stride: int = 4,
    max_relative_jump: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A triangle mesh over a depth map, sampled every ``stride`` pixels at pixel centres
    (plus the last row and column, so it reaches the frame's edges).

    depth_z_m: (H, W); c2w_opencv: (4, 4); intrinsics: (4,) fx, fy, cx, cy.
    Returns world vertices (V, 3) float32, UVs (V, 2) float32 (``s = u / W``,
    ``t = 1 - v / H``: OpenGL/Blender, t up), triangles (F, 3) int32 facing the
    camera. Triangles touching invalid depth or spanning a depth jump larger
    than ``max_relative_jump`` (default ``0.04 * stride``) are left out, so
    foreground and background are not stitched together.
    """
    from ...bridge.cameras import grid_indices, intrinsics_matrix, unproject_depth_grid

    height, width = depth_z_m.shape
    if max_relative_jump is None:
        max_relative_jump = 0.04 * stride
    k = intrinsics_matrix(*[float(x) for x in intrinsics])
    points, uv = unproject_depth_grid(depth_z_m, c2w_opencv, k, stride)
    h, w = points.shape[:2]
    z = np.asarray(depth_z_m, dtype=np.float64)[np.ix_(grid_indices(height, stride), grid_indices(width, stride))]
    valid = np.isfinite(points).all(axis=-1)
    index = np.full((h, w), -1, dtype=np.int64)
    index[valid] = np.arange(int(valid.sum()))
    vertices = points[valid].astype(np.float32)
    uvs = np.stack([uv[..., 0][valid] / width, 1.0 - uv[..., 1][valid] / height], -1).astype(np.float32)

    a, b, c, d = index[:-1, :-1], index[1:, :-1], index[:-1, 1:], index[1:, 1:]  # (r,c) (r+1,c) (r,c+1) (r+1,c+1)
    za, zb, zc, zd = z[:-1, :-1], z[1:, :-1], z[:-1, 1:], z[1:, 1:]
    triangles = []
    # Order (r,c), (r+1,c), (r,c+1) is counter-clockwise seen from the camera (y down in the image).
    for i0, i1, i2, z0, z1, z2 in ((a, b, c, za, zb, zc), (b, d, c, zb, zd, zc)):
        ok = (i0 >= 0) & (i1 >= 0) & (i2 >= 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            zmax = np.maximum(np.maximum(z0, z1), z2)
            zmin = np.minimum(np.minimum(z0, z1), z2)
            ok &= zmax <= zmin * (1.0 + max_relative_jump)
        triangles.append(np.stack([i0[ok], i1[ok], i2[ok]], -1))
    faces = np.concatenate(triangles).astype(np.int32)
    return vertices, uvs, faces


@dataclass
class TrajectoryOutput:
    """Writes one camera's frames into the bundle; ``close`` returns its manifest entry."""

    bundle: "BundleWriter"
    trajectory: Trajectory
    stem: str
    write_exr: bool = True
    frames: list[ResultFrame] = field(default_factory=list)
    meshes: list[ResultMesh] = field(default_factory=list)
    video: Mp4Writer | None = None
    _pool: ThreadPoolExecutor | None = None
    _pending: list[Future] = field(default_factory=list)

    # zlib (EXR) and PNG encoding release the GIL: one writer thread overlaps them
    # with the next frame's torch work. At most this many frames wait in its queue.
    MAX_PENDING = 8

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bundle-writer")
        root = self.bundle.root
        for sub in ("frames", "depth"):
            (root / sub / self.stem).mkdir(parents=True, exist_ok=True)
        self.video = Mp4Writer(root / "video" / f"{self.stem}.mp4", self.trajectory.width, self.trajectory.height,
                               self.trajectory.fps, comment=self.bundle.label)

    def write_frame(self, index: int, rgb: np.ndarray, depth_z_m: np.ndarray) -> None:
        """Frame ``index`` of the trajectory: (H, W, 3) uint8 and (H, W) float32 z-depth."""
        number = int(self.trajectory.frames[index])
        if len(self.frames) != index:
            raise KeyframeWorldsError(f"{self.trajectory.name}: frame {index} written out of order")
        root = self.bundle.root
        image = f"frames/{self.stem}/{number:06d}.png"
        depth_npy = f"depth/{self.stem}/{number:06d}.npy"
        depth_exr = f"depth/{self.stem}/{number:06d}.exr" if self.write_exr else None
        depth32 = np.array(depth_z_m, dtype=np.float32)  # a copy: the caller may reuse its buffer
        rgb = np.array(rgb, dtype=np.uint8)
        label = self.bundle.label

        def write_files() -> None:
            write_png(root / image, rgb, text={"Software": "Keyframe Worlds", "Comment": label})
            write_npy(root / depth_npy, depth32)
            if depth_exr:
                write_depth_exr(root / depth_exr, depth32)

        self._wait(self.MAX_PENDING - 1)
        self._pending.append(self._pool.submit(write_files))
        self.video.write(rgb)
        self.frames.append(ResultFrame(number, image, depth_npy, depth_exr))

    def write_mesh(self, index: int, depth_z_m: np.ndarray, stride: int) -> None:
        """The depth-textured mesh of frame ``index`` (already written with :meth:`write_frame`)."""
        number = int(self.trajectory.frames[index])
        texture = self.frames[index].image
        traj = self.trajectory
        intr = np.array([traj.fx[index], traj.fy[index], traj.cx[index], traj.cy[index]])
        vertices, uvs, faces = depth_mesh(depth_z_m, traj.c2w_opencv[index], intr, stride)
        path = f"meshes/{self.stem}_{number:06d}.ply"
        ply.write_ply(
            self.bundle.root / path,
            {"x": vertices[:, 0], "y": vertices[:, 1], "z": vertices[:, 2], "s": uvs[:, 0], "t": uvs[:, 1]},
            faces,
            comments=(f"TextureFile ../{texture}", _ascii(f"Keyframe Worlds: {traj.name} frame {number}")),
        )
        self.meshes.append(ResultMesh(traj.name, number, path, texture))

    def _wait(self, keep: int = 0) -> None:
        """Block until at most ``keep`` frame writes are pending; re-raise a failed write."""
        while len(self._pending) > keep:
            self._pending.pop(0).result()

    def flush(self) -> None:
        """Return once every frame written so far is on disk (before recording it as done)."""
        self._wait()

    def close(self) -> ResultTrajectory:
        self._wait()
        self._pool.shutdown()
        self.video.close()
        camera_file = self.bundle.root / "cameras" / f"{self.stem}.json"
        camera_file.parent.mkdir(parents=True, exist_ok=True)
        write_trajectories([self.trajectory], camera_file, "keyframe-worlds")
        return ResultTrajectory(self.trajectory, tuple(self.frames), f"video/{self.stem}.mp4")

    def abort(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.video is not None:
            self.video.abort()


class BundleWriter:
    """The result bundle of one job in folder ``root``; ``finish`` writes the manifest last."""

    def __init__(self, root: str | Path, job_name: str, generator: str, label: str, seed: int = 0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.job_name, self.generator, self.label, self.seed = job_name, generator, label, seed
        self._taken: set[str] = set()
        self.trajectories: list[ResultTrajectory] = []
        self.meshes: list[ResultMesh] = []
        self.point_cloud: str | None = None
        self.point_count = 0
        stale = self.root / MANIFEST_FILENAME
        if stale.exists():
            stale.unlink()  # a manifest must only ever describe a finished bundle

    def trajectory(self, trajectory: Trajectory, write_exr: bool = True) -> TrajectoryOutput:
        return TrajectoryOutput(self, trajectory, safe_name(trajectory.name, self._taken), write_exr)

    def resume(self, finished: list[ResultTrajectory], meshes: list[ResultMesh]) -> None:
        """Take back the trajectories (and their meshes) an interrupted run of the same job finished;
        their file stems stay reserved, so the rest get the same names as in the first run."""
        for done in finished:
            self.trajectories.append(done)
            safe_name(done.trajectory.name, self._taken)
        self.meshes.extend(meshes)

    def add(self, output: TrajectoryOutput) -> None:
        self.trajectories.append(output.close())
        self.meshes.extend(output.meshes)

    def write_point_cloud(self, positions_world: np.ndarray, colors: np.ndarray, confidence: np.ndarray, frame_index: np.ndarray) -> None:
        """The fused cloud: (N, 3) float32 world, (N, 3) uint8 RGB, (N,) confidence, (N,) source frame."""
        positions_world = np.asarray(positions_world, dtype=np.float32)
        colors = np.asarray(colors, dtype=np.uint8)
        ply.write_ply(
            self.root / "points.ply",
            {
                "x": positions_world[:, 0], "y": positions_world[:, 1], "z": positions_world[:, 2],
                "red": colors[:, 0], "green": colors[:, 1], "blue": colors[:, 2],
                "confidence": np.asarray(confidence, dtype=np.float32),
                "frame": np.asarray(frame_index, dtype=np.int32),
            },
            comments=(_ascii(f"Keyframe Worlds fused point cloud of job {self.job_name} ({self.label})"),),
        )
        self.point_cloud, self.point_count = "points.ply", int(len(positions_world))

    def finish(self, warnings: tuple[str, ...] = ()) -> ResultManifest:
        """Validate against every file and write ``manifest.json``; returns the manifest."""
        manifest = ResultManifest(
            job_name=self.job_name,
            generator=self.generator,
            generator_label=self.label,
            trajectories=tuple(self.trajectories),
            point_cloud=self.point_cloud,
            point_count=self.point_count,
            meshes=tuple(self.meshes),
            seed=self.seed,
            warnings=tuple(warnings),
        )
        doc = manifest.to_json()
        problems = validate_manifest(doc, self.root)
        if problems:
            raise ValidationError("result manifest written by the engine", problems)
        write_json_atomic(self.root / MANIFEST_FILENAME, doc)
        return manifest
