"""Retrieval of spatial-stereo memory frames: which earlier frames to show the generator.

For a target segment (the cameras about to be generated), every earlier frame
is scored by how much of what the target cameras see it observed: the memory
is rendered along the target cameras at a low resolution, the visible surface
points are lifted to the world, and a candidate observes a point when the
point falls inside its frustum and, when the candidate's depth map is known,
is not hidden behind what the candidate saw (visibility overlap).

Up to ``max_frames`` (8) are then picked by furthest-point sampling over
camera poses weighted by that overlap: the best-scoring frame first, then
repeatedly the frame whose overlap times its pose distance to the frames
already picked is largest, so near-duplicate views do not crowd out other
viewpoints. Each target frame is paired with the picked frame that observes
most of what it sees.

Conventions: c2w_opencv (OpenCV axes, camera-to-world), intrinsics
``(fx, fy, cx, cy)`` in pixels of the stated size, z-depth in metres.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cameras import rescale_intrinsics_vec, rotation_angle_between, unproject_depth
from .memory import PointMemory


@dataclass(frozen=True)
class CandidateView:
    """An earlier frame that may be retrieved.

    c2w_opencv: (4, 4). intrinsics: (4,) in pixels of ``width x height``.
    depth_z_m: (height, width) z-depth of what the frame saw (0 = unknown), or
    None to test the frustum only. ``key`` identifies the frame to the caller.
    """

    key: object
    c2w_opencv: torch.Tensor
    intrinsics: torch.Tensor
    width: int
    height: int
    depth_z_m: torch.Tensor | None = None


@dataclass(frozen=True)
class Retrieval:
    """The picked frames and the pairing.

    selected: indices into the candidate list, in pick order (at most max_frames).
    scores: (M,) mean overlap of every candidate with the target segment.
    overlap: (M, T) fraction of target frame t's visible points candidate m observes.
    pairs: (T,) for each target frame, the position in ``selected`` of its best
    reference (-1 when no picked frame observes anything of it).
    """

    selected: tuple[int, ...]
    scores: torch.Tensor
    overlap: torch.Tensor
    pairs: torch.Tensor


def target_samples(
    memory: PointMemory,
    c2w_opencv: torch.Tensor,
    intrinsics: torch.Tensor,
    width: int,
    height: int,
    scale: float = 0.125,
    max_points: int = 2048,
) -> list[torch.Tensor]:
    """World points the target cameras see, per target frame: list of (S_t, 3) float32.

    The memory is rendered at ``scale`` times the target size; at most
    ``max_points`` evenly strided samples are kept per frame.
    """
    w = max(int(round(width * scale)), 1)
    h = max(int(round(height * scale)), 1)
    k = rescale_intrinsics_vec(intrinsics.to(torch.float64), (width, height), (w, h))
    rendered = memory.render(c2w_opencv, k, w, h)
    samples = []
    for t in range(c2w_opencv.shape[0]):
        mask = rendered.mask[t]
        points = unproject_depth(rendered.depth_z_m[t], c2w_opencv[t], k[t])[mask]
        if points.shape[0] > max_points:
            step = points.shape[0] / max_points
            points = points[(torch.arange(max_points) * step).long()]
        samples.append(points.cpu())
    return samples


def observed_fraction(points: torch.Tensor, view: CandidateView, relative_tolerance: float = 0.05) -> torch.Tensor:
    """(P, 3) world points -> (P,) bool: inside the view's frustum and not behind what it saw."""
    c2w = view.c2w_opencv.to(torch.float64)
    cam = (points.to(torch.float64) - c2w[:3, 3]) @ c2w[:3, :3]
    z = cam[:, 2]
    fx, fy, cx, cy = (float(x) for x in view.intrinsics.tolist())
    safe = torch.where(z > 1e-9, z, torch.ones_like(z))
    u = fx * cam[:, 0] / safe + cx
    v = fy * cam[:, 1] / safe + cy
    inside = (z > 1e-3) & (u >= 0) & (u < view.width) & (v >= 0) & (v < view.height)
    if view.depth_z_m is not None:
        col = u.clamp(0, view.width - 1).long()
        row = v.clamp(0, view.height - 1).long()
        seen = view.depth_z_m.to(torch.float64)[row, col]
        # Unknown depth (0) does not hide anything.
        visible = (seen <= 0) | (z <= seen * (1 + relative_tolerance))
        inside &= visible
    return inside


def pose_distance(c2w_a: torch.Tensor, c2w_b: torch.Tensor, scene_scale_m: float, radians_weight: float = 1.0) -> torch.Tensor:
    """Distance between camera poses (broadcasting over leading dims): centre distance over
    ``scene_scale_m`` plus ``radians_weight`` times the rotation angle."""
    trans = (c2w_a[..., :3, 3] - c2w_b[..., :3, 3]).norm(dim=-1) / scene_scale_m
    angle = rotation_angle_between(c2w_a[..., :3, :3], c2w_b[..., :3, :3])
    return trans + radians_weight * angle


def retrieve(
    samples: list[torch.Tensor],
    candidates: list[CandidateView],
    max_frames: int = 8,
    min_overlap: float = 0.02,
    scene_scale_m: float | None = None,
) -> Retrieval:
    """Pick up to ``max_frames`` candidates for target frames whose visible points are ``samples``.

    scene_scale_m: the length that makes a camera move comparable to a turn of
    one radian; default: the median distance from the target samples to
    their centroid.
    """
    t_count, m_count = len(samples), len(candidates)
    overlap = torch.zeros(m_count, t_count, dtype=torch.float64)
    for m, view in enumerate(candidates):
        for t, points in enumerate(samples):
            if points.shape[0]:
                overlap[m, t] = observed_fraction(points, view).to(torch.float64).mean()
    scores = overlap.mean(dim=1) if t_count else torch.zeros(m_count, dtype=torch.float64)
    if scene_scale_m is None:
        everything = torch.cat([s for s in samples if s.shape[0]] or [torch.zeros(1, 3)])
        scene_scale_m = float((everything - everything.mean(0)).norm(dim=1).median().clamp_min(1e-3))

    eligible = [m for m in range(m_count) if scores[m] >= min_overlap]
    selected: list[int] = []
    if eligible:
        poses = torch.stack([candidates[m].c2w_opencv.to(torch.float64) for m in range(m_count)])
        # Best first; ties to the earliest candidate.
        first = max(eligible, key=lambda m: (float(scores[m]), -m))
        selected.append(first)
        nearest = pose_distance(poses, poses[first], scene_scale_m)
        while len(selected) < min(max_frames, len(eligible)):
            best, best_value = None, 0.0
            for m in eligible:
                if m in selected:
                    continue
                value = float(scores[m] * nearest[m])
                if value > best_value:
                    best, best_value = m, value
            if best is None:  # every remaining one duplicates a picked pose
                break
            selected.append(best)
            nearest = torch.minimum(nearest, pose_distance(poses, poses[best], scene_scale_m))

    pairs = torch.full((t_count,), -1, dtype=torch.int64)
    if selected:
        sub = overlap[selected]  # (K, T)
        best_val, best_pos = sub.max(dim=0)
        pairs = torch.where(best_val > 0, best_pos, pairs)
    return Retrieval(selected=tuple(selected), scores=scores, overlap=overlap, pairs=pairs)
