"""The WorldStereo control branch: point-cloud render, hole mask and Pluecker rays in, residuals out.

Parameter names are those of the released checkpoints (all under ``controlnet.``
in the full model). Runs once per forward, before the backbone blocks:

1. The backbone input's first 20 channels (noisy latent + first-frame mask)
   and the 16-channel render latent are patchified (``controlnet_patch_embedding``)
   to ``conv_out_dim`` tokens.
2. :class:`MaskCameraEmbedding` turns the pixel-resolution hole mask and
   Pluecker map into one additive term per token.
3. ``proj_in`` narrows to the branch width; ``num_layers`` adaLN blocks driven
   by the backbone's time embedding follow; after block ``i``, ``proj_out[i]``
   lifts the state back to the backbone width: the residual added after
   backbone block ``i``.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...bridge.errors import KeyframeWorldsError
from . import sequence_parallel
from .wan_transformer import ModelConfigError, WanAttention, WanRotaryEmbedding

#: Latent channels of the backbone input the control branch sees: 16 noisy + 4 first-frame mask.
CONTROL_LATENT_CHANNELS = 20
#: Pixel -> latent downsampling of the Wan2.1 VAE (spatial).
VAE_SPATIAL_FACTOR = 8


@dataclass(frozen=True)
class ControlBranchConfig:
    """``controlnet_cfg`` of a WorldStereo ``config.json`` (the control-branch part).

    ``conv_out_dim`` and ``time_embed_dim`` must equal the backbone width: the
    branch's patch embedding has the backbone's shape and its blocks are
    modulated by the backbone's time embedding. Defaults are upstream's.
    """

    conv_out_dim: int
    dim: int
    num_heads: int
    ffn_dim: int
    time_embed_dim: int
    num_layers: int
    add_channels: int = 1
    mid_channels: int = 64
    mask_downsample: int = 4
    interp: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in ("conv_out_dim", "dim", "num_heads", "ffn_dim", "time_embed_dim", "num_layers",
                     "add_channels", "mid_channels", "mask_downsample"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.interp, bool):
            problems.append(f"interp must be true or false, got {self.interp!r}")
        if not problems:
            if self.dim % self.num_heads:
                problems.append(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
            elif (self.dim // self.num_heads) % 2:
                problems.append(f"head size dim/num_heads ({self.dim // self.num_heads}) must be even")
            if self.mid_channels % 8:
                problems.append(f"mid_channels ({self.mid_channels}) must be a multiple of 8 (GroupNorm of mid/8 groups)")
            if self.add_channels not in (1, 7):
                problems.append(f"add_channels must be 1 (mask) or 7 (mask + Pluecker rays), got {self.add_channels}")
        if problems:
            raise ModelConfigError("controlnet_cfg is invalid: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ControlBranchConfig":
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing = sorted(n for n in required if n not in data)
        if missing:
            raise ModelConfigError(f"controlnet_cfg is missing {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FP32GroupNorm(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the input dtype (half precision loses them
    over a 60x96 latent)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class MaskCameraEmbedding(nn.Module):
    """Hole mask (+ Pluecker rays) at pixel resolution -> one additive term per control token.

    ``mask_proj``: Conv3d with kernel and stride ``(mask_downsample, 8, 8)`` to
    latent resolution, GroupNorm(mid/8), SiLU. ``mask_zero_proj``: Conv3d
    ``(1, 2, 2)`` onto the token grid (zero-initialised in training).
    """

    def __init__(self, config: ControlBranchConfig):
        super().__init__()
        self.config = config
        down = config.mask_downsample
        self.mask_proj = nn.Sequential(
            nn.Conv3d(config.add_channels, config.mid_channels, kernel_size=(down, VAE_SPATIAL_FACTOR, VAE_SPATIAL_FACTOR),
                      stride=(down, VAE_SPATIAL_FACTOR, VAE_SPATIAL_FACTOR)),
            FP32GroupNorm(config.mid_channels // 8, config.mid_channels),
            nn.SiLU(),
        )
        self.mask_zero_proj = nn.Conv3d(config.mid_channels, config.conv_out_dim, kernel_size=(1, 2, 2),
                                        stride=(1, 2, 2))

    def forward(self, add_inputs: torch.Tensor) -> torch.Tensor:
        """``[B, add_channels, T, H, W]`` -> ``[B, L, conv_out_dim]``."""
        if self.config.mask_downsample > 1:
            # Temporal compression: pixel frames 4k+1 -> k+1 latent frames, so pad
            # the front (and the back for interpolation models) with blank frames.
            pad_back = 3 if self.config.interp else 0
            add_inputs = F.pad(add_inputs, (0, 0, 0, 0, 3, pad_back))
        x = self.mask_proj(add_inputs)        # [B, mid, F, h, w]
        x = self.mask_zero_proj(x)            # [B, conv_out, F, h', w']
        return x.flatten(2).transpose(1, 2)   # [B, L, conv_out]


class AdaLayerNormZero(nn.Module):
    """LayerNorm (eps 1e-5, affine) modulated by ``linear(silu(temb))`` -> shift, scale, gate."""

    def __init__(self, cond_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 3 * dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the linear may be kept in float32 while the stream runs in half precision
        cond = F.silu(temb).to(self.linear.weight.dtype)
        shift, scale, gate = self.linear(cond).to(x.dtype).chunk(3, dim=1)  # [B, dim] each
        norm = F.layer_norm(x.float(), self.norm.normalized_shape, self.norm.weight.float(),
                            self.norm.bias.float(), self.norm.eps).to(x.dtype)
        return norm * (1 + scale[:, None, :]) + shift[:, None, :], gate[:, None, :]


class ControlSelfAttention(WanAttention):
    """Self-attention with q/k RMS-norm (eps 1e-6) and rotary positions; keys ``to_q..to_out.0, norm_q/k``."""

    def __init__(self, dim: int, heads: int):
        super().__init__(dim, heads, eps=1e-6)


class ControlBlock(nn.Module):
    """adaLN block: modulated self-attention and modulated tanh-GELU MLP, both gated."""

    def __init__(self, config: ControlBranchConfig):
        super().__init__()
        self.norm1 = AdaLayerNormZero(config.time_embed_dim, config.dim)
        self.self_attn = ControlSelfAttention(config.dim, config.num_heads)
        self.norm2 = AdaLayerNormZero(config.time_embed_dim, config.dim)
        self.ffn = nn.Sequential(nn.Linear(config.dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, config.dim))

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        norm, gate = self.norm1(x, temb)
        q, k, v = self.self_attn.project_self(norm, rotary)
        x = x + gate * self.self_attn.output(sequence_parallel.attend_streams([(q, k, v)])[0], q)
        norm, gate = self.norm2(x, temb)
        return x + gate * self.ffn(norm)


class ControlBranch(nn.Module):
    """The control branch (``controlnet.*``); returns one residual per block."""

    def __init__(self, config: ControlBranchConfig, in_channels: int, patch_size: tuple[int, int, int],
                 backbone_dim: int, rope_max_seq_len: int):
        super().__init__()
        self.config = config
        self.controlnet_patch_embedding = nn.Conv3d(in_channels, config.conv_out_dim, kernel_size=patch_size,
                                                    stride=patch_size)
        self.controlnet_mask_embedding = MaskCameraEmbedding(config)
        self.proj_in = nn.Linear(config.conv_out_dim, config.dim) if config.conv_out_dim != config.dim \
            else nn.Identity()
        self.controlnet_blocks = nn.ModuleList([ControlBlock(config) for _ in range(config.num_layers)])
        self.proj_out = nn.ModuleList([nn.Linear(config.dim, backbone_dim) for _ in range(config.num_layers)])
        self.rope = WanRotaryEmbedding(config.head_dim, patch_size, rope_max_seq_len)

    def check_inputs(self, hidden_states: torch.Tensor, render_latent: torch.Tensor, render_mask: torch.Tensor,
                     camera_embedding: torch.Tensor | None) -> None:
        batch, _, frames, height, width = hidden_states.shape
        expected_latent = [batch, self.controlnet_patch_embedding.in_channels - CONTROL_LATENT_CHANNELS,
                           frames, height, width]
        if render_latent is None or list(render_latent.shape) != expected_latent:
            got = None if render_latent is None else list(render_latent.shape)
            raise KeyframeWorldsError(f"render_latent must be {expected_latent} (like hidden_states), got {got}")
        down = self.config.mask_downsample
        # with temporal downsampling the embedding pads 3 blank frames in front (and behind if interp)
        pixel_frames = frames if down == 1 else frames * down - 3 - (3 if self.config.interp else 0)
        pixel = [pixel_frames, height * VAE_SPATIAL_FACTOR, width * VAE_SPATIAL_FACTOR]
        if render_mask is None or list(render_mask.shape) != [batch, 1, *pixel]:
            got = None if render_mask is None else list(render_mask.shape)
            raise KeyframeWorldsError(f"render_mask must be {[batch, 1, *pixel]} (1 = hole), got {got}")
        channels = 1 + (0 if camera_embedding is None else camera_embedding.shape[1])
        if camera_embedding is not None and list(camera_embedding.shape) != [batch, 6, *pixel]:
            raise KeyframeWorldsError(
                f"camera_embedding must be {[batch, 6, *pixel]} (Pluecker rays), got {list(camera_embedding.shape)}"
            )
        if channels != self.config.add_channels:
            raise KeyframeWorldsError(
                f"the control branch takes {self.config.add_channels} mask/camera channels "
                f"({'mask and Pluecker rays' if self.config.add_channels == 7 else 'mask only'}), "
                f"got {channels}: {'pass' if channels == 1 else 'omit'} camera_embedding"
            )

    def forward(self, hidden_states: torch.Tensor, render_latent: torch.Tensor, render_mask: torch.Tensor,
                camera_embedding: torch.Tensor | None, temb: torch.Tensor,
                grid: tuple[int, int, int]) -> list[torch.Tensor]:
        """Residuals, one ``[B, L, D_backbone]`` per block (this rank's ``L/P`` tokens inside a
        ``sequence_parallel.token_streams`` of a split target stream).

        ``hidden_states [B, 36, F, h, w]`` (backbone input), ``render_latent [B, 16, F, h, w]``,
        ``render_mask [B, 1, F, 8h, 8w]``, ``camera_embedding [B, 6, F, 8h, 8w]``, ``temb [B, D_backbone]``.
        """
        self.check_inputs(hidden_states, render_latent, render_mask, camera_embedding)
        # 1. Control latent [B, 36, F, h, w] -> tokens [B, L, conv_out]
        control_latent = torch.cat([hidden_states[:, :CONTROL_LATENT_CHANNELS], render_latent], dim=1)
        tokens = self.controlnet_patch_embedding(control_latent).flatten(2).transpose(1, 2)
        # 2. Mask (+ rays) [B, 1|7, F, 8h, 8w] -> additive term [B, L, conv_out]
        add_inputs = render_mask if camera_embedding is None else torch.cat([render_mask, camera_embedding], dim=1)
        tokens = tokens + self.controlnet_mask_embedding(add_inputs.to(tokens.dtype))
        # 3. Blocks at the branch width [B, L, dim]; residuals [B, L, D_backbone]
        # this rank's tokens and their positions when the sequence is split across ranks (sequence_parallel)
        tokens, rotary = sequence_parallel.local_tokens(tokens, self.rope(*grid, device=tokens.device))
        x = self.proj_in(tokens)
        residuals = []
        for block, proj in zip(self.controlnet_blocks, self.proj_out):
            x = block(x, temb.to(x.dtype), rotary)
            residuals.append(proj(x))
        return residuals
