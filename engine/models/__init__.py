"""The WorldStereo networks, one file per network.

- ``wan_transformer``: the Wan2.1 I2V backbone (diffusers' parameter names).
- ``control_branch``: the control branch and its mask/camera embedding.
- ``stereo_memory``: the spatial-stereo memory attention and block.
- ``worldstereo``: the variants (camera; memory and memory-dmd) and their config.
- ``camera``: camera normalisation, Pluecker maps, pose vectors.
- ``dmd_scheduler``: the distilled variant's few-step schedule.
- ``attention``: the attention backends (diffusers' dispatcher).
- ``weights``: variant folder + backbone weights (safetensors only), key checks, dtype casting.
- ``offload``: the offload modes (the block streamer of ``sequential``, the visits of ``model``) and float8 weight storage.
- ``budget``: the GPU memory each offload mode needs, and the check that refuses one that will not fit.
- ``memory_trace``: peak activation bytes of a forward, measured on the meta device (no GPU).
- ``hub``: where each model comes from on the Hugging Face Hub, downloads, and what is on this machine.
- ``commands``: ``keyframe-worlds model download / list / check / check-pipeline``.

This package imports without torch (the command line lists its commands
cheaply); the names below load their module on first use.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "load_worldstereo": "weights",
    "ModelPaths": "weights",
    "estimate_memory": "budget",
    "check_gpu_memory": "budget",
    "OFFLOAD_MODES": "offload",
    "WorldStereoConfig": "worldstereo",
    "WorldStereoCameraModel": "worldstereo",
    "WorldStereoMemoryModel": "worldstereo",
    "build_worldstereo": "worldstereo",
    "VARIANTS": "worldstereo",
    "WanTransformerConfig": "wan_transformer",
    "WanTransformer3DModel": "wan_transformer",
    "DMDScheduler": "dmd_scheduler",
    "DMDSchedulerConfig": "dmd_scheduler",
    "set_attention_backend": "attention",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
