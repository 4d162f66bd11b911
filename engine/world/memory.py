"""The global-geometric memory: a coloured point cloud in world space.

Every point has a position (Blender world, metres), an RGB colour, the index
of the frame it came from (the reference is frame 0 unless told otherwise) and
a confidence (how much the depth behind it is trusted: 1 for a measured
reference depth, less for estimated depth; re-observing a point consistently
raises it).

The memory grows with content, not with frames: fusing a frame first renders
the memory at that frame's camera and adds only the pixels the memory does not
already explain (nothing visible there, or a depth that disagrees). A point
budget is kept by voxel downsampling, which keeps the most confident point of
each voxel.

Positions are stored as rows (3, N) so the renderer reads them without a copy;
``positions_world`` is the usual (N, 3) view of the same storage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ...bridge.atomic import atomic_write
from .cameras import unproject_pixels
from .render import PointRenderer, RenderOutput

MEMORY_FILE_VERSION = 1


@dataclass(frozen=True)
class FuseStats:
    """What one fused frame did: pixels added as new points, points re-observed."""

    added: int
    confirmed: int


def _neighbourhood_range(depth: torch.Tensor, valid: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of the valid depths in the ``(2r+1)^2`` square around each pixel, (H, W) each.

    Separable shifted minima/maxima: several times faster than max_pool2d on the CPU.
    """
    if radius == 0:
        return depth, depth
    low = torch.where(valid, depth, float("inf"))
    high = torch.where(valid, depth, 0.0)
    return _box_extreme(low, radius, torch.minimum), _box_extreme(high, radius, torch.maximum)


def _box_extreme(x: torch.Tensor, radius: int, op) -> torch.Tensor:
    rows = x.clone()
    for s in range(1, radius + 1):
        op(rows[:, s:], x[:, :-s], out=rows[:, s:])
        op(rows[:, :-s], x[:, s:], out=rows[:, :-s])
    out = rows.clone()
    for s in range(1, radius + 1):
        op(out[s:], rows[:-s], out=out[s:])
        op(out[:-s], rows[s:], out=out[:-s])
    return out


