"""Tiny, randomly initialised model folders in the released layouts, for tests and CPU smoke runs.

``write_tiny_wan_folder`` writes a Wan2.1 image-to-video diffusers folder
(tokenizer, UMT5 text encoder, CLIP vision tower, image processor, Wan VAE,
UniPC scheduler config, transformer config) whose sizes fit the tiny
transformer of the shared fixtures (``text_dim`` 24, ``image_dim`` 20, 16
latent channels). ``write_tiny_variant`` writes a variant folder
(``config.json``, ``transformer_config.json``, ``model.safetensors`` with every
key) with seeded random weights, the normally zero-initialised control
outputs included, so the memory render visibly conditions the output.
Nothing is downloaded; the same loaders as for the released files read them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

#: The tiny backbone of the shared fixtures (``camera/transformer_config.json``).
TINY_BACKBONE = {
    "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 2,
    "attention_head_dim": 16, "in_channels": 36, "out_channels": 16, "text_dim": 24, "freq_dim": 32,
    "ffn_dim": 64, "num_layers": 3, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
    "image_dim": 20, "added_kv_proj_dim": 32, "rope_max_seq_len": 1024, "pos_embed_seq_len": None,
}
TINY_CONTROL = {"conv_out_dim": 32, "dim": 16, "num_heads": 2, "ffn_dim": 32, "time_embed_dim": 32, "num_layers": 2,
                "add_channels": 7, "mid_channels": 16, "mask_downsample": 1, "interp": False}
TINY_MEMORY = {"update_ref": True, "main_camera_embedding": True, "camera_embedding_dim": 7, "ref_embedding": False}
#: UniPC settings of the Wan2.1 I2V 480P diffusers release (flow prediction, shift 3).
WAN_UNIPC_CONFIG = {
    "_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "disable_corrector": [], "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
    "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
    "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
    "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False, "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}
TINY_WORDS = ("a", "the", "red", "green", "blue", "house", "tree", "garden", "street", "sky", "room", "blurry",
              "static", "low", "quality", "of", "and", "with", "in")


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter redrawn from one generator in sorted name order (weights ~ N(0,1)/sqrt(fan_in),
    biases 0.1 N(0,1), norm weights 1 + 0.1 N(0,1))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight" and p.ndim == 1:
                p.copy_(1 + 0.1 * noise)
            elif leaf == "bias" or p.ndim < 2:
                p.copy_(0.1 * noise)
            else:
                fan_in = max(1, math.prod(p.shape[1:]))
                p.copy_(noise / math.sqrt(fan_in))


def write_tiny_variant(folder: str | Path, variant: str, seed: int = 1234, dmd: dict | None = None,
                       extra: dict | None = None) -> Path:
    """A tiny variant folder for ``variant`` (``worldstereo-camera``, ``-memory``, ``-memory-dmd``)."""
    from safetensors.torch import save_file

    from ..models.wan_transformer import WanTransformerConfig
    from ..models.names import CAMERA_VARIANT
    from ..models.worldstereo import WorldStereoConfig, build_worldstereo

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(TINY_CONTROL)
    if variant != CAMERA_VARIANT:
        cfg.update(TINY_MEMORY)
    data = {"model_type": variant, "base_model": "./tiny_base", "controlnet_cfg": cfg, "freeze_backbone": True}
    data.update(dmd or {})
    data.update(extra or {})
    (folder / "config.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    (folder / "transformer_config.json").write_text(json.dumps(TINY_BACKBONE, indent=1), encoding="utf-8")
    model = build_worldstereo(WorldStereoConfig.from_dict(data), WanTransformerConfig.from_dict(TINY_BACKBONE))
    _randomise(model, seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def _tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in TINY_WORDS:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
                            ).save_pretrained(str(folder))


def write_tiny_wan_folder(folder: str | Path, seed: int = 7, text_dim: int = 24, image_dim: int = 20,
                          image_size: int = 32) -> Path:
    """A tiny Wan2.1 I2V diffusers folder (see the module docstring)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from ..pipelines.components import wan_vae_class

    AutoencoderKLWan = wan_vae_class()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    _tiny_tokenizer(folder / "tokenizer")
    text = UMT5EncoderModel(UMT5Config(vocab_size=len(TINY_WORDS) + 3, d_model=text_dim, d_kv=8, d_ff=32,
                                       num_layers=1, num_heads=2, relative_attention_num_buckets=8,
                                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    text.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=image_dim, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=image_size, patch_size=8))
    clip.save_pretrained(str(folder / "image_encoder"), safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(str(folder / "image_processor"))
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(WAN_UNIPC_CONFIG, indent=1), encoding="utf-8")
    (folder / "transformer").mkdir(exist_ok=True)
    (folder / "transformer" / "config.json").write_text(json.dumps(TINY_BACKBONE, indent=1), encoding="utf-8")
    return folder


def write_tiny_depth_model(folder: str | Path, kind: str = "relative", seed: int = 5) -> Path:
    """A tiny Depth Anything folder (``relative`` or ``metric``) in the Hugging Face layout, random weights in
    safetensors, with its image processor: what ``load_depth_estimator`` loads, without any download."""
    import transformers

    folder = Path(folder)
    backbone = transformers.Dinov2Config(image_size=28, patch_size=14, hidden_size=16, num_hidden_layers=4,
                                         num_attention_heads=2, intermediate_size=32, out_indices=[1, 2, 3, 4],
                                         reshape_hidden_states=False, apply_layernorm=True)
    config = transformers.DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
        head_hidden_size=4, patch_size=14, depth_estimation_type=kind, max_depth=20.0 if kind == "metric" else None)
    model = transformers.DepthAnythingForDepthEstimation(config)
    _randomise(model.eval(), seed)
    model.save_pretrained(folder, safe_serialization=True)
    transformers.DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=True,
                                   ensure_multiple_of=14).save_pretrained(folder)
    return folder
