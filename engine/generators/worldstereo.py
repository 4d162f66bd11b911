"""The ``worldstereo`` generator: WorldStereo video diffusion conditioned on the 3D memory.

A segment of ``T`` cameras (the runner cuts trajectories into segments of
``segment_length`` frames, renders the memory along them, retrieves earlier
frames, and fuses what comes back into the memory afterwards, with depth from
the geometry module's estimator) becomes:

1. Keyframes: the model makes ``F`` keyframes, as it was trained to (81
   video frames, every 4th a keyframe: ``keyframes`` 21, ``keyframe_stride``
   4, so ``segment_length`` 81). A shorter last segment gets
   ``ceil((T - 1) / stride) + 1`` keyframes spread evenly over it.
2. Conditions at the generation size (the size map entry closest to the
   trajectory's aspect ratio, or ``size``): the memory rendered along the
   keyframe cameras (RGB and hole mask), Pluecker maps of those cameras, and
   as the image condition keyframe 0's render with its few holes filled
   classically (for the first segment at the reference camera that is the
   reference image; later segments start next to frames already fused).
   Memory variants also get the retrieved earlier frames, each attached to
   the first keyframe it is the best match of (the reference memory bank's
   rule), with their cameras as pose vectors.
3. The pipeline generates the keyframes; they are resized to the
   trajectory's size.
4. In-between frames (when ``keyframe_stride`` > 1): the two keyframes around
   a frame are lifted to 3D with the depth estimator and rendered along its
   camera; what they do not cover comes from the memory render, and what
   neither covers is filled classically. Every output frame is therefore
   either generated or re-projected from generated keyframes.

Progress: ``on_step(step, steps)`` after every denoising step of the segment's
keyframes, ``on_frame`` once all its frames are assembled. ``on_step`` is also
where the runner cancels, so a cancelled job stops between two steps.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...bridge.errors import KeyframeWorldsError
from ..world.depth import MemoryDepthCompletion
from ..world.inpaint import fill_rgb
from ..world.memory import PointMemory
from ..world.cameras import rescale_intrinsics_vec
from ..world.render import RenderOutput
from .base import Generator, SegmentRequest, SegmentResult
from .options import parse_worldstereo_options

def segment_keyframes(count: int, keyframes: int, stride: int) -> np.ndarray:
    """Keyframe positions in a segment of ``count`` frames: ``ceil((count - 1) / stride) + 1`` of them
    (at most ``keyframes``, at least 2 when the segment has 2 frames), evenly spread, first and last included."""
    if count == 1:
        return np.zeros(1, dtype=int)
    n = min(keyframes, math.ceil((count - 1) / stride) + 1, count)
    return np.linspace(0, count - 1, max(n, 2), dtype=int)


def _resize_uint8(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, h, w, 3) uint8 -> (N, H, W, 3) uint8, bicubic (antialiased when shrinking)."""
    if frames.shape[1:3] == (height, width):
        return frames
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False,
                      antialias=height < frames.shape[1] or width < frames.shape[2])
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _segment_seed(seed: int, request: SegmentRequest) -> int:
    """A per-segment seed: the job seed, the segment's first camera and its position."""
    first = request.c2w_opencv[0].detach().cpu().to(torch.float64).numpy().tobytes()
    return (int(seed) * 1_000_003 + zlib.crc32(first) + int(request.frame_offset)) % (2**63 - 1)


