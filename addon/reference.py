"""Render the reference view (RGB, and the blockout's z-depth) from the scene itself, with the exact camera.

The reference image becomes the job's first frame and its depth the world's
initial memory. Renders use Cycles on the CPU (works headless, no GPU needed).
Depth is read from Cycles' Depth pass, which is z-depth along the camera axis
in metres, routed through a temporary compositor node group into a float EXR
that Blender itself loads back; it is saved as ``.npy`` float32 ``(H, W)``,
0 where no surface was hit.

A camera set to panoramic (Cycles' equirectangular type) renders the reference as a 2:1 panorama
(``bridge/panorama.py``'s convention, which is Blender's) at ``panorama_size``, and its depth is then Cycles'
Depth pass for panoramic cameras: the distance along each pixel's ray, which is what a panorama's depth is;
the render says so in ``projection``.

A camera with lens distortion (kept on its data by a trajectory import, ``lens.py``) cannot render its own lens:
Blender cameras are pinholes. Its reference is rendered through the pinhole that keeps the lens's field of view
(``bridge.cameras.pinhole_keeping_fov``; a stand-in camera at the same pose) and then distorted into the lens,
each plate pixel taking the pinhole pixel its ray goes through, so the image and depth are what the job
declares them to be: the camera's view through its lens. The engine undistorts them back to that pinhole.

Every scene setting touched here is restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import bpy
import numpy as np

from ..bridge.atomic import atomic_write
from ..bridge.cameras import (Distortion, Intrinsics, blender_lens_and_shift, pinhole_keeping_fov, render_resolution,
                              undistort_normalized)
from ..bridge.errors import KeyframeWorldsError
from ..bridge.panorama import EQUIRECTANGULAR, PERSPECTIVE
from ..bridge.trajectory import MAX_SIZE_PX

# Cycles writes this (1e10) where a ray hits nothing.
_NO_HIT_DEPTH = 1e9


@dataclass(frozen=True)
class ReferenceRender:
    """What ``render_reference`` wrote: image path, depth path (or None), frame, size and projection (``reference.projection``:
    perspective with z-depth, or equirectangular with the distance along each ray)."""

    image: Path
    depth: Path | None
    frame: int
    width: int
    height: int
    projection: str = PERSPECTIVE


def is_equirectangular_camera(camera: bpy.types.Object) -> bool:
    """Whether a camera object is panoramic with Cycles' equirectangular type."""
    return camera.data.type == "PANO" and camera.data.panorama_type == "EQUIRECTANGULAR"


def panorama_size(width: int) -> tuple[int, int]:
    """The panorama a reference camera renders for an output ``width`` px wide: 4 x width by half that, so a
    90-degree view of it has about the output's pixels (at most MAX_SIZE_PX wide)."""
    pano_width = min(4 * width, MAX_SIZE_PX) // 2 * 2
    return pano_width, pano_width // 2


@contextlib.contextmanager
def _panorama_setup(scene: bpy.types.Scene, camera: bpy.types.Object, width: int, height: int):
    """The output at the panorama's size and the camera's full sphere (360 x 180 degrees), restored on exit."""
    render = scene.render
    with _saved(render, "resolution_x", "resolution_y", "resolution_percentage", "pixel_aspect_x", "pixel_aspect_y"), \
            _saved(camera.data, "longitude_min", "longitude_max", "latitude_min", "latitude_max"):
        render.resolution_x, render.resolution_y, render.resolution_percentage = width, height, 100
        render.pixel_aspect_x = render.pixel_aspect_y = 1.0
        camera.data.longitude_min, camera.data.longitude_max = -np.pi, np.pi
        camera.data.latitude_min, camera.data.latitude_max = -np.pi / 2, np.pi / 2
        yield


@contextlib.contextmanager
def _saved(obj, *names):
    """Restore attributes of ``obj`` on exit."""
    saved = {name: getattr(obj, name) for name in names}
    try:
        yield obj
    finally:
        for name, value in saved.items():
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                setattr(obj, name, value)


