"""The Wan2.1 companions as the pipelines use them: text padding, CLIP features, keyframe latents, I2V condition."""

from __future__ import annotations

import pytest
import torch

from keyframe_worlds.engine.pipelines.components import (condition_latent, encode_image, encode_prompt, load_companions,
                                                         make_unipc, vae_decode_keyframes, vae_encode_keyframes,
                                                         vae_encode_video)
from keyframe_worlds.engine.testing.tiny_models import WAN_UNIPC_CONFIG, write_tiny_wan_folder


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    return load_companions(write_tiny_wan_folder(tmp_path_factory.mktemp("wan") / "wan"))


def test_prompt_embeddings_are_zero_after_the_prompt(comp):
    emb = encode_prompt(comp.tokenizer, comp.text_encoder, ["a  red\nhouse", "the garden of the house with a tree"])
    assert emb.shape == (2, 512, 24)
    lengths = [4, 9]  # words + end-of-sequence token (whitespace collapsed first)
    for row, n in zip(emb, lengths):
        assert row[:n].abs().sum(-1).min() > 0 and row[n:].abs().sum() == 0
    # padding does not leak into the prompt's own embeddings (the encoder masks it)
    alone = encode_prompt(comp.tokenizer, comp.text_encoder, ["a red house"])
    torch.testing.assert_close(alone[0], emb[0])


def test_image_features_are_the_penultimate_clip_layer(comp):
    from PIL import Image

    image = torch.rand(1, 3, 48, 64) * 2 - 1
    feats = encode_image(comp.image_processor, comp.image_encoder, image)
    assert feats.shape == (1, 17, 20)  # 32 px / 8 px patches = 16 tokens + class token
    # the released inference: a PIL image into a processor built with do_rescale=False
    pil = Image.fromarray(((image[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy())
    released = comp.image_processor(images=[pil], do_rescale=False, return_tensors="pt").pixel_values
    assert released.max() > 100  # CLIP's normalisation applied to 0-255 values
    states = comp.image_encoder(pixel_values=released, output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats, states[-2])
    assert not torch.allclose(feats, states[-1])
    # "unit": CLIP's own convention, pixels divided by 255 before the normalisation
    unit = encode_image(comp.image_processor, comp.image_encoder, image, clip_pixels="unit")
    standard = comp.image_processor(images=[pil], do_rescale=True, return_tensors="pt").pixel_values
    assert standard.abs().max() < 3
    torch.testing.assert_close(unit, comp.image_encoder(pixel_values=standard, output_hidden_states=True).hidden_states[-2])
    assert not torch.allclose(unit, feats)
    with pytest.raises(Exception, match="clip_pixels must be one of uint8, unit"):
        encode_image(comp.image_processor, comp.image_encoder, image, clip_pixels="float")


def test_keyframe_latents_encode_each_frame_on_its_own(comp):
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 3, 64, 64, generator=gen) * 2 - 1
    keys = vae_encode_keyframes(comp.vae, video)
    assert keys.shape == (1, 16, 3, 8, 8)
    torch.testing.assert_close(keys[:, :, 1:2], vae_encode_video(comp.vae, video[:, :, 1:2]))
    # normalised with the VAE's latent statistics
    raw = comp.vae.encode(video[:, :, :1]).latent_dist.mode()
    mean = torch.tensor(comp.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(comp.vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(keys[:, :, :1], (raw - mean) / std)
    decoded = vae_decode_keyframes(comp.vae, keys)
    assert decoded.shape == (1, 3, 3, 64, 64) and decoded.abs().max() <= 1


@pytest.mark.parametrize("mode", ["full_vae", "first_frame_only"])
def test_condition_latent_layout(comp, mode):
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    cond = condition_latent(comp.vae, image, 3, comp.vae_temporal_factor, mode)
    assert comp.vae_temporal_factor == 4 and cond.shape == (1, 20, 3, 8, 8)
    assert torch.all(cond[:, :4, 0] == 1) and torch.all(cond[:, :4, 1:] == 0)
    # latent frame 0 is the image's own latent (the VAE is causal)
    torch.testing.assert_close(cond[:, 4:, :1], vae_encode_video(comp.vae, image[:, :, None]), rtol=1e-4, atol=1e-4)


def test_unipc_follows_the_wan_flow_schedule():
    sched = make_unipc(WAN_UNIPC_CONFIG)
    sched.set_timesteps(40)
    assert len(sched.timesteps) == 40 and sched.timesteps[0] > sched.timesteps[-1]
    assert sched.config.prediction_type == "flow_prediction" and sched.config.flow_shift == 3.0
    # a fresh scheduler per call: state from one run does not leak into the next
    assert make_unipc(WAN_UNIPC_CONFIG) is not sched


def test_a_missing_diffusers_is_reported_as_such(monkeypatch, tmp_path):
    from keyframe_worlds.engine.pipelines.components import MissingDependencyError

    import sys

    for name in [n for n in sys.modules if n == "diffusers" or n.startswith("diffusers.")]:
        monkeypatch.setitem(sys.modules, name, None)  # also the already imported submodules
    with pytest.raises(MissingDependencyError, match="diffusers==0.36.0.*keyframe-worlds\\[engine\\]"):
        load_companions(tmp_path)
