"""The names job options and checkpoint folders use for the models (no torch, so option checks stay cheap).

Defined once here; the networks, pipelines and generators import them.
"""

from __future__ import annotations

CAMERA_VARIANT = "worldstereo-camera"
MEMORY_VARIANT = "worldstereo-memory"
MEMORY_DMD_VARIANT = "worldstereo-memory-dmd"
VARIANTS = (CAMERA_VARIANT, MEMORY_VARIANT, MEMORY_DMD_VARIANT)

#: How the conditioning image reaches CLIP: ``uint8`` feeds CLIP's normalisation 0-255 values (as the released
#: inference scripts do); ``unit`` divides by 255 first (CLIP's own convention).
CLIP_PIXELS = ("uint8", "unit")

#: Attention kernels a job can ask for (``attention`` option), all through diffusers' attention dispatcher:
#: ``native`` PyTorch's SDPA (the default; any device), ``cudnn`` SDPA's cuDNN kernel, ``flash`` the
#: flash-attn package, ``sage`` the sageattention package (the last three: CUDA, bf16/fp16). None of them
#: downloads kernels at run time (diffusers' ``*_hub`` backends, which do, are refused).
ATTENTION_BACKENDS = ("native", "cudnn", "flash", "sage")
DEFAULT_ATTENTION_BACKEND = "native"
