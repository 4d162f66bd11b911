"""Cameras in a Blender scene <-> bridge trajectories.

Plain functions over ``bpy`` data, used by the operators, the headless
commands and scripts alike. All convention changes go through
``bridge.cameras``; nothing here flips an axis itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import bpy
import numpy as np

from ..bridge import cameras as conv
from ..bridge.errors import KeyframeWorldsError
from ..bridge.trajectory import Trajectory
from .choices import CAMERA_SOURCES
from .lens import images_at, lenses_at, set_tracking_lens, store_lens_and_images


def scene_fps(scene: bpy.types.Scene) -> float:
    return scene.render.fps / scene.render.fps_base


def camera_intrinsics(scene: bpy.types.Scene, camera_data: bpy.types.Camera) -> conv.Intrinsics:
    """Pixel intrinsics of a perspective camera at the scene's output resolution (current frame's values).

    An equirectangular panoramic camera (a panorama reference, ``reference.py``) gets those of a 90-degree
    view along its axis: the perspective view the engine renders along its trajectory from the panorama's memory.
    """
    if camera_data.type == "PANO" and camera_data.panorama_type == "EQUIRECTANGULAR":
        render = scene.render
        width, height = conv.render_resolution(render.resolution_x, render.resolution_y, render.resolution_percentage)
        focal = width / 2.0  # 90 degrees across the width
        return conv.Intrinsics(focal, focal * render.pixel_aspect_x / render.pixel_aspect_y, width / 2.0, height / 2.0,
                               width, height)
    if camera_data.type != "PERSP":
        raise KeyframeWorldsError(f"camera {camera_data.name!r} is {camera_data.type.lower()}; only perspective cameras are supported")
    render = scene.render
    return conv.intrinsics_from_blender(
        lens_mm=camera_data.lens,
        sensor_width_mm=camera_data.sensor_width,
        sensor_height_mm=camera_data.sensor_height,
        sensor_fit=camera_data.sensor_fit,
        shift_x=camera_data.shift_x,
        shift_y=camera_data.shift_y,
        resolution_x=render.resolution_x,
        resolution_y=render.resolution_y,
        resolution_percentage=render.resolution_percentage,
        pixel_aspect_x=render.pixel_aspect_x,
        pixel_aspect_y=render.pixel_aspect_y,
    )


def extract_trajectory(scene: bpy.types.Scene, camera: bpy.types.Object, frames: Sequence[int],
                       warnings: list[str] | None = None) -> Trajectory:
    """Evaluate ``camera`` at every frame in ``frames`` (increasing) into a trajectory.

    Everything that moves a camera is evaluated (``scene.frame_set``: fcurves,
    NLA, drivers, constraints, parents), and so are animated lens, sensor,
    shift and fit. The scene's current frame is restored afterwards. Scale is
    removed from the matrix (the protocol carries rigid transforms); a
    non-uniform scale, which also shears what the camera sees, is reported in
    ``warnings``. The lens distortion and image paths an import kept on the
    camera data (``lens.py``) come back with each frame.
    """
    if camera is None or camera.type != "CAMERA":
        raise KeyframeWorldsError(f"{getattr(camera, 'name', camera)!r} is not a camera object")
    frames = [int(f) for f in frames]
    if not frames:
        raise KeyframeWorldsError("no frames to extract")
    current = scene.frame_current, scene.frame_subframe
    matrices = np.empty((len(frames), 4, 4))
    intr = []
    try:
        for i, frame in enumerate(frames):
            scene.frame_set(frame)
            matrices[i] = np.array(camera.matrix_world, dtype=np.float64)
            intr.append(camera_intrinsics(scene, camera.data))
    finally:
        scene.frame_set(current[0], subframe=current[1])
    rigid, scale = conv.split_scale(matrices)
    if warnings is not None:
        spread = np.ptp(scale, axis=1) / scale.max(axis=1)
        if spread.max() > 1e-4:
            worst = int(np.argmax(spread))
            warnings.append(f"camera {camera.name!r} has non-uniform scale {np.round(scale[worst], 4).tolist()} at frame "
                            f"{frames[worst]}; it was removed from the trajectory")
    sizes = {(k.width, k.height) for k in intr}
    if len(sizes) != 1:
        raise KeyframeWorldsError(f"the output size changes over frames {frames[0]}-{frames[-1]} ({sorted(sizes)}); a trajectory has one size")
    (width, height), = sizes
    return Trajectory(
        name=camera.name,
        frames=frames,
        c2w_opencv=conv.c2w_blender_to_opencv(rigid),
        fx=[k.fx for k in intr],
        fy=[k.fy for k in intr],
        cx=[k.cx for k in intr],
        cy=[k.cy for k in intr],
        width=width,
        height=height,
        fps=scene_fps(scene),
        distortion=lenses_at(camera.data, frames, camera.name),
        images=images_at(camera.data, frames, camera.name),
    )


def frame_range(scene: bpy.types.Scene, start: int | None = None, end: int | None = None, step: int = 1) -> list[int]:
    """Frames ``start..end`` every ``step`` (the scene's range by default). A range reaching past the scene's is
    refused: there the cameras only hold their last pose, which would be generated as frames of a frozen camera."""
    start = scene.frame_start if start is None else start
    end = scene.frame_end if end is None else end
    if step < 1:
        raise KeyframeWorldsError(f"frame step must be at least 1, got {step}")
    if end < start:
        raise KeyframeWorldsError(f"frame range {start}-{end} is empty")
    if start < scene.frame_start or end > scene.frame_end:
        outside = [f"{a}-{b}" for a, b in ((start, min(end, scene.frame_start - 1)), (max(start, scene.frame_end + 1), end))
                   if a <= b]
        raise KeyframeWorldsError(f"frames {start}-{end} reach outside the scene's frame range {scene.frame_start}-"
                                  f"{scene.frame_end} (frames {', '.join(outside)}), where the cameras would hold "
                                  f"their pose; choose frames within it or extend the scene's range")
    return list(range(start, end + 1, step))


def create_camera_from_trajectory(scene: bpy.types.Scene, trajectory: Trajectory, collection=None) -> bpy.types.Object:
    """A new camera object keyframed on every trajectory frame, so that extracting it gives the trajectory back.

    The scene's output resolution is set to the trajectory's size; the focal
    length and lens shift are keyed per frame with a horizontal sensor fit, and
    ``fx != fy`` becomes the scene's pixel aspect (which cannot be animated, so
    the ratio ``fx / fy`` must be the same on every frame). A Blender camera is
    a pinhole: the lens distortion and each frame's image path are kept on the
    camera data (``lens.store_lens_and_images``) and exported again from there.
    """
    ycor = trajectory.fx / trajectory.fy
    if np.ptp(ycor) > 1e-9 * ycor.max():
        raise KeyframeWorldsError(f"trajectory {trajectory.name!r}: fx/fy changes over time; Blender's pixel aspect cannot be animated")
    ycor = float(ycor[0])
    data = bpy.data.cameras.new(trajectory.name)
    obj = bpy.data.objects.new(trajectory.name, data)
    (collection or scene.collection).objects.link(obj)
    obj.rotation_mode = "QUATERNION"
    render = scene.render
    render.resolution_x = trajectory.width
    render.resolution_y = trajectory.height
    render.resolution_percentage = 100
    # ycor = pixel_aspect_y / pixel_aspect_x; Blender keeps both at 1 or more.
    render.pixel_aspect_x, render.pixel_aspect_y = (1.0, ycor) if ycor >= 1.0 else (1.0 / ycor, 1.0)
    data.sensor_fit = "HORIZONTAL"
    store_lens_and_images(data, trajectory)
    sensor = data.sensor_width
    w, h = trajectory.width, trajectory.height
    c2w_blender = conv.c2w_opencv_to_blender(trajectory.c2w_opencv)
    for i, frame in enumerate(trajectory.frames.tolist()):
        obj.matrix_world = _to_blender_matrix(c2w_blender[i])
        obj.keyframe_insert("location", frame=frame)
        obj.keyframe_insert("rotation_quaternion", frame=frame)
        data.lens, data.shift_x, data.shift_y = conv.blender_lens_and_shift(trajectory.fx[i], trajectory.cx[i], trajectory.cy[i],
                                                                            w, h, sensor, ycor)
        data.keyframe_insert("lens", frame=frame)
        data.keyframe_insert("shift_x", frame=frame)
        data.keyframe_insert("shift_y", frame=frame)
    return obj


def _to_blender_matrix(m: np.ndarray):
    from mathutils import Matrix

    return Matrix([list(map(float, row)) for row in m])


def cameras_in(objects: Iterable[bpy.types.Object]) -> list[bpy.types.Object]:
    return [o for o in objects if o.type == "CAMERA"]




def choose_cameras(scene: bpy.types.Scene, source: str, frames: Sequence[int],
                   selected: Iterable[bpy.types.Object] = ()) -> list[tuple[bpy.types.Object, list[int]]]:
    """Which cameras to extract, each with its frames.

    ``SCENE``: the scene camera; ``SELECTED``: selected cameras; ``ALL``: every
    camera in the scene (both by name), each over all ``frames``. ``MARKERS``:
    the cameras bound to timeline markers, in marker order, each over the
    frames from its marker up to the next bound marker (a camera bound to
    several markers gets all its shots in one trajectory).
    """
    frames = list(frames)
    if source == "SCENE":
        if scene.camera is None:
            raise KeyframeWorldsError("the scene has no active camera")
        return [(scene.camera, frames)]
    if source in ("SELECTED", "ALL"):
        cams = sorted(cameras_in(selected if source == "SELECTED" else scene.objects), key=lambda o: o.name)
        if not cams:
            raise KeyframeWorldsError("no camera is selected" if source == "SELECTED" else "the scene has no camera")
        return [(cam, frames) for cam in cams]
    if source != "MARKERS":
        raise KeyframeWorldsError(f"camera source must be one of {', '.join(CAMERA_SOURCES)}, got {source!r}")
    shots: dict[str, tuple[bpy.types.Object, list[int]]] = {}
    for _, camera, shot in marker_shots(scene, frames):
        shots.setdefault(camera.name, (camera, []))[1].extend(shot)
    return [(cam, sorted(set(fr))) for cam, fr in shots.values()]


def marker_shots(scene: bpy.types.Scene, frames: Sequence[int]) -> list[tuple[bpy.types.TimelineMarker, bpy.types.Object, list[int]]]:
    """``(marker, camera, frames)`` of every shot the camera-bound timeline markers make, in marker order: the
    frames from a marker up to the next bound marker (before the first marker Blender shows the first marker's
    camera); shots with none of ``frames`` are left out."""
    markers = sorted((m for m in scene.timeline_markers if m.camera is not None), key=lambda m: (m.frame, m.name))
    if not markers:
        raise KeyframeWorldsError("no timeline marker is bound to a camera (bind one with Marker > Bind Camera to Markers)")
    shots = []
    for i, marker in enumerate(markers):
        end = markers[i + 1].frame if i + 1 < len(markers) else None
        start = None if i == 0 else marker.frame
        shot = [f for f in frames if (start is None or f >= start) and (end is None or f < end)]
        if shot:
            shots.append((marker, marker.camera, shot))
    if not shots:
        raise KeyframeWorldsError("no frame of the range falls into a marker-bound camera's shot")
    return shots


def extract_trajectories(scene: bpy.types.Scene, source: str, *, start: int | None = None, end: int | None = None, step: int = 1,
                         selected: Iterable[bpy.types.Object] = (), warnings: list[str] | None = None) -> list[Trajectory]:
    """The chosen cameras' trajectories over ``start..end`` (the scene range by default) every ``step`` frames."""
    frames = frame_range(scene, start, end, step)
    return [extract_trajectory(scene, cam, cam_frames, warnings) for cam, cam_frames in choose_cameras(scene, source, frames, selected)]


