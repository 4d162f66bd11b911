"""Bring a result bundle into Blender: video on the cameras, depth-textured meshes, the point cloud.

Works on any bundle folder on disk (``bridge.spec.load_manifest`` checks it
first). Each job's objects live in one collection named ``KFW <job name>``;
importing the same job again replaces that collection and what it held.

On request (none of it by default) the 4D outputs come along: the point maps
and the dynamic masks as image sequences on each camera (hidden background
images, non-colour data), and the point cloud's ``consistency`` shown by its
material (points the video contradicts turn red).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import bpy
import numpy as np

from ..bridge.errors import KeyframeWorldsError
from ..bridge.ply import read_ply
from ..bridge.spec import load_manifest
from ..bridge.trajectory import Trajectory

COLLECTION_PREFIX = "KFW "


@dataclass(frozen=True)
class ImportOptions:
    """What to import. Which frames get meshes, and how fine they are, is the job's ``output.mesh_every`` and
    ``output.mesh_stride``: the add-on imports the meshes the bundle holds."""

    video: bool = True
    point_cloud: bool = True
    meshes: bool = True
    point_radius: float = 0.02  # metres
    point_maps: bool = False  # per-frame world XYZ (EXR) as an image sequence on the camera
    dynamic_masks: bool = False  # per-frame dynamic / inconsistency mask (PNG) as an image sequence on the camera
    consistency: bool = False  # the point cloud's material shows its ``consistency`` attribute


@dataclass
class ImportResult:
    collection: bpy.types.Collection
    cameras: list = field(default_factory=list)
    meshes: list = field(default_factory=list)
    point_cloud: object | None = None
    warnings: list[str] = field(default_factory=list)


def job_collection(scene: bpy.types.Scene, job_name: str) -> bpy.types.Collection:
    """A fresh, empty collection for the job, linked to the scene; an earlier import's is removed with its contents."""
    name = COLLECTION_PREFIX + job_name
    old = bpy.data.collections.get(name)
    if old is not None:
        remove_collection(old)
    collection = bpy.data.collections.new(name)
    scene.collection.children.link(collection)
    return collection


def remove_collection(collection: bpy.types.Collection) -> None:
    """Remove a collection, its objects and the data only they used."""
    for child in list(collection.children):
        remove_collection(child)
    for obj in list(collection.objects):
        data = obj.data
        if obj.type == "CAMERA":
            remove_bundle_backgrounds(obj)  # its frames, point maps, masks: gone with the camera
        bpy.data.objects.remove(obj)
        if data is not None and data.users == 0:
            store = {bpy.types.Mesh: bpy.data.meshes, bpy.types.PointCloud: bpy.data.pointclouds,
                     bpy.types.Camera: bpy.data.cameras}.get(type(data))
            if store is not None:
                store.remove(data)
    bpy.data.collections.remove(collection)


