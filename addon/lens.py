"""What a Blender camera cannot hold itself, kept on its camera data: the lens distortion and each frame's image.

A Blender camera is a pinhole (focal length, sensor, shift). A trajectory imported
from a file can have a lens model with distortion (``bridge.cameras.Distortion``)
and an image path per frame (COLMAP's ``NAME``, nerfstudio's ``file_path``). The
import keeps both as custom properties of the camera data (Object Data > Custom
Properties), and the export reads them back, so import -> export gives the same
lens parameters, bit for bit, and the same names. The keys, defined here once:

- ``kfw_lens_model`` (string, a COLMAP model name such as ``OPENCV``) and
  ``kfw_lens_params`` (floats, that model's distortion parameters in COLMAP's order,
  ``cameras.LENS_MODELS``): the camera's lens, on every frame.
- ``kfw_lens_frames`` (a group ``{"<frame>": {"model": ..., "params": [...]}}``): a
  lens that changes over the frames; each holds from its frame until the next keyed
  one (before the first, the first's), as a constant-interpolated key would. When
  present it is used instead of the two above. ``PINHOLE`` is a frame without distortion.
- ``kfw_images`` (a group ``{"<frame>": "images/0001.jpg"}``): each frame's image path
  as its file wrote it; a frame not listed has none.

A camera without these keys is a pinhole without image paths, as any camera made in
Blender. Edit them (or delete them) like any custom property; the export checks them
and names the camera and key of a value that is not a lens.

The same lens can also go on a movie clip's tracking camera (``set_tracking_lens``),
where Blender's own models can hold it (``cameras.distortion_to_blender_tracking``).
"""

from __future__ import annotations

from typing import Sequence

from ..bridge.cameras import Distortion, distortion_to_blender_tracking
from ..bridge.errors import KeyframeWorldsError
from ..bridge.trajectory import Trajectory

LENS_MODEL_KEY = "kfw_lens_model"
LENS_PARAMS_KEY = "kfw_lens_params"
LENS_FRAMES_KEY = "kfw_lens_frames"
IMAGES_KEY = "kfw_images"
KEYS = (LENS_MODEL_KEY, LENS_PARAMS_KEY, LENS_FRAMES_KEY, IMAGES_KEY)
PINHOLE = "PINHOLE"


def store_lens_and_images(camera_data, trajectory: Trajectory) -> None:
    """Keep ``trajectory``'s per-frame lens and image paths on ``camera_data`` (a ``bpy.types.Camera``), replacing any."""
    for key in KEYS:
        if key in camera_data:
            del camera_data[key]
    lenses = trajectory.distortion
    if any(d is not None for d in lenses):
        if len(set(lenses)) == 1:
            camera_data[LENS_MODEL_KEY] = lenses[0].model
            # Python floats become double-precision ID properties: the parameters are kept exactly.
            camera_data[LENS_PARAMS_KEY] = [float(p) for p in lenses[0].params]
        else:
            # Only where the lens changes, so a long shot with two lenses stays two entries.
            changes = {}
            for i, d in enumerate(lenses):
                if i == 0 or d != lenses[i - 1]:
                    changes[str(int(trajectory.frames[i]))] = _lens_entry(d)
            camera_data[LENS_FRAMES_KEY] = changes
    images = {str(int(f)): name for f, name in zip(trajectory.frames, trajectory.images) if name is not None}
    if images:
        camera_data[IMAGES_KEY] = images


def _lens_entry(d: Distortion | None) -> dict:
    if d is None:
        return {"model": PINHOLE}
    entry = {"model": d.model}
    if d.params:  # an ID property array cannot be empty
        entry["params"] = [float(p) for p in d.params]
    return entry


