"""Render a coloured point cloud along cameras: RGB, z-depth and a visibility mask.

One code path for the CPU and CUDA (plain torch ops, no custom kernels), and
deterministic on both: the z-buffer is a single ``scatter_reduce(amin)`` over
64-bit keys that pack the point's z-depth (high 32 bits, the float's bit
pattern, which orders like the float for positive values) above the point's
index (low 32 bits). The minimum key per pixel is therefore the nearest point,
ties going to the lowest index, whatever order the hardware visits them in.

Splats: every point covers a square of ``(2r+1) x (2r+1)`` pixels at its own
depth. Because the footprint is the same for every point, the z-buffer of the
splats equals a min filter of the one-pixel z-buffer over that square, which
costs per pixel instead of per point (the filter runs on the packed keys, so
depth, winner index and tie-breaking all come out of the same minimum).

Conventions (DESIGN.md): cameras are camera-to-world in OpenCV axes (x right,
y down, z forward); intrinsics ``(fx, fy, cx, cy)`` in pixels with continuous
pixel coordinates, so pixel column ``i`` spans ``[i, i+1)`` and has its centre
at ``i + 0.5``; depth is z-depth in metres.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cameras import projection_matrices

EMPTY_KEY = torch.iinfo(torch.int64).max
_INDEX_BITS = 32
_INDEX_MASK = (1 << _INDEX_BITS) - 1


@dataclass
class RenderOutput:
    """What :func:`render_points` returns for ``B`` cameras of ``H x W`` pixels.

    ``rgb``: (B, H, W, 3) uint8, black where nothing is visible.
    ``depth_z_m``: (B, H, W) float32 z-depth in metres, 0 where nothing is visible.
    ``mask``: (B, H, W) bool, True where a point covers the pixel.
    ``point_index``: (B, H, W) int64 index of the visible point, -1 where none.
    """

    rgb: torch.Tensor
    depth_z_m: torch.Tensor
    mask: torch.Tensor
    point_index: torch.Tensor




class _Workspace:
    """Scratch tensors reused between calls (per-point and per-pixel).

    Fresh multi-megabyte tensors are page-faulted in on every call on the CPU,
    which costs as much as the arithmetic; reusing them halves a frame's time.
    """

    def __init__(self, n: int, width: int, height: int, device: torch.device):
        # Room for some growth, so a memory that gains points between renders
        # does not reallocate every time.
        n = max(n + n // 4, 1024)
        self.n, self.width, self.height, self.device = n, width, height, device
        self.uvz = torch.empty(3, n, dtype=torch.float32, device=device)
        self.key = torch.empty(n, dtype=torch.int64, device=device)
        self.pixel = torch.empty(n, dtype=torch.int64, device=device)
        self.column = torch.empty(n, dtype=torch.int64, device=device)
        self.inside = torch.empty(n, dtype=torch.bool, device=device)
        self.test = torch.empty(n, dtype=torch.bool, device=device)
        self.arange = torch.arange(n, dtype=torch.int64, device=device)
        self.zbuf = torch.empty(height * width + 1, dtype=torch.int64, device=device)
        self.rows = torch.empty(height, width, dtype=torch.int64, device=device)
        self.keys = torch.empty(height, width, dtype=torch.int64, device=device)
        self.empty = torch.empty(height, width, dtype=torch.bool, device=device)
        self.gather = torch.empty(height * width, dtype=torch.int64, device=device)

    def fits(self, n: int, width: int, height: int, device: torch.device) -> bool:
        return n <= self.n and (self.width, self.height, self.device) == (width, height, device)

    def points(self, n: int) -> tuple[torch.Tensor, ...]:
        """The per-point buffers cut to ``n``: uvz, key, pixel, column, inside, test, arange."""
        return (
            self.uvz[:, :n], self.key[:n], self.pixel[:n], self.column[:n],
            self.inside[:n], self.test[:n], self.arange[:n],
        )


def _rows_of(positions_world: torch.Tensor) -> torch.Tensor:
    """(N, 3) -> (3, N) contiguous float32, without a copy when it already is one."""
    rows = positions_world.T
    if rows.dtype != torch.float32 or rows.stride(1) != 1:
        rows = rows.to(torch.float32).contiguous()
    return rows


class PointRenderer:
    """Renders point clouds into ``height x width`` images; keeps scratch memory between calls.

    splat_radius_px: each point covers a ``(2r+1) x (2r+1)`` square at its own
    depth (0 = one pixel), which closes the holes between sparse points.
    near_m: points with z-depth at or below this are not drawn.
    """

    def __init__(self, width: int, height: int, splat_radius_px: int = 1, near_m: float = 1e-3):
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if splat_radius_px < 0:
            raise ValueError(f"splat_radius_px must be >= 0, got {splat_radius_px}")
        self.width = int(width)
        self.height = int(height)
        self.splat_radius_px = int(splat_radius_px)
        self.near_m = float(near_m)
        self._ws: _Workspace | None = None

    def _workspace(self, n: int, device: torch.device) -> _Workspace:
        if self._ws is None or not self._ws.fits(n, self.width, self.height, device):
            self._ws = None  # free the old one before allocating the new one
            self._ws = _Workspace(n, self.width, self.height, device)
        return self._ws

    def keys(self, positions_world: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
        """The packed z-buffer of one camera: (H, W) int64, ``EMPTY_KEY`` where empty.

        positions_world: (N, 3) float32, N < 2**32; fastest as the ``.T`` view
        of a contiguous (3, N) tensor (no copy then).
        projection: (3, 4) world-to-pixel matrix from :func:`projection_matrices`.
        The result is scratch memory, valid until the next call.
        """
        width, height = self.width, self.height
        n = positions_world.shape[0]
        if n >= 1 << _INDEX_BITS:
            raise ValueError("PointRenderer draws fewer than 2**32 points")
        rows = _rows_of(positions_world)
        device = rows.device
        ws = self._workspace(n, device)
        proj = projection.to(device=device, dtype=torch.float32)
        uvz, key, pixel, column, inside, test, arange = ws.points(n)
        # Row-wise (x, y, z each contiguous): streaming arithmetic, several
        # times faster than on (N, 3).
        torch.addmm(proj[:, 3:], proj[:, :3], rows, out=uvz)  # (3, N): u*z, v*z, z
        z = uvz[2]
        # Key = z bits above the point index; built before u, v overwrite uvz.
        key.copy_(z.view(torch.int32)).bitwise_left_shift_(_INDEX_BITS).bitwise_or_(arange)
        u = uvz[0].div_(z)
        v = uvz[1].div_(z)
        # NaN/inf (z == 0) fail every comparison, so they are dropped here too.
        torch.gt(z, self.near_m, out=inside)
        for values, limit in ((u, width), (v, height)):
            inside.logical_and_(torch.ge(values, 0.0, out=test))
            inside.logical_and_(torch.lt(values, float(limit), out=test))
        # Truncation equals floor for the kept points (u, v >= 0).
        pixel.copy_(v).mul_(width).add_(column.copy_(u))
        dump = height * width  # points that are not drawn land in one extra slot
        pixel.masked_fill_(torch.logical_not(inside, out=test), dump)
        zbuf = ws.zbuf.fill_(EMPTY_KEY)
        zbuf.scatter_reduce_(0, pixel, key, reduce="amin", include_self=True)
        keys = zbuf[:dump].view(height, width)
        r = self.splat_radius_px
        if r > 0:
            # Same footprint for every point: the splat z-buffer is a min filter
            # of the one-pixel z-buffer, separable into a row and a column pass.
            row_min = ws.rows.copy_(keys)
            for s in range(1, r + 1):
                torch.minimum(row_min[:, s:], keys[:, :-s], out=row_min[:, s:])
                torch.minimum(row_min[:, :-s], keys[:, s:], out=row_min[:, :-s])
            out = ws.keys.copy_(row_min)
            for s in range(1, r + 1):
                torch.minimum(out[s:], row_min[:-s], out=out[s:])
                torch.minimum(out[:-s], row_min[s:], out=out[:-s])
            keys = out
        return keys

    def render(
        self,
        positions_world: torch.Tensor,
        colors: torch.Tensor,
        c2w_opencv: torch.Tensor,
        intrinsics: torch.Tensor,
    ) -> RenderOutput:
        """Render points along a batch of cameras.

        positions_world: (N, 3) float32 world positions (Blender world, metres).
        colors: (N, 3) uint8 RGB.
        c2w_opencv: (B, 4, 4) or (4, 4) camera-to-world, OpenCV axes.
        intrinsics: (B, 4) or (4,) ``fx, fy, cx, cy`` in pixels of this size.
        Outputs live on the points' device.
        """
        if c2w_opencv.dim() == 2:
            c2w_opencv = c2w_opencv[None]
        if intrinsics.dim() == 1:
            intrinsics = intrinsics[None]
        width, height = self.width, self.height
        # One (3, N) copy for the whole batch unless the caller stores rows.
        positions_world = _rows_of(positions_world).T
        device = positions_world.device
        colors = colors.to(device)
        projections = projection_matrices(c2w_opencv.cpu(), intrinsics.cpu())
        b = projections.shape[0]
        rgb = torch.empty(b, height, width, 3, dtype=torch.uint8, device=device)
        depth = torch.empty(b, height, width, dtype=torch.float32, device=device)
        mask = torch.empty(b, height, width, dtype=torch.bool, device=device)
        index = torch.empty(b, height, width, dtype=torch.int64, device=device)
        for i in range(b):
            keys = self.keys(positions_world, projections[i])
            ws = self._ws
            m = torch.ne(keys, EMPTY_KEY, out=mask[i])
            empty = torch.logical_not(m, out=ws.empty)
            torch.bitwise_and(keys, _INDEX_MASK, out=index[i])
            index[i].masked_fill_(empty, -1)
            torch.bitwise_right_shift(keys, _INDEX_BITS, out=ws.rows)
            depth[i].view(torch.int32).copy_(ws.rows)
            depth[i].masked_fill_(empty, 0.0)
            if colors.shape[0] > 0:
                gather = torch.clamp_min(index[i].view(-1), 0, out=ws.gather)
                torch.index_select(colors, 0, gather, out=rgb[i].view(-1, 3))
                rgb[i].masked_fill_(empty[..., None], 0)
            else:
                rgb[i].zero_()
        return RenderOutput(rgb=rgb, depth_z_m=depth, mask=mask, point_index=index)


def render_points(
    positions_world: torch.Tensor,
    colors: torch.Tensor,
    c2w_opencv: torch.Tensor,
    intrinsics: torch.Tensor,
    width: int,
    height: int,
    splat_radius_px: int = 1,
    near_m: float = 1e-3,
) -> RenderOutput:
    """One-off :meth:`PointRenderer.render` (keep a :class:`PointRenderer` to render repeatedly)."""
    renderer = PointRenderer(width, height, splat_radius_px, near_m)
    return renderer.render(positions_world, colors, c2w_opencv, intrinsics)
