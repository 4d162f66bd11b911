"""A point cloud as the memory's first content: ``reference.points`` (a scan, photogrammetry, a previous bundle).

The seed is a PLY file or a COLMAP model folder, read by ``bridge/seed.py``, in the trajectories' world frame. Its
points go into the memory before the reference is lifted, as frame 0 with confidence ``SEED_CONFIDENCE``, so the generator
continues the scanned location; the memory's point budget holds (voxel downsampling keeps the most confident point).

Without a reference depth, the reference is lifted at the seed's depth where the seed covers it (the seed
rendered at the reference camera), so it lines up with the scan instead of becoming a flat board.
"""

from __future__ import annotations

import numpy as np
import torch

from ...bridge.seed import SeedPoints, read_seed_points
from ..world.memory import PointMemory

__all__ = ["SEED_CONFIDENCE", "SeedPoints", "read_seed_points", "seed_depth_at", "seed_memory"]

#: A measured scan is trusted like a given reference depth.
SEED_CONFIDENCE = 1.0


def seed_memory(memory: PointMemory, seed: SeedPoints) -> int:
    """Put the seed's points into ``memory`` (frame 0, ``SEED_CONFIDENCE``), keeping its budget; returns how many stayed."""
    memory.add_points(torch.from_numpy(seed.positions_world), torch.from_numpy(seed.colors), 0, SEED_CONFIDENCE)
    memory.enforce_budget()
    return len(memory)


def seed_depth_at(memory: PointMemory, c2w_opencv: torch.Tensor, k: torch.Tensor, width: int, height: int) -> np.ndarray:
    """(H, W) float32 z-depth in metres of the memory's points at one camera (0 where it has none)."""
    rendered = memory.render(c2w_opencv[None], k[None], width, height)
    depth = torch.where(rendered.mask[0], rendered.depth_z_m[0], torch.zeros_like(rendered.depth_z_m[0]))
    return depth.to(torch.float32).cpu().numpy()
