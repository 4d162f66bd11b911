"""`make demo`: build a small previs scene, generate its world along the cameras, and bring it back into Blender.

Runs with the `bpy` module from PyPI, through the same functions the add-on's
operators and headless commands call (prepare_job, the engine service
started through the bridge's process manager, the client, import_bundle). Each step prints what it computed. Writes into
--out: job/ (job.json, reference, bundle/), trajectories/, demo.blend,
videos/, contact_sheet.png (reference, memory renders, generated frames, depth)
and world.png.

    .venv/bin/python scripts/demo.py --out demo_out [--frames 120] [--size 480x270]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np


def build_scene(frames: int, width: int, height: int):
    """A ground plane, blockout buildings and props with simple materials, a sun, and two cameras.

    ``Dolly`` moves along a keyframed path with a pan over ``frames`` frames;
    ``Crane`` is a second camera bound to a timeline marker halfway through.
    Returns ``(scene, dolly, crane)``.
    """
    import bpy

    bpy.ops.wm.read_homefile(app_template="", use_empty=True)
    scene = bpy.context.scene
    scene.name = "Previs"
    scene.frame_start, scene.frame_end = 1, frames
    scene.render.fps = 24
    scene.render.resolution_x, scene.render.resolution_y = width, height
    scene.render.resolution_percentage = 100

    def material(name, rgb):
        mat = bpy.data.materials.new(name)
        mat.use_nodes = True
        bsdf = mat.node_tree.nodes.get("Principled BSDF")
        bsdf.inputs["Base Color"].default_value = (*rgb, 1.0)
        bsdf.inputs["Roughness"].default_value = 0.8
        return mat

    def box(name, location, size, mat):
        bpy.ops.mesh.primitive_cube_add(size=1.0, location=location)
        obj = bpy.context.object
        obj.name = name
        obj.scale = size
        obj.data.materials.append(mat)
        return obj

    ground = material("Ground", (0.35, 0.33, 0.3))
    concrete = material("Concrete", (0.7, 0.68, 0.62))
    brick = material("Brick", (0.55, 0.25, 0.18))
    glass = material("Glass", (0.2, 0.35, 0.5))
    prop = material("Prop", (0.8, 0.65, 0.2))

    bpy.ops.mesh.primitive_plane_add(size=120, location=(0, 0, 0))
    bpy.context.object.name = "Ground"
    bpy.context.object.data.materials.append(ground)
    rng = np.random.default_rng(7)
    mats = [concrete, brick, glass]
    for i, x in enumerate(np.linspace(-24, 24, 7)):
        for side in (-1, 1):
            h = float(rng.uniform(4, 14))
            w = float(rng.uniform(4, 6))
            box(f"Building_{i}_{'L' if side < 0 else 'R'}", (float(x), side * 12.0, h / 2), (w, 6.0, h), mats[(i + (side > 0)) % 3])
    for i in range(10):
        x, y = float(rng.uniform(-20, 20)), float(rng.uniform(-5, 5))
        s = float(rng.uniform(0.6, 1.4))
        box(f"Prop_{i}", (x, y, s / 2), (s, s, s), prop)

    sun = bpy.data.objects.new("Sun", bpy.data.lights.new("Sun", "SUN"))
    sun.data.energy = 4.0
    sun.rotation_euler = (math.radians(50), math.radians(10), math.radians(30))
    scene.collection.objects.link(sun)
    world = bpy.data.worlds.new("Sky")
    world.use_nodes = True
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (0.55, 0.7, 0.9, 1.0)
    world.node_tree.nodes["Background"].inputs["Strength"].default_value = 0.8
    scene.world = world

    # Dolly: down the street at eye height, panning from one side to the other.
    dolly = bpy.data.objects.new("Dolly", bpy.data.cameras.new("Dolly"))
    dolly.data.lens = 28
    scene.collection.objects.link(dolly)
    for frame, x, yaw in ((1, -20.0, -70.0), (frames // 2, -4.0, -90.0), (frames, 12.0, -110.0)):
        dolly.location = (x, -1.5, 1.7)
        dolly.rotation_euler = (math.radians(88), 0.0, math.radians(yaw))
        dolly.keyframe_insert("location", frame=frame)
        dolly.keyframe_insert("rotation_euler", frame=frame)

    # Crane: a high view bound to a marker, as a cut in the middle of the shot.
    crane = bpy.data.objects.new("Crane", bpy.data.cameras.new("Crane"))
    crane.data.lens = 24
    scene.collection.objects.link(crane)
    crane.location = (6.0, -9.0, 9.0)
    crane.rotation_euler = (math.radians(60), 0.0, math.radians(20))
    # Markers bound to cameras make the cuts: Dolly from the start, Crane from the middle.
    scene.timeline_markers.new("Dolly", frame=1).camera = dolly
    scene.timeline_markers.new("Crane", frame=frames // 2).camera = crane
    scene.camera = dolly
    return scene, dolly, crane


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--size", default="480x270", help="output resolution WxH")
    parser.add_argument("--samples", type=int, default=16, help="Cycles samples for the reference render")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    import bpy

    from keyframe_worlds.addon.importers import import_bundle
    from keyframe_worlds.addon.jobs import JobSettings, prepare_job, run_through_engine
    from keyframe_worlds.bridge.jobs import format_status
    from keyframe_worlds.bridge.formats import FORMATS, write_trajectories

    t0 = time.perf_counter()
    scene, dolly, crane = build_scene(args.frames, width, height)
    print(f"[scene] {len(scene.objects)} objects, {args.frames} frames at {width}x{height} ({time.perf_counter() - t0:.2f} s)")

    t0 = time.perf_counter()
    settings = JobSettings(name="demo", cameras="MARKERS", reference="RENDER", depth="SCENE", samples=args.samples,
                           prompt="a street of blockout buildings on a clear day")
    prepared = prepare_job(scene, settings, out / "job")
    trajectories = prepared.spec.trajectories
    depth = np.load(prepared.spec.reference.depth)
    hit = depth > 0
    print(f"[job] {', '.join(f'{t.name}: frames {t.frames[0]}-{t.frames[-1]}' for t in trajectories)}; reference "
          f"{width}x{height} rendered with depth {depth[hit].min():.1f}-{depth[hit].max():.1f} m on {hit.mean():.0%} of pixels; "
          f"{prepared.spec_path} validated ({time.perf_counter() - t0:.2f} s)")
    for fmt in FORMATS:
        target = out / "trajectories" / (fmt if fmt in ("colmap", "colmap-binary", "worldstereo") else f"{fmt}.json")
        write_trajectories(trajectories, target, fmt)
    print(f"[trajectories] written as {', '.join(FORMATS)} under {out / 'trajectories'}")

    t0 = time.perf_counter()
    shown = [""]

    def progress(status) -> None:
        line = format_status(status)
        if line != shown[0]:
            print(f"\r[engine] {line}", end="", flush=True)
            shown[0] = line

    bundle = run_through_engine(prepared.spec_path, out / "job" / "bundle", device="cpu", on_status=progress)
    print()
    frames_total = sum(len(t) for t in trajectories)
    gen_s = time.perf_counter() - t0
    print(f"[engine] {frames_total} frames generated with 'preview' in {gen_s:.1f} s ({frames_total / gen_s:.1f} frames/s)")

    t0 = time.perf_counter()
    result = import_bundle(scene, bundle)
    points = len(result.point_cloud.data.points) if result.point_cloud is not None else 0
    print(f"[import] collection {result.collection.name!r}: {len(result.cameras)} cameras with video, "
          f"{len(result.meshes)} depth meshes, {points:,} points ({time.perf_counter() - t0:.2f} s)")
    bpy.ops.wm.save_as_mainfile(filepath=str(out / "demo.blend"))
    print(f"[blend] {out / 'demo.blend'}")

    videos = out / "videos"
    videos.mkdir(exist_ok=True)
    for mp4 in sorted((bundle / "video").glob("*.mp4")):
        (videos / mp4.name).write_bytes(mp4.read_bytes())
    print(f"[videos] {', '.join(p.name for p in sorted(videos.glob('*.mp4')))} in {videos}")

    contact_sheet(bundle, prepared.spec.reference.image, out / "contact_sheet.png")
    print(f"[contact sheet] {out / 'contact_sheet.png'}")
    t0 = time.perf_counter()
    render_world(scene, result.collection, out / "world.png", samples=args.samples)
    print(f"[world] {out / 'world.png'}: the imported point cloud and meshes from a third viewpoint ({time.perf_counter() - t0:.1f} s)")
    print(f"[done] {time.perf_counter() - started:.1f} s in all")
    return 0


def contact_sheet(bundle: Path, reference: str, path: Path, rows: int = 4) -> None:
    """For a few frames: the reference (first row), the memory render, the generated frame and its depth, side by side.

    The memory render shows the fused cloud's points that came from earlier frames
    (the reference and every frame generated before this one), rendered along this
    frame's camera with the engine's renderer: what the generator was conditioned on,
    less what the point budget later thinned out. Black is where the memory saw nothing.
    """
    import torch
    from PIL import Image

    from keyframe_worlds.bridge.ply import read_ply
    from keyframe_worlds.bridge.spec import load_manifest
    from keyframe_worlds.engine.world.render import render_points

    manifest = load_manifest(bundle)
    cloud = read_ply(bundle / manifest.point_cloud)
    positions = torch.from_numpy(cloud.positions().astype(np.float32))
    colours = torch.from_numpy(cloud.colors_u8())
    source = cloud.vertex["frame"]
    picks, global_index = [], 1  # 0 is the reference; generated frames count on in trajectory order
    for rt in manifest.trajectories:
        chosen = set(np.linspace(0, len(rt.frames) - 1, max(1, rows // len(manifest.trajectories)), dtype=int).tolist())
        for i, f in enumerate(rt.frames):
            if i in chosen:
                picks.append((rt.trajectory, i, f, global_index))
            global_index += 1
    ref = Image.open(reference).convert("RGB")
    w, h = ref.size
    sheet = Image.new("RGB", (w * 4, h * len(picks)), (20, 20, 20))
    for row, (traj, i, f, g) in enumerate(picks):
        if row == 0:
            sheet.paste(ref, (0, 0))
        earlier = torch.from_numpy(source < g)
        intr = torch.tensor([[traj.fx[i], traj.fy[i], traj.cx[i], traj.cy[i]]], dtype=torch.float64)
        c2w = torch.from_numpy(traj.c2w_opencv[i : i + 1])
        memory = render_points(positions[earlier], colours[earlier], c2w, intr, traj.width, traj.height)
        sheet.paste(Image.fromarray(memory.rgb[0].numpy()).resize((w, h)), (w, row * h))
        sheet.paste(Image.open(bundle / f.image).convert("RGB").resize((w, h)), (2 * w, row * h))
        d = np.load(bundle / f.depth_npy)
        valid = d > 0
        lo, hi = (np.percentile(d[valid], 2), np.percentile(d[valid], 98)) if valid.any() else (0.0, 1.0)
        norm = np.clip((d - lo) / max(hi - lo, 1e-6), 0, 1)
        # Near is bright, far is dark; no depth is black.
        gray = np.where(valid, 255 * (1 - norm) * 0.9 + 25, 0).astype(np.uint8)
        sheet.paste(Image.fromarray(gray).convert("RGB").resize((w, h)), (3 * w, row * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def render_world(scene, collection, path: Path, samples: int) -> None:
    """Render only the imported world (points and meshes) from a high three-quarter view, with Cycles on the CPU."""
    import bpy

    from keyframe_worlds.addon.reference import render_still

    shown = set(collection.all_objects)
    hidden = [o for o in scene.objects if o not in shown and o.type != "CAMERA" and not o.hide_render]
    cam = bpy.data.objects.new("World View", bpy.data.cameras.new("World View"))
    scene.collection.objects.link(cam)
    cam.data.lens = 22
    cam.location = (-26.0, -30.0, 24.0)
    cam.rotation_euler = (math.radians(58), 0.0, math.radians(-38))
    try:
        for o in hidden:
            o.hide_render = True
        render_still(scene, cam, scene.frame_current, path, samples=samples)
    finally:
        for o in hidden:
            o.hide_render = False
        bpy.data.objects.remove(cam)


if __name__ == "__main__":
    sys.exit(main())
