"""Cameras in a Blender scene <-> bridge trajectories.

Plain functions over ``bpy`` data, used by the operators, the headless
commands and scripts alike. All convention changes go through
``bridge.cameras``; nothing here flips an axis itself.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import bpy
import numpy as np

from ..bridge import cameras as conv
from ..bridge.errors import KeyframeWorldsError
from ..bridge.trajectory import Trajectory


def scene_fps(scene: bpy.types.Scene) -> float:
    return scene.render.fps / scene.render.fps_base


def camera_intrinsics(scene: bpy.types.Scene, camera_data: bpy.types.Camera) -> conv.Intrinsics:
    """Pixel intrinsics of a perspective camera at the scene's output resolution (current frame's values)."""
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


def extract_trajectory(scene: bpy.types.Scene, camera: bpy.types.Object, frames: Sequence[int]) -> Trajectory:
    """Evaluate ``camera`` at every frame in ``frames`` (increasing) into a trajectory.

    The scene's current frame is restored afterwards. Scale is removed from
    the matrix (the protocol carries rigid transforms).
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
    rigid, _scale = conv.split_scale(matrices)
    sizes = {(k.width, k.height) for k in intr}
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
    )


def frame_range(scene: bpy.types.Scene, start: int | None = None, end: int | None = None, step: int = 1) -> list[int]:
    start = scene.frame_start if start is None else start
    end = scene.frame_end if end is None else end
    if step < 1:
        raise KeyframeWorldsError(f"frame step must be at least 1, got {step}")
    if end < start:
        raise KeyframeWorldsError(f"frame range {start}-{end} is empty")
    return list(range(start, end + 1, step))


def create_camera_from_trajectory(scene: bpy.types.Scene, trajectory: Trajectory, collection=None) -> bpy.types.Object:
    """A new camera object keyframed on every trajectory frame, so that extracting it gives the trajectory back.

    The scene's output resolution is set to the trajectory's size; the focal
    length and lens shift are keyed per frame with a horizontal sensor fit, and
    ``fx != fy`` becomes the scene's pixel aspect (which cannot be animated, so
    the ratio ``fx / fy`` must be the same on every frame).
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
    sensor = data.sensor_width
    w, h = trajectory.width, trajectory.height
    c2w_blender = conv.c2w_opencv_to_blender(trajectory.c2w_opencv)
    for i, frame in enumerate(trajectory.frames.tolist()):
        obj.matrix_world = _to_blender_matrix(c2w_blender[i])
        obj.keyframe_insert("location", frame=frame)
        obj.keyframe_insert("rotation_quaternion", frame=frame)
        # Inverse of bridge.cameras.intrinsics_from_blender for a horizontal fit.
        data.lens = float(trajectory.fx[i]) * sensor / w
        data.shift_x = (w / 2.0 - float(trajectory.cx[i])) / w
        data.shift_y = (float(trajectory.cy[i]) - h / 2.0) * ycor / w
        data.keyframe_insert("lens", frame=frame)
        data.keyframe_insert("shift_x", frame=frame)
        data.keyframe_insert("shift_y", frame=frame)
    return obj


def _to_blender_matrix(m: np.ndarray):
    from mathutils import Matrix

    return Matrix([list(map(float, row)) for row in m])


def cameras_in(objects: Iterable[bpy.types.Object]) -> list[bpy.types.Object]:
    return [o for o in objects if o.type == "CAMERA"]
