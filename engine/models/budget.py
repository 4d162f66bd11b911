"""GPU memory budget: what a generator needs per memory mode (offload mode x weight storage), and the check
that refuses a mode that will not fit and names the fastest one that would."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from ...bridge.errors import KeyframeWorldsError
from .offload import OFFLOAD_MODES, WEIGHTS_STORAGES
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
#: Memory modes ``(offload, weights_storage)``, fastest first: with everything resident float8 storage
#: costs one cast per layer; offloading costs host-to-device copies, fewer bytes of them with float8.
MEMORY_MODES = tuple((offload, storage) for offload in OFFLOAD_MODES for storage in WEIGHTS_STORAGES)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes the generator needs on the GPU, by part. Deliberately on the high side.

    ``transformer_bytes``, ``largest_block_bytes``: with the weights stored as the model holds them;
    ``float8_*``: with the blocks' layers stored as float8 (None: the same), and ``float8_cast_bytes``
    the largest layer's weight in the compute dtype, the one copy layerwise casting holds at a time.
    ``activation_bytes`` are for ``batch`` samples per forward (2: batched guidance).
    """

    transformer_bytes: int
    largest_block_bytes: int
    resident_bytes: int  # everything of the transformer but its blocks (embeddings, head, control branch)
    aux_bytes: Mapping[str, int]
    activation_bytes: int
    float8_transformer_bytes: int | None = None
    float8_largest_block_bytes: int | None = None
    float8_cast_bytes: int = 0
    batch: int = 1

    def weights(self, weights_storage: str = "compute") -> tuple[int, int, int]:
        """``(transformer, largest block, transient cast)`` bytes with ``weights_storage``."""
        if weights_storage == "compute":
            return self.transformer_bytes, self.largest_block_bytes, 0
        if weights_storage == "float8":
            return ((self.transformer_bytes if self.float8_transformer_bytes is None else self.float8_transformer_bytes),
                    (self.largest_block_bytes if self.float8_largest_block_bytes is None
                     else self.float8_largest_block_bytes), self.float8_cast_bytes)
        raise KeyframeWorldsError(f"unknown weights_storage {weights_storage!r}; expected one of "
                                  f"{', '.join(WEIGHTS_STORAGES)}")

    def required(self, offload: str, weights_storage: str = "compute") -> int:
        transformer, block, cast = self.weights(weights_storage)
        activations = self.activation_bytes + cast
        if offload == "none":
            return transformer + sum(self.aux_bytes.values()) + activations + GPU_OVERHEAD_BYTES
        if offload == "model":
            return max(transformer + activations, max(self.aux_bytes.values(), default=0)) + GPU_OVERHEAD_BYTES
        if offload == "sequential":
            # the non-block parts stay resident; two blocks in flight (one computing, one arriving);
            # the companions visit one at a time as with "model"
            return max(self.resident_bytes + 2 * block + activations,
                       max(self.aux_bytes.values(), default=0)) + GPU_OVERHEAD_BYTES
        raise KeyframeWorldsError(f"unknown offload mode {offload!r}; expected one of {', '.join(OFFLOAD_MODES)}")

    def fastest_fitting(self, free_bytes: int) -> tuple[str, str] | None:
        """The fastest ``(offload, weights_storage)`` of :data:`MEMORY_MODES` that fits ``free_bytes``, or None."""
        return next((m for m in MEMORY_MODES if self.required(*m) <= free_bytes), None)


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
                    num_refs: int = 8, base_dir: Path | None = None, aux_bytes_per_param: int = 2,
                    batch: int = 1) -> MemoryEstimate:
    """GPU memory for one denoising forward of ``model`` (which may live on the meta device) at
    ``frames`` latent frames of ``height x width`` pixels with ``num_refs`` reference frames, ``batch``
    samples at once (2: prompt and negative prompt in one call).

    Weights: the model's parameters at their dtypes; companions (text and image
    encoders, VAE) from ``base_dir``'s safetensors headers when given, else the
    Wan2.1 I2V sizes, at ``aux_bytes_per_param``; with float8 storage the layers of
    :func:`~.offload.float8_storage_modules` at one byte per weight. Activations: per token the
    residual stream, its float32 normalised copy, q/k/v and attention output, the
    MLP hidden layer twice, for target plus reference tokens; the control
    branch's residuals (one per control layer) and the pixel-resolution inputs.
    """
    from .offload import float8_storage_modules

    config = model.config
    transformer_bytes = parameter_bytes(model)
    block_bytes = [parameter_bytes(b) for b in model.blocks]
    largest_block = max(block_bytes, default=0)
    # float8 storage: each cast layer's parameters at one byte instead of their current size
    float8_saving = [0] * len(block_bytes)
    compute_size = model.patch_embedding.weight.element_size()
    cast_bytes = 0
    for name, layer in float8_storage_modules(model):
        index = int(name.split(".")[1])
        for p in layer.parameters(recurse=False):
            float8_saving[index] += p.numel() * (p.element_size() - 1)
            cast_bytes = max(cast_bytes, p.numel() * compute_size)
    float8_blocks = [b - s for b, s in zip(block_bytes, float8_saving)]
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
                          int(activations * batch),
                          float8_transformer_bytes=transformer_bytes - sum(float8_saving),
                          float8_largest_block_bytes=max(float8_blocks, default=0),
                          float8_cast_bytes=cast_bytes, batch=batch)


