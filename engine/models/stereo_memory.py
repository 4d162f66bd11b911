"""The spatial-stereo memory: retrieved reference frames attended beside the target frames.

The memory variants carry a second token stream through the backbone blocks:
the reference frames (earlier generated or input views), patchified with the
backbone's own patch embedding. Positions are "stereo-stitched": the rotary
table is built for a virtual ``F' x h' x 2w'`` grid, every target frame with an
equally wide frame glued to its right. Target tokens take the left half (the
ordinary table); reference ``k`` takes the right half of target frame
``ref_index[k] + 1``. The images are never actually concatenated.

In every block the two streams share the modulation, the self-attention
weights and the MLP; self-attention is one joint unmasked attention over
``[reference tokens | target tokens]``; cross-attention to text and image is
for the target tokens only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn

from ...bridge.errors import KeyframeWorldsError
from . import sequence_parallel
from .wan_transformer import ModelConfigError, WanAttention, WanRotaryEmbedding, WanTransformerBlock

#: Size of the (unused by the forward) ``ref_index_embedding`` table of ``ref_embedding`` models:
#: one row per latent frame of a 21-latent-frame segment.
REF_INDEX_EMBEDDING_ROWS = 21


@dataclass(frozen=True)
class StereoMemoryConfig:
    """The memory part of ``controlnet_cfg``.

    ``update_ref``: whether reference tokens updated by block ``i`` feed block
    ``i+1`` (else every block sees them as embedded). Upstream has no default,
    so neither does this. ``main_camera_embedding``: add a per-frame embedding
    of the ``camera_qt`` pose (``camera_embedding_dim`` = 7: quaternion + translation)
    to the main-branch tokens. ``ref_embedding``: a table the forward never reads,
    present in such checkpoints.
    """

    update_ref: bool
    main_camera_embedding: bool = False
    camera_embedding_dim: int | None = None
    ref_embedding: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in ("update_ref", "main_camera_embedding", "ref_embedding"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        dim = self.camera_embedding_dim
        if self.main_camera_embedding and (not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0):
            problems.append(f"main_camera_embedding needs a positive camera_embedding_dim, got {dim!r}")
        if problems:
            raise ModelConfigError("controlnet_cfg (memory) is invalid: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StereoMemoryConfig":
        if "update_ref" not in data:
            raise ModelConfigError("controlnet_cfg of a memory variant must set update_ref (true or false)")
        return cls(
            update_ref=data["update_ref"],
            main_camera_embedding=data.get("main_camera_embedding", False),
            camera_embedding_dim=data.get("camera_embedding_dim"),
            ref_embedding=data.get("ref_embedding", False),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CameraPoseEmbedding(nn.Sequential):
    """Per-frame pose ``[B, F, 7]`` -> ``[B, F, D]``: Linear(7, D/2), SiLU, Linear(D/2, D), SiLU, Linear(D, D)."""

    def __init__(self, pose_dim: int, dim: int):
        super().__init__(nn.Linear(pose_dim, dim // 2), nn.SiLU(), nn.Linear(dim // 2, dim), nn.SiLU(),
                         nn.Linear(dim, dim))


def stereo_rotary(rope: WanRotaryEmbedding, grid: tuple[int, int, int], ref_index: torch.Tensor, device=None):
    """Rotary tables for target and reference tokens on the stitched ``F' x h' x 2w'`` grid.

    Returns ``(cos, sin)`` ``[1, F' h' w', 1, Dh]`` for the targets and
    ``(cos, sin)`` ``[1, F_ref h' w', 1, Dh]`` for the references, reference ``k``
    at frame ``ref_index[k] + 1``, columns ``w' .. 2w'-1``.
    """
    frames, rows, cols = grid
    cos, sin = rope.grid_tables(frames, rows, 2 * cols, device)  # [F', h', 2w', Dh]
    frame_of_ref = ref_index.to(device=cos.device, dtype=torch.long) + 1
    head_dim = cos.shape[-1]
    target = (cos[:, :, :cols].reshape(1, -1, 1, head_dim), sin[:, :, :cols].reshape(1, -1, 1, head_dim))
    ref = (cos[frame_of_ref, :, cols:].reshape(1, -1, 1, head_dim),
           sin[frame_of_ref, :, cols:].reshape(1, -1, 1, head_dim))
    return target, ref


def stereo_self_attention(attn: WanAttention, x: torch.Tensor, ref: torch.Tensor,
                          rotary: tuple[torch.Tensor, torch.Tensor],
                          rotary_ref: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint self-attention of target ``x [B, L, D]`` and reference ``ref [B, L_ref, D]`` tokens.

    Both streams use ``attn``'s projections and norms and their own rotary
    tables; one attention runs over ``[ref | target]`` (every token sees every
    token); the result is split back and projected. Returns ``([B, L, D], [B, L_ref, D])``.
    """
    q, k, v = attn.project_self(x, rotary)                      # [B, L, H, Dh]
    q_ref, k_ref, v_ref = attn.project_self(ref, rotary_ref)    # [B, L_ref, H, Dh]
    # one attention over [ref | target]; each stream split across ranks on its own (sequence_parallel)
    out_ref, out = sequence_parallel.attend_streams(
        [(q_ref, k_ref, v_ref), (q, k, v)], (sequence_parallel.REFERENCE_STREAM, sequence_parallel.TARGET_STREAM))
    return attn.output(out, q), attn.output(out_ref, q)


class StereoMemoryBlock(WanTransformerBlock):
    """A backbone block that also carries the reference stream (same parameters as a plain block)."""

    def forward(self, x: torch.Tensor, ref: torch.Tensor, context: torch.Tensor, timestep_proj: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor],
                rotary_ref: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale, gate, c_shift, c_scale, c_gate = self.modulation(timestep_proj)
        # 1. Joint self-attention over [ref | target], separately normalised and modulated
        attn_x, attn_ref = stereo_self_attention(
            self.attn1, self.modulate(self.norm1, x, shift, scale), self.modulate(self.norm1, ref, shift, scale),
            rotary, rotary_ref,
        )
        x = (x.float() + attn_x * gate).type_as(x)
        ref = (ref.float() + attn_ref * gate).type_as(ref)
        # 2. Cross-attention (targets only) and MLP (both streams, same weights)
        x = self.cross_attention_and_mlp(x, context, c_shift, c_scale, c_gate)
        ref = self.mlp(ref, c_shift, c_scale, c_gate)
        return x, ref


def check_memory_inputs(hidden_states: torch.Tensor, reference_latent: torch.Tensor | None,
                        ref_index: torch.Tensor | None, camera_qt: torch.Tensor | None,
                        camera_qt_ref: torch.Tensor | None, pose_dim: int | None) -> None:
    """Shapes and ranges of the memory inputs, with messages that say what is expected."""
    batch, channels, frames, height, width = hidden_states.shape
    if reference_latent is None:
        raise KeyframeWorldsError(
            "the memory variants need reference_latent [B, 36, F_ref, h, w] (single view: the condition "
            "image itself with ref_index [0])"
        )
    if reference_latent.ndim != 5 or reference_latent.shape[0] != batch or reference_latent.shape[1] != channels \
            or reference_latent.shape[3:] != hidden_states.shape[3:]:
        raise KeyframeWorldsError(
            f"reference_latent must be [{batch}, {channels}, F_ref, {height}, {width}], got {list(reference_latent.shape)}"
        )
    n_ref = reference_latent.shape[2]
    if ref_index is None or ref_index.ndim != 1 or ref_index.shape[0] != n_ref:
        got = None if ref_index is None else list(ref_index.shape)
        raise KeyframeWorldsError(f"ref_index must be [{n_ref}] (one target frame per reference), got {got}")
    if ref_index.dtype.is_floating_point or ref_index.dtype == torch.bool:
        raise KeyframeWorldsError(f"ref_index must hold integers, got {ref_index.dtype}")
    if n_ref and (int(ref_index.min()) < 0 or int(ref_index.max()) > frames - 2):
        raise KeyframeWorldsError(
            f"ref_index values must lie in [0, {frames - 2}] (reference k sits beside target frame "
            f"ref_index[k] + 1), got {ref_index.tolist()}"
        )
    for name, value, count in (("camera_qt", camera_qt, frames), ("camera_qt_ref", camera_qt_ref, n_ref)):
        if value is None:
            continue
        if pose_dim is None:
            raise KeyframeWorldsError(f"{name} was given but this checkpoint has no main camera embedding")
        if list(value.shape) != [batch, count, pose_dim]:
            raise KeyframeWorldsError(f"{name} must be [{batch}, {count}, {pose_dim}], got {list(value.shape)}")
