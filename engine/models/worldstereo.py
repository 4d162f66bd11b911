"""The WorldStereo transformers: the Wan2.1 I2V backbone plus control branch (and stereo memory).

Three released variants, one ``config.json`` each:

- ``worldstereo-camera``: :class:`WorldStereoCameraModel`, backbone + control branch.
- ``worldstereo-memory`` and ``worldstereo-memory-dmd`` (the same network
  distilled to a few steps): :class:`WorldStereoMemoryModel`, which adds the
  spatial-stereo memory (reference stream) and a per-frame camera embedding.

Both forwards return the flow-matching velocity ``[B, 16, F, h, w]`` for the 16
noisy latent channels. Inputs (``B`` batch, ``F`` latent frames, ``h x w`` latent
size, ``H x W = 8h x 8w`` pixels) are documented on each ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from ...bridge.errors import KeyframeWorldsError
from . import sequence_parallel
from .control_branch import CONTROL_LATENT_CHANNELS, ControlBranch, ControlBranchConfig
from .dmd_scheduler import DMDSchedulerConfig
from .stereo_memory import (REF_INDEX_EMBEDDING_ROWS, CameraPoseEmbedding, StereoMemoryBlock,
                            StereoMemoryConfig, check_memory_inputs, stereo_rotary)
from .wan_transformer import ModelConfigError, WanTransformer3DModel, WanTransformerConfig

from .names import CAMERA_VARIANT, MEMORY_DMD_VARIANT, MEMORY_VARIANT, VARIANTS

#: Latent channels of the rendered point cloud fed to the control branch (one VAE latent).
RENDER_LATENT_CHANNELS = 16

_CONTROL_KEYS = {"conv_out_dim", "dim", "num_heads", "ffn_dim", "time_embed_dim", "num_layers", "add_channels",
                 "mid_channels", "mask_downsample", "interp"}
_MEMORY_KEYS = {"update_ref", "main_camera_embedding", "camera_embedding_dim", "ref_embedding"}
_DMD_KEYS = {"dmd_start_steps", "dmd_end_steps", "gen_shift", "dmd_steps"}


@dataclass(frozen=True)
class WorldStereoConfig:
    """A variant's ``config.json``: which network, which backbone, and the branch settings.

    ``extra`` keeps keys this code does not use (so a newer release with more
    pipeline settings still loads); they are reported, never silently acted on.
    """

    model_type: str
    base_model: str
    control: ControlBranchConfig
    memory: StereoMemoryConfig | None = None
    dmd: DMDSchedulerConfig | None = None
    freeze_backbone: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_type not in VARIANTS:
            raise ModelConfigError(f"model_type {self.model_type!r} is not a WorldStereo variant; "
                                   f"expected one of {', '.join(VARIANTS)}")
        if self.is_memory and self.memory is None:
            raise ModelConfigError(f"{self.model_type} needs the memory settings (update_ref, ...) in controlnet_cfg")
        if not self.is_memory and self.memory is not None:
            raise ModelConfigError(f"{self.model_type} has no stereo memory, but controlnet_cfg sets memory keys")

    @property
    def is_memory(self) -> bool:
        return self.model_type in (MEMORY_VARIANT, MEMORY_DMD_VARIANT)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config.json",
                  fallback_model_type: str | None = None) -> "WorldStereoConfig":
        """Parse a variant ``config.json``. Without ``model_type`` the folder name
        (``fallback_model_type``) is used, as upstream does."""
        if not isinstance(data, Mapping):
            raise ModelConfigError(f"{source} must be a JSON object")
        model_type = data.get("model_type", fallback_model_type)
        if model_type is None:
            raise ModelConfigError(f"{source} has no model_type; expected one of {', '.join(VARIANTS)}")
        if model_type not in VARIANTS:
            raise ModelConfigError(f"{source}: model_type {model_type!r} is not a WorldStereo variant; "
                                   f"expected one of {', '.join(VARIANTS)}")
        for key in ("base_model", "controlnet_cfg"):
            if key not in data:
                raise ModelConfigError(f"{source} is missing {key!r}")
        base_model = data["base_model"]
        if not isinstance(base_model, str) or not base_model:
            raise ModelConfigError(f"{source}: base_model must be a non-empty string, got {base_model!r}")
        if "5B" in base_model:
            raise ModelConfigError(f"{source}: base_model {base_model!r} is a Wan2.2-5B model; only Wan2.1 "
                                   "image-to-video backbones are supported")
        cfg = data["controlnet_cfg"]
        if not isinstance(cfg, Mapping):
            raise ModelConfigError(f"{source}: controlnet_cfg must be a JSON object")
        try:
            control = ControlBranchConfig.from_dict(cfg)
            is_memory = model_type != CAMERA_VARIANT
            memory = StereoMemoryConfig.from_dict(cfg) if is_memory else None
            dmd = None
            if model_type == MEMORY_DMD_VARIANT and any(k in data for k in _DMD_KEYS):
                missing = sorted(k for k in _DMD_KEYS if k not in data)
                if missing:
                    raise ModelConfigError(f"DMD settings are incomplete, missing {', '.join(missing)}")
                dmd = DMDSchedulerConfig(start_timesteps=data["dmd_start_steps"],
                                         num_train_timesteps=data["dmd_end_steps"],
                                         shift=data["gen_shift"], steps=data["dmd_steps"])
        except ModelConfigError as exc:
            raise ModelConfigError(f"{source}: {exc}") from None
        extra = {k: v for k, v in data.items()
                 if k not in {"model_type", "base_model", "controlnet_cfg", "freeze_backbone"} | _DMD_KEYS}
        ignored_cfg = {k: v for k, v in cfg.items()
                       if k not in _CONTROL_KEYS | (_MEMORY_KEYS if is_memory else set()) | {"base_model"}}
        if ignored_cfg:
            extra["controlnet_cfg"] = ignored_cfg
        return cls(model_type=model_type, base_model=base_model, control=control, memory=memory, dmd=dmd,
                   freeze_backbone=bool(data.get("freeze_backbone", True)), extra=extra)

    def check_backbone(self, backbone: WanTransformerConfig) -> None:
        """The cross-checks between this variant and the backbone it is put on."""
        problems = []
        dim = backbone.inner_dim
        if backbone.in_channels != CONTROL_LATENT_CHANNELS + RENDER_LATENT_CHANNELS:
            problems.append(f"the backbone must be image-to-video with in_channels 36 (16 noisy + 4 mask + "
                            f"16 condition), got {backbone.in_channels}")
        if backbone.image_dim is None:
            problems.append("the backbone must be image-to-video (image_dim set)")
        if self.control.conv_out_dim != dim:
            problems.append(f"controlnet_cfg.conv_out_dim ({self.control.conv_out_dim}) must equal the backbone "
                            f"width {dim}")
        if self.control.time_embed_dim != dim:
            problems.append(f"controlnet_cfg.time_embed_dim ({self.control.time_embed_dim}) must equal the backbone "
                            f"width {dim}")
        if self.control.num_layers > backbone.num_layers:
            problems.append(f"controlnet_cfg.num_layers ({self.control.num_layers}) exceeds the backbone's "
                            f"{backbone.num_layers} blocks")
        if backbone.patch_size[0] != 1:
            problems.append("the stereo memory and keyframe latents need a temporal patch of 1")
        if problems:
            raise ModelConfigError(f"{self.model_type} does not fit the backbone: " + "; ".join(problems))


def _compute_dtype(model: WanTransformer3DModel, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Floating inputs in the dtype the model computes in (that of its patch embedding)."""
    dtype = model.patch_embedding.weight.dtype
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