def export_trajectories(scene: bpy.types.Scene, source: str, path: str, fmt: str, *, start: int | None = None, end: int | None = None,
                        step: int = 1, selected: Iterable[bpy.types.Object] = (), warnings: list[str] | None = None):
    """Extract and write in one bridge format; returns ``(trajectories, files written)``. Used by the operator and the CLI."""
    from ..bridge.formats import write_trajectories

    trajectories = extract_trajectories(scene, source, start=start, end=end, step=step, selected=selected, warnings=warnings)
    return trajectories, write_trajectories(trajectories, path, fmt)


@dataclass
class TrajectoryImport:
    """What ``import_trajectory_file`` made: the cameras, the point cloud (or None), warnings to show."""

    cameras: list = field(default_factory=list)
    point_cloud: object | None = None
    warnings: list[str] = field(default_factory=list)


POINTS_OBJECT_SUFFIX = " points3D"


def import_trajectory_file(scene: bpy.types.Scene, path: str, fmt: str | None = None, *, points: bool = False,
                           clip_lens: bool = False, point_radius: float = 0.02) -> TrajectoryImport:
    """Read a trajectory file or folder (format ``fmt``, detected when None) into keyframed cameras.

    Each camera keeps its lens and image paths (``create_camera_from_trajectory``). ``points``: a COLMAP
    model's ``points3D`` also come in as a point-cloud object in the scene's collection, in the cameras' world
    (COLMAP's world is Blender's, unchanged, as the cameras' is). ``clip_lens``: the scene's active movie clip
    gets the first distorted camera's lens on its tracking camera (``lens.set_tracking_lens``). Used by the
    import operator and the headless ``import-trajectory`` command.
    """
    from ..bridge.formats import POINT_FORMATS, detect_format, read_trajectory_set

    fmt = fmt or detect_format(path)
    tset = read_trajectory_set(path, fmt)
    result = TrajectoryImport()
    result.cameras = [create_camera_from_trajectory(scene, t) for t in tset.trajectories]
    if points:
        if fmt not in POINT_FORMATS:
            result.warnings.append(f"{fmt} files hold no points (only {', '.join(POINT_FORMATS)} do): no point cloud imported")
        elif tset.points is None or not len(tset.points.xyz):
            result.warnings.append(f"{path} has no points3D: no point cloud imported")
        else:
            from .importers import import_points

            source = Path(path)
            name = (source.parent.name if source.is_file() else source.name) or "COLMAP"
            result.point_cloud = import_points(tset.points.xyz, tset.points.rgb, name + POINTS_OBJECT_SUFFIX, scene.collection,
                                               point_radius)
    if clip_lens:
        lensed = [t for t in tset.trajectories if t.has_distortion]
        if scene.active_clip is None:
            result.warnings.append("the scene has no active movie clip: no clip lens set")
        elif lensed:
            result.warnings += set_tracking_lens([scene.active_clip], lensed[0])
            if len(lensed) > 1:
                result.warnings.append(f"the movie clip {scene.active_clip.name!r} has camera {lensed[0].name!r}'s lens "
                                       f"({len(lensed)} cameras have distortion)")
    return result
