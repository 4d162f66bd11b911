"""WorldStereo pipelines: from keyframe cameras, memory render and retrieved frames to keyframe video.

- ``prep``: generation size, keyframe sub-sampling, cameras -> Pluecker maps and pose vectors,
  render and references -> the networks' tensors (torch/numpy only).
- ``components``: the Wan2.1 I2V companions (UMT5, CLIP, Wan VAE, UniPC) from a local folder.
- ``worldstereo``: :class:`WorldStereoPipeline`, the sampling loop for the three variants.
- ``check``: a pipeline case (the shared goldens' layout) run and compared key by key.

The names below load their module on first use (diffusers/transformers only when needed).
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "WorldStereoPipeline": "worldstereo",
    "PipelineOutput": "worldstereo",
    "SegmentConditions": "prep",
    "Reference": "prep",
    "prepare_conditions": "prep",
    "assign_generation_size": "prep",
    "keyframe_indices": "prep",
    "load_companions": "components",
    "WanCompanions": "components",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