def import_bundle(scene: bpy.types.Scene, bundle_dir: str | os.PathLike, options: ImportOptions = ImportOptions()) -> ImportResult:
    """Import a result bundle folder into ``scene``; returns what was made."""
    # Absolute: every media path saved into the .blend is built from it, and a relative one would only resolve
    # from the working directory of this run.
    bundle = Path(bundle_dir).resolve()
    manifest = load_manifest(bundle)
    result = ImportResult(job_collection(scene, manifest.job_name), warnings=list(manifest.warnings))
    for rt in manifest.trajectories:
        # A camera given with lens distortion is the plate's camera (its intrinsics, its lens kept on the camera
        # data); the pinhole the frames were generated for is the engine's.
        cam = _camera_for(scene, rt.trajectory if rt.source is None else rt.source, result.collection)
        result.cameras.append(cam)
        remove_bundle_backgrounds(cam)
        if options.video:
            result.warnings += _attach_result_video(scene, cam, bundle, rt)
        for wanted, key, what in ((options.point_maps, "point_map", "point maps"), (options.dynamic_masks, "dynamic_mask", "dynamic mask")):
            if not wanted:
                continue
            numbered = [(int(f.frame), bundle / getattr(f, key)) for f in rt.frames if getattr(f, key)]
            if not numbered:
                result.warnings.append(f"{rt.trajectory.name}: the bundle has no {what} (turned off for the job, or made "
                                       "before the engine wrote them)")
                continue
            attach_sequence(cam, f"{COLLECTION_PREFIX}{rt.trajectory.name} {what}", numbered, colorspace="Non-Color")
    if options.meshes:
        # The bundle is the contract: exactly the meshes the manifest lists, as the engine triangulated them.
        for m in manifest.meshes:
            result.meshes.append(import_mesh(f"{m.trajectory} depth {m.frame}", bundle / m.path, bundle / m.texture,
                                             result.collection))
    if options.point_cloud and manifest.point_cloud is not None:
        result.point_cloud = import_point_cloud(bundle / manifest.point_cloud, f"{manifest.job_name} points", result.collection,
                                                options.point_radius)
        if options.consistency:
            if result.point_cloud.data.attributes.get("consistency") is None:
                result.warnings.append(f"{manifest.point_cloud} has no consistency attribute (a bundle made before the engine "
                                       "wrote it); the cloud keeps its colour material")
            else:
                result.point_cloud.data.materials.clear()
                result.point_cloud.data.materials.append(_consistency_material(f"{manifest.job_name} points consistency"))
    return result


def _camera_for(scene, trajectory: Trajectory, collection) -> bpy.types.Object:
    """The scene's camera of that name (the one the job was made from), else a new keyframed one in the job collection."""
    existing = scene.objects.get(trajectory.name)
    if existing is not None and existing.type == "CAMERA":
        return existing
    from .scene_cameras import create_camera_from_trajectory

    return create_camera_from_trajectory(scene, trajectory, collection)


# --- video ----------------------------------------------------------------------


def attach_video(scene, camera: bpy.types.Object, trajectory: Trajectory, frame_files: list[Path], video: Path | None) -> list[str]:
    """The generated frames as the camera's background, aligned with the scene frames they were made for.

    The image sequence is loaded with its first file at the trajectory's
    first frame; with a frame step of 1 the MP4 is also set as a movie clip
    background (the active one). Returns warnings.
    """
    warnings = []
    data = camera.data
    remove_bundle_backgrounds(camera)
    first = int(trajectory.frames[0])
    steps = np.diff(trajectory.frames)
    bg = attach_sequence(camera, f"{COLLECTION_PREFIX}{trajectory.name} frames",
                         list(zip((int(f) for f in trajectory.frames), frame_files)), show=True)
    if video is not None and video.is_file():
        clip = bpy.data.movieclips.load(str(video))
        clip.name = f"{COLLECTION_PREFIX}{trajectory.name} video"
        clip.frame_start = first
        if len(steps) and np.any(steps != 1):
            warnings.append(f"{trajectory.name}: frames were generated every {int(steps.min())}+ frames; the movie clip plays "
                            "them back to back, the image sequence background is the aligned one")
        else:
            clip_bg = data.background_images.new()
            clip_bg.source = "MOVIE_CLIP"
            clip_bg.clip = clip
            clip_bg.alpha = 1.0
            bg.show_background_image = False  # the clip is the one shown; the sequence stays available
    return warnings


