"""The Wan2.1 I2V companions of the WorldStereo transformer: tokenizer, UMT5 text encoder,
CLIP image encoder, the Wan VAE and the UniPC scheduler settings, read from a local
diffusers folder (``tokenizer/``, ``text_encoder/``, ``image_encoder/``,
``image_processor/``, ``vae/``, ``scheduler/``). Nothing is downloaded.

The encoders follow the reference pipelines:

- Text: the prompt cleaned as the reference pipelines clean it
  (:func:`clean_prompt`: ftfy, HTML unescaping twice, whitespace runs
  collapsed), tokenised to 512 tokens; the UMT5 last hidden state, with the
  positions after the prompt's length zeroed (the transformer's
  cross-attention takes the last 512 context tokens as text).
- Image: the CLIP vision tower's penultimate hidden state (257 tokens for
  ViT-H/14 at 224 px) of the conditioning image, as 8-bit pixels. How they are
  scaled is ``clip_pixels`` (:data:`CLIP_PIXELS`): ``"uint8"`` (default) hands
  CLIP's mean/std normalisation the 0-255 values themselves, which is what the
  released inference scripts do (a PIL image into a processor built with
  ``do_rescale=False``), so embeddings match theirs; ``"unit"`` divides by 255
  first, CLIP's own convention (and the Wan2.1 backbone's). Which one the
  released checkpoints were trained with is not published; the default
  reproduces the released inference.
- Keyframe latents: every frame VAE-encoded on its own (the distribution's
  mode), normalised ``(z - mean) / std``; decoding is the inverse, per frame.
- The I2V condition latent: the conditioning image followed by
  ``4 (F - 1)`` black frames, VAE-encoded as one video (``full_vae``), or the
  image and one black frame encoded on their own (``first_frame_only``).

diffusers (AutoencoderKLWan, UniPCMultistepScheduler), transformers
(UMT5EncoderModel, CLIPVisionModel) and ftfy are imported here only.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...bridge.errors import KeyframeWorldsError
from ..models.names import CLIP_PIXELS
from ..io.checkpoint_files import PICKLE_SUFFIXES, CheckpointError

#: Text tokens of the context (the I2V cross-attention's fixed text length).
TEXT_TOKENS = 512
LATENT_COND_MODES = ("full_vae", "first_frame_only")
COMPANION_FOLDERS = ("tokenizer", "text_encoder", "image_encoder", "image_processor", "vae", "scheduler")


def wan_vae_class():
    """diffusers' ``AutoencoderKLWan`` (its package import warns about CUDA autocast in unrelated models on a
    CPU-only machine; that warning is silenced here, nothing else)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="CUDA is not available or torch_xla is imported")
        try:
            from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
        except ImportError as exc:
            raise MissingDependencyError(exc) from None
    return AutoencoderKLWan


class MissingDependencyError(CheckpointError):
    """diffusers or transformers is not installed in the engine's environment."""

    def __init__(self, exc: ImportError):
        super().__init__(f"the WorldStereo pipelines need diffusers==0.36.0, transformers>=4.57,<5 and ftfy in "
                         f"the engine's environment ({exc}); install the engine extra: "
                         f"pip install 'keyframe-worlds[engine]'")


def _require_folder(base: Path, name: str) -> Path:
    folder = base / name
    if not folder.is_dir():
        raise CheckpointError(f"{base} is not a complete Wan2.1 image-to-video diffusers folder: {name}/ is missing")
    if name in ("text_encoder", "image_encoder", "vae"):
        if not any(folder.glob("*.safetensors")):
            pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
            raise CheckpointError(
                f"{folder} has no safetensors weights" + (f" (only pickle files {', '.join(pickles)}, which are not "
                                                          "loaded: unpickling can run arbitrary code)" if pickles else "")
            )
    return folder


