"""Classical hole filling: an edge-aware push-pull over an image pyramid.

Pull: halve the image repeatedly, each coarse pixel the weighted mean of the
valid fine pixels under it (and the mean of their guide values).
Push: from the coarsest level down, every fine pixel that has no value of its
own takes a bilinear blend of the four nearest coarse pixels, each weighted by
how much valid data it holds and by how close its guide is to the fine
pixel's guide (a joint-bilateral upsampling). Valid pixels keep their value
exactly. The cost is linear in the pixel count and the result is a
deterministic, smooth function of the surroundings, so a hole that moves a
little between frames is filled almost the same way.

The guide is what makes it edge-aware: filling colour with depth as the guide
takes the colour of neighbours at the hole's depth (the background behind a
disocclusion, not the foreground next to it); filling depth with colour as the
guide keeps depth edges where the colour edges are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _upsample_indices(fine: int, coarse: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each fine index: the two nearest coarse indices and the weight of the second."""
    centre = (torch.arange(fine, dtype=torch.float32, device=device) + 0.5) / 2 - 0.5
    lo = torch.floor(centre)
    frac = centre - lo
    lo = lo.to(torch.int64)
    return lo.clamp(0, coarse - 1), (lo + 1).clamp(0, coarse - 1), frac


def push_pull_fill(
    values: torch.Tensor,
    valid: torch.Tensor,
    guide: torch.Tensor | None = None,
    guide_sigma: float = 0.1,
    weight: torch.Tensor | None = None,
    min_size: int = 2,
    push_bias: float = 0.0,
) -> torch.Tensor:
    """Fill the invalid pixels of ``values`` from the valid ones.

    values: (B, C, H, W) float32. valid: (B, H, W) bool.
    guide: (B, G, H, W) float32 known at every pixel (None: plain push-pull).
    guide_sigma: guide distance (Euclidean over G) at which a coarse pixel's
    weight falls to 1/e.
    weight: (B, H, W) extra confidence of each valid pixel in the pull (e.g. to
    favour far depths); defaults to 1.
    push_bias: in the push, each coarse tap's weight is also multiplied by
    ``exp(push_bias * value[0])``: with log-depth as channel 0, a positive bias
    fills from the farther side of a hole's border (the background a
    disocclusion reveals) instead of blending it with the foreground edge.
    Returns (B, C, H, W): ``values`` where valid, filled elsewhere. Pixels stay
    0 only if the whole image is invalid.
    """
    w = valid.to(values.dtype)
    if weight is not None:
        w = w * weight
    w = w[:, None]
    levels = [(values * w, w, None if guide is None else guide)]
    # Pull: weighted means over 2x2 blocks until the image is tiny.
    while min(levels[-1][1].shape[-2:]) > min_size:
        vw, ww, g = levels[-1]
        vw_c = F.avg_pool2d(vw, 2, ceil_mode=True)
        ww_c = F.avg_pool2d(ww, 2, ceil_mode=True)
        g_c = None
        if g is not None:
            # The coarse guide describes the pixels that contributed values
            # (all pixels where none did).
            g_c = F.avg_pool2d(g * ww, 2, ceil_mode=True) / ww_c.clamp_min(1e-12)
            g_c = torch.where(ww_c > 0, g_c, F.avg_pool2d(g, 2, ceil_mode=True))
        levels.append((vw_c, ww_c, g_c))

    # The coarsest level: normalise, and fall back to the global mean where empty.
    vw, ww, _ = levels[-1]
    filled = vw / ww.clamp_min(1e-12)
    total = ww.sum(dim=(-2, -1), keepdim=True)
    mean = vw.sum(dim=(-2, -1), keepdim=True) / total.clamp_min(1e-12)
    filled = torch.where(ww > 0, filled, mean.expand_as(filled))
    filled_w = torch.where(ww > 0, ww, torch.full_like(ww, 1e-6))

    inv_sigma_sq = 1.0 / (guide_sigma * guide_sigma)
    for level in range(len(levels) - 2, -1, -1):
        vw, ww, g = levels[level]
        g_coarse = levels[level + 1][2]
        h, w_ = vw.shape[-2:]
        hc, wc = filled.shape[-2:]
        y0, y1, fy = _upsample_indices(h, hc, vw.device)
        x0, x1, fx = _upsample_indices(w_, wc, vw.device)
        has_data = ww > 0
        own = torch.where(has_data, vw / ww.clamp_min(1e-12), 0.0)
        own_w = ww.clone()
        # Only pixels without data of their own are upsampled (holes are few).
        bi, yi, xi = torch.nonzero(~has_data[:, 0], as_tuple=True)
        if bi.numel():
            # Gather taps with flat indices into channel-last copies of the
            # (small) coarse level: much cheaper than 4-D advanced indexing.
            c = vw.shape[1]
            flat_v = filled.permute(0, 2, 3, 1).reshape(-1, c)
            flat_w = filled_w.reshape(-1)
            flat_g = None if g is None else g_coarse.permute(0, 2, 3, 1).reshape(-1, g_coarse.shape[1])
            g_fine = None if g is None else g.permute(0, 2, 3, 1)[bi, yi, xi]
            base = bi * (hc * wc)
            acc = torch.zeros(bi.numel(), c, dtype=vw.dtype, device=vw.device)
            acc_w = torch.zeros(bi.numel(), dtype=vw.dtype, device=vw.device)
            ref = flat_v[:, 0].max() if push_bias else None
            for ys, wy in ((y0, 1 - fy), (y1, fy)):
                for xs, wx in ((x0, 1 - fx), (x1, fx)):
                    tap = base + ys[yi] * wc + xs[xi]
                    tap_w = flat_w[tap] * wy[yi] * wx[xi]
                    if g_fine is not None:
                        dist = (g_fine - flat_g[tap]).square().sum(dim=1)
                        # The floor keeps a plain bilinear fill where no tap's guide is close.
                        tap_w = tap_w * (torch.exp(-dist * inv_sigma_sq) + 1e-6)
                    if push_bias:
                        tap_w = tap_w * (torch.exp(push_bias * (flat_v[tap, 0] - ref)) + 1e-12)
                    acc.addcmul_(flat_v[tap], tap_w[:, None])
                    acc_w += tap_w
            own[bi, :, yi, xi] = acc / acc_w.clamp_min(1e-30)[:, None]
            own_w[bi, 0, yi, xi] = acc_w.clamp(1e-6, 1e-3)
        filled, filled_w = own, own_w
    return torch.where(valid[:, None], values, filled)


