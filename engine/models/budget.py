"""GPU memory budget: what a generator needs per offload mode, and the check that refuses a mode that will not fit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from ...bridge.errors import KeyframeWorldsError
from .offload import OFFLOAD_MODES
from .weights import index_safetensors, parameter_bytes

if TYPE_CHECKING:  # torch stays out of import time for the CLI
    from .wan_transformer import WanTransformer3DModel

#: Parameter counts of the Wan2.1 I2V companions, used when no backbone folder is at hand:
#: UMT5-XXL encoder, CLIP ViT-H/14 vision tower, Wan VAE.
DEFAULT_AUX_PARAMS = {"text_encoder": 5_680_000_000, "image_encoder": 632_000_000, "vae": 127_000_000}
class InsufficientGPUMemoryError(KeyframeWorldsError):
    """The GPU has too little free memory for the requested offload mode."""


#: CUDA context, cuBLAS workspaces and allocator slack.
GPU_OVERHEAD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes the generator needs on the GPU, by part. Deliberately on the high side."""

    transformer_bytes: int
    largest_block_bytes: int
    resident_bytes: int  # everything of the transformer but its blocks (embeddings, head, control branch)
    aux_bytes: Mapping[str, int]
    activation_bytes: int

    def required(self, offload: str) -> int:
        if offload == "none":
            return self.transformer_bytes + sum(self.aux_bytes.values()) + self.activation_bytes + GPU_OVERHEAD_BYTES
        if offload == "model":
            return max(self.transformer_bytes + self.activation_bytes,
                       max(self.aux_bytes.values(), default=0)) + GPU_OVERHEAD_BYTES
        if offload == "sequential":
            # the non-block parts stay resident; two blocks in flight (one computing, one arriving);
            # the companions visit one at a time as with "model"
            return max(self.resident_bytes + 2 * self.largest_block_bytes + self.activation_bytes,
                       max(self.aux_bytes.values(), default=0)) + GPU_OVERHEAD_BYTES
        raise KeyframeWorldsError(f"unknown offload mode {offload!r}; expected one of {', '.join(OFFLOAD_MODES)}")


def _safetensors_param_count(folder: Path) -> int | None:
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = 0
    for ref in index_safetensors(files).values():
        count = 1
        for size in ref.shape:
            count *= size
        total += count
    return total


def estimate_memory(model: "WanTransformer3DModel", frames: int = 21, height: int = 480, width: int = 768,
                    num_refs: int = 8, base_dir: Path | None = None, aux_bytes_per_param: int = 2) -> MemoryEstimate:
    """GPU memory for one denoising forward of ``model`` (which may live on the meta device) at
    ``frames`` latent frames of ``height x width`` pixels with ``num_refs`` reference frames.

    Weights: the model's parameters at their dtypes; companions (text and image
    encoders, VAE) from ``base_dir``'s safetensors headers when given, else the
    Wan2.1 I2V sizes, at ``aux_bytes_per_param``. Activations: per token the
    residual stream, its float32 normalised copy, q/k/v and attention output, the
    MLP hidden layer twice, for target plus reference tokens; the control
    branch's residuals (one per control layer) and the pixel-resolution inputs.
    """
    config = model.config
    transformer_bytes = parameter_bytes(model)
    block_bytes = [parameter_bytes(b) for b in model.blocks]
    largest_block = max(block_bytes, default=0)
    aux = {}
    for name, default in DEFAULT_AUX_PARAMS.items():
        counted = _safetensors_param_count(base_dir / name) if base_dir is not None else None
        aux[name] = (counted if counted is not None else default) * aux_bytes_per_param
    act_size = 2 if any(p.dtype in (_bf16(), _fp16()) for p in model.parameters()) else 4
    p_t, p_h, p_w = config.patch_size
    latent_h, latent_w = height // 8, width // 8
    tokens_per_frame = (latent_h // p_h) * (latent_w // p_w)
    tokens = (frames // p_t) * tokens_per_frame
    ref_tokens = num_refs * tokens_per_frame if hasattr(model, "camera_embedding") else 0
    dim, ffn = config.inner_dim, config.ffn_dim
    per_token = dim * (6 * act_size + 2 * 4) + 2 * ffn * act_size
    activations = (tokens + ref_tokens) * per_token
    control = getattr(model, "controlnet", None)
    if control is not None:
        cfg = control.config
        activations += cfg.num_layers * tokens * dim * act_size  # residuals kept until their block
        activations += tokens * (cfg.dim * 6 + cfg.ffn_dim * 2) * act_size
        activations += 7 * frames * height * width * 4  # mask + Pluecker rays, float32
    return MemoryEstimate(transformer_bytes, largest_block, transformer_bytes - sum(block_bytes), aux,
                          int(activations))


def _bf16():
    import torch
    return torch.bfloat16


def _fp16():
    import torch
    return torch.float16


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def check_gpu_memory(estimate: MemoryEstimate, free_bytes: int, offload: str = "none", what: str = "the model") -> None:
    """Raise :class:`InsufficientGPUMemoryError` if ``offload`` needs more than ``free_bytes``,
    naming the fastest offload mode that would fit (or the smallest need, if none does)."""
    need = estimate.required(offload)
    if need <= free_bytes:
        return
    fitting = [m for m in OFFLOAD_MODES if estimate.required(m) <= free_bytes]
    # only suggest leaner modes than the one requested
    fitting = [m for m in fitting if OFFLOAD_MODES.index(m) > OFFLOAD_MODES.index(offload)]
    message = (f"not enough GPU memory for {what} with offload {offload!r}: it needs about {_gib(need)}, "
               f"{_gib(free_bytes)} is free.")
    if fitting:
        mode = fitting[0]
        message += f" Offload {mode!r} needs about {_gib(estimate.required(mode))} and would fit: set offload to {mode!r}."
    else:
        lean = OFFLOAD_MODES[-1]
        message += (f" Even offload {lean!r} needs about {_gib(estimate.required(lean))}; free GPU memory "
                    "(close other programs) or use a larger GPU.")
    raise InsufficientGPUMemoryError(message)