@dataclass
class WanCompanions:
    """The loaded companions; ``scheduler_config`` is the UniPC config dict of ``scheduler/``."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    image_encoder: torch.nn.Module
    image_processor: Any
    vae: torch.nn.Module
    scheduler_config: dict

    @property
    def vae_temporal_factor(self) -> int:
        return 2 ** sum(self.vae.config.temperal_downsample)

    @property
    def vae_spatial_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder, "image_encoder": self.image_encoder, "vae": self.vae}


def load_companions(base_dir: str | Path, dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> WanCompanions:
    """Load the companions from a local Wan2.1 I2V diffusers folder (local files only, safetensors only)."""
    AutoencoderKLWan = wan_vae_class()
    from diffusers.utils import is_accelerate_available

    try:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel
    except ImportError as exc:
        raise MissingDependencyError(exc) from None
    base = Path(base_dir).expanduser()
    if not base.is_dir():
        raise CheckpointError(f"Wan2.1 image-to-video folder not found: {base}")
    for name in COMPANION_FOLDERS:
        _require_folder(base, name)
    common = dict(local_files_only=True, use_safetensors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base / "tokenizer"), local_files_only=True)
        text_encoder = UMT5EncoderModel.from_pretrained(str(base / "text_encoder"), dtype=dtype, **common)
        image_encoder = CLIPVisionModel.from_pretrained(str(base / "image_encoder"), dtype=dtype, **common)
        image_processor = CLIPImageProcessor.from_pretrained(str(base / "image_processor"), local_files_only=True)
        # diffusers asks for low_cpu_mem_usage by default and, without accelerate, warns on stderr that it
        # falls back; asking for what it falls back to keeps the loading the same and the output clean
        vae = AutoencoderKLWan.from_pretrained(str(base / "vae"), torch_dtype=vae_dtype or dtype,
                                               low_cpu_mem_usage=is_accelerate_available(), **common)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the Wan2.1 companions from {base}: {exc}") from None
    config_path = base / "scheduler" / "scheduler_config.json"
    try:
        scheduler_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read the scheduler config {config_path}: {exc}") from None
    device = torch.device(device)
    for module in (text_encoder, image_encoder, vae):
        module.to(device).eval().requires_grad_(False)
    return WanCompanions(tokenizer, text_encoder, image_encoder, image_processor, vae, scheduler_config)


def make_unipc(scheduler_config: dict):
    """A fresh UniPC multistep scheduler (it keeps per-run state) from the folder's config."""
    from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return UniPCMultistepScheduler.from_config(config)


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def clean_prompt(text: str) -> str:
    """The text of a prompt as it reaches the tokenizer, cleaned as the reference pipelines (and diffusers'
    Wan pipelines) clean it: mojibake, curly quotes and control characters fixed by ``ftfy.fix_text``, HTML
    entities unescaped twice more (ftfy leaves them when the text looks like HTML), stripped, then every
    whitespace run made one space.

    The order matters: unescaping comes before collapsing, so an escaped no-break space (``&nbsp;``)
    collapses too.
    """
    try:
        import ftfy
    except ImportError as exc:
        raise MissingDependencyError(exc) from None
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    # Upstream collapses with the third-party regex module's \s (Unicode White_Space); the standard
    # library's \s also takes U+001C-U+001F, which ftfy.fix_text has already removed, so both agree here.
    return re.sub(r"\s+", " ", text).strip()


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int = TEXT_TOKENS
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask``, both ``[B, max_length]`` int64, of the cleaned prompts
    (:func:`clean_prompt`), padded and truncated to ``max_length`` with the closing ``</s>``."""
    tokens = tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=max_length,
                       truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    return tokens.input_ids, tokens.attention_mask


@torch.no_grad()
def encode_tokens(text_encoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                  ) -> torch.Tensor:
    """``[B, L, text_dim]``: UMT5 last hidden states of ``[B, L]`` tokens, zero after each prompt's tokens."""
    device = _module_device(text_encoder)
    ids, mask = input_ids.to(device), attention_mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state  # [B, L, D]
    keep = (torch.arange(ids.shape[1], device=device)[None] < mask.gt(0).sum(dim=1, keepdim=True))[..., None]
    return torch.where(keep, hidden, torch.zeros_like(hidden))


def encode_prompt(tokenizer, text_encoder: torch.nn.Module, prompts: list[str], max_length: int = TEXT_TOKENS
                  ) -> torch.Tensor:
    """``[B, max_length, text_dim]``: :func:`tokenize_prompts` then :func:`encode_tokens`."""
    return encode_tokens(text_encoder, *tokenize_prompts(tokenizer, prompts, max_length))


def clip_pixel_values(image_processor, image: torch.Tensor, clip_pixels: str = "uint8") -> torch.Tensor:
    """CLIP's input ``[B, 3, S, S]`` float32 (S: the processor's crop size) for ``image`` ``[B, 3, H, W]`` in [-1, 1].

    The image goes to the processor as 8-bit ``[B, H, W, 3]`` pixels (what the reference pipelines
    hand it), scaled as ``clip_pixels`` says (see the module docstring): with ``"uint8"`` the values
    are ``(0..255 - mean) / std``.
    """
    if clip_pixels not in CLIP_PIXELS:
        raise KeyframeWorldsError(f"clip_pixels must be one of {', '.join(CLIP_PIXELS)}, got {clip_pixels!r}")
    pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().permute(0, 2, 3, 1).numpy()
    inputs = image_processor(images=list(pixels), do_rescale=clip_pixels == "unit", rescale_factor=1 / 255,
                             return_tensors="pt")
    return inputs.pixel_values


