"""The generator interface: one segment of cameras in, frames (and optionally their depth) out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..world.depth import DepthEstimate, DepthEstimator
from ..world.memory import PointMemory
from ..world.render import RenderOutput

#: The runner keeps every 8th frame of a trajectory as a retrieval candidate unless a generator says otherwise.
RETRIEVAL_EVERY = 8


@dataclass(frozen=True)
class ReferenceFrame:
    """A retrieved earlier frame (spatial-stereo memory input).

    rgb: (H, W, 3) uint8; depth_z_m: (H, W); c2w_opencv: (4, 4); intrinsics: (4,)
    in pixels of that size. ``key`` is (trajectory name, frame number).
    """

    key: tuple[str, int]
    rgb: torch.Tensor
    depth_z_m: torch.Tensor
    c2w_opencv: torch.Tensor
    intrinsics: torch.Tensor


@dataclass
class SegmentRequest:
    """Everything a generator gets for one segment of ``T`` frames of ``height x width``.

    c2w_opencv: (T, 4, 4); intrinsics: (T, 4) fx, fy, cx, cy in pixels.
    rendered: the memory rendered along these cameras (RGB, z-depth, mask).
    references: retrieved earlier frames; pairs: (T,) index into references of
    each frame's best reference (-1: none).
    memory: the global-geometric memory (read it, do not change it).
    frame_offset: index of the segment's first frame within its trajectory.
    depth: the job's learned depth estimator, for frames a generator makes by re-projection (None: its own).
    """

    c2w_opencv: torch.Tensor
    intrinsics: torch.Tensor
    width: int
    height: int
    rendered: RenderOutput
    memory: PointMemory
    references: list[ReferenceFrame] = field(default_factory=list)
    pairs: torch.Tensor | None = None
    prompt: str = ""
    seed: int = 0
    frame_offset: int = 0
    depth: DepthEstimator | None = None


@dataclass
class SegmentResult:
    """rgb: (T, H, W, 3) uint8 frames; depth: their z-depth if the generator knows it (else estimated)."""

    rgb: torch.Tensor
    depth: DepthEstimate | None = None


class Generator(ABC):
    """Makes the frames of a segment.

    ``name`` is the job-spec name, ``label`` what the result manifest tells a
    person about the output, ``segment_length`` the native number of frames
    per call, ``uses_references`` whether retrieval is worth running for it,
    ``retrieval_every`` which frames the runner keeps as retrieval candidates.
    """

    name: str = "generator"
    label: str = ""
    segment_length: int = 16
    uses_references: bool = False
    #: Every this many frames of a trajectory one is kept for retrieval (the runner's cadence).
    retrieval_every: int = RETRIEVAL_EVERY

    @abstractmethod
    def generate(self, request: SegmentRequest, on_frame: Callable[[int], None] | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> SegmentResult:
        """Generate the segment.

        ``on_frame(i)``: call after frame ``i`` is final. ``on_step(step, steps)``: a generator
        that works on the whole segment at once (denoising) calls it after each of its ``steps``
        steps (1-based), so progress moves, and a cancel takes effect, before any frame is final.
        Either callback may raise to stop the segment (cancellation); let that propagate.
        """
