"""Depth for generated frames, behind one interface so a learned estimator can replace it.

The default, :class:`MemoryDepthCompletion`, needs no weights: where the
memory is visible the frame's depth is the memory's rendered depth; where it
is not (disocclusions, new content), the depth is completed from the visible
neighbours by an edge-aware push-pull (``inpaint.push_pull_fill``) guided by
the frame's colours and biased towards the farther neighbours, because what a
disocclusion reveals lies behind the edge that uncovered it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .inpaint import far_bias_weight, push_pull_fill
from .render import RenderOutput


@dataclass
class DepthEstimate:
    """``depth_z_m``: (T, H, W) float32 z-depth in metres, positive everywhere.
    ``confidence``: (T, H, W) float32 in [0, 1], how far to trust each pixel when fusing."""

    depth_z_m: torch.Tensor
    confidence: torch.Tensor


#: How far a surface is taken to be when nothing says (a reference without depth, a frame with nothing visible).
DEFAULT_DEPTH_M = 5.0


class DepthEstimator(ABC):
    """Estimates z-depth for generated frames; may use the memory's render along the same cameras.

    ``learned``: whether it brings geometry of its own (a depth network) rather than completing the
    memory's; the runner then asks it for every generated frame, even when the generator gives depth.
    """

    name: str = "depth"
    learned: bool = False

    @abstractmethod
    def estimate(self, rgb: torch.Tensor, rendered: RenderOutput, *, point_confidence: torch.Tensor | None = None,
                 intrinsics: torch.Tensor | None = None) -> DepthEstimate:
        """rgb: (T, H, W, 3) uint8 generated frames; rendered: the memory along their cameras;
        point_confidence: the memory's (N,) per-point confidences (``PointMemory.confidence``), for
        estimators that trust some points less; intrinsics: (T, 4) fx, fy, cx, cy for those that use a focal."""

    def reset(self) -> None:
        """A new trajectory starts: forget what was learnt along the previous one (default: nothing to forget)."""


class MemoryDepthCompletion(DepthEstimator):
    """Rendered memory depth where visible, edge-aware completion elsewhere.

    far_bias: exponent of the preference for farther neighbours in the holes
    (0: none). color_sigma: RGB distance (0-255 scale) at which a neighbour's
    colour stops counting as "the same surface". visible_confidence and
    completed_confidence are the confidences reported for the two kinds of
    pixel. fallback_depth_m is used for frames where nothing is visible.
    """

    name = "memory-completion"

    def __init__(
        self,
        far_bias: float = 8.0,
        color_sigma: float = 40.0,
        visible_confidence: float = 1.0,
        completed_confidence: float = 0.3,
        fallback_depth_m: float = DEFAULT_DEPTH_M,
    ):
        self.far_bias = far_bias
        self.color_sigma = color_sigma
        self.visible_confidence = visible_confidence
        self.completed_confidence = completed_confidence
        self.fallback_depth_m = fallback_depth_m

    def complete(self, depth_z_m: torch.Tensor, visible: torch.Tensor, rgb: torch.Tensor | None = None) -> torch.Tensor:
        """Fill (T, H, W) depth where ``visible`` is False; rgb (T, H, W, 3) uint8 guides when given."""
        visible = visible & (depth_z_m > 0) & torch.isfinite(depth_z_m)
        log_d = torch.log(torch.where(visible, depth_z_m, torch.ones_like(depth_z_m)))[:, None]
        guide = None
        if rgb is not None:
            guide = rgb.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        weight = far_bias_weight(depth_z_m, visible, self.far_bias) if self.far_bias else None
        filled = push_pull_fill(log_d, visible, guide=guide, guide_sigma=self.color_sigma / 255.0, weight=weight,
                                push_bias=self.far_bias)
        out = torch.where(visible, depth_z_m, torch.exp(filled[:, 0]))
        # A frame with nothing visible has nothing to complete from.
        empty = ~visible.flatten(1).any(dim=1)
        if bool(empty.any()):
            out[empty] = self.fallback_depth_m
        return out

    def estimate(self, rgb: torch.Tensor, rendered: RenderOutput, *, point_confidence: torch.Tensor | None = None,
                 intrinsics: torch.Tensor | None = None) -> DepthEstimate:
        depth = self.complete(rendered.depth_z_m, rendered.mask, rgb)
        confidence = torch.where(rendered.mask, float(self.visible_confidence), float(self.completed_confidence))
        return DepthEstimate(depth_z_m=depth, confidence=confidence)