@contextlib.contextmanager
def _render_setup(scene: bpy.types.Scene, camera: bpy.types.Object, frame: int, samples: int, hold_out_results: bool = True):
    render = scene.render
    settings = scene.render.image_settings
    view_layer = scene.view_layers[0]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_saved(scene, "camera", "compositing_node_group"))
        stack.enter_context(_saved(render, "engine", "filepath", "use_compositing", "use_file_extension", "film_transparent"))
        stack.enter_context(_saved(settings, "file_format", "color_depth", "color_mode"))
        stack.enter_context(_saved(scene.cycles, "device", "samples", "filter_width", "use_denoising", "use_adaptive_sampling"))
        stack.enter_context(_saved(view_layer, "use_pass_z"))
        current = scene.frame_current, scene.frame_subframe
        stack.callback(lambda: scene.frame_set(current[0], subframe=current[1]))
        # Cameras bound to timeline markers take over scene.camera on every frame change
        # (before the first marker, the first marker's camera): unbind them while rendering.
        bound = [(marker, marker.camera) for marker in scene.timeline_markers if marker.camera is not None]
        for marker, _camera in bound:
            marker.camera = None
        stack.callback(lambda: [setattr(marker, "camera", cam) for marker, cam in bound])
        # Imported results (each job's "KFW <name>" collection) are the generator's output, not the scene:
        # they are held out of the reference render and its depth, so a second Generate sees the blockout only.
        for layer_collection in _job_layer_collections(view_layer.layer_collection) if hold_out_results else ():
            stack.enter_context(_saved(layer_collection, "exclude"))
            layer_collection.exclude = True
        scene.camera = camera
        render.engine = "CYCLES"
        scene.cycles.device = "CPU"
        scene.cycles.samples = samples
        scene.cycles.use_denoising = False
        render.use_file_extension = False
        render.film_transparent = False
        scene.frame_set(frame)
        yield


def _job_layer_collections(layer_collection) -> list:
    """The view layer's collections that hold imported results (``importers.COLLECTION_PREFIX``), outermost first."""
    from .importers import COLLECTION_PREFIX

    found = []
    for child in layer_collection.children:
        if child.collection.name.startswith(COLLECTION_PREFIX):
            found.append(child)
        else:
            found.extend(_job_layer_collections(child))
    return found


def _render_to(scene: bpy.types.Scene, path: Path) -> None:
    scene.render.filepath = str(path)
    result = bpy.ops.render.render(write_still=True)
    if "FINISHED" not in result or not path.is_file():
        raise KeyframeWorldsError(f"Blender did not write the render {path}")


def _load_float_image(path: Path) -> np.ndarray:
    """An image file as ``(H, W, 4)`` float32 through Blender's images, top row first (a byte image's values are
    its bytes / 255)."""
    image = bpy.data.images.load(str(path), check_existing=False)
    try:
        w, h = image.size
        pixels = np.empty(w * h * 4, dtype=np.float32)
        image.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(image)
    # Blender stores rows bottom-up.
    return pixels.reshape(h, w, 4)[::-1]


def check_reference_camera(camera) -> bool:
    """Refuse what cannot render a reference (not a camera; orthographic; a panorama other than equirectangular);
    returns whether it is an equirectangular panorama. Renders nothing: the Generate operator calls it first."""
    if camera is None or camera.type != "CAMERA":
        raise KeyframeWorldsError(f"{getattr(camera, 'name', camera)!r} is not a camera object")
    panorama = camera.data.type == "PANO" and is_equirectangular_camera(camera)
    if camera.data.type != "PERSP" and not panorama:
        kind = camera.data.type.lower() if camera.data.type != "PANO" else f"panoramic ({camera.data.panorama_type.lower()})"
        raise KeyframeWorldsError(f"camera {camera.name!r} is {kind}; a reference is rendered from a perspective "
                                  f"camera or an equirectangular panoramic one")
    return panorama


