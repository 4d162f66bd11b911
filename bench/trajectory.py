"""Trajectory extraction vs a bare `scene.frame_set` + `matrix_world` loop, side by side.

Scene: 200 animated objects (keyframed location/rotation) plus a camera parented to an
animated empty with a Track To constraint and an animated lens; 1,000 frames. The bare
loop is the floor any extraction pays (evaluating the scene at every frame); the ratio
says what our extraction (matrices to numpy, scale removal, convention change,
intrinsics per frame) adds on top.

    .venv/bin/python bench/trajectory.py [--frames 1000] [--objects 200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import bpy

from _common import print_result


def build(frames: int, objects: int):
    bpy.ops.wm.read_homefile(app_template="", use_empty=True)
    scene = bpy.context.scene
    scene.frame_start, scene.frame_end = 1, frames
    for i in range(objects):
        obj = bpy.data.objects.new(f"Anim{i}", None)
        scene.collection.objects.link(obj)
        for k, frame in enumerate((1, frames // 2, frames)):
            obj.location = (i * 0.1, k, math.sin(i + k))
            obj.rotation_euler = (0.1 * k, 0.2 * i, 0.0)
            obj.keyframe_insert("location", frame=frame)
            obj.keyframe_insert("rotation_euler", frame=frame)
    rig = bpy.data.objects.new("Rig", None)
    scene.collection.objects.link(rig)
    for frame, x in ((1, 0.0), (frames, 20.0)):
        rig.location = (x, 0, 0)
        rig.keyframe_insert("location", frame=frame)
    target = bpy.data.objects["Anim0"]
    cam = bpy.data.objects.new("Cam", bpy.data.cameras.new("Cam"))
    scene.collection.objects.link(cam)
    cam.parent = rig
    cam.location = (0, -10, 2)
    cam.constraints.new("TRACK_TO").target = target
    for frame, lens in ((1, 24.0), (frames, 85.0)):
        cam.data.lens = lens
        cam.data.keyframe_insert("lens", frame=frame)
    return scene, cam


def bare_loop(scene, cam, frames):
    out = []
    for frame in frames:
        scene.frame_set(frame)
        out.append(cam.matrix_world.copy())
    scene.frame_set(1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--objects", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from keyframe_worlds.addon.scene_cameras import extract_trajectory

    scene, cam = build(args.frames, args.objects)
    frames = list(range(1, args.frames + 1))
    bare, ours = [], []
    # Interleaved, so both see the same machine noise.
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        bare_loop(scene, cam, frames)
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        traj = extract_trajectory(scene, cam, frames)
        ours.append(time.perf_counter() - t0)
    assert len(traj) == args.frames
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"{args.frames} frames, {args.objects} animated objects, {args.repeat} runs each (medians)")
    print(f"  bare frame_set + matrix_world loop: {b * 1000:8.1f} ms  ({b / args.frames * 1e6:.0f} us/frame)")
    print(f"  extract_trajectory:                 {o * 1000:8.1f} ms  ({o / args.frames * 1e6:.0f} us/frame)")
    print(f"  ratio (ours / bare):                {o / b:.3f}  (target <= 1.2)")
    print_result(frames=args.frames, objects=args.objects, bare_ms=b * 1000, extract_ms=o * 1000, ratio_vs_frame_set=o / b)


if __name__ == "__main__":
    main()
