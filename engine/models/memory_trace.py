"""Peak activation memory of a WorldStereo forward, measured without a GPU.

The network runs on the ``meta`` device (shapes only, nothing allocated)
under a dispatch mode that keeps the byte size of every storage an operation
creates until Python frees it, exactly when a CUDA allocation would be
returned to the caching allocator. The largest sum seen is the peak of live
activation bytes for one forward; parameters and buffers are left out (the
offload mode decides where they live; ``budget.MemoryEstimate`` adds them).

Attention is the one kernel whose memory differs by backend: on a GPU, torch's
SDPA picks a fused kernel (flash or memory-efficient) that never holds the
``L x L`` score matrix, so during the trace attention is a stand-in with the
fused kernels' footprint: the output, plus its float32 log-sum-exp row.

With float8 storage (:func:`~.offload.apply_float8_storage`) the layerwise
casting runs in the trace as on a GPU: each layer's compute-dtype copy of its
weight counts while it lives; the float8 tensors the casting puts back into
the parameters are weights, not activations, and are not counted.

Not counted: the caching allocator's rounding and fragmentation and the cuBLAS
workspace (``budget.GPU_OVERHEAD_BYTES`` stands for them).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import attention

_TRACE_BACKEND = "fused-footprint"


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of live storages created under it; ``peak`` is the largest total seen.

    ``ignore``: storages not to count (a model's parameters and buffers); ``weight_dtypes``: storages
    created with these dtypes are weights going back into storage (float8 after a layer's forward).
    """

    def __init__(self, ignore: set[int] | None = None, weight_dtypes: tuple[torch.dtype, ...] = ()):
        super().__init__()
        self.ignore = set(ignore or ())
        self.weight_dtypes = tuple(weight_dtypes)
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        # what Python freed since the last operation was returned before this one allocated
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                if t.dtype in self.weight_dtypes:
                    continue
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.ignore and ref.cdata not in self.live:  # views and in-place: no new bytes
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def _fused_attention_footprint(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """What a fused SDPA kernel allocates: the output and a float32 log-sum-exp per query and head."""
    batch, length, heads, _ = query.shape
    lse = torch.empty(batch, heads, length, dtype=torch.float32, device=query.device)
    out = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)
    del lse
    return out


@contextlib.contextmanager
def _fused_attention():
    previous = attention.get_attention_backend()
    attention.register_attention_backend(_TRACE_BACKEND, _fused_attention_footprint)
    attention.set_attention_backend(_TRACE_BACKEND)
    try:
        yield
    finally:
        attention.set_attention_backend(previous)


@dataclass(frozen=True)
class ForwardTrace:
    """peak_bytes: live activation bytes at the worst moment of one forward; ops: operations traced."""

    peak_bytes: int
    ops: int


def forward_inputs(model: torch.nn.Module, frames: int, height: int, width: int, num_refs: int,
                   device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16, batch: int = 1) -> dict:
    """Keyword inputs of one denoising forward of ``model`` at ``frames`` latent frames of ``height x width``
    pixels (``num_refs`` retrieved frames for the memory variants), ``batch`` samples (2: batched
    guidance), as the pipeline passes them."""
    config = model.config
    h, w, b = height // 8, width // 8, batch
    inputs = dict(
        hidden_states=torch.empty(b, config.in_channels, frames, h, w, dtype=dtype, device=device),
        timestep=torch.empty(b, device=device),
        encoder_hidden_states=torch.empty(b, 512, config.text_dim, dtype=dtype, device=device),
        encoder_hidden_states_image=torch.empty(b, 257, config.image_dim, dtype=dtype, device=device),
        render_latent=torch.empty(b, config.out_channels, frames, h, w, dtype=dtype, device=device),
        render_mask=torch.empty(b, 1, frames, height, width, dtype=dtype, device=device),
        camera_embedding=torch.empty(b, 6, frames, height, width, dtype=dtype, device=device),
    )
    if hasattr(model, "camera_embedding"):  # the memory variants
        # ref_index is read as numbers (positions of the references), so it is a real tensor
        inputs.update(reference_latent=torch.empty(b, config.in_channels, num_refs, h, w, dtype=dtype, device=device),
                      ref_index=torch.linspace(0, frames - 2, num_refs).round().long(),
                      camera_qt=torch.empty(b, frames, 7, device=device),
                      camera_qt_ref=torch.empty(b, num_refs, 7, device=device))
    return inputs


def trace_forward(model: torch.nn.Module, frames: int = 21, height: int = 480, width: int = 768,
                  num_refs: int = 8, batch: int = 1) -> ForwardTrace:
    """Peak live activation bytes of one forward of ``model`` (built on the meta device, in its
    inference dtype, float8 storage applied or not) at the given size for ``batch`` samples; the
    inputs are created inside the trace, so they count."""
    dtype = model.patch_embedding.weight.dtype  # what the network computes in
    device = model.patch_embedding.weight.device
    # the weights' tensors as they are now, held for the trace: float8 casting replaces parameters' data,
    # and a freed storage's address (its key here) could be reused by an activation, which would go uncounted
    weights = [t.data for t in (*model.parameters(), *model.buffers())]
    ignore = {StorageWeakRef(t.untyped_storage()).cdata for t in weights}
    float8 = (torch.float8_e4m3fn,) if getattr(model, "weights_storage", "compute") == "float8" else ()
    with torch.no_grad(), _fused_attention(), LiveBytes(ignore, weight_dtypes=float8) as live:
        inputs = forward_inputs(model, frames, height, width, num_refs, device=device, dtype=dtype, batch=batch)
        out = model(**inputs)
        del inputs, out
    del weights
    return ForwardTrace(live.peak, live.ops)
