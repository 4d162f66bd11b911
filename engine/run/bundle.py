"""Writing the result bundle: frames, depth, 4D outputs, video, cameras, meshes, point cloud, manifest.

Layout (every path in the manifest is relative to the bundle folder)::

    manifest.json                       result manifest v1 (bridge/spec.py), written last
    frames/<camera>/<frame:06d>.png     generated frames (RGB)
    depth/<camera>/<frame:06d>.npy      z-depth in metres, float32 (H, W)
    depth/<camera>/<frame:06d>.exr      the same as a one-channel (Z) float32 OpenEXR
    pointmaps/<camera>/<frame:06d>.exr  world X Y Z in metres per pixel (float32 EXR; NaN: no surface)
    flow/<camera>/<frame:06d>.exr       observed optical flow to the next frame, u v in pixels (float32 EXR)
    rigidflow/<camera>/<frame:06d>.exr  flow the cameras and the depth induce, u v in pixels (NaN: unknown)
    sceneflow/<camera>/<frame:06d>.exr  world motion to the next frame, X Y Z in metres (NaN: unknown)
    dynamic/<camera>/<frame:06d>.png    dynamic / inconsistency mask: 0 static, 128 unchecked, 255 dynamic
    video/<camera>.mp4                  H.264, at the trajectory's fps
    source/<camera>/<frame:06d>.png     a camera with lens distortion: each frame in the job's own lens (the plate's)
    source/<camera>.mp4                 its video, H.264
    cameras/<camera>.json               the trajectory in the keyframe-worlds format
    meshes/<camera>_<frame:06d>.ply     depth-textured mesh of a keyframe (UVs ``s t``), texture = its PNG
    points.ply                          the fused world point cloud: colours, confidence, source frame, consistency

The 4D outputs (``engine/world/flow.py`` has their maths and conventions) are WorldReel's: point maps for every
frame, the four flow files for every frame but a camera's last (it has no next frame; its entries are null). A
frame's flow files are made when the next frame arrives, on the writer thread. Every file is written through a
temporary name and a rename, so a bundle interrupted mid-way holds only complete files (and no manifest).
"""

from __future__ import annotations

import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...bridge import ply
from ...bridge.atomic import atomic_write
from ...bridge.errors import KeyframeWorldsError, ValidationError
from ...bridge.formats import write_trajectories
from ...bridge.spec import (FLOW_METHODS, MANIFEST_FILENAME, ResultFrame, ResultManifest, ResultMesh, ResultTrajectory,
                            validate_manifest, write_json_atomic)
from ...bridge.trajectory import Trajectory
from ..io.exr import write_depth_exr, write_exr
from ..io.images import read_rgb, write_npy, write_png
from ..io.video import Mp4Writer
from ..world import flow as flow4d

if TYPE_CHECKING:
    from .lens import SourceLens

#: OpenEXR compression of the 4D files. None: on 832x480 frames ZIP (zlib level 1, as the depth EXR) shrinks the
#: observed flow by 6 %, the scene flow by 27 %, the rigid flow by 36 % and the point map by half, for 50-80 ms a file
#: (about 5 ms uncompressed) on the thread that also computes them (bench/geometry.py), more than the preview
#: generator spends on a frame.
FOUR_D_COMPRESSION = "none"
#: The folder of the frames (and videos) in the job's own lens, of cameras given with distortion.
SOURCE_DIRNAME = "source"


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


def _write_mask_png(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    with atomic_write(path) as tmp:
        Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), "L").save(tmp, format="PNG", compress_level=1)


@dataclass
class _Waiting:
    """The last frame written, waiting for the next one to get its flow: (H, W, 3) uint8 and (H, W) float32 z-depth."""

    index: int
    rgb: np.ndarray
    depth: np.ndarray


