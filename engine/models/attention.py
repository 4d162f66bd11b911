"""Attention backends and the pieces every attention layer here shares.

All attention in the WorldStereo networks goes through :func:`attend`, which
looks up the backend by name. The models never call a kernel themselves. The
selectable backends (:data:`~.names.ATTENTION_BACKENDS`: native SDPA, cuDNN,
flash-attn, SageAttention) all go through diffusers' attention dispatcher
(``dispatch_attention_fn``), which owns the kernels' calling conventions;
:func:`check_attention_backend` says in one line why one cannot run here.
Others (the memory trace's stand-in) can be registered without touching the
models.

Tensor layout throughout: ``[batch, tokens, heads, head_dim]``.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...bridge.errors import KeyframeWorldsError
from .names import ATTENTION_BACKENDS, DEFAULT_ATTENTION_BACKEND

#: ``fn(query, key, value) -> out``, all ``[B, L, H, D]`` (``key``/``value`` may have another L).
AttentionBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: Our backend names -> diffusers' ``AttentionBackendName`` values.
DIFFUSERS_BACKENDS = {"native": "native", "cudnn": "_native_cudnn", "flash": "flash", "sage": "sage"}
#: The Python package (import name, pip name) a backend's kernel comes from; native and cuDNN are torch's.
_BACKEND_PACKAGES = {"flash": ("flash_attn", "flash-attn"), "sage": ("sageattention", "sageattention")}


class AttentionBackendError(KeyframeWorldsError):
    """An attention backend that does not exist here or cannot run on this device."""


def _dispatcher():
    # diffusers is imported on first use: the networks import this module, and the CLI stays light
    from diffusers.models import attention_dispatch

    return attention_dispatch


def dispatched_backend(name: str) -> AttentionBackend:
    """``attend`` through diffusers' ``dispatch_attention_fn`` with the backend ``DIFFUSERS_BACKENDS[name]``.

    The dispatcher takes and returns ``[B, L, H, D]``, our layout, so nothing is transposed here;
    unmasked, no dropout, scale ``head_dim ** -0.5`` (its default).
    """
    backend_value = DIFFUSERS_BACKENDS[name]

    def run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        dispatch = _dispatcher()
        return dispatch.dispatch_attention_fn(query, key, value,
                                              backend=dispatch.AttentionBackendName(backend_value))

    run.__name__ = f"{name}_attention"
    return run


def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Unmasked softmax attention with scale ``head_dim ** -0.5`` straight through PyTorch's SDPA
    (what the ``native`` backend runs, without the dispatcher: the reference it is tested against)."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p=0.0, is_causal=False
    )
    return out.transpose(1, 2)


_BACKENDS: dict[str, AttentionBackend] = {name: dispatched_backend(name) for name in ATTENTION_BACKENDS}
_active_backend = DEFAULT_ATTENTION_BACKEND


def register_attention_backend(name: str, fn: AttentionBackend) -> None:
    """Make ``fn`` selectable with :func:`set_attention_backend` under ``name``."""
    _BACKENDS[name] = fn


def set_attention_backend(name: str) -> None:
    """Select the backend every WorldStereo attention layer uses from now on."""
    global _active_backend
    if name not in _BACKENDS:
        raise AttentionBackendError(
            f"unknown attention backend {name!r}; available: {', '.join(sorted(_BACKENDS))}"
        )
    _active_backend = name


def get_attention_backend() -> str:
    return _active_backend


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside the block (a pipeline's call), the previous one after it."""
    previous = get_attention_backend()
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def check_attention_backend(name: str, device: "torch.device | str", dtype: torch.dtype) -> None:
    """Raise :class:`AttentionBackendError` (one line: what is missing) unless backend ``name`` runs
    on ``device`` with tensors of ``dtype``. Backends that fetch kernels at run time are refused."""
    device = torch.device(device)
    if isinstance(name, str) and name.endswith("_hub"):
        raise AttentionBackendError(f"attention backend {name!r} downloads its kernels at run time, which the engine "
                                    f"never does; use one of {', '.join(ATTENTION_BACKENDS)}")
    if name not in ATTENTION_BACKENDS:
        raise AttentionBackendError(f"unknown attention backend {name!r}; expected one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "native":
        return
    if name in _BACKEND_PACKAGES:
        module, pip_name = _BACKEND_PACKAGES[name]
        dispatch = _dispatcher()
        usable = {"flash": "_CAN_USE_FLASH_ATTN", "sage": "_CAN_USE_SAGE_ATTN"}[name]
        if importlib.util.find_spec(module) is None or not getattr(dispatch, usable, False):
            raise AttentionBackendError(f"attention {name!r} needs the {pip_name} package (a version diffusers "
                                        f"supports) in the engine's environment: pip install {pip_name}")
    if device.type != "cuda":
        raise AttentionBackendError(f"attention {name!r} needs a CUDA GPU; this pipeline runs on {device.type} "
                                    f"(use attention 'native')")
    if dtype not in (torch.bfloat16, torch.float16):
        raise AttentionBackendError(f"attention {name!r} runs in bfloat16 or float16 only; this pipeline computes in "
                                    f"{str(dtype).replace('torch.', '')} (use dtype bfloat16, or attention 'native')")


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Run the active backend on ``[B, L, H, D]`` tensors; returns ``[B, Lq, H, D]``."""
    return _BACKENDS[_active_backend](query, key, value)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs ``(2i, 2i+1)`` of ``x`` ``[B, L, H, D]``.

    ``cos``/``sin`` are ``[1, L, 1, D]`` tables in which each pair's angle is
    stored in both of its channels; the cosine is read from the even channel and
    the sine from the odd one (which matters where the two differ, see
    :class:`~.wan_transformer.WanRotaryEmbedding`).
    """
    x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    c = cos[..., 0::2]
    s = sin[..., 1::2]
    out = torch.stack((x_even * c - x_odd * s, x_even * s + x_odd * c), dim=-1).flatten(-2)
    return out.type_as(x)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as the Wan backbone expects)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
