"""The ``preview`` generator: the memory rendered along the cameras, holes filled classically.

No weights and no GPU needed. Each frame is the memory's render; its holes
(disocclusions and content the memory never saw) get a far-biased depth
completion and then a depth-guided colour fill (``inpaint``), so they take
the colour of the background around them. The filled pixels are lifted to 3D
into a segment-local scratch cloud that later frames render too: a hole that
persists over several frames is filled once and then seen from the moving
camera, which keeps it stable instead of re-inventing it every frame.

It is a geometric previs, and says so (``label``).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..world.depth import DepthEstimate, MemoryDepthCompletion
from ..world.inpaint import fill_rgb
from ..world.memory import PointMemory
from .base import Generator, SegmentRequest, SegmentResult
from .options import parse_preview_options

PREVIEW_LABEL = "geometric preview: the 3D memory rendered along the cameras with classically inpainted holes (no learned model)"


class PreviewGenerator(Generator):
    """See the module docstring.

    segment_length: frames per segment. temporal: reuse fills through the
    scratch cloud (True) or fill every frame on its own. depth_sigma: relative
    depth difference at which the colour fill stops trusting a neighbour.
    filled_confidence: confidence reported for filled pixels' depth.
    """

    name = "preview"
    label = PREVIEW_LABEL
    uses_references = False

    def __init__(self, segment_length: int = 16, temporal: bool = True, depth_sigma: float = 0.05, filled_confidence: float = 0.3):
        if segment_length < 1:
            raise ValueError("segment_length must be >= 1")
        self.segment_length = segment_length
        self.temporal = temporal
        self.depth_sigma = depth_sigma
        self.filled_confidence = filled_confidence
        self.completion = MemoryDepthCompletion(completed_confidence=filled_confidence)

    @classmethod
    def from_options(cls, options: dict) -> "PreviewGenerator":
        """Configured by a job's options (checked: :class:`ValidationError` with every problem)."""
        return cls(**parse_preview_options(options))

    def generate(self, request: SegmentRequest, on_frame: Callable[[int], None] | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> SegmentResult:
        # frame by frame: on_frame is the progress; there are no steps within a frame (on_step unused)
        rendered = request.rendered
        count, height, width = rendered.mask.shape
        device = rendered.mask.device
        scratch = PointMemory(device=device, max_points=None, splat_radius_px=request.memory.splat_radius_px)
        rgb_out = torch.empty(count, height, width, 3, dtype=torch.uint8, device=device)
        depth_out = torch.empty(count, height, width, dtype=torch.float32, device=device)
        conf_out = torch.empty(count, height, width, dtype=torch.float32, device=device)
        for t in range(count):
            rgb, depth, mask = rendered.rgb[t], rendered.depth_z_m[t], rendered.mask[t]
            from_memory = mask
            if self.temporal and len(scratch):
                fill = scratch.render(request.c2w_opencv[t : t + 1], request.intrinsics[t : t + 1], width, height)
                # Earlier fills show only where the memory has nothing: real content wins.
                use = fill.mask[0] & ~mask
                rgb = torch.where(use[..., None], fill.rgb[0], rgb)
                depth = torch.where(use, fill.depth_z_m[0], depth)
                mask = mask | use
            holes = ~mask
            if bool(holes.any()):
                depth = self.completion.complete(depth[None], mask[None])[0]
                rgb = fill_rgb(rgb[None], mask[None], depth[None], depth_sigma=self.depth_sigma)[0]
                if self.temporal:
                    scratch.add_rgbd(rgb, depth, request.c2w_opencv[t], request.intrinsics[t], frame_index=-1,
                                     confidence=self.filled_confidence, where=holes)
            rgb_out[t], depth_out[t] = rgb, depth
            conf_out[t] = torch.where(from_memory, 1.0, self.filled_confidence)
            if on_frame is not None:
                on_frame(t)
        return SegmentResult(rgb=rgb_out, depth=DepthEstimate(depth_z_m=depth_out, confidence=conf_out))


