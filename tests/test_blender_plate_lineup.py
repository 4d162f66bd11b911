"""A distorted job's video lines up with its plate in Blender, by Blender's own lens code.

The engine writes every frame of a camera given with lens distortion back in that lens (``source/``); the add-on
puts that video on the camera as a movie clip whose tracking camera has the plate's lens, shown undistorted. What
Blender does with that lens is libmv's code, reachable headless only through the compositor: its Movie Distortion
node (Undistort) on the imported clip must give the pinhole view of the imported camera (the plate's intrinsics),
which is the engine's pinhole frame resampled to those intrinsics. Each check also runs with the tangential terms
as a naive mapping would set them (``brown_p2 = +p1``, OpenCV's y down taken for Blender's y up): that version is
visibly off, so the check can fail.

Blender 5's compositor grows the Movie Distortion node's output by the lens's bounds, rounded to whole pixels, and
the composite places that larger image on the render frame; the comparison therefore allows a whole-pixel
translation (searched), never a fraction of a pixel, a scale or a bend.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from test_undistort_jobs import run_lens_job

from keyframe_worlds.bridge.cameras import Distortion
from keyframe_worlds.bridge.spec import load_manifest
from keyframe_worlds.engine.io.images import read_rgb
from keyframe_worlds.engine.testing.synthetic import look_at_c2w_opencv

W, H = 128, 96
FX, FY, CX, CY = 78.0, 78.0, 66.3, 45.2
LENSES = {
    "OPENCV": Distortion("OPENCV", (-0.22, 0.05, 0.018, -0.014)),  # BROWN in Blender
    "RADIAL": Distortion("RADIAL", (-0.2, 0.04)),  # POLYNOMIAL
}
MARGIN = 12  # px of the frame's border left out: what the pinhole and the plate each leave unseen
SHIFT_SEARCH = 16


def _texture() -> np.ndarray:
    """A reference with detail at every scale (smooth blobs and a fine grid), so a misplaced pixel shows."""
    rng = np.random.default_rng(7)
    blobs = cv2.resize(rng.uniform(0, 255, (12, 16, 3)).astype(np.float32), (W, H), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:H, 0:W]
    grid = ((xx // 6 + yy // 6) % 2) * 60.0
    return np.clip(blobs * 0.7 + grid[..., None], 0, 255).astype(np.uint8)


def _distorted_job(folder: Path, lens: Distortion) -> Path:
    """A two-frame job of a camera with ``lens`` looking at a textured reference 3 m away (the plate)."""
    poses = [look_at_c2w_opencv((0.05 * i, -3.0, 1.0), (0.05 * i, 0.0, 1.0)) for i in range(2)]
    return run_lens_job(folder, lens, _texture(), (FX, FY, CX, CY), poses)


def _undistorted_by_blender(bpy, scene, clip, out: Path) -> np.ndarray:
    """The compositor's Movie Distortion (Undistort) of ``clip`` at the current frame, as (H, W) float32 luma 0-255."""
    tree = bpy.data.node_groups.new("KFW test undistort", "CompositorNodeTree")
    tree.interface.new_socket("Image", in_out="OUTPUT", socket_type="NodeSocketColor")
    source = tree.nodes.new("CompositorNodeMovieClip")
    source.clip = clip
    undistort = tree.nodes.new("CompositorNodeMovieDistortion")
    undistort.clip = clip
    undistort.inputs["Type"].default_value = "Undistort"
    output = tree.nodes.new("NodeGroupOutput")
    tree.links.new(source.outputs["Image"], undistort.inputs["Image"])
    tree.links.new(undistort.outputs["Image"], output.inputs[0])
    scene.compositing_node_group = tree
    render = scene.render
    render.use_compositing = True
    render.engine = "CYCLES"
    scene.cycles.samples = 1
    scene.view_settings.view_transform = "Standard"  # the clip's sRGB back as it was
    settings = render.image_settings
    settings.file_format, settings.color_mode, settings.color_depth = "PNG", "RGB", "8"
    render.filepath = str(out)
    bpy.ops.render.render(write_still=True)
    bpy.data.node_groups.remove(tree)
    return cv2.cvtColor(read_rgb(out), cv2.COLOR_RGB2GRAY).astype(np.float32)