class PointMemory:
    """A coloured point cloud with provenance and confidence (see module docstring).

    splat_radius_px is the renderer's splat radius used for rendering and for the
    visibility test of :meth:`fuse`; max_points is the budget (None: unbounded).
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        max_points: int | None = 4_000_000,
        splat_radius_px: int = 1,
    ):
        self.device = torch.device(device)
        self.max_points = max_points
        self.splat_radius_px = splat_radius_px
        self._n = 0
        self._generation = 0  # bumped whenever points are removed
        self._rows = torch.empty(3, 0, dtype=torch.float32, device=self.device)
        self._colors = torch.empty(0, 3, dtype=torch.uint8, device=self.device)
        self._frame = torch.empty(0, dtype=torch.int32, device=self.device)
        self._confidence = torch.empty(0, dtype=torch.float32, device=self.device)
        self._renderers: dict[tuple[int, int], PointRenderer] = {}

    # ----------------------------------------------------------------- storage
    def __len__(self) -> int:
        return self._n

    @property
    def stamp(self) -> tuple[int, int]:
        """(point count, removal generation): a render made at this stamp can be updated by
        rendering only the points added since, as long as the generation is unchanged."""
        return self._n, self._generation

    @property
    def positions_world(self) -> torch.Tensor:
        """(N, 3) float32 world positions (a view; do not write through it)."""
        return self._rows[:, : self._n].T

    @property
    def colors(self) -> torch.Tensor:
        """(N, 3) uint8 RGB."""
        return self._colors[: self._n]

    @property
    def frame_index(self) -> torch.Tensor:
        """(N,) int32 index of the frame each point came from."""
        return self._frame[: self._n]

    @property
    def confidence(self) -> torch.Tensor:
        """(N,) float32 confidence."""
        return self._confidence[: self._n]

    def _reserve(self, n: int) -> None:
        capacity = self._rows.shape[1]
        if n <= capacity:
            return
        new_capacity = max(n, capacity + capacity // 2, 1024)

        def grow(old: torch.Tensor, shape: tuple[int, ...], dim: int) -> torch.Tensor:
            new = torch.empty(shape, dtype=old.dtype, device=self.device)
            new.narrow(dim, 0, self._n).copy_(old.narrow(dim, 0, self._n))
            return new

        self._rows = grow(self._rows, (3, new_capacity), 1)
        self._colors = grow(self._colors, (new_capacity, 3), 0)
        self._frame = grow(self._frame, (new_capacity,), 0)
        self._confidence = grow(self._confidence, (new_capacity,), 0)

    def restore(self, positions_world: torch.Tensor, colors: torch.Tensor, frame_index: torch.Tensor,
                confidence: torch.Tensor, generation: int) -> None:
        """Fill an empty memory with saved points and the removal generation of the saved
        memory, so stamps taken before the save stay comparable (a resumed run)."""
        if self._n:
            raise ValueError("restore() needs an empty memory")
        self.add_points(positions_world, colors, frame_index, confidence)
        self._generation = int(generation)

    def add_points(
        self,
        positions_world: torch.Tensor,
        colors: torch.Tensor,
        frame_index: int | torch.Tensor,
        confidence: float | torch.Tensor,
    ) -> None:
        """Append (M, 3) positions and (M, 3) uint8 colours (no visibility test)."""
        m = positions_world.shape[0]
        if m == 0:
            return
        self._reserve(self._n + m)
        sl = slice(self._n, self._n + m)
        self._rows[:, sl] = positions_world.to(self.device, torch.float32).T
        self._colors[sl] = colors.to(self.device, torch.uint8)
        self._frame[sl] = torch.as_tensor(frame_index, dtype=torch.int32).to(self.device)
        self._confidence[sl] = torch.as_tensor(confidence, dtype=torch.float32).to(self.device)
        self._n += m

    def _keep(self, index: torch.Tensor) -> None:
        """Keep only the points at ``index`` (sorted int64), in that order."""
        m = index.numel()
        self._rows[:, :m] = self._rows[:, index]
        self._colors[:m] = self._colors[index]
        self._frame[:m] = self._frame[index]
        self._confidence[:m] = self._confidence[index]
        self._n = m
        self._generation += 1

    # -------------------------------------------------------------- rendering
    def renderer(self, width: int, height: int) -> PointRenderer:
        key = (width, height)
        if key not in self._renderers:
            self._renderers[key] = PointRenderer(width, height, self.splat_radius_px)
        return self._renderers[key]

    def render(self, c2w_opencv: torch.Tensor, intrinsics: torch.Tensor, width: int, height: int) -> RenderOutput:
        """Render along (B, 4, 4) cameras with (B, 4) intrinsics; see :class:`RenderOutput`."""
        return self.renderer(width, height).render(self.positions_world, self.colors, c2w_opencv, intrinsics)

    # ------------------------------------------------------------------ fusing
    @classmethod
    def from_rgbd(
        cls,
        rgb: torch.Tensor,
        depth_z_m: torch.Tensor,
        c2w_opencv: torch.Tensor,
        intrinsics: torch.Tensor,
        frame_index: int = 0,
        confidence: float = 1.0,
        **kwargs,
    ) -> "PointMemory":
        """A memory lifted from one RGB-D image: (H, W, 3) uint8, (H, W) z-depth (0/inf/NaN = none)."""
        memory = cls(**kwargs)
        memory.add_rgbd(rgb, depth_z_m, c2w_opencv, intrinsics, frame_index, confidence)
        return memory

    def add_rgbd(
        self,
        rgb: torch.Tensor,
        depth_z_m: torch.Tensor,
        c2w_opencv: torch.Tensor,
        intrinsics: torch.Tensor,
        frame_index: int,
        confidence: float | torch.Tensor = 1.0,
        where: torch.Tensor | None = None,
    ) -> int:
        """Append every pixel with a valid depth (and ``where`` True); returns the count."""
        depth = depth_z_m.to(self.device, torch.float32)
        valid = depth > 0  # NaN fails this too
        valid &= depth < float("inf")
        if where is not None:
            valid &= where.to(self.device)
        rows, cols = torch.nonzero(valid, as_tuple=True)
        points = unproject_pixels(rows, cols, depth[rows, cols], c2w_opencv, intrinsics)
        conf = torch.as_tensor(confidence, dtype=torch.float32, device=self.device)
        if conf.dim() == 2:
            conf = conf[rows, cols]
        self.add_points(points, rgb.to(self.device)[rows, cols], frame_index, conf)
        self.enforce_budget()
        return int(rows.numel())

    def render_update(
        self, prior: RenderOutput, prior_points: int, c2w_opencv: torch.Tensor, intrinsics: torch.Tensor
    ) -> RenderOutput:
        """Bring a one-camera render made when the memory had ``prior_points`` points up to date.

        Only the points added since are rendered and composited in front of
        ``prior`` (same camera, (1, H, W) tensors): the result equals a full
        render (up to ties) at the cost of the new points. Valid only if no
        point was removed since (the budget did not trigger).
        """
        _, height, width = prior.mask.shape
        if prior_points >= self._n:
            return prior
        rows = self._rows[:, prior_points : self._n]
        new = self.renderer(width, height).render(rows.T, self._colors[prior_points : self._n], c2w_opencv[None], intrinsics[None])
        front = new.mask & (~prior.mask | (new.depth_z_m < prior.depth_z_m))
        return RenderOutput(
            rgb=torch.where(front[..., None], new.rgb, prior.rgb),
            depth_z_m=torch.where(front, new.depth_z_m, prior.depth_z_m),
            mask=prior.mask | new.mask,
            point_index=torch.where(front, new.point_index + prior_points, prior.point_index),
        )

    def fuse(
        self,
        rgb: torch.Tensor,
        depth_z_m: torch.Tensor,
        c2w_opencv: torch.Tensor,
        intrinsics: torch.Tensor,
        frame_index: int,
        confidence: float | torch.Tensor = 0.5,
        relative_tolerance: float = 0.03,
        prior: tuple[RenderOutput, tuple[int, int]] | None = None,
    ) -> FuseStats:
        """Fuse one frame, adding only what the memory does not already explain.

        rgb: (H, W, 3) uint8; depth_z_m: (H, W); c2w_opencv: (4, 4); intrinsics: (4,).
        confidence: scalar or (H, W) per-pixel confidence of the new depth.
        prior: ``(render, stamp)``: this camera's (1, H, W) render made earlier
        when :attr:`stamp` was ``stamp``, to update instead of rendering afresh
        (see :meth:`render_update`); ignored if points were removed since.
        A pixel is explained when the memory's render there is visible and its
        depth agrees within ``relative_tolerance`` with the new depth (of the
        pixel or of its splat-radius neighbours); explained points gain
        confidence, the other pixels with a valid depth become new points.
        """
        height, width = depth_z_m.shape
        depth = depth_z_m.to(self.device, torch.float32)
        valid = torch.isfinite(depth) & (depth > 0)
        confirmed = 0
        if self._n > 0:
            if prior is not None and prior[1][1] == self._generation and prior[1][0] <= self._n:
                seen = self.render_update(prior[0], prior[1][0], c2w_opencv, intrinsics)
            else:
                seen = self.render(c2w_opencv[None], intrinsics[None], width, height)
            mem_depth = seen.depth_z_m[0]
            # A splatted point covers pixels up to r away, so it explains a pixel
            # when its depth lies within the new depths of that neighbourhood.
            low, high = _neighbourhood_range(depth, valid, self.splat_radius_px)
            agree = (
                seen.mask[0]
                & valid
                & (mem_depth >= low * (1 - relative_tolerance))
                & (mem_depth <= high * (1 + relative_tolerance))
            )
            # Re-observed points gain the observation's confidence (once per point).
            points = seen.point_index[0][agree]
            if points.numel():
                observed = torch.zeros(self._n, dtype=torch.bool, device=self.device)
                observed[points] = True
                conf = torch.as_tensor(confidence, dtype=torch.float32, device=self.device)
                gain = conf.max() if conf.dim() else conf
                self._confidence[: self._n] += observed.to(torch.float32) * gain
                confirmed = int(observed.sum())
            new = valid & ~agree
        else:
            new = valid
        added = self.add_rgbd(rgb, depth, c2w_opencv, intrinsics, frame_index, confidence, where=new)
        return FuseStats(added=added, confirmed=confirmed)

    # ------------------------------------------------------------------ budget
    def enforce_budget(self, headroom: float = 0.9) -> None:
        """Voxel-downsample when over ``max_points``, to at most ``headroom * max_points``.

        The headroom keeps a memory at its budget from re-downsampling on every fused frame.
        """
        if self.max_points is None or self._n <= self.max_points:
            return
        target = max(int(self.max_points * headroom), 1)
        positions = self.positions_world
        extent = (positions.max(0).values - positions.min(0).values).clamp_min(1e-6)
        # Start at the voxel size that would hold the target on surface-like
        # content (count ~ (extent / voxel)^2) and grow until it fits.
        voxel = float(extent.prod() ** (1 / 3)) / (target ** 0.5)
        while True:
            keep = self.voxel_representatives(voxel)
            if keep.numel() <= target:
                break
            voxel *= 1.25
        self._keep(keep)

    def voxel_representatives(self, voxel_m: float) -> torch.Tensor:
        """Sorted indices of the most confident point per ``voxel_m`` cube (ties: lowest index)."""
        positions = self.positions_world
        cells = torch.floor((positions - positions.min(0).values) / voxel_m).to(torch.int64)
        cells = cells.clamp_(0, (1 << 21) - 1)
        cell_id = (cells[:, 0] << 42) | (cells[:, 1] << 21) | cells[:, 2]
        _, inverse = torch.unique(cell_id, return_inverse=True)
        n = self._n
        index = torch.arange(n, dtype=torch.int64, device=self.device)
        # Higher confidence first, then lower index: pack both into one maximum.
        conf_bits = self.confidence.clamp_min(0).view(torch.int32).to(torch.int64)
        score = (conf_bits << 32) | ((1 << 32) - 1 - index)
        best = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.int64, device=self.device)
        best.scatter_reduce_(0, inverse, score, reduce="amax", include_self=True)
        winners = (1 << 32) - 1 - (best & ((1 << 32) - 1))
        return torch.sort(winners).values

    # ------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike) -> None:
        """Write the memory to ``path`` (.npz), atomically (temp file + rename)."""
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                version=np.int32(MEMORY_FILE_VERSION),
                positions_world=self.positions_world.cpu().numpy(),
                colors=self.colors.cpu().numpy(),
                frame_index=self.frame_index.cpu().numpy(),
                confidence=self.confidence.cpu().numpy(),
            )

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> "PointMemory":
        """Read a memory written by :meth:`save`."""
        from ...bridge.errors import KeyframeWorldsError

        try:
            data = np.load(path)
            version = int(data["version"])
        except (OSError, ValueError, KeyError) as exc:
            raise KeyframeWorldsError(f"{path}: not a memory file ({exc})") from exc
        if version != MEMORY_FILE_VERSION:
            raise KeyframeWorldsError(f"{path}: memory file version {version}, expected {MEMORY_FILE_VERSION}")
        memory = cls(**kwargs)
        memory.add_points(
            torch.from_numpy(data["positions_world"]),
            torch.from_numpy(data["colors"]),
            torch.from_numpy(data["frame_index"]),
            torch.from_numpy(data["confidence"]),
        )
        return memory