def lenses_at(camera_data, frames: Sequence[int], camera_name: str) -> tuple[Distortion | None, ...]:
    """The lens kept on ``camera_data`` at each of ``frames`` (None: a pinhole); raises ``KeyframeWorldsError`` for a bad one."""
    frames = [int(f) for f in frames]
    keyed = camera_data.get(LENS_FRAMES_KEY)
    if keyed is not None:
        where = f"camera {camera_name!r}: custom property {LENS_FRAMES_KEY}"
        try:
            entries = sorted((int(k), v) for k, v in keyed.items())
        except (AttributeError, ValueError):
            raise KeyframeWorldsError(f"{where} must map frame numbers to lenses") from None
        if not entries:
            return (None,) * len(frames)
        lenses = [(f, _lens(entry.get("model") if hasattr(entry, "get") else None,
                            entry.get("params", ()) if hasattr(entry, "get") else (), f"{where}[{f}]")) for f, entry in entries]
        out = []
        for frame in frames:
            held = lenses[0][1]
            for f, d in lenses:
                if f <= frame:
                    held = d
            out.append(held)
        return tuple(out)
    model = camera_data.get(LENS_MODEL_KEY)
    if model is None:
        if LENS_PARAMS_KEY in camera_data:
            raise KeyframeWorldsError(f"camera {camera_name!r}: custom property {LENS_PARAMS_KEY} without {LENS_MODEL_KEY}")
        return (None,) * len(frames)
    d = _lens(model, camera_data.get(LENS_PARAMS_KEY, ()), f"camera {camera_name!r}: custom properties {LENS_MODEL_KEY}/{LENS_PARAMS_KEY}")
    return (d,) * len(frames)


def _lens(model, params, where: str) -> Distortion | None:
    if not isinstance(model, str):
        raise KeyframeWorldsError(f"{where}: the lens model must be a camera model name, got {model!r}")
    try:
        values = tuple(float(p) for p in params)
    except (TypeError, ValueError):
        raise KeyframeWorldsError(f"{where}: the lens parameters must be numbers") from None
    if model == PINHOLE and not values:
        return None
    try:
        return Distortion(model, values)
    except KeyframeWorldsError as exc:
        raise KeyframeWorldsError(f"{where}: {exc}") from None


def images_at(camera_data, frames: Sequence[int], camera_name: str) -> tuple[str | None, ...] | None:
    """Each frame's image path kept on ``camera_data`` (None where a frame has none; None when the camera keeps none)."""
    images = camera_data.get(IMAGES_KEY)
    if images is None:
        return None
    try:
        by_frame = {int(k): v for k, v in images.items()}
    except (AttributeError, ValueError):
        raise KeyframeWorldsError(f"camera {camera_name!r}: custom property {IMAGES_KEY} must map frame numbers to image paths") from None
    bad = [f for f, v in by_frame.items() if not isinstance(v, str) or not v]
    if bad:
        raise KeyframeWorldsError(f"camera {camera_name!r}: custom property {IMAGES_KEY}[{bad[0]}] must be an image path")
    return tuple(by_frame.get(int(f)) for f in frames)


def set_tracking_lens(clips, trajectory: Trajectory) -> list[str]:
    """Set the first distorted frame's lens of ``trajectory`` on each movie clip's tracking camera; returns warnings.

    The tracking camera gets the focal length (pixels), pixel aspect, principal point and distortion
    (``cameras.distortion_to_blender_tracking``). A clip has one lens: a lens that changes over the frames is
    warned about, and a lens Blender cannot hold (a fisheye, rational terms) is named in a warning and no clip
    is changed. A trajectory without distortion changes nothing.
    """
    lensed = [i for i, d in enumerate(trajectory.distortion) if d is not None]
    if not clips or not lensed:
        return []
    i = lensed[0]
    warnings = []
    if len({(trajectory.distortion[j], float(trajectory.fx[j]), float(trajectory.fy[j])) for j in lensed}) > 1:
        warnings.append(f"{trajectory.name}: the lens changes over the shot; the movie clip has the lens of frame "
                        f"{int(trajectory.frames[i])}")
    try:
        model, values = distortion_to_blender_tracking(trajectory.distortion[i])
    except KeyframeWorldsError as exc:
        return warnings + [f"{trajectory.name}: the movie clip keeps no lens distortion: {exc}"]
    for clip in clips:
        tracking = clip.tracking.camera
        tracking.units = "PIXELS"
        tracking.focal_length_pixels = float(trajectory.fx[i])
        tracking.pixel_aspect = float(trajectory.fy[i] / trajectory.fx[i])  # Blender's x:y pixel aspect, as its camera has
        # Blender's tracking frame is y up from the bottom-left corner; ours is y down from the top-left.
        tracking.principal_point_pixels = (float(trajectory.cx[i]), float(trajectory.height - trajectory.cy[i]))
        tracking.distortion_model = model
        for key, value in values.items():
            setattr(tracking, key, float(value))
    return warnings