def _pinhole_view(pinhole_rgb: np.ndarray, pinhole, plate) -> tuple[np.ndarray, np.ndarray]:
    """The engine's pinhole frame (intrinsics ``pinhole``) resampled to the pinhole of the plate's intrinsics: what the
    imported camera sees. (H, W) float32 luma and the (H, W) mask of pixels it covers."""
    cols, rows = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    map_x = ((cols - plate.cx) / plate.fx * pinhole.fx + pinhole.cx - 0.5).astype(np.float32)
    map_y = ((rows - plate.cy) / plate.fy * pinhole.fy + pinhole.cy - 0.5).astype(np.float32)
    gray = cv2.cvtColor(pinhole_rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    inside = (map_x > 0) & (map_x < W - 1) & (map_y > 0) & (map_y < H - 1)
    return cv2.remap(gray, map_x, map_y, cv2.INTER_LINEAR), inside


def _best_whole_pixel_error(got: np.ndarray, want: np.ndarray, where: np.ndarray) -> tuple[float, tuple[int, int]]:
    """The smallest mean absolute difference over ``where`` with ``got`` moved by a whole-pixel translation."""
    best = (np.inf, (0, 0))
    for dy in range(-SHIFT_SEARCH, SHIFT_SEARCH + 1):
        for dx in range(-SHIFT_SEARCH, SHIFT_SEARCH + 1):
            moved = np.roll(got, (dy, dx), (0, 1))
            error = float(np.abs(moved - want)[where].mean())
            best = min(best, (error, (dx, dy)))
    return best


def _fractional_offset(got: np.ndarray, want: np.ndarray, where: np.ndarray) -> tuple[float, float]:
    """The sub-pixel translation (x, y), in eighths of a pixel within one pixel, that best lays ``got`` on ``want``."""
    best = (np.inf, 0.0, 0.0)
    for dy in np.arange(-1.0, 1.01, 0.125):
        for dx in np.arange(-1.0, 1.01, 0.125):
            moved = cv2.warpAffine(got, np.float32([[1, 0, dx], [0, 1, dy]]), (W, H), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REPLICATE)
            best = min(best, (float(np.abs(moved - want)[where].mean()), float(dx), float(dy)))
    return best[1], best[2]


@pytest.mark.parametrize("model", sorted(LENSES))
def test_blender_undistorts_the_imported_clip_to_the_imported_cameras_view(blank_blend, tmp_path, model):
    bpy = blank_blend
    from keyframe_worlds.addon.importers import import_bundle

    lens = LENSES[model]
    bundle = _distorted_job(tmp_path, lens)
    rt = load_manifest(bundle).trajectories[0]
    scene = bpy.context.scene
    result = import_bundle(scene, bundle)
    assert not [w for w in result.warnings if "lens" in w]
    camera = result.cameras[0]
    (background,) = [bg for bg in camera.data.background_images if bg.source == "MOVIE_CLIP"]
    clip = background.clip
    # The clip is the video in the plate's lens, shown undistorted; the camera has the plate's intrinsics.
    assert Path(bpy.path.abspath(clip.filepath)).resolve() == (bundle / rt.source_video).resolve()
    assert background.clip_user.use_render_undistorted
    assert camera.data.lens * W / camera.data.sensor_width == pytest.approx(FX, rel=1e-5)
    assert camera.data["kfw_lens_model"] == lens.model
    assert (scene.render.resolution_x, scene.render.resolution_y) == (W, H)

    scene.frame_set(1)
    got = _undistorted_by_blender(bpy, scene, clip, tmp_path / "undistorted.png")
    want, inside = _pinhole_view(read_rgb(bundle / rt.frames[0].image), rt.trajectory.intrinsics(0), rt.source.intrinsics(0))
    where = inside.copy()
    where[:MARGIN], where[-MARGIN:], where[:, :MARGIN], where[:, -MARGIN:] = False, False, False, False
    error, shift = _best_whole_pixel_error(got, want, where)
    assert max(map(abs, shift)) < SHIFT_SEARCH
    # H.264 (4:2:0) and the resamplings, nothing more: a few grey levels on average (3.6 for OPENCV, of which
    # 1.8 remain with OpenCV's own undistortion of the PNG in place of Blender's of the MP4) ...
    assert error < 4.5, (error, shift)
    # ... and no part of a pixel off: the conventions (principal point from the bottom, pixel centres) agree.
    dx, dy = _fractional_offset(np.roll(got, (shift[1], shift[0]), (0, 1)), want, where)
    assert abs(dx) <= 0.25 and abs(dy) <= 0.25, (dx, dy)
    # Without the plate's lens (the clip shown as it is) the view is far off: the lens is strong enough to test.
    plain = cv2.cvtColor(read_rgb(bundle / rt.frames[0].source_image), cv2.COLOR_RGB2GRAY).astype(np.float32)
    assert _best_whole_pixel_error(plain, want, where)[0] > 2 * error
    if model == "OPENCV":
        # The tangential terms as OpenCV's y-down formula reads them, without Blender's y up: visibly worse.
        tracking = clip.tracking.camera
        tracking.brown_p2 = -tracking.brown_p2
        naive = _undistorted_by_blender(bpy, scene, clip, tmp_path / "naive.png")
        assert _best_whole_pixel_error(naive, want, where)[0] > 2 * error  # 9.8