@torch.no_grad()
def encode_pixels(image_encoder: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[B, tokens, image_dim]``: CLIP penultimate hidden states of :func:`clip_pixel_values`' output."""
    pixel_values = pixel_values.to(_module_device(image_encoder), _module_dtype(image_encoder))
    return image_encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]


def encode_image(image_processor, image_encoder: torch.nn.Module, image: torch.Tensor,
                 clip_pixels: str = "uint8") -> torch.Tensor:
    """``[B, tokens, image_dim]``: CLIP penultimate hidden states of ``image`` ``[B, 3, H, W]`` in [-1, 1]
    (:func:`clip_pixel_values` then :func:`encode_pixels`)."""
    return encode_pixels(image_encoder, clip_pixel_values(image_processor, image, clip_pixels))


def _latent_stats(vae: torch.nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``1 / std`` of the latents, ``[1, z, 1, 1, 1]`` in ``like``'s dtype and device.

    The reciprocal, because the reference pipelines normalise with ``(z - mean) * (1 / std)`` and undo it
    with ``x / (1 / std) + mean``: ``x * std`` differs from that in the last bit, and the VAE decoder turns
    that into ~1e-5 differences in the frames.
    """
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(like.device, like.dtype)
    inv_std = (1.0 / torch.tensor(vae.config.latents_std)).view(1, z, 1, 1, 1).to(like.device, like.dtype)
    return mean, inv_std


@torch.no_grad()
def vae_encode_video(vae: torch.nn.Module, video: torch.Tensor) -> torch.Tensor:
    """``[B, 3, T, H, W]`` in [-1, 1] as one causal video -> normalised latent ``[B, 16, 1 + (T-1)/4, h, w]``."""
    x = video.to(_module_device(vae), _module_dtype(vae))
    z = vae.encode(x).latent_dist.mode()
    mean, inv_std = _latent_stats(vae, z)
    return ((z - mean) * inv_std).float()


@torch.no_grad()
def vae_encode_keyframes(vae: torch.nn.Module, video: torch.Tensor) -> torch.Tensor:
    """``[B, 3, F, H, W]`` in [-1, 1] -> keyframe latents ``[B, 16, F, h, w]`` (each frame on its own)."""
    return torch.cat([vae_encode_video(vae, video[:, :, i:i + 1]) for i in range(video.shape[2])], dim=2)


@torch.no_grad()
def vae_decode_keyframes(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Keyframe latents ``[B, 16, F, h, w]`` -> ``[B, 3, F, H, W]`` in [-1, 1] (each frame on its own)."""
    z = latents.to(_module_device(vae), _module_dtype(vae))
    mean, inv_std = _latent_stats(vae, z)
    z = z / inv_std + mean
    frames = [vae.decode(z[:, :, i:i + 1], return_dict=False)[0] for i in range(z.shape[2])]
    return torch.cat(frames, dim=2).float().clamp(-1, 1)


@torch.no_grad()
def condition_latent(vae: torch.nn.Module, image: torch.Tensor, latent_frames: int, temporal_factor: int,
                     mode: str = "full_vae") -> torch.Tensor:
    """The I2V condition ``[B, 4 + 16, F, h, w]``: first-frame mask (1 at latent frame 0) | condition latent.

    image: ``[B, 3, H, W]`` in [-1, 1]. See the module docstring for the two modes.
    """
    if mode not in LATENT_COND_MODES:
        raise CheckpointError(f"latent_cond_mode {mode!r} is not one of {', '.join(LATENT_COND_MODES)}")
    first = image[:, :, None]
    if mode == "full_vae":
        blank = first.new_zeros(first.shape[0], 3, (latent_frames - 1) * temporal_factor, *first.shape[-2:])
        latent = vae_encode_video(vae, torch.cat([first, blank], dim=2))
    else:
        latent = vae_encode_video(vae, first)
        if latent_frames > 1:
            blank = vae_encode_video(vae, torch.zeros_like(first))
            latent = torch.cat([latent, blank.expand(-1, -1, latent_frames - 1, -1, -1)], dim=2)
    mask = torch.zeros(latent.shape[0], temporal_factor, latent_frames, *latent.shape[-2:], dtype=latent.dtype,
                       device=latent.device)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latent], dim=1)
