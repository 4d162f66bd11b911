"""`make demo`: build a small previs scene, generate its world along the cameras, and bring it back into Blender.

Runs with the `bpy` module from PyPI, through the same functions the add-on's
operators and headless commands call (prepare_job, the engine service
started through the bridge's process manager, the client, import_bundle). Each step prints what it computed. Writes into
--out: job/ (job.json, reference, bundle/), trajectories/, demo.blend,
videos/, contact_sheet.png (labelled: the reference and its depth, then per camera the memory render, the
generated frame and its depth on one colour scale) and world.png (an overview of the imported world with the
cameras' paths).

    .venv/bin/python scripts/demo.py --out demo_out [--frames 120] [--size 480x270] [--world-size 1280x720]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def build_scene(frames: int, width: int, height: int):
    """A ground plane, blockout buildings and props with simple materials, a sun, and two cameras.

    ``Dolly`` moves along a keyframed path with a pan over ``frames`` frames;
    ``Crane`` is a second camera bound to a timeline marker halfway through, rising and swinging along the street.
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
        mat = bpy.data.materials.new(name)  # Blender 5 makes materials and worlds with their node trees
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

    # Crane: a high view bound to a marker, as a cut in the middle of the shot; it rises and swings along the street.
    crane = bpy.data.objects.new("Crane", bpy.data.cameras.new("Crane"))
    crane.data.lens = 24
    scene.collection.objects.link(crane)
    for frame, location, tilt, yaw in ((frames // 2, (-14.0, -4.0, 4.0), 80.0, -75.0), (frames, (-2.0, -2.0, 12.0), 62.0, -100.0)):
        crane.location = location
        crane.rotation_euler = (math.radians(tilt), 0.0, math.radians(yaw))
        crane.keyframe_insert("location", frame=frame)
        crane.keyframe_insert("rotation_euler", frame=frame)
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
    parser.add_argument("--world-size", default="1280x720", help="world.png's resolution WxH")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The demo's job folder is rebuilt every run (one bundle, not one more per run).
    shutil.rmtree(out / "job", ignore_errors=True)
    started = time.perf_counter()

    import bpy

    from keyframe_worlds.addon.importers import import_bundle
    from keyframe_worlds.addon.jobs import JobSettings, prepare_job, run_through_engine
    from keyframe_worlds.bridge.jobs import TerminalProgress
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
    bar = TerminalProgress(stream=sys.stdout)
    bundle = run_through_engine(prepared.spec_path, out / "job" / "bundle", device="cpu", on_status=bar.show_status)
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

    contact_sheet(bundle, prepared.spec.reference.image, prepared.spec.reference.depth, out / "contact_sheet.png")
    print(f"[contact sheet] {out / 'contact_sheet.png'}")
    t0 = time.perf_counter()
    # Emission-heavy materials need few samples; 8 keeps the overview's noise low at a fraction of 16's time.
    world_size = tuple(int(v) for v in args.world_size.lower().split("x"))
    render_world(scene, result.collection, trajectories, out / "world.png", samples=min(args.samples, 8), size=world_size)
    print(f"[world] {out / 'world.png'}: the imported point cloud and meshes from above, with the cameras' paths "
          f"({time.perf_counter() - t0:.1f} s)")
    print(f"[done] {time.perf_counter() - started:.1f} s in all")
    return 0


# --- the two pictures a user looks at first -------------------------------------------------------------------------

_BACKGROUND = (24, 24, 26)
_TEXT = (235, 235, 235)
_MUTED = (160, 160, 165)
_NO_DEPTH = (0, 0, 0)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's bundled scalable font: no system font needed


_BEYOND = (90, 90, 96)  # depth past the colour scale: the preview generator's far sky board


def depth_range_m(depth_z_m: np.ndarray) -> tuple[float, float]:
    """The colour map's range in metres: the 2nd to 98th percentile of the valid depth of the reference's blockout
    (the scene itself), so the generator's far sky board, 4x beyond it, does not squeeze the street into one colour."""
    valid = depth_z_m[(depth_z_m > 0) & np.isfinite(depth_z_m)]
    if valid.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(valid, [2, 98])
    return float(lo), float(max(hi, lo + 1e-3))


def colour_depth(depth_z_m: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(H, W)`` z-depth in metres to ``(H, W, 3)`` uint8 RGB with OpenCV's turbo map, near blue to far red over
    ``lo..hi``; no surface (0) black; more than 25% beyond ``hi`` (the sky board) grey."""
    import cv2

    norm = np.clip((depth_z_m - lo) / (hi - lo), 0.0, 1.0)
    bgr = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    rgb = bgr[..., ::-1].copy()
    rgb[depth_z_m > 1.25 * hi] = _BEYOND
    rgb[~(depth_z_m > 0)] = _NO_DEPTH
    return rgb


def colour_bar(lo: float, hi: float, height: int, width: int = 120):
    """A vertical colour bar for :func:`colour_depth` with tick labels in metres (near at the top)."""
    from PIL import Image, ImageDraw

    bar = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(bar)
    top, bottom, x0, x1 = 28, height - 44, 10, 30
    ramp = np.linspace(lo, hi, max(bottom - top, 2))[:, None].repeat(x1 - x0, axis=1)
    bar.paste(Image.fromarray(colour_depth(ramp, lo, hi)), (x0, top))
    draw.text((x0, 6), "depth (m)", fill=_TEXT, font=_font(13))
    for value in np.linspace(lo, hi, 6):
        y = top + (value - lo) / (hi - lo) * (bottom - top - 1)
        draw.line([(x1, y), (x1 + 5, y)], fill=_TEXT)
        draw.text((x1 + 8, y - 7), f"{value:.1f}", fill=_TEXT, font=_font(12))
    for n, (colour, text) in enumerate(((_BEYOND, f"> {1.25 * hi:.0f}: sky board"), (_NO_DEPTH, "no depth"))):
        y = bottom + 8 + 18 * n
        draw.rectangle([x0, y, x1, y + 12], fill=colour, outline=_MUTED)
        draw.text((x1 + 6, y - 1), text, fill=_MUTED, font=_font(11))
    return bar


def contact_sheet(bundle: Path, reference: str, reference_depth: str | None, path: Path, rows_per_camera: int = 2) -> None:
    """A labelled sheet: the job's inputs on top (the reference and its depth), then for the first and last frame of
    each camera the memory render, the generated frame and its depth, one row each, labelled with camera and frame.

    The memory render shows the fused cloud's points that came from earlier frames (the reference and every frame
    generated before this one), rendered along this frame's camera with the engine's renderer: what the generator
    was conditioned on, less what the point budget later thinned out; black is where the memory saw nothing. Every
    depth panel shares one colour scale (:func:`depth_range_m`), drawn as a bar in metres on the right.
    """
    import torch
    from PIL import Image, ImageDraw

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
        chosen = set(np.linspace(0, len(rt.frames) - 1, min(rows_per_camera, len(rt.frames)), dtype=int).tolist())
        for i, f in enumerate(rt.frames):
            if i in chosen:
                picks.append((rt.trajectory, i, f, global_index))
            global_index += 1
    ref = Image.open(reference).convert("RGB")
    w, h = ref.size
    ref_depth = np.load(reference_depth) if reference_depth else np.zeros((h, w), np.float32)
    depths = [np.load(bundle / f.depth_npy) for _t, _i, f, _g in picks]
    lo, hi = depth_range_m(ref_depth if reference_depth else np.concatenate([d.ravel() for d in depths]))

    label_w, head_h, gap, bar_w = 150, 30, 6, 120
    title_h = 34
    sheet_w = label_w + 3 * (w + gap) + bar_w
    sheet_h = title_h + (head_h + h + gap) + head_h + len(picks) * (h + gap)
    sheet = Image.new("RGB", (sheet_w, sheet_h), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    big, small = _font(16), _font(13)
    draw.text((10, 8), f"Keyframe Worlds demo: job {manifest.job_name!r}, generator {manifest.generator!r}", fill=_TEXT, font=big)

    def column_x(c: int) -> int:
        return label_w + c * (w + gap)

    # The inputs: what the add-on rendered from the scene and sent.
    y = title_h
    ref_traj = manifest.trajectories[0].trajectory
    for c, text in enumerate(("reference (Cycles render of the blockout)", "reference depth (blockout, z)")):
        draw.text((column_x(c) + 2, y + 8), text, fill=_TEXT, font=small)
    y += head_h
    notes = ("The add-on renders the reference and its depth", "from the scene; the engine lifts them into a", "point-cloud memory.", "",
             "Below, per camera, its first and last frame:", "memory render: that memory (the reference and", "every frame before) seen from this frame's",
             "camera; black: not seen yet. The generator", "fills it in; the depth is the frame's own.")
    for n, text in enumerate(notes):
        draw.text((column_x(2) + 4, y + 4 + 17 * n), text, fill=_MUTED, font=small)
    draw.text((8, y + 8), "input", fill=_TEXT, font=big)
    draw.text((8, y + 30), f"{ref_traj.name}, frame {int(ref_traj.frames[0])}", fill=_MUTED, font=small)
    sheet.paste(ref, (column_x(0), y))
    sheet.paste(Image.fromarray(colour_depth(ref_depth, lo, hi)), (column_x(1), y))
    y += h + gap

    # The outputs, one row per picked frame.
    for c, text in enumerate(("memory render (what the generator saw)", "generated frame", "generated depth (z)")):
        draw.text((column_x(c) + 2, y + 8), text, fill=_TEXT, font=small)
    y += head_h
    rows_top = y
    for (traj, i, f, g), depth in zip(picks, depths):
        earlier = torch.from_numpy(source < g)
        intr = torch.tensor([[traj.fx[i], traj.fy[i], traj.cx[i], traj.cy[i]]], dtype=torch.float64)
        c2w = torch.from_numpy(traj.c2w_opencv[i : i + 1])
        memory = render_points(positions[earlier], colours[earlier], c2w, intr, traj.width, traj.height)
        draw.text((8, y + 8), traj.name, fill=_TEXT, font=big)
        draw.text((8, y + 30), f"frame {f.frame}", fill=_MUTED, font=small)
        draw.text((8, y + 48), f"({i + 1} of {len(traj.frames)})", fill=_MUTED, font=small)
        sheet.paste(Image.fromarray(memory.rgb[0].numpy()).resize((w, h)), (column_x(0), y))
        sheet.paste(Image.open(bundle / f.image).convert("RGB").resize((w, h)), (column_x(1), y))
        sheet.paste(Image.fromarray(colour_depth(depth, lo, hi)).resize((w, h), Image.NEAREST), (column_x(2), y))
        y += h + gap
    sheet.paste(colour_bar(lo, hi, y - rows_top, bar_w), (column_x(3), rows_top))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)


def overview_camera(scene, location=(-24.0, -24.0, 19.0), target=(0.0, 0.0, 1.5), name: str = "Overview"):
    """A camera high above the street's south-west corner, aimed at ``target`` (world metres, Z up)."""
    import bpy
    from mathutils import Vector

    cam = bpy.data.objects.new(name, bpy.data.cameras.new(name))
    scene.collection.objects.link(cam)
    cam.data.lens = 22
    cam.location = location
    cam.rotation_euler = (Vector(target) - Vector(location)).to_track_quat("-Z", "Y").to_euler()
    return cam


@contextlib.contextmanager
def _lit_materials(objects, emission_strength: float = 0.45):
    """Make the imported (emission, unlit) materials of ``objects`` partly diffuse for one render, so a light gives
    the street its shape; restored afterwards. The colour each material shows is kept: the diffuse part reads the
    same colour as the emission."""
    added = []
    materials = {slot.material for o in objects for slot in o.material_slots if slot.material is not None}
    for mat in materials:
        tree = mat.node_tree
        emit = next((n for n in tree.nodes if n.type == "EMISSION"), None)
        out = next((n for n in tree.nodes if n.type == "OUTPUT_MATERIAL"), None)
        if emit is None or out is None or not emit.inputs["Color"].links:
            continue
        colour = emit.inputs["Color"].links[0].from_socket
        diffuse, add = tree.nodes.new("ShaderNodeBsdfDiffuse"), tree.nodes.new("ShaderNodeAddShader")
        tree.links.new(colour, diffuse.inputs["Color"])
        tree.links.new(emit.outputs["Emission"], add.inputs[0])
        tree.links.new(diffuse.outputs["BSDF"], add.inputs[1])
        tree.links.new(add.outputs["Shader"], out.inputs["Surface"])
        added.append((tree, emit, out, (diffuse, add), emit.inputs["Strength"].default_value))
        emit.inputs["Strength"].default_value = emission_strength
    try:
        yield
    finally:
        for tree, emit, out, nodes, strength in added:
            for node in nodes:
                tree.nodes.remove(node)
            tree.links.new(emit.outputs["Emission"], out.inputs["Surface"])
            emit.inputs["Strength"].default_value = strength


def render_world(scene, collection, trajectories, path: Path, samples: int, size: tuple[int, int] = (1280, 720)) -> None:
    """A previs overview: the imported point cloud and meshes rendered (Cycles, CPU) from a high camera, lit by the
    scene's sun, on a dark ground, with each shot camera's path and a few of its frusta drawn over it (projected
    with the overview camera's own intrinsics, so they sit where the cameras were), labelled.

    Only the imported world is rendered, not the blockout: this picture shows what came back from the engine.
    """
    import bpy
    import cv2
    from PIL import Image, ImageDraw

    from keyframe_worlds.addon.reference import render_still
    from keyframe_worlds.addon.scene_cameras import extract_trajectory
    from keyframe_worlds.bridge import cameras as conv

    shown = set(collection.all_objects)
    hidden = [o for o in scene.objects if o not in shown and o.type not in ("CAMERA", "LIGHT") and not o.hide_render]
    clouds = [o for o in shown if o.type == "POINTCLOUD"]
    cam = overview_camera(scene)
    saved = (scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage)
    background = scene.world.node_tree.nodes["Background"].inputs["Color"] if scene.world is not None else None
    saved_background = tuple(background.default_value) if background is not None else None
    radii = []
    try:
        scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = *size, 100
        overview = extract_trajectory(scene, cam, [scene.frame_current])
        if background is not None:  # a dark sky, so the world stands out
            background.default_value = (0.02, 0.022, 0.026, 1.0)
        # Points the size of a few centimetres vanish from 40 m away: render them larger here only.
        for o in clouds:
            attr = o.data.attributes.get("radius")
            if attr is not None:
                r = np.empty(len(attr.data), np.float32)
                attr.data.foreach_get("value", r)
                radii.append((attr, r))
                attr.data.foreach_set("value", np.maximum(r, 0.05))
        for o in hidden:
            o.hide_render = True
        with _lit_materials(shown):
            render_still(scene, cam, scene.frame_current, path, samples=samples)
    finally:
        for attr, r in radii:
            attr.data.foreach_set("value", r)
        for o in hidden:
            o.hide_render = False
        if background is not None:
            background.default_value = saved_background
        scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = saved
        bpy.data.objects.remove(cam)

    picture = np.asarray(Image.open(path).convert("RGB")).copy()
    c2w, k = overview.c2w_opencv[0], overview.k[0]
    palette = [(255, 210, 60), (80, 220, 255), (255, 120, 200), (140, 255, 120)]
    labels = []

    def project(points: np.ndarray) -> np.ndarray | None:
        uv, z = conv.project_points_opencv(points, c2w, k)
        return None if (z <= 0.1).any() else np.round(uv).astype(np.int32)

    for n, traj in enumerate(trajectories):
        colour = palette[n % len(palette)]
        centres = traj.c2w_opencv[:, :3, 3]
        path_uv = project(centres)
        if path_uv is not None:
            cv2.polylines(picture, [path_uv.reshape(-1, 1, 2)], False, colour, 3, cv2.LINE_AA)
        for i in np.linspace(0, len(traj.frames) - 1, min(4, len(traj.frames)), dtype=int):
            corners_px = np.array([[0, 0], [traj.width, 0], [traj.width, traj.height], [0, traj.height]], np.float64)
            far = conv.unproject_pixels_opencv(corners_px, np.full(4, 2.5), traj.c2w_opencv[i], traj.k[i])
            uv = project(np.vstack([centres[i], far]))
            if uv is None:
                continue
            for corner in uv[1:]:
                cv2.line(picture, tuple(uv[0]), tuple(corner), colour, 2, cv2.LINE_AA)
            cv2.polylines(picture, [uv[1:].reshape(-1, 1, 2)], True, colour, 2, cv2.LINE_AA)
        if path_uv is not None:
            labels.append((tuple(path_uv[0]), f"{traj.name} f{int(traj.frames[0])}-{int(traj.frames[-1])}", colour))
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    for (u, v), text, colour in labels:
        draw.text((u + 8, v - 26), text, fill=colour, font=_font(20), stroke_width=3, stroke_fill=(0, 0, 0))
    draw.text((14, 12), "the imported world (point cloud and depth meshes) with the shot cameras' paths",
              fill=_TEXT, font=_font(20), stroke_width=3, stroke_fill=(0, 0, 0))
    image.save(path, optimize=True)


if __name__ == "__main__":
    sys.exit(main())