def render_reference(
    scene: bpy.types.Scene,
    camera: bpy.types.Object,
    frame: int,
    out_dir: str | os.PathLike,
    *,
    with_depth: bool = True,
    with_image: bool = True,
    samples: int = 16,
    name: str = "reference",
    lens: tuple[Intrinsics, Distortion | None] | None = None,
) -> ReferenceRender:
    """Render ``camera`` at ``frame`` into ``out_dir/<name>.png`` and, with depth, ``<name>_depth.npy``.

    A perspective camera renders at the output resolution (z-depth); an equirectangular panoramic one renders the
    full sphere at ``panorama_size`` (depth: distance along the rays), see the module docstring. Without
    ``with_image`` only the depth is rendered (the UI renders the two as stages of their own); ``image`` then names
    the file the image render writes. lens: the frame's intrinsics (as extracted, the camera's own) and its lens
    distortion; with a distortion the render goes through the pinhole keeping its field of view and is then
    distorted into it (module docstring).
    """
    panorama = check_reference_camera(camera)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_path = out / f"{name}.png"
    depth_path = out / f"{name}_depth.npy" if with_depth else None
    width, height = render_resolution(scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage)
    if panorama:
        width, height = panorama_size(width)
    distorted = lens is not None and lens[1] is not None and not lens[1].is_pinhole and not panorama
    with contextlib.ExitStack() as stack:
        stack.enter_context(_render_setup(scene, camera, frame, samples))
        if panorama:
            stack.enter_context(_panorama_setup(scene, camera, width, height))
        if distorted:
            wide = pinhole_keeping_fov(*lens)
            stack.enter_context(_pinhole_stand_in(scene, camera, wide))
        if with_image:
            _render_png(scene, image_path)
        if depth_path is not None:
            _render_depth(scene, depth_path)
    if distorted:
        sample = _lens_sampling(wide, *lens)
        if with_image:
            _distort_png(image_path, sample)
        if depth_path is not None:
            depth = np.load(depth_path)
            with atomic_write(depth_path) as tmp:
                np.save(tmp, sample.nearest(depth).astype(np.float32))
    return ReferenceRender(image_path, depth_path, int(frame), width, height, EQUIRECTANGULAR if panorama else PERSPECTIVE)


@contextlib.contextmanager
def _pinhole_stand_in(scene: bpy.types.Scene, camera: bpy.types.Object, pinhole: Intrinsics):
    """A camera at ``camera``'s pose of the current frame (scale removed, as extraction does) projecting with the
    intrinsics ``pinhole`` on the current output, made the scene camera; removed on exit."""
    from mathutils import Matrix, Vector

    data = bpy.data.cameras.new(f"{camera.name} pinhole stand-in")
    stand_in = bpy.data.objects.new(data.name, data)
    scene.collection.objects.link(stand_in)
    try:
        location, rotation, _scale = camera.matrix_world.decompose()
        stand_in.matrix_world = Matrix.LocRotScale(location, rotation, Vector((1.0, 1.0, 1.0)))
        data.clip_start, data.clip_end = camera.data.clip_start, camera.data.clip_end
        data.sensor_fit = "HORIZONTAL"
        render = scene.render
        ycor = render.pixel_aspect_y / render.pixel_aspect_x
        data.lens, data.shift_x, data.shift_y = blender_lens_and_shift(pinhole.fx, pinhole.cx, pinhole.cy, pinhole.width,
                                                                       pinhole.height, data.sensor_width, ycor)
        scene.camera = stand_in
        yield stand_in
    finally:
        bpy.data.objects.remove(stand_in)
        bpy.data.cameras.remove(data)


@dataclass(frozen=True)
class _LensSampling:
    """Where each pixel of a distorted camera samples the pinhole image that keeps its field of view: ``(H, W)``
    float64 source positions in array index units (pixel centres on integers) and where they are inside it.

    Written with numpy because Blender's Python has no OpenCV (the engine's ``cv2.remap`` does the same)."""

    x: np.ndarray
    y: np.ndarray
    valid: np.ndarray

    def bilinear(self, image: np.ndarray) -> np.ndarray:
        """``image`` (H, W, C) of the pinhole -> (H, W, C) float64 of the distorted camera; 0 outside."""
        h, w = image.shape[:2]
        x = np.clip(np.nan_to_num(self.x), 0.0, w - 1.0)
        y = np.clip(np.nan_to_num(self.y), 0.0, h - 1.0)
        x0, y0 = np.minimum(np.floor(x).astype(int), w - 2), np.minimum(np.floor(y).astype(int), h - 2)
        fx, fy = (x - x0)[..., None], (y - y0)[..., None]
        img = image.astype(np.float64)
        top = img[y0, x0] * (1 - fx) + img[y0, x0 + 1] * fx
        bottom = img[y0 + 1, x0] * (1 - fx) + img[y0 + 1, x0 + 1] * fx
        return np.where(self.valid[..., None], top * (1 - fy) + bottom * fy, 0.0)

    def nearest(self, image: np.ndarray) -> np.ndarray:
        """``image`` (H, W) of the pinhole -> (H, W) of the distorted camera, each value one source pixel's; 0 outside."""
        h, w = image.shape[:2]
        x = np.clip(np.rint(np.nan_to_num(self.x)).astype(int), 0, w - 1)
        y = np.clip(np.rint(np.nan_to_num(self.y)).astype(int), 0, h - 1)
        return np.where(self.valid, image[y, x], 0)


