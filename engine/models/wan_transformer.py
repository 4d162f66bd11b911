"""The Wan2.1 video transformer (the WorldStereo backbone), with diffusers' parameter names.

Parameter names and shapes are those of diffusers' ``WanTransformer3DModel``
(the layout with a top-level ``scale_shift_table``), so the ``transformer/``
folder of a Wan2.1 image-to-video diffusers checkpoint loads into
:class:`WanTransformer3DModel` key for key.

Shapes: ``B`` batch, ``C`` latent channels, ``F`` latent frames, ``h x w``
latent size; ``(p_t, p_h, p_w)`` patch; ``F' h' w'`` the token grid
(``F/p_t, h/p_h, w/p_w``); ``L = F' h' w'`` tokens, ordered frame-major, then
row, then column; ``D`` the inner width (heads x head_dim).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...bridge.errors import KeyframeWorldsError
from . import sequence_parallel
from .attention import FP32LayerNorm, apply_rotary, attend

#: The I2V cross-attention tells image tokens from text tokens by position: the
#: text context is always the UMT5 sequence padded to this many tokens, and
#: everything before it is the CLIP image context.
TEXT_CONTEXT_TOKENS = 512


class ModelConfigError(KeyframeWorldsError):
    """A model configuration value is missing, of the wrong type or inconsistent."""


@dataclass(frozen=True)
class WanTransformerConfig:
    """The backbone configuration, as in a diffusers ``transformer/config.json``.

    Defaults are diffusers' defaults (used for keys a config file leaves out);
    :data:`WAN21_I2V_14B_480P` is the configuration WorldStereo was trained on.
    """

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self) -> None:
        problems = []
        patch = tuple(self.patch_size) if isinstance(self.patch_size, (list, tuple)) else None
        if patch is None or len(patch) != 3 or not all(isinstance(p, int) and p > 0 for p in patch):
            problems.append(f"patch_size must be three positive integers, got {self.patch_size!r}")
        else:
            object.__setattr__(self, "patch_size", patch)
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                     "freq_dim", "ffn_dim", "num_layers", "rope_max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                problems.append(f"{name} must be a positive integer or null, got {value!r}")
        if isinstance(self.attention_head_dim, int) and self.attention_head_dim % 2:
            problems.append(f"attention_head_dim must be even for rotary embeddings, got {self.attention_head_dim}")
        if isinstance(self.freq_dim, int) and self.freq_dim % 2:
            problems.append(f"freq_dim must be even, got {self.freq_dim}")
        if self.qk_norm != "rms_norm_across_heads":
            problems.append(f"qk_norm {self.qk_norm!r} is not supported (only 'rms_norm_across_heads')")
        if not isinstance(self.cross_attn_norm, bool):
            problems.append(f"cross_attn_norm must be true or false, got {self.cross_attn_norm!r}")
        if not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1:
            problems.append(f"eps must be a small positive number, got {self.eps!r}")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            problems.append("image_dim and added_kv_proj_dim must both be set (image-to-video) or both null")
        if (self.added_kv_proj_dim is not None and isinstance(self.num_attention_heads, int)
                and isinstance(self.attention_head_dim, int)
                and self.added_kv_proj_dim != self.num_attention_heads * self.attention_head_dim):
            problems.append(
                f"added_kv_proj_dim ({self.added_kv_proj_dim}) must equal the inner width "
                f"num_attention_heads x attention_head_dim ({self.num_attention_heads * self.attention_head_dim}): "
                "the image context is projected to that width before the added key/value projections"
            )
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            problems.append("pos_embed_seq_len needs image_dim")
        if problems:
            raise ModelConfigError("backbone config is invalid: " + "; ".join(problems))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "backbone config") -> "WanTransformerConfig":
        """Read a diffusers transformer config; ``_``-prefixed bookkeeping keys are ignored."""
        if not isinstance(data, Mapping):
            raise ModelConfigError(f"{source} must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in data if not k.startswith("_") and k not in known)
        if unknown:
            raise ModelConfigError(f"{source} has keys this backbone does not know: {', '.join(unknown)}")
        class_name = data.get("_class_name")
        if class_name is not None and class_name != "WanTransformer3DModel":
            raise ModelConfigError(f"{source} describes a {class_name!r}, expected 'WanTransformer3DModel'")
        kwargs = {k: v for k, v in data.items() if k in known}
        if "patch_size" in kwargs and isinstance(kwargs["patch_size"], list):
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        try:
            return cls(**kwargs)
        except ModelConfigError as exc:
            raise ModelConfigError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["patch_size"] = list(self.patch_size)
        return out


#: diffusers config of ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`` (and -720P), ``transformer/``.
WAN21_I2V_14B_480P = WanTransformerConfig(
    in_channels=36, image_dim=1280, added_kv_proj_dim=5120,
)


class WanRotaryEmbedding(nn.Module):
    """3-axis rotary position tables for a ``F' x h' x w'`` token grid.

    Each head's ``Dh`` channels are split into a row part and a column part of
    ``2*(Dh//6)`` channels each and a time part with the rest (time first).
    Within a part of ``n`` channels, pair ``i`` (channels ``2i, 2i+1``) turns by
    ``position * theta^(-2i/n)``. Tables are computed in float64 and returned
    as float32, with each pair's angle stored in both of its channels.
    """

    def __init__(self, head_dim: int, patch_size: tuple[int, int, int], max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.patch_size = tuple(patch_size)
        self.max_seq_len = max_seq_len
        self.theta = theta

    def parts(self) -> tuple[int, int, int]:
        """Channels of the (time, row, column) parts."""
        part_hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * part_hw, part_hw, part_hw

    def _channel_frequencies(self) -> torch.Tensor:
        """``[Dh]`` float64 angular frequency per channel (pairs repeated)."""
        per_part = []
        for size in self.parts():
            exponents = torch.arange(0, size, 2, dtype=torch.float64)[: size // 2] / size
            per_part.append((1.0 / (self.theta ** exponents)).repeat_interleave(2))
        return torch.cat(per_part)

    def grid_tables(self, frames: int, rows: int, cols: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables ``[F', h', w', D]`` (float32) for token grid positions."""
        if max(frames, rows, cols) > self.max_seq_len:
            raise KeyframeWorldsError(
                f"token grid {frames}x{rows}x{cols} exceeds the rotary table length {self.max_seq_len}"
            )
        freq = self._channel_frequencies()
        axis_of_channel = torch.repeat_interleave(torch.arange(3), torch.tensor(self.parts()))
        pos_f = torch.arange(frames, dtype=torch.float64).view(frames, 1, 1, 1)
        pos_h = torch.arange(rows, dtype=torch.float64).view(1, rows, 1, 1)
        pos_w = torch.arange(cols, dtype=torch.float64).view(1, 1, cols, 1)
        angle = torch.where(
            axis_of_channel == 0, pos_f * freq,
            torch.where(axis_of_channel == 1, pos_h * freq, pos_w * freq),
        )  # [F', h', w', D]
        return angle.cos().float().to(device), angle.sin().float().to(device)

    def forward(self, frames: int, rows: int, cols: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[1, L, 1, D]`` for the ``F' x h' x w'`` grid, tokens frame-major."""
        cos, sin = self.grid_tables(frames, rows, cols, device)
        return cos.reshape(1, -1, 1, self.head_dim), sin.reshape(1, -1, 1, self.head_dim)


class WanAttention(nn.Module):
    """Multi-head attention with q/k RMS-norm across heads; self- or cross-attention.

    For I2V cross-attention (``added_kv_proj_dim`` set) the context is
    ``[image tokens | 512 text tokens]``; the image part gets its own key/value
    projections and key norm, and the two attention results are summed.
    """

    def __init__(self, dim: int, heads: int, eps: float, added_kv_proj_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.add_k_proj = self.add_v_proj = self.norm_added_k = None
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def project_self(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None):
        """q, k, v ``[B, L, H, Dh]`` of tokens ``x`` ``[B, L, D]``, normed and rotated."""
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.heads, -1))
        k = self.norm_k(self.to_k(x)).unflatten(2, (self.heads, -1))
        v = self.to_v(x).unflatten(2, (self.heads, -1))
        if rotary is not None:
            q = apply_rotary(q, *rotary)
            k = apply_rotary(k, *rotary)
        return q, k, v

    def output(self, heads_out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``[B, L, H, Dh]`` attention result -> ``[B, L, D]`` through the output projection."""
        return self.to_out[0](heads_out.flatten(2, 3).type_as(like))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if context is None:
            q, k, v = self.project_self(x, rotary)
            # over the whole sequence also when the tokens are split across ranks (sequence_parallel)
            return self.output(sequence_parallel.attend_streams([(q, k, v)])[0], q)

        image_context = None
        if self.add_k_proj is not None:
            image_tokens = context.shape[1] - TEXT_CONTEXT_TOKENS
            image_context, context = context[:, :image_tokens], context[:, image_tokens:]
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.heads, -1))
        k = self.norm_k(self.to_k(context)).unflatten(2, (self.heads, -1))
        v = self.to_v(context).unflatten(2, (self.heads, -1))
        out = attend(q, k, v).flatten(2, 3).type_as(q)
        if image_context is not None:
            k_img = self.norm_added_k(self.add_k_proj(image_context)).unflatten(2, (self.heads, -1))
            v_img = self.add_v_proj(image_context).unflatten(2, (self.heads, -1))
            out = out + attend(q, k_img, v_img).flatten(2, 3).type_as(q)
        return self.to_out[0](out)


class GELUProjection(nn.Module):
    """Linear then GELU (keys ``proj.*``), the first layer of diffusers' FeedForward."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """``net.0`` GELU projection, ``net.1`` (dropout slot, identity), ``net.2`` Linear."""

    def __init__(self, dim: int, inner_dim: int, dim_out: int | None = None, approximate: str = "tanh"):
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(dim, inner_dim, approximate), nn.Identity(),
                                  nn.Linear(inner_dim, dim_out or dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TimestepEmbedding(nn.Module):
    """``linear_1`` -> SiLU -> ``linear_2``."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TextProjection(nn.Module):
    """``linear_1`` -> tanh-GELU -> ``linear_2``: UMT5 width to the inner width."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class ImageProjection(nn.Module):
    """CLIP hidden states to the inner width: LayerNorm, GELU MLP, LayerNorm (eps 1e-5)."""

    def __init__(self, dim_in: int, dim: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim_in)
        self.ff = FeedForward(dim_in, dim_in, dim, approximate="none")
        self.norm2 = FP32LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, dim_in)) if pos_embed_seq_len else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            # first-last-frame models carry two images' tokens side by side
            x = x.view(-1, 2 * x.shape[1], x.shape[2]) + self.pos_embed
        return self.norm2(self.ff(self.norm1(x)))


def sinusoidal_timestep(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[B]`` diffusion times -> ``[B, dim]`` float32, cosine half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    angles = timestep.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class ConditionEmbedder(nn.Module):
    """Timestep, text and image conditioning (diffusers ``condition_embedder``)."""

    def __init__(self, config: WanTransformerConfig):
        super().__init__()
        dim = config.inner_dim
        self.freq_dim = config.freq_dim
        self.time_embedder = TimestepEmbedding(config.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TextProjection(config.text_dim, dim)
        self.image_embedder = (
            ImageProjection(config.image_dim, dim, config.pos_embed_seq_len) if config.image_dim else None
        )

    def forward(self, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None):
        """Returns ``temb [B, D]``, ``timestep_proj [B, 6D]``, text ``[B, 512, D]``, image ``[B, 257, D]`` or None."""
        t = sinusoidal_timestep(timestep, self.freq_dim)
        t = t.to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(t).type_as(text)
        timestep_proj = self.time_proj(F.silu(temb))
        text = self.text_embedder(text)
        if image is not None:
            if self.image_embedder is None:
                raise KeyframeWorldsError("this backbone has no image conditioning (image_dim is null)")
            image = self.image_embedder(image)
        return temb, timestep_proj, text, image


class WanTransformerBlock(nn.Module):
    """Modulated self-attention, cross-attention to text/image, modulated MLP."""

    def __init__(self, config: WanTransformerConfig):
        super().__init__()
        dim, eps = config.inner_dim, config.eps
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, config.num_attention_heads, eps)
        self.attn2 = WanAttention(dim, config.num_attention_heads, eps, config.added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, config.ffn_dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def modulation(self, timestep_proj: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``[B, 6, D]`` -> six float32 ``[B, 1, D]``: shift/scale/gate for attention, then for the MLP."""
        return (self.scale_shift_table + timestep_proj.float()).chunk(6, dim=1)

    def modulate(self, norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (norm(x.float()) * (1 + scale) + shift).type_as(x)

    def cross_attention_and_mlp(self, x: torch.Tensor, context: torch.Tensor, c_shift, c_scale, c_gate):
        x = x + self.attn2(self.norm2(x.float()).type_as(x), context)
        return self.mlp(x, c_shift, c_scale, c_gate)

    def mlp(self, x: torch.Tensor, c_shift, c_scale, c_gate) -> torch.Tensor:
        ff = self.ffn(self.modulate(self.norm3, x, c_shift, c_scale))
        return (x.float() + ff.float() * c_gate).type_as(x)

    def forward(self, x: torch.Tensor, context: torch.Tensor, timestep_proj: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shift, scale, gate, c_shift, c_scale, c_gate = self.modulation(timestep_proj)
        attn = self.attn1(self.modulate(self.norm1, x, shift, scale), rotary=rotary)
        x = (x.float() + attn * gate).type_as(x)
        return self.cross_attention_and_mlp(x, context, c_shift, c_scale, c_gate)


class WanTransformer3DModel(nn.Module):
    """Wan2.1 video diffusion transformer: latent video + time + text/image -> velocity."""

    #: Parameters kept in float32 when the rest is cast to half precision (as diffusers does).
    keep_in_fp32_patterns = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")

    def __init__(self, config: WanTransformerConfig, block_cls: type[WanTransformerBlock] = WanTransformerBlock):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.rope = WanRotaryEmbedding(config.attention_head_dim, config.patch_size, config.rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.condition_embedder = ConditionEmbedder(config)
        self.blocks = nn.ModuleList([block_cls(config) for _ in range(config.num_layers)])
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, config.out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    # -- pieces shared with the WorldStereo variants ---------------------------------------------

    def token_grid(self, latent: torch.Tensor) -> tuple[int, int, int]:
        """``(F', h', w')`` of a ``[B, C, F, h, w]`` latent; the sizes must divide by the patch."""
        _, _, frames, height, width = latent.shape
        p_t, p_h, p_w = self.config.patch_size
        if frames % p_t or height % p_h or width % p_w:
            raise KeyframeWorldsError(
                f"latent size {frames}x{height}x{width} (FxHxW) is not divisible by the patch {p_t}x{p_h}x{p_w}"
            )
        return frames // p_t, height // p_h, width // p_w

    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, F, h, w]`` -> tokens ``[B, L, D]``."""
        return self.patch_embedding(latent).flatten(2).transpose(1, 2)

    def embed_conditions(self, timestep, encoder_hidden_states, encoder_hidden_states_image):
        """Returns ``temb [B, D]``, ``timestep_proj [B, 6, D]`` and the context ``[B, 257 + 512, D]``."""
        temb, timestep_proj, text, image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        context = text if image is None else torch.cat([image, text], dim=1)
        return temb, timestep_proj, context

    def output_head(self, tokens: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Tokens ``[B, L, D]`` -> velocity ``[B, C_out, F, h, w]``."""
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)  # [B, 1, D] each
        x = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        x = self.proj_out(x)  # [B, L, p_t*p_h*p_w*C_out], laid out [p_t, p_h, p_w, C_out]
        batch = x.shape[0]
        frames, rows, cols = grid
        p_t, p_h, p_w = self.config.patch_size
        x = x.reshape(batch, frames, rows, cols, p_t, p_h, p_w, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C_out, F', p_t, h', p_h, w', p_w]
        return x.reshape(batch, x.shape[1], frames * p_t, rows * p_h, cols * p_w)

    def check_context(self, encoder_hidden_states: torch.Tensor, encoder_hidden_states_image) -> None:
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[1] != TEXT_CONTEXT_TOKENS \
                or encoder_hidden_states.shape[2] != self.config.text_dim:
            raise KeyframeWorldsError(
                f"encoder_hidden_states must be [B, {TEXT_CONTEXT_TOKENS}, {self.config.text_dim}] "
                f"(UMT5 embeddings zero-padded to {TEXT_CONTEXT_TOKENS} tokens), got {list(encoder_hidden_states.shape)}"
            )
        if self.config.image_dim is not None:
            if encoder_hidden_states_image is None:
                raise KeyframeWorldsError("this image-to-video backbone needs encoder_hidden_states_image")
            if encoder_hidden_states_image.ndim != 3 or encoder_hidden_states_image.shape[2] != self.config.image_dim:
                raise KeyframeWorldsError(
                    f"encoder_hidden_states_image must be [B, tokens, {self.config.image_dim}], "
                    f"got {list(encoder_hidden_states_image.shape)}"
                )

    @sequence_parallel.shared_forward
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor | None = None) -> torch.Tensor:
        """The plain Wan forward: ``hidden_states [B, C_in, F, h, w]`` -> ``[B, C_out, F, h, w]``."""
        self.check_context(encoder_hidden_states, encoder_hidden_states_image)
        # 1. Token grid and rotary tables: cos, sin [1, L, 1, Dh]; this rank's tokens (all of them when alone)
        grid = self.token_grid(hidden_states)
        shard = sequence_parallel.token_shard(math.prod(grid))
        rotary = shard.take_rotary(self.rope(*grid, device=hidden_states.device))
        # 2. Patch embedding: [B, L, D] (this rank's [B, L/P, D])
        x = shard.take(self.patchify(hidden_states))
        # 3. Conditions: temb [B, D], timestep_proj [B, 6, D], context [B, 257 + 512, D]
        temb, timestep_proj, context = self.embed_conditions(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        # 4. Blocks: [B, L, D]
        with sequence_parallel.token_streams(target=shard):
            for block in self.blocks:
                x = block(x, context, timestep_proj, rotary)
        # 5. Output head on every rank's tokens: [B, C_out, F, h, w]
        return self.output_head(shard.gather(x), temb, grid)