def fill_rgb(rgb: torch.Tensor, valid: torch.Tensor, depth_z_m: torch.Tensor | None = None, depth_sigma: float = 0.05) -> torch.Tensor:
    """Inpaint the holes of RGB frames, guided by (filled) depth when given.

    rgb: (B, H, W, 3) uint8. valid: (B, H, W) bool. depth_z_m: (B, H, W) z-depth
    known everywhere (the guide compares log-depth, so ``depth_sigma`` is relative).
    Returns (B, H, W, 3) uint8 with valid pixels unchanged.
    """
    values = rgb.permute(0, 3, 1, 2).to(torch.float32)
    guide = None
    if depth_z_m is not None:
        guide = torch.log(depth_z_m.clamp_min(1e-6))[:, None]
    out = push_pull_fill(values, valid, guide=guide, guide_sigma=depth_sigma)
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def far_bias_weight(depth_z_m: torch.Tensor, valid: torch.Tensor, exponent: float) -> torch.Tensor:
    """(B, H, W) weights that grow with depth, normalised per frame so they stay finite."""
    log_d = torch.log(depth_z_m.clamp_min(1e-6))
    ref = torch.where(valid, log_d, torch.full_like(log_d, -math.inf)).flatten(1).max(dim=1).values
    ref = torch.where(torch.isfinite(ref), ref, torch.zeros_like(ref))
    return torch.exp(exponent * (log_d - ref[:, None, None]))