def _as_batch_timestep(timestep: torch.Tensor | float, batch: int, device) -> torch.Tensor:
    timestep = torch.as_tensor(timestep, device=device)
    if timestep.ndim == 0:
        timestep = timestep.expand(batch)
    if timestep.ndim != 1 or timestep.shape[0] != batch:
        raise KeyframeWorldsError(f"timestep must be a scalar or [{batch}], got {list(timestep.shape)}")
    return timestep


class WorldStereoCameraModel(WanTransformer3DModel):
    """``worldstereo-camera``: Wan2.1 I2V backbone + control branch."""

    forward_inputs = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image",
                      "render_latent", "render_mask", "camera_embedding", "extrinsics", "intrinsics")

    def __init__(self, config: WorldStereoConfig, backbone: WanTransformerConfig):
        config.check_backbone(backbone)
        super().__init__(backbone)
        self.variant = config
        self.controlnet = ControlBranch(config.control, backbone.in_channels, backbone.patch_size,
                                        backbone.inner_dim, backbone.rope_max_seq_len)

    @sequence_parallel.shared_forward
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor | None = None, render_latent: torch.Tensor | None = None,
                render_mask: torch.Tensor | None = None, camera_embedding: torch.Tensor | None = None,
                extrinsics: torch.Tensor | None = None, intrinsics: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity ``[B, 16, F, h, w]``.

        - ``hidden_states [B, 36, F, h, w]``: noisy latent (16) | first-frame mask (4) | condition latent (16).
        - ``timestep [B]`` (or scalar) in [0, 1000].
        - ``encoder_hidden_states [B, 512, text_dim]``, ``encoder_hidden_states_image [B, 257, image_dim]``.
        - ``render_latent [B, 16, F, h, w]``: keyframe latents of the point-cloud render.
        - ``render_mask [B, 1, F, H, W]``: 1 = hole (nothing rendered), 0 = covered.
        - ``camera_embedding [B, 6, F, H, W]``: Pluecker rays (see :mod:`.camera`).
        - ``extrinsics``/``intrinsics``: accepted for call compatibility with upstream; the
          released network does not read them (its control attention ignores them).
        """
        del extrinsics, intrinsics  # no influence on the output, see docstring
        hidden_states, encoder_hidden_states, encoder_hidden_states_image, render_latent = _compute_dtype(
            self, hidden_states, encoder_hidden_states, encoder_hidden_states_image, render_latent)
        self.check_context(encoder_hidden_states, encoder_hidden_states_image)
        # 1. Token grid (F', h', w') and rotary tables [1, L, 1, Dh]
        grid = self.token_grid(hidden_states)
        rotary = self.rope(*grid, device=hidden_states.device)
        # 2. Conditions: temb [B, D], timestep_proj [B, 6, D], context [B, 257 + 512, D]
        timestep = _as_batch_timestep(timestep, hidden_states.shape[0], hidden_states.device)
        temb, timestep_proj, context = self.embed_conditions(timestep, encoder_hidden_states,
                                                             encoder_hidden_states_image)
        # 3. This rank's tokens (all of them when alone, see sequence_parallel): [B, L/P, D]
        shard = sequence_parallel.token_shard(rotary[0].shape[1])
        rotary = shard.take_rotary(rotary)
        with sequence_parallel.token_streams(target=shard):
            # 4. Control branch: num_layers residuals [B, L, D]
            residuals = self.controlnet(hidden_states, render_latent, render_mask, camera_embedding, temb, grid)
            # 5. Patch embedding [B, L, D]; blocks, residual i added after block i
            x = shard.take(self.patchify(hidden_states))
            for i, block in enumerate(self.blocks):
                x = block(x, context, timestep_proj, rotary)
                if i < len(residuals):
                    x = x + residuals[i].to(x.dtype)
        # 6. Output head on every rank's tokens [B, 16, F, h, w]
        return self.output_head(shard.gather(x), temb, grid)


class WorldStereoMemoryModel(WanTransformer3DModel):
    """``worldstereo-memory`` / ``-memory-dmd``: backbone + control branch + stereo memory."""

    forward_inputs = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image",
                      "render_latent", "render_mask", "reference_latent", "camera_embedding", "ref_index",
                      "camera_qt", "camera_qt_ref")

    def __init__(self, config: WorldStereoConfig, backbone: WanTransformerConfig):
        config.check_backbone(backbone)
        super().__init__(backbone, block_cls=StereoMemoryBlock)
        self.variant = config
        memory = config.memory
        dim = backbone.inner_dim
        self.controlnet = ControlBranch(config.control, backbone.in_channels, backbone.patch_size, dim,
                                        backbone.rope_max_seq_len)
        self.camera_embedding = (CameraPoseEmbedding(memory.camera_embedding_dim, dim)
                                 if memory.main_camera_embedding else None)
        # Present in ref_embedding checkpoints so they load; the forward does not use it.
        self.ref_index_embedding = nn.Embedding(REF_INDEX_EMBEDDING_ROWS, dim) if memory.ref_embedding else None

    def _add_pose(self, tokens: torch.Tensor, pose: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor:
        """Add the pose embedding of each frame ``[B, F, 7]`` to its ``h' w'`` tokens ``[B, F h' w', D]``."""
        if pose is None or self.camera_embedding is None:
            return tokens
        per_frame = self.camera_embedding(pose.to(tokens.dtype))  # [B, F, D]
        return tokens + per_frame.repeat_interleave(rows * cols, dim=1)

    @sequence_parallel.shared_forward
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor | None = None, render_latent: torch.Tensor | None = None,
                render_mask: torch.Tensor | None = None, reference_latent: torch.Tensor | None = None,
                camera_embedding: torch.Tensor | None = None, ref_index: torch.Tensor | None = None,
                camera_qt: torch.Tensor | None = None, camera_qt_ref: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity ``[B, 16, F, h, w]``.

        As :meth:`WorldStereoCameraModel.forward`, plus:

        - ``reference_latent [B, 36, F_ref, h, w]``: retrieved frames, ``[latent | ones(4) | latent]``.
        - ``ref_index [F_ref]`` (int): reference ``k`` sits beside target latent frame ``ref_index[k] + 1``.
        - ``camera_qt [B, F, 7]``, ``camera_qt_ref [B, F_ref, 7]``: per-frame world-to-camera
          ``(q_w, q_x, q_y, q_z, t_x, t_y, t_z)`` after :func:`.camera.unified_camera_normalization`;
          either may be None (then that stream gets no pose embedding).
        """
        pose_dim = self.variant.memory.camera_embedding_dim if self.camera_embedding is not None else None
        hidden_states, encoder_hidden_states, encoder_hidden_states_image, render_latent, reference_latent = \
            _compute_dtype(self, hidden_states, encoder_hidden_states, encoder_hidden_states_image, render_latent,
                           reference_latent)
        check_memory_inputs(hidden_states, reference_latent, ref_index, camera_qt, camera_qt_ref, pose_dim)
        self.check_context(encoder_hidden_states, encoder_hidden_states_image)
        # 1. Token grid and stitched rotary tables: targets [1, L, 1, Dh], references [1, L_ref, 1, Dh]
        grid = self.token_grid(hidden_states)
        _, rows, cols = grid
        rotary, rotary_ref = stereo_rotary(self.rope, grid, ref_index, device=hidden_states.device)
        # 2. Conditions: temb [B, D], timestep_proj [B, 6, D], context [B, 257 + 512, D]
        timestep = _as_batch_timestep(timestep, hidden_states.shape[0], hidden_states.device)
        temb, timestep_proj, context = self.embed_conditions(timestep, encoder_hidden_states,
                                                             encoder_hidden_states_image)
        # 3. This rank's target and reference tokens (all of them when alone, see sequence_parallel)
        shard = sequence_parallel.token_shard(rotary[0].shape[1])
        shard_ref = sequence_parallel.token_shard(rotary_ref[0].shape[1])
        rotary, rotary_ref = shard.take_rotary(rotary), shard_ref.take_rotary(rotary_ref)
        with sequence_parallel.token_streams(target=shard, reference=shard_ref):
            # 4. Control branch on the target grid: residuals [B, L, D]
            residuals = self.controlnet(hidden_states, render_latent, render_mask, camera_embedding, temb, grid)
            # 5. Both streams through the patch embedding, plus per-frame pose: [B, L, D], [B, L_ref, D]
            x = shard.take(self._add_pose(self.patchify(hidden_states), camera_qt, rows, cols))
            ref_in = shard_ref.take(self._add_pose(self.patchify(reference_latent.to(hidden_states.dtype)),
                                                   camera_qt_ref, rows, cols))
            # 6. Blocks; the reference stream is carried on (update_ref) or restarted each block
            ref = ref_in
            for i, block in enumerate(self.blocks):
                x, ref_out = block(x, ref if self.variant.memory.update_ref else ref_in, context, timestep_proj,
                                   rotary, rotary_ref)
                ref = ref_out
                if i < len(residuals):
                    x = x + residuals[i].to(x.dtype)
        # 7. Output head on every rank's target tokens only: [B, 16, F, h, w]
        return self.output_head(shard.gather(x), temb, grid)


WorldStereoModel = WorldStereoCameraModel | WorldStereoMemoryModel


def build_worldstereo(config: WorldStereoConfig, backbone: WanTransformerConfig) -> WanTransformer3DModel:
    """The network for ``config.model_type`` on ``backbone`` (parameters uninitialised for loading;
    build under ``torch.device("meta")`` to allocate nothing)."""
    cls = WorldStereoMemoryModel if config.is_memory else WorldStereoCameraModel
    return cls(config, backbone)