@dataclass
class TrajectoryOutput:
    """Writes one camera's frames into the bundle; ``close`` returns its manifest entry.

    first_global_index: the memory's frame index (``PointMemory.frame_index``) of this camera's first frame; the
    reference is 0 and generated frames count on in trajectory order. source: the way back to the job's lens of a
    camera given with distortion (``lens.SourceLens``): each frame is also written in that lens, with its video.
    """

    bundle: "BundleWriter"
    trajectory: Trajectory
    stem: str
    write_exr: bool = True
    first_global_index: int = 1
    frames: list[ResultFrame] = field(default_factory=list)
    meshes: list[ResultMesh] = field(default_factory=list)
    video: Mp4Writer | None = None
    source: "SourceLens | None" = None
    source_video: Mp4Writer | None = None
    _pool: ThreadPoolExecutor | None = None
    _geometry_pool: ThreadPoolExecutor | None = None
    _pending: list[list[Future]] = field(default_factory=list)  # per frame
    _estimator: object | None = None
    _waiting: _Waiting | None = None
    _point_maps: dict = field(default_factory=dict)  # index -> point map, only on the geometry thread

    # zlib (EXR) and PNG encoding, OpenCV and numpy release the GIL: one writer thread overlaps them
    # with the next frame's torch work, and a second one the 4D outputs (on a machine with cores to
    # spare they overlap each other too). At most this many frames wait in their queues.
    MAX_PENDING = 8

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bundle-writer")
        if self.bundle.point_maps or self.bundle.flow != "none":
            self._geometry_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bundle-4d")
        root = self.bundle.root
        subs = ["frames", "depth"]
        if self.bundle.point_maps:
            subs.append("pointmaps")
        if self.bundle.flow != "none":
            subs += ["flow", "rigidflow", "sceneflow", "dynamic"]
            self._estimator = self.bundle.flow_estimator()
        for sub in subs:
            (root / sub / self.stem).mkdir(parents=True, exist_ok=True)
        self.video = Mp4Writer(root / "video" / f"{self.stem}.mp4", self.trajectory.width, self.trajectory.height,
                               self.trajectory.fps, comment=self.bundle.label)
        if self.source is not None:
            (root / SOURCE_DIRNAME / self.stem).mkdir(parents=True, exist_ok=True)
            self.source_video = Mp4Writer(root / self._source_video_path(), self.trajectory.width, self.trajectory.height,
                                          self.trajectory.fps, comment=self.bundle.label)

    def _source_video_path(self) -> str:
        return f"{SOURCE_DIRNAME}/{self.stem}.mp4"

    def _camera(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        traj = self.trajectory
        return traj.c2w_opencv[index], np.array([traj.fx[index], traj.fy[index], traj.cx[index], traj.cy[index]])

    def _entry(self, index: int) -> ResultFrame:
        """The manifest entry of frame ``index``: every path it will have once its successor is written."""
        number = int(self.trajectory.frames[index])
        name = f"{self.stem}/{number:06d}"
        has_flow = self._estimator is not None and index + 1 < len(self.trajectory)
        return ResultFrame(
            number, f"frames/{name}.png", f"depth/{name}.npy", f"depth/{name}.exr" if self.write_exr else None,
            point_map=f"pointmaps/{name}.exr" if self.bundle.point_maps else None,
            flow_observed=f"flow/{name}.exr" if has_flow else None,
            flow_rigid=f"rigidflow/{name}.exr" if has_flow else None,
            scene_flow=f"sceneflow/{name}.exr" if has_flow else None,
            dynamic_mask=f"dynamic/{name}.png" if has_flow else None,
            source_image=f"{SOURCE_DIRNAME}/{name}.png" if self.source is not None else None,
        )

    def write_frame(self, index: int, rgb: np.ndarray, depth_z_m: np.ndarray) -> None:
        """Frame ``index`` of the trajectory: (H, W, 3) uint8 and (H, W) float32 z-depth.

        Its files are written on the writer thread; its point map, and the flow files of the frame before (which
        needed this one), on the 4D thread."""
        if len(self.frames) != index:
            raise KeyframeWorldsError(f"{self.trajectory.name}: frame {index} written out of order")
        entry = self._entry(index)
        depth32 = np.array(depth_z_m, dtype=np.float32)  # a copy: the caller may reuse its buffer
        rgb = np.array(rgb, dtype=np.uint8)
        current = _Waiting(index, rgb, depth32)
        previous, self._waiting = self._waiting, (current if self._estimator is not None else None)
        # A remap (a few ms): here, so the source video gets its frames in order.
        source_rgb = None if self.source is None else self.source.frame(index, rgb)

        self._wait(self.MAX_PENDING - 1)
        futures = [self._pool.submit(self._write_frame_files, entry, current, source_rgb)]
        if self._geometry_pool is not None:
            futures.append(self._geometry_pool.submit(self._write_geometry, entry, current, previous))
        self._pending.append(futures)
        self.video.write(rgb)
        if source_rgb is not None:
            self.source_video.write(source_rgb)
        self.frames.append(entry)

    def _write_frame_files(self, entry: ResultFrame, frame: _Waiting, source_rgb: np.ndarray | None = None) -> None:
        root = self.bundle.root
        write_png(root / entry.image, frame.rgb, text={"Software": "Keyframe Worlds", "Comment": self.bundle.label})
        if source_rgb is not None:
            write_png(root / entry.source_image, source_rgb,
                      text={"Software": "Keyframe Worlds", "Comment": f"{self.bundle.label}; in the job's own lens"})
        write_npy(root / entry.depth_npy, frame.depth)
        if entry.depth_exr:
            write_depth_exr(root / entry.depth_exr, frame.depth)

    def _point_map(self, frame: _Waiting) -> np.ndarray:
        """Frame ``frame``'s point map, computed once: the flow files of it and of the frame before need it too."""
        points = self._point_maps.get(frame.index)
        if points is None:  # not yet, or the frame was written before a resume
            points = self._point_maps[frame.index] = flow4d.point_map(frame.depth, *self._camera(frame.index))
        return points

    def _write_geometry(self, entry: ResultFrame, current: _Waiting, previous: _Waiting | None) -> None:
        """On the 4D thread: frame ``current``'s point map, and the flow files of the frame before it."""
        if entry.point_map:
            points = self._point_map(current)
            write_exr(self.bundle.root / entry.point_map, {"X": points[..., 0], "Y": points[..., 1], "Z": points[..., 2]},
                      compression=FOUR_D_COMPRESSION)
        if previous is not None:
            self._write_flow_files(previous, current)
            self._point_maps.pop(previous.index, None)
        if self._estimator is None:
            self._point_maps.pop(current.index, None)

    def _write_flow_files(self, frame: _Waiting, following: _Waiting) -> None:
        """Frame ``frame``'s flow files, towards ``following`` (its successor)."""
        entry = self.frames[frame.index]
        pair = flow4d.pair_geometry(self._estimator, frame.rgb, self._point_map(frame), following.rgb, following.depth,
                                    self._point_map(following), *self._camera(following.index))
        root = self.bundle.root
        write_exr(root / entry.flow_observed, {"u": pair.observed[..., 0], "v": pair.observed[..., 1]}, compression=FOUR_D_COMPRESSION)
        write_exr(root / entry.flow_rigid, {"u": pair.rigid[..., 0], "v": pair.rigid[..., 1]}, compression=FOUR_D_COMPRESSION)
        write_exr(root / entry.scene_flow, {"X": pair.scene[..., 0], "Y": pair.scene[..., 1], "Z": pair.scene[..., 2]},
                  compression=FOUR_D_COMPRESSION)
        _write_mask_png(root / entry.dynamic_mask, pair.mask)
        self.bundle.consistency_cells[self.first_global_index + frame.index] = flow4d.ConsistencyCells.from_mask(pair.mask)

    def replay(self, frames: list[ResultFrame]) -> None:
        """Resume after ``frames`` were written by an interrupted run: their PNGs (lossless) go into the new video
        writer, and the last of them (PNG and npy, exact) waits for its successor as it did in the first run."""
        rgb = None
        for f in frames:
            rgb = np.ascontiguousarray(read_rgb(self.bundle.root / f.image))
            self.video.write(rgb)
            if self.source_video is not None:
                self.source_video.write(np.ascontiguousarray(read_rgb(self.bundle.root / f.source_image)))
        self.frames = list(frames)
        if frames and self._estimator is not None and frames[-1].flow_observed is not None:
            depth = np.load(self.bundle.root / frames[-1].depth_npy, allow_pickle=False).astype(np.float32)
            self._waiting = _Waiting(len(frames) - 1, rgb, depth)

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
        """Block until at most ``keep`` frames have writes pending; re-raise a failed write."""
        while len(self._pending) > keep:
            for future in self._pending.pop(0):
                future.result()

    def flush(self) -> None:
        """Return once every file written so far is on disk (before recording it as done). The last frame's flow
        files are not among them: they wait for the next frame."""
        self._wait()

    def close(self) -> ResultTrajectory:
        self._wait()
        self._pool.shutdown()
        if self._geometry_pool is not None:
            self._geometry_pool.shutdown()
        self._waiting = None  # the camera's last frame: no next frame, no flow files (its entries say null)
        self._point_maps.clear()
        self.video.close()
        if self.source_video is not None:
            self.source_video.close()
        camera_file = self.bundle.root / "cameras" / f"{self.stem}.json"
        camera_file.parent.mkdir(parents=True, exist_ok=True)
        write_trajectories([self.trajectory], camera_file, "keyframe-worlds")
        return ResultTrajectory(self.trajectory, tuple(self.frames), f"video/{self.stem}.mp4",
                                source=None if self.source is None else self.source.source,
                                source_video=None if self.source is None else self._source_video_path())

    def abort(self) -> None:
        for pool in (self._pool, self._geometry_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        for video in (self.video, self.source_video):
            if video is not None:
                video.abort()


class BundleWriter:
    """The result bundle of one job in folder ``root``; ``finish`` writes the manifest last.

    flow: the job's ``geometry.flow`` (``dis``, ``raft`` or ``none``: no flow, scene flow or dynamic mask);
    point_maps: its ``geometry.point_maps``; flow_device: where RAFT runs; raft_weights: a torchvision RAFT state
    dict (default ``$KEYFRAME_WORLDS_RAFT_WEIGHTS``). A RAFT that cannot load fails here, before any frame.
    """

    def __init__(self, root: str | Path, job_name: str, generator: str, label: str, seed: int = 0, *,
                 flow: str = "dis", point_maps: bool = True, flow_device: str = "cpu", raft_weights: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.job_name, self.generator, self.label, self.seed = job_name, generator, label, seed
        self.flow, self.point_maps = flow, bool(point_maps)
        if flow not in FLOW_METHODS:
            raise KeyframeWorldsError(f"unknown flow method {flow!r}; use dis, raft or none")
        self._raft = flow4d.flow_estimator(flow, flow_device, raft_weights) if flow == "raft" else None
        self._taken: set[str] = set()
        self._frames_before = 0  # frames of the trajectories opened or resumed so far
        self.trajectories: list[ResultTrajectory] = []
        self.meshes: list[ResultMesh] = []
        self.point_cloud: str | None = None
        self.point_count = 0
        # global frame index -> what the fused cloud's consistency needs of that frame's dynamic mask
        self.consistency_cells: dict[int, flow4d.ConsistencyCells] = {}
        stale = self.root / MANIFEST_FILENAME
        if stale.exists():
            stale.unlink()  # a manifest must only ever describe a finished bundle

    def flow_estimator(self):
        """An observed-flow estimator for one camera's writer thread (DIS keeps per-call buffers; RAFT is shared)."""
        return self._raft if self.flow == "raft" else flow4d.flow_estimator(self.flow)

    def trajectory(self, trajectory: Trajectory, write_exr: bool = True, source: "SourceLens | None" = None) -> TrajectoryOutput:
        output = TrajectoryOutput(self, trajectory, safe_name(trajectory.name, self._taken), write_exr,
                                  first_global_index=1 + self._frames_before, source=source)
        self._frames_before += len(trajectory)
        return output

    def resume(self, finished: list[ResultTrajectory], meshes: list[ResultMesh]) -> None:
        """Take back the trajectories (and their meshes) an interrupted run of the same job finished;
        their file stems stay reserved, so the rest get the same names as in the first run."""
        for done in finished:
            self.trajectories.append(done)
            safe_name(done.trajectory.name, self._taken)
            self._frames_before += len(done.trajectory)
        self.meshes.extend(meshes)

    def add(self, output: TrajectoryOutput) -> None:
        self.trajectories.append(output.close())
        self.meshes.extend(output.meshes)

    def point_consistency(self, positions_world: np.ndarray, frame_index: np.ndarray) -> np.ndarray:
        """(N,) float32 in [0, 1] for the fused cloud's points: of the checked pixels of its source frame's dynamic
        mask around the point (``flow.CONSISTENCY_CELL_PX`` cells), the share where observed and rigid flow agree.
        1 where nothing was checked: the reference (frame 0), each camera's last frame, flow turned off.

        frame_index: the memory's source frame of each point (0 the reference, then the generated frames in
        trajectory order, as the closed trajectories list them). Frames written before a resume have no cells in
        memory; theirs are counted again from the mask files, the same numbers.
        """
        consistency = np.ones(len(positions_world), np.float32)
        views = [(rt.trajectory, i, f) for rt in self.trajectories for i, f in enumerate(rt.frames)]
        frame_index = np.asarray(frame_index).astype(np.int64)
        order = np.argsort(frame_index, kind="stable")  # the points of each frame together: one pass, not one per frame
        frames, starts, counts = np.unique(frame_index[order], return_index=True, return_counts=True)
        for g, start, count in zip(frames.tolist(), starts.tolist(), counts.tolist()):
            if not 1 <= g <= len(views):
                continue
            traj, i, entry = views[g - 1]
            cells = self.consistency_cells.get(int(g))
            if cells is None and entry.dynamic_mask is not None and (self.root / entry.dynamic_mask).is_file():
                from PIL import Image

                with Image.open(self.root / entry.dynamic_mask) as image:
                    cells = flow4d.ConsistencyCells.from_mask(np.asarray(image.convert("L")))
            if cells is None:
                continue
            chosen = order[start : start + count]
            intr = np.array([traj.fx[i], traj.fy[i], traj.cx[i], traj.cy[i]])
            consistency[chosen] = cells.at_points(positions_world[chosen], traj.c2w_opencv[i], intr)
        return consistency

    def write_point_cloud(self, positions_world: np.ndarray, colors: np.ndarray, confidence: np.ndarray, frame_index: np.ndarray) -> None:
        """The fused cloud: (N, 3) float32 world, (N, 3) uint8 RGB, (N,) confidence, (N,) source frame; its
        ``consistency`` (see :meth:`point_consistency`) is added. Call it after every trajectory is closed."""
        positions_world = np.asarray(positions_world, dtype=np.float32)
        colors = np.asarray(colors, dtype=np.uint8)
        ply.write_ply(
            self.root / "points.ply",
            {
                "x": positions_world[:, 0], "y": positions_world[:, 1], "z": positions_world[:, 2],
                "red": colors[:, 0], "green": colors[:, 1], "blue": colors[:, 2],
                "confidence": np.asarray(confidence, dtype=np.float32),
                "frame": np.asarray(frame_index, dtype=np.int32),
                "consistency": self.point_consistency(positions_world, frame_index),
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