class WorldStereoGenerator(Generator):
    """See the module docstring. Build with :meth:`from_options` (loads the model) or around a pipeline."""

    name = "worldstereo"
    uses_references = True

    def __init__(self, pipeline, keyframes: int = 21, keyframe_stride: int = 4, size: tuple[int, int] | None = None,
                 steps: int | None = None, guidance_scale: float | None = None, negative_prompt: str | None = None):
        if pipeline.is_dmd:  # say so when the job is set up, not after the first segment's encodes
            if steps is not None and steps != pipeline.default_steps():
                raise KeyframeWorldsError(f"options.steps: {pipeline.variant} is distilled for "
                                          f"{pipeline.default_steps()} steps, got {steps}")
            if guidance_scale is not None and guidance_scale > 1:
                raise KeyframeWorldsError(f"options.guidance_scale: {pipeline.variant} runs without guidance, "
                                          f"got {guidance_scale}")
            guidance_scale = None
        self.pipeline = pipeline
        self.keyframes = keyframes
        self.keyframe_stride = keyframe_stride
        self.segment_length = (keyframes - 1) * keyframe_stride + 1
        self.retrieval_every = keyframe_stride  # keyframes are generated; the frames between are re-projected
        self.size = size
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.uses_references = pipeline.is_memory
        self.depth = MemoryDepthCompletion()
        steps_text = f"{steps or pipeline.default_steps()} steps"
        self.label = (f"WorldStereo ({pipeline.variant}, {steps_text}): camera- and memory-conditioned video diffusion "
                      f"on Wan2.1 image-to-video; every {keyframe_stride}th frame generated, the frames between "
                      f"re-projected from them" if keyframe_stride > 1 else
                      f"WorldStereo ({pipeline.variant}, {steps_text}): camera- and memory-conditioned video diffusion "
                      "on Wan2.1 image-to-video; every frame generated")

    @classmethod
    def from_options(cls, options: dict, device: "str | torch.device | None" = None) -> "WorldStereoGenerator":
        """Build the pipeline (this loads the weights). ``device``: the worker's device, which every
        part of the pipeline is built on; a job's ``options.device`` may only repeat it (or say ``auto``).
        Without ``device``, ``options.device`` decides (``auto``: CUDA when present)."""
        opts = parse_worldstereo_options(options)
        from ..pipelines.worldstereo import WorldStereoPipeline  # diffusers/transformers load here

        if device is not None:
            device = torch.device(device)
            if opts.device != "auto" and torch.device(opts.device) != device:
                raise KeyframeWorldsError(f"options.device: the job asks for {opts.device}, but it runs on the worker "
                                          f"for {device}; leave it 'auto' (or submit to an engine serving {opts.device})")
        elif opts.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(opts.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise KeyframeWorldsError(f"options.device: {device} was asked for, but this engine sees no CUDA GPU")
        dtype = None if opts.dtype == "auto" else getattr(torch, opts.dtype)
        pipeline = WorldStereoPipeline.from_pretrained(opts.checkpoint, opts.wan_dir, device=device, dtype=dtype,
                                                       offload=opts.offload, expect_variant=opts.variant,
                                                       companions_dir=opts.wan_dir, clip_pixels=opts.clip_pixels,
                                                       attention=opts.attention, weights_storage=opts.weights_storage,
                                                       batched_guidance=opts.batched_guidance)
        return cls(pipeline, keyframes=opts.keyframes, keyframe_stride=opts.keyframe_stride, size=opts.size,
                   steps=opts.steps, guidance_scale=opts.guidance_scale, negative_prompt=opts.negative_prompt)

    # ------------------------------------------------------------------------------------------
    def generation_size(self, height: int, width: int) -> tuple[int, int]:
        from ..pipelines.prep import assign_generation_size

        if self.size is not None:
            return self.size
        return assign_generation_size(height, width, self.pipeline.transformer.variant.extra.get("scale_map"))

    def _condition_image(self, render: RenderOutput) -> torch.Tensor:
        """Keyframe 0's render, holes filled: (H, W, 3) uint8."""
        rgb, mask, depth = render.rgb[0], render.mask[0], render.depth_z_m[0]
        if bool(mask.all()):
            return rgb
        depth = self.depth.complete(depth[None], mask[None], rgb[None])[0]
        return fill_rgb(rgb[None], mask[None], depth[None])[0]

    def generate(self, request: SegmentRequest, on_frame: Callable[[int], None] | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> SegmentResult:
        from ..pipelines.prep import Reference, attach_references, prepare_conditions

        count, height0, width0 = request.rendered.mask.shape
        out_device = request.rendered.rgb.device
        keys = segment_keyframes(count, self.keyframes, self.keyframe_stride)
        if self.pipeline.is_memory and len(keys) < 2:
            keys = np.array([0, 0])  # a one-frame segment: the model needs two keyframes; the second is a repeat
        height, width = self.generation_size(height0, width0)
        index = torch.as_tensor(keys, dtype=torch.long)
        c2w = request.c2w_opencv.to(torch.float64)
        intr_gen = rescale_intrinsics_vec(request.intrinsics.to(torch.float64)[index], (width0, height0), (width, height))
        render = request.memory.render(c2w[index], intr_gen, width, height)
        image = self._condition_image(render)
        references = []
        if self.pipeline.is_memory and request.references:
            for r, attach_to in attach_references(request.pairs, keys):
                frame = request.references[r]
                references.append(Reference(frame.rgb, frame.c2w_opencv, attach_to))
        cond = prepare_conditions(image, render.rgb, render.mask, c2w[index], intr_gen, (width, height), height, width,
                                  memory=self.pipeline.is_memory, references=references)
        out = self.pipeline(cond, prompt=request.prompt, negative_prompt=self.negative_prompt, steps=self.steps,
                            guidance_scale=self.guidance_scale, seed=_segment_seed(request.seed, request),
                            callback=on_step)
        key_rgb = _resize_uint8(out.frames, height0, width0).to(out_device)
        rgb = self._assemble(request, keys, key_rgb)
        if on_frame is not None:
            on_frame(count - 1)
        return SegmentResult(rgb=rgb)

    def _assemble(self, request: SegmentRequest, keys: np.ndarray, key_rgb: torch.Tensor) -> torch.Tensor:
        """All ``T`` frames: keyframes as generated, the frames between re-projected from their two keyframes."""
        rendered = request.rendered
        count, height, width = rendered.mask.shape
        device = key_rgb.device
        rgb = torch.empty(count, height, width, 3, dtype=torch.uint8, device=device)
        unique = sorted(set(int(k) for k in keys))
        first_of = {int(k): i for i, k in reversed(list(enumerate(keys)))}
        for k in unique:
            rgb[k] = key_rgb[first_of[k]]
        if len(unique) == count:
            return rgb
        pick = [first_of[k] for k in unique]
        sub = RenderOutput(rendered.rgb[unique], rendered.depth_z_m[unique], rendered.mask[unique],
                           rendered.point_index[unique])
        estimator = request.depth or self.depth  # the job's learned depth when it has one
        key_depth = estimator.estimate(key_rgb[pick].to(rendered.rgb.device), sub,
                                       intrinsics=request.intrinsics[unique].to(torch.float32)).depth_z_m
        c2w = request.c2w_opencv.to(torch.float64)
        intr = request.intrinsics.to(torch.float64)
        for a, b in zip(range(len(unique) - 1), range(1, len(unique))):
            ka, kb = unique[a], unique[b]
            if kb - ka < 2:
                continue
            scratch = PointMemory(device=rendered.rgb.device, max_points=None,
                                  splat_radius_px=request.memory.splat_radius_px)
            for j, k in ((a, ka), (b, kb)):
                scratch.add_rgbd(key_rgb[pick[j]].to(rendered.rgb.device), key_depth[j], c2w[k], intr[k], frame_index=-1)
            between = list(range(ka + 1, kb))
            warped = scratch.render(c2w[between], intr[between], width, height)
            for n, t in enumerate(between):
                own = warped.mask[n]
                frame = torch.where(own[..., None], warped.rgb[n], rendered.rgb[t])
                depth = torch.where(own, warped.depth_z_m[n], rendered.depth_z_m[t])
                covered = own | rendered.mask[t]
                if not bool(covered.all()):
                    depth = self.depth.complete(depth[None], covered[None], frame[None])[0]
                    frame = fill_rgb(frame[None], covered[None], depth[None])[0]
                rgb[t] = frame.to(device)
        return rgb