def _attach_result_video(scene, camera: bpy.types.Object, bundle: Path, rt) -> list[str]:
    """The bundle trajectory ``rt``'s frames and video on ``camera``; returns warnings.

    A camera the job gave with lens distortion gets them in its own lens (the frames' ``source_image``, the
    ``source_video``): they lie on the plate pixel for pixel. The clip's tracking camera gets the plate's lens
    (``set_clip_lens``) and the clip is shown undistorted, so the viewport, the camera (the plate's intrinsics)
    and the imported geometry line up as in Blender's own camera tracking set-up; Blender's Movie Distortion node
    takes renders to the plate's lens with the same clip.
    """
    if rt.source is None:
        return attach_video(scene, camera, rt.trajectory, [bundle / f.image for f in rt.frames],
                            None if rt.video is None else bundle / rt.video)
    if rt.source_video is None or any(f.source_image is None for f in rt.frames):
        # A bundle from before the engine wrote frames in the job's lens: the pinhole frames are all there is.
        warnings = attach_video(scene, camera, rt.trajectory, [bundle / f.image for f in rt.frames],
                                None if rt.video is None else bundle / rt.video)
        return warnings + [f"{rt.trajectory.name}: the bundle has the frames of the pinhole only (made before the engine "
                           "wrote them in the camera's own lens); they do not line up with the plate or this camera"]
    warnings = attach_video(scene, camera, rt.source, [bundle / f.source_image for f in rt.frames], bundle / rt.source_video)
    clip_shown = any(bg.source == "MOVIE_CLIP" for bg in camera.data.background_images)
    warnings += set_clip_lens(camera, rt.source)
    if not clip_shown:
        warnings.append(f"{rt.trajectory.name}: the image sequence shown is in the camera's own lens: it lies on the plate "
                        "as filmed, and on the 3D view only once undistorted")
    return warnings


def set_clip_lens(camera: bpy.types.Object, source: Trajectory) -> list[str]:
    """Give the camera's movie clip the lens of the plate the job was made for (the manifest's ``source_lens``).

    The clip holds the generated video in that lens (the bundle's ``source_video``); its tracking camera gets the
    plate's lens (``lens.set_tracking_lens``) and the camera shows the clip undistorted, which lines it up with the
    camera's pinhole view. Returns warnings: a lens Blender cannot hold (it is named; the clip keeps no
    distortion and is shown as it is), a lens that changes.
    """
    from .lens import set_tracking_lens

    backgrounds = [bg for bg in camera.data.background_images
                   if bg.source == "MOVIE_CLIP" and bg.clip is not None and bg.clip.name.startswith(COLLECTION_PREFIX)]
    for bg in backgrounds:
        bg.clip_user.use_render_undistorted = True  # with a lens Blender cannot hold, the clip has none: shown as it is
    return set_tracking_lens([bg.clip for bg in backgrounds], source)


def remove_bundle_backgrounds(camera: bpy.types.Object) -> None:
    """Take off the camera the background images an earlier import of a bundle put there (``KFW `` names), and the
    images and clips nothing else uses, so a re-import gets the same names."""
    data = camera.data
    for bg in list(data.background_images):
        if (bg.source == "MOVIE_CLIP" and bg.clip and bg.clip.name.startswith(COLLECTION_PREFIX)) or (
            bg.source == "IMAGE" and bg.image and bg.image.name.startswith(COLLECTION_PREFIX)):
            image, clip = bg.image, bg.clip
            data.background_images.remove(bg)
            for datum, store in ((image, bpy.data.images), (clip, bpy.data.movieclips)):
                # ``users`` is not lowered by removing a background image; the user map is exact.
                if datum is not None and datum.name.startswith(COLLECTION_PREFIX) and not bpy.data.user_map(subset=[datum])[datum]:
                    store.remove(datum)


def attach_sequence(camera: bpy.types.Object, name: str, numbered: list[tuple[int, Path]], show: bool = False,
                    colorspace: str | None = None):
    """An image sequence as a background image of ``camera``, each file shown at its scene frame.

    numbered: (scene frame, file) in frame order, files named by frame number (``<frame:06d>.ext``, as the bundle
    names them): scene frame f shows file f, so a camera sampled every Nth frame, or a sequence without its last
    frame (the dynamic masks), still lines up. show: visible (else listed on the camera, off). colorspace: e.g.
    ``Non-Color`` for data (point maps, masks), so Blender shows the values as they are.
    """
    data = camera.data
    data.show_background_images = True
    first, last = numbered[0][0], numbered[-1][0]
    image = bpy.data.images.load(str(numbered[0][1]), check_existing=False)
    image.name = name
    image.source = "SEQUENCE"
    if colorspace is not None:
        image.colorspace_settings.name = colorspace
    bg = data.background_images.new()
    bg.source = "IMAGE"
    bg.image = image
    bg.image_user.frame_start = first
    if _file_number(numbered[0][1]) == first and _file_number(numbered[-1][1]) == last:
        # Files numbered by scene frame: scene frame f shows file f (Blender reads file f - start + 1 + offset).
        bg.image_user.frame_offset = first - 1
        bg.image_user.frame_duration = last - first + 1
    else:
        bg.image_user.frame_duration = len(numbered)
    bg.image_user.use_auto_refresh = True
    bg.alpha = 1.0
    bg.show_background_image = show
    return bg


