"""A job's distorted cameras made pinhole: the trajectories it generates along, and its reference image and depth.

The engine renders and generates pinhole views only. A trajectory whose frames carry lens distortion
(``bridge.cameras.Distortion``) is replaced by the pinhole that keeps each lens's field of view
(``world/undistort.py``, OpenCV); frames sharing a lens (model, parameters, intrinsics) share that pinhole, so
a camera's video has one focal length wherever its lens has one. The reference image (and its depth) is
undistorted to its frame's pinhole. The result manifest keeps both: each trajectory as generated (pinhole) and
its ``source_lens`` (the job's intrinsics and distortion). Every generated frame is also written back in the job's
lens (``SourceLens``: the pinhole frame distorted onto the plate's pixels), so it lies on the plate as it was
filmed; that video is the add-on's movie clip, with the plate's lens on its tracking camera.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ...bridge.cameras import Intrinsics
from ...bridge.spec import JobSpec
from ...bridge.trajectory import Trajectory
from ..world.undistort import LensMaps, distort_maps, pinhole_keeping_fov, undistort_maps


@dataclass
class PinholeJob:
    """What undistortion made of a job.

    spec: the job with every trajectory pinhole; sources: the job's own trajectory, by name, of each that changed;
    log: one line per distinct lens, what was done.
    """

    spec: JobSpec
    sources: dict[str, Trajectory] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def undistort_reference(self, rgb: np.ndarray, depth_z_m: np.ndarray | None
                            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The reference (H, W, 3) uint8 and z-depth (H, W) metres or None, at the trajectory's size, as its pinhole sees
        them, and the (H, W) bool mask of pixels the plate reaches (None: the reference camera is a pinhole).

        Depth is remapped to the nearest source pixel: a pinhole ray is the same ray of the lens, so its z-depth
        along the axis is unchanged, and no depth is blended across an edge or with a pixel that has none.
        """
        traj, index = self.spec.reference_view()
        source = self.sources.get(traj.name)
        maps = None if source is None else _undistortion(source, traj, index)
        if maps is None:
            return rgb, depth_z_m, None
        rgb = maps.remap(rgb)
        if depth_z_m is not None:
            depth_z_m = maps.remap(depth_z_m.astype(np.float32), nearest=True)
        return rgb, depth_z_m, maps.valid

    def source_lens(self, name: str) -> "SourceLens | None":
        """The way back to the job's lens of trajectory ``name``; None when the job gave it as a pinhole."""
        source = self.sources.get(name)
        if source is None:
            return None
        return SourceLens(next(t for t in self.spec.trajectories if t.name == name), source)


@dataclass
class SourceLens:
    """One trajectory's generated (pinhole) frames as its job's lens sees them.

    pinhole: the trajectory the frames were generated for; source: the job's own (same poses, frames and size, the
    plate's intrinsics and distortion). Frames sharing a lens share one set of maps (each costs about a second at
    832x480: every plate pixel undistorted to convergence).
    """

    pinhole: Trajectory
    source: Trajectory
    _maps: dict[tuple, LensMaps] = field(default_factory=dict)

    def frame(self, index: int, rgb: np.ndarray) -> np.ndarray:
        """Frame ``index`` (H, W, 3) uint8 of the pinhole -> (H, W, 3) uint8 on the plate's pixels; a plate pixel whose
        ray the pinhole does not hold (a fisheye's widest) is 0. A frame the job gave without distortion is returned
        as it is (its pinhole is its own camera)."""
        lens = self.source.distortion[index]
        if lens is None or lens.is_pinhole:
            return rgb
        intr, pinhole = self.source.intrinsics(index), self.pinhole.intrinsics(index)
        key = (lens, intr, pinhole)
        maps = self._maps.get(key)
        if maps is None:
            maps = self._maps[key] = distort_maps(pinhole, lens, intr)
        return maps.remap(rgb)


def pinhole_trajectory(traj: Trajectory, log: list[str] | None = None) -> Trajectory:
    """``traj`` with every distorted frame's intrinsics replaced by the pinhole keeping its lens's field of view (one
    pinhole per distinct lens and intrinsics) and no distortion; one line per distinct lens appended to ``log``."""
    if not traj.has_distortion:
        return traj if all(d is None for d in traj.distortion) else replace(traj, distortion=None)
    chosen: dict[tuple, Intrinsics] = {}
    fx, fy, cx, cy = (np.array(getattr(traj, k)) for k in ("fx", "fy", "cx", "cy"))
    for i, lens in enumerate(traj.distortion):
        if lens is None or lens.is_pinhole:
            continue
        intr = traj.intrinsics(i)
        key = (lens, intr.fx, intr.fy, intr.cx, intr.cy)
        if key not in chosen:
            chosen[key] = new = pinhole_keeping_fov(intr, lens)
            if log is not None:
                log.append(f"lens: camera {traj.name!r} {lens.describe()} undistorted (OpenCV) to a pinhole keeping its field of "
                           f"view: focal {intr.fx:.2f} x {intr.fy:.2f} px -> {new.fx:.2f} x {new.fy:.2f} px, principal point "
                           f"({intr.cx:.2f}, {intr.cy:.2f}) -> ({new.cx:.2f}, {new.cy:.2f})")
        new = chosen[key]
        fx[i], fy[i], cx[i], cy[i] = new.fx, new.fy, new.cx, new.cy
    return replace(traj, fx=fx, fy=fy, cx=cx, cy=cy, distortion=None)


def undistort_view(source: Trajectory, pinhole: Trajectory, index: int, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Frame ``index``'s image (H, W, 3) uint8 of the camera ``source`` as ``pinhole`` (its ``pinhole_trajectory``)
    sees it, and the (H, W) bool mask of the pixels the image reaches (None: the frame is a pinhole already)."""
    maps = _undistortion(source, pinhole, index)
    return (rgb, None) if maps is None else (maps.remap(rgb), maps.valid)


def _undistortion(source: Trajectory, pinhole: Trajectory, index: int) -> LensMaps | None:
    """The maps taking frame ``index`` of ``source`` to ``pinhole``'s; None where that frame has no distortion."""
    lens = source.distortion[index]
    if lens is None or lens.is_pinhole:
        return None
    return undistort_maps(source.intrinsics(index), lens, pinhole.intrinsics(index))


def pinhole_job(spec: JobSpec) -> PinholeJob:
    """``spec`` with its distorted trajectories replaced by pinhole ones keeping each lens's field of view."""
    result = PinholeJob(spec)
    trajectories = []
    for traj in spec.trajectories:
        pinhole = pinhole_trajectory(traj, result.log)
        trajectories.append(pinhole)
        if traj.has_distortion:
            result.sources[traj.name] = traj
    if result.sources:
        result.spec = replace(spec, trajectories=tuple(trajectories))
    return result