def _bf16():
    import torch
    return torch.bfloat16


def _fp16():
    import torch
    return torch.float16


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def _mode_text(offload: str, weights_storage: str) -> str:
    return f"offload {offload!r}" + (f" with weights_storage {weights_storage!r}" if weights_storage != "compute" else "")


def check_gpu_memory(estimate: MemoryEstimate, free_bytes: int, offload: str = "none", what: str = "the model",
                     weights_storage: str = "compute") -> None:
    """Raise :class:`InsufficientGPUMemoryError` if ``offload`` with ``weights_storage`` needs more than
    ``free_bytes``, naming the fastest leaner memory mode (:data:`MEMORY_MODES`) that would fit, or the
    smallest need if none does."""
    need = estimate.required(offload, weights_storage)
    if need <= free_bytes:
        return
    requested = MEMORY_MODES.index((offload, weights_storage))
    # only suggest leaner modes than the one requested
    fitting = [m for m in MEMORY_MODES[requested + 1:] if estimate.required(*m) <= free_bytes]
    batch = " (prompt and negative prompt in one batch: set batched_guidance to false to halve the activations)" \
        if estimate.batch > 1 else ""
    message = (f"not enough GPU memory for {what} with {_mode_text(offload, weights_storage)}: it needs about "
               f"{_gib(need)}{batch}, {_gib(free_bytes)} is free.")
    if fitting:
        mode, storage = fitting[0]
        settings = f"set offload to {mode!r}" + (f" and weights_storage to {storage!r}" if storage != weights_storage
                                                 else "")
        text = _mode_text(mode, storage)
        message += f" {text[0].upper()}{text[1:]} needs about {_gib(estimate.required(mode, storage))} " \
                   f"and would fit: {settings}."
    else:
        lean = min(MEMORY_MODES, key=lambda m: estimate.required(*m))
        message += (f" Even {_mode_text(*lean)} needs about {_gib(estimate.required(*lean))}; free GPU memory "
                    "(close other programs) or use a larger GPU.")
    raise InsufficientGPUMemoryError(message)


def pick_batched_guidance(model: "WanTransformer3DModel", free_bytes: int, offload: str,
                          weights_storage: str = "compute", guided: bool = True, **size) -> bool:
    """Whether to run the prompt and the negative prompt as one batch of two (twice the activations,
    one pass over the weights per step) rather than two calls: yes unless the batch of two would not fit
    ``free_bytes`` with ``offload`` and ``weights_storage`` (``size``: :func:`estimate_memory`'s keywords).
    Unguided variants have nothing to batch: True, which changes nothing."""
    if not guided:
        return True
    return estimate_memory(model, batch=2, **size).required(offload, weights_storage) <= free_bytes