def _file_number(path: Path) -> int | None:
    stem = path.stem
    end = len(stem)
    while end > 0 and stem[end - 1].isdigit():
        end -= 1
    return int(stem[end:]) if end < len(stem) else None


# --- depth-textured meshes ------------------------------------------------------------


def import_mesh(name: str, path: Path, texture: Path, collection) -> bpy.types.Object:
    """The bundle's depth-textured mesh ``path`` (the engine's triangulation, world space, UVs ``s t``) as an
    object textured with its frame ``texture``. Vertices and triangles are the PLY's, unchanged."""
    if not Path(path).is_file():
        raise KeyframeWorldsError(f"mesh not found: {path}")
    data = read_ply(path)
    if not all(k in data.vertex for k in ("x", "y", "z", "s", "t")) or not len(data.faces):
        raise KeyframeWorldsError(f"{path} is not a depth mesh of a result bundle (needs x y z s t and triangles)")
    verts = data.positions()
    faces = data.faces.astype(np.int32, copy=False)
    mesh = bpy.data.meshes.new(name)
    mesh.vertices.add(len(verts))
    mesh.vertices.foreach_set("co", verts.ravel())
    mesh.loops.add(faces.size)
    mesh.loops.foreach_set("vertex_index", faces.ravel())
    mesh.polygons.add(len(faces))
    mesh.polygons.foreach_set("loop_start", np.arange(0, faces.size, 3, dtype=np.int32))
    # The engine's UVs are already Blender's (t up); one per loop.
    st = np.stack([data.vertex["s"], data.vertex["t"]], -1).astype(np.float32)
    layer = mesh.uv_layers.new(name="UVMap")
    layer.data.foreach_set("uv", st[faces.ravel()].ravel())
    mesh.update()
    mesh.validate()
    mesh.materials.append(_textured_material(name, texture))
    obj = bpy.data.objects.new(name, mesh)
    collection.objects.link(obj)
    return obj


def _emission_material(name: str):
    """A new material whose surface is an emission node (its colour input left for the caller): (material, tree, node).
    Emission, so what was generated shows as it is, unlit."""
    mat = bpy.data.materials.new(name)
    if mat.node_tree is None:  # Blender before 5 starts materials without nodes
        mat.use_nodes = True
    tree = mat.node_tree
    tree.nodes.clear()
    out = tree.nodes.new("ShaderNodeOutputMaterial")
    emit = tree.nodes.new("ShaderNodeEmission")
    tree.links.new(emit.outputs["Emission"], out.inputs["Surface"])
    return mat, tree, emit


def _textured_material(name: str, image_path: Path) -> bpy.types.Material:
    mat, tree, emit = _emission_material(name)
    tex = tree.nodes.new("ShaderNodeTexImage")
    # Its own still image: the same file may also be the first of a camera's background sequence.
    tex.image = bpy.data.images.load(str(image_path), check_existing=False)
    tex.image.name = name
    tex.interpolation = "Closest"
    tree.links.new(tex.outputs["Color"], emit.inputs["Color"])
    return mat


# --- point cloud ----------------------------------------------------------------------


