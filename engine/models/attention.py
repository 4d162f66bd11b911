"""Attention backends and the pieces every attention layer here shares.

All attention in the WorldStereo networks goes through :func:`attend`, which
looks up the backend by name. The models never call a kernel themselves, so a
faster backend (flash attention on a GPU, a chunked one for low memory) can be
registered without touching them.

Tensor layout throughout: ``[batch, tokens, heads, head_dim]``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...bridge.errors import KeyframeWorldsError

#: ``fn(query, key, value) -> out``, all ``[B, L, H, D]`` (``key``/``value`` may have another L).
AttentionBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Unmasked softmax attention with scale ``head_dim ** -0.5`` through PyTorch's SDPA."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p=0.0, is_causal=False
    )
    return out.transpose(1, 2)


_BACKENDS: dict[str, AttentionBackend] = {"sdpa": sdpa_attention}
_active_backend = "sdpa"


def register_attention_backend(name: str, fn: AttentionBackend) -> None:
    """Make ``fn`` selectable with :func:`set_attention_backend` under ``name``."""
    _BACKENDS[name] = fn


def set_attention_backend(name: str) -> None:
    """Select the backend every WorldStereo attention layer uses from now on."""
    global _active_backend
    if name not in _BACKENDS:
        raise KeyframeWorldsError(
            f"unknown attention backend {name!r}; available: {', '.join(sorted(_BACKENDS))}"
        )
    _active_backend = name


def get_attention_backend() -> str:
    return _active_backend


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