def _lens_sampling(pinhole: Intrinsics, intr: Intrinsics, distortion: Distortion) -> _LensSampling:
    cols, rows = np.meshgrid(np.arange(intr.width) + 0.5, np.arange(intr.height) + 0.5)
    xy = undistort_normalized(np.stack([(cols - intr.cx) / intr.fx, (rows - intr.cy) / intr.fy], -1), distortion)
    x = pinhole.fx * xy[..., 0] + pinhole.cx - 0.5
    y = pinhole.fy * xy[..., 1] + pinhole.cy - 0.5
    with np.errstate(invalid="ignore"):
        valid = (x > -0.5) & (x < pinhole.width - 0.5) & (y > -0.5) & (y < pinhole.height - 0.5)
    return _LensSampling(x, y, valid)


def _distort_png(path: Path, sample: _LensSampling) -> None:
    """Rewrite the 8-bit PNG ``path`` (the pinhole render) as the distorted camera sees it, through Blender's images
    (byte images round-trip exactly)."""
    rgb = _load_float_image(path)[..., :3]
    h, w = rgb.shape[:2]
    out = np.round(sample.bilinear(rgb * 255.0)) / 255.0
    rgba = np.concatenate([out, np.ones((h, w, 1))], -1)[::-1].astype(np.float32)
    result = bpy.data.images.new("KeyframeWorlds distorted reference", w, h, alpha=False)
    try:
        result.pixels.foreach_set(rgba.ravel())
        with atomic_write(path) as tmp:
            result.filepath_raw = str(tmp)
            result.file_format = "PNG"
            result.save()
    finally:
        bpy.data.images.remove(result)


def render_still(scene: bpy.types.Scene, camera: bpy.types.Object, frame: int, path: str | os.PathLike, samples: int = 16) -> Path:
    """Render ``camera`` at ``frame`` to a PNG with Cycles on the CPU, imported results included (a look at the
    world, not a reference); every scene setting is restored."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _render_setup(scene, camera, frame, samples, hold_out_results=False):
        _render_png(scene, path)
    return path


def _render_png(scene: bpy.types.Scene, path: Path) -> None:
    settings = scene.render.image_settings
    scene.render.use_compositing = False
    settings.file_format, settings.color_mode, settings.color_depth = "PNG", "RGB", "8"
    _render_to(scene, path)


def _render_depth(scene: bpy.types.Scene, depth_path: Path) -> None:
    settings = scene.render.image_settings
    # The Render Layers node offers a Depth output only if the pass is on when it is created.
    scene.view_layers[0].use_pass_z = True
    tree = bpy.data.node_groups.new("KeyframeWorlds Depth", "CompositorNodeTree")
    try:
        tree.interface.new_socket("Image", in_out="OUTPUT", socket_type="NodeSocketColor")
        layers = tree.nodes.new("CompositorNodeRLayers")
        output = tree.nodes.new("NodeGroupOutput")
        tree.links.new(layers.outputs["Depth"], output.inputs[0])
        scene.compositing_node_group = tree
        scene.render.use_compositing = True
        # One sample with a tiny pixel filter: depth at the pixel centre, not an average across an edge.
        scene.cycles.samples = 1
        scene.cycles.filter_width = 0.01
        settings.file_format, settings.color_mode, settings.color_depth = "OPEN_EXR", "RGB", "32"
        with tempfile.TemporaryDirectory(prefix="kfw_depth_") as tmp:
            exr = Path(tmp) / "depth.exr"
            _render_to(scene, exr)
            depth = _load_float_image(exr)[..., 0].copy()
    finally:
        bpy.data.node_groups.remove(tree)
    depth[~np.isfinite(depth) | (depth > _NO_HIT_DEPTH)] = 0.0
    with atomic_write(depth_path) as tmp:
        np.save(tmp, depth.astype(np.float32))