def import_point_cloud(path: Path, name: str, collection, radius: float = 0.02) -> bpy.types.Object:
    """A coloured PointCloud object from a binary PLY, with ``color`` and ``radius`` attributes and a material showing the colour.

    Blender's own C++ PLY reader builds the vertices and sRGB byte colours;
    the mesh is converted to a PointCloud (bpy cannot resize one from Python).
    """
    if not Path(path).is_file():
        raise KeyframeWorldsError(f"point cloud not found: {path}")
    before = set(bpy.data.objects)
    # Operators act on the context's view layer; in background mode that is the scene's first.
    view_layer = bpy.context.view_layer
    result = bpy.ops.wm.ply_import(filepath=str(path), import_colors="SRGB", forward_axis="Y", up_axis="Z")
    if "FINISHED" not in result:
        raise KeyframeWorldsError(f"Blender could not read the point cloud {path}")
    (obj,) = [o for o in bpy.data.objects if o not in before]
    for other in list(obj.users_collection):
        other.objects.unlink(obj)
    collection.objects.link(obj)
    obj.name = name
    view_layer.objects.active = obj
    for o in view_layer.objects:
        o.select_set(o == obj)
    mesh = obj.data
    bpy.ops.object.convert(target="POINTCLOUD")
    if mesh.users == 0:  # the converted-from mesh stays behind as an orphan
        bpy.data.meshes.remove(mesh)
    obj = view_layer.objects.active
    cloud = obj.data
    cloud.name = name
    col = cloud.attributes.get("Col")
    if col is not None:
        col.name = "color"
    radii = cloud.attributes.get("radius") or cloud.attributes.new("radius", "FLOAT", "POINT")
    radii.data.foreach_set("value", np.full(len(cloud.points), radius, np.float32))
    cloud.materials.append(_attribute_material(f"{name} colour", "color"))
    return obj


def import_points(positions_world: np.ndarray, colors: np.ndarray | None, name: str, collection,
                  radius: float = 0.02) -> bpy.types.Object:
    """Points as a coloured point-cloud object, through the same PLY import as a bundle's point cloud.

    positions_world: ``(N, 3)`` metres in the world the cameras are in (kept as they are: Blender's world);
    colors: ``(N, 3)`` uint8 sRGB, or None (grey). A temporary binary PLY (``bridge.seed.write_seed_ply``) goes
    through ``import_point_cloud``, so a COLMAP model's points look and behave as a bundle's (``color``,
    ``radius``, the same material) and can seed a job's memory.
    """
    import tempfile

    from ..bridge.seed import write_seed_ply

    with tempfile.TemporaryDirectory(prefix="kfw-points-") as tmp:
        path = Path(tmp) / "points.ply"
        write_seed_ply(path, positions_world, colors, comment=f"Keyframe Worlds points {name}")
        return import_point_cloud(path, name, collection, radius)


def _attribute_material(name: str, attribute: str) -> bpy.types.Material:
    mat, tree, emit = _emission_material(name)
    attr = tree.nodes.new("ShaderNodeAttribute")
    attr.attribute_name = attribute
    tree.links.new(attr.outputs["Color"], emit.inputs["Color"])
    return mat


def _consistency_material(name: str) -> bpy.types.Material:
    """Emission of the point's colour where its ``consistency`` is 1, fading to red where it is 0 (where the video
    contradicts the geometry, see the README's "4D outputs")."""
    mat, tree, emit = _emission_material(name)
    colour = tree.nodes.new("ShaderNodeAttribute")
    colour.attribute_name = "color"
    consistency = tree.nodes.new("ShaderNodeAttribute")
    consistency.attribute_name = "consistency"
    consistency.name = "consistency"
    mix = tree.nodes.new("ShaderNodeMix")
    mix.data_type = "RGBA"
    mix.inputs["A"].default_value = (1.0, 0.0, 0.0, 1.0)
    tree.links.new(consistency.outputs["Fac"], mix.inputs["Factor"])
    tree.links.new(colour.outputs["Color"], mix.inputs["B"])
    tree.links.new(mix.outputs["Result"], emit.inputs["Color"])
    return mat
