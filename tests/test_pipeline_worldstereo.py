"""The WorldStereo pipelines end to end at tiny size on the CPU: 3 keyframes at 16x16 latents, 2 steps
(4 for the distilled variant), tiny companions written by the real savers and read by the real loaders."""

from __future__ import annotations

import shutil

import pytest
import torch

from keyframe_worlds.bridge.errors import KeyframeWorldsError
from keyframe_worlds.engine.models.weights import CheckpointError
from keyframe_worlds.engine.pipelines.prep import prepare_conditions
from keyframe_worlds.engine.testing.tiny_models import write_tiny_variant, write_tiny_wan_folder
from keyframe_worlds.bridge.jobs import JobCancelled
from keyframe_worlds.engine.pipelines.worldstereo import WorldStereoPipeline

VARIANTS = ("worldstereo-camera", "worldstereo-memory", "worldstereo-memory-dmd")
F, H, W = 3, 128, 128  # 16x16 latents


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_ws")
    wan = write_tiny_wan_folder(root / "wan")
    variants = {v: write_tiny_variant(root / v, v, seed=11 + i) for i, v in enumerate(VARIANTS)}
    return wan, variants


@pytest.fixture(scope="module")
def pipes(folders):
    wan, variants = folders
    return {v: WorldStereoPipeline.from_pretrained(variants[v], wan, device="cpu") for v in VARIANTS}


def make_inputs(seed: int = 0, frames: int = F):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (H, W, 3), generator=gen, dtype=torch.uint8)
    render = torch.randint(0, 256, (frames, H, W, 3), generator=gen, dtype=torch.uint8)
    covered = torch.rand(frames, H, W, generator=gen) > 0.3
    c2w = torch.eye(4, dtype=torch.float64).repeat(frames, 1, 1)
    c2w[:, 0, 3] = torch.arange(frames) * 0.3
    intr = torch.tensor([[90.0, 90.0, 64.0, 64.0]]).repeat(frames, 1)
    return image, render, covered, c2w, intr


def conditions(pipe, seed=0, **kw):
    image, render, covered, c2w, intr = make_inputs(seed)
    args = dict(image=image, render_rgb=render, render_covered=covered, c2w_opencv=c2w, intrinsics=intr)
    args.update(kw)
    return prepare_conditions(input_wh=(W, H), height=H, width=W, memory=pipe.is_memory, **args)


@pytest.mark.parametrize("variant", VARIANTS)
def test_end_to_end_shapes_progress_and_determinism(pipes, variant):
    pipe = pipes[variant]
    cond = conditions(pipe)
    calls = []
    out = pipe(cond, prompt="a red house in a garden", steps=None if pipe.is_dmd else 2, seed=5,
               callback=lambda i, n: calls.append((i, n)))
    total = 4 if pipe.is_dmd else 2
    assert calls == [(i, total) for i in range(1, total + 1)]
    assert out.frames.shape == (F, H, W, 3) and out.frames.dtype == torch.uint8
    assert out.latents.shape == (1, 16, F, H // 8, W // 8) and torch.isfinite(out.latents).all()
    again = pipe(cond, prompt="a red house in a garden", steps=None if pipe.is_dmd else 2, seed=5)
    assert torch.equal(out.latents, again.latents) and torch.equal(out.frames, again.frames)
    if pipe.is_dmd:  # one variant suffices: the seed is drawn the same way for all
        other = pipe(cond, prompt="a red house in a garden", seed=6)
        assert not torch.equal(out.latents, other.latents)


@pytest.mark.parametrize("variant", ["worldstereo-camera", "worldstereo-memory-dmd"])
def test_the_memory_render_conditions_the_output(pipes, variant):
    pipe = pipes[variant]
    steps = None if pipe.is_dmd else 1
    base = pipe(conditions(pipe), steps=steps, seed=1).latents
    _, render, covered, _, _ = make_inputs(99)
    changed_render = pipe(conditions(pipe, render_rgb=render), steps=steps, seed=1).latents
    changed_mask = pipe(conditions(pipe, render_covered=covered), steps=steps, seed=1).latents
    assert (changed_render - base).abs().max() > 1e-3
    assert (changed_mask - base).abs().max() > 1e-3


def test_references_and_cameras_condition_the_memory_output(pipes):
    from keyframe_worlds.engine.pipelines.prep import Reference

    pipe = pipes["worldstereo-memory"]
    image, render, covered, c2w, intr = make_inputs(0)
    single = pipe(conditions(pipe), steps=1, seed=1).latents
    ref = Reference(render[2], c2w[2] @ torch.tensor([[1, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]],
                                                     dtype=torch.float64), attach_to=2)
    with_ref = pipe(conditions(pipe, references=[ref]), steps=1, seed=1).latents
    assert (with_ref - single).abs().max() > 1e-3
    moved = c2w.clone()
    moved[:, 1, 3] += torch.arange(F) * 0.5
    other_cams = pipe(conditions(pipe, c2w_opencv=moved), steps=1, seed=1).latents
    assert (other_cams - single).abs().max() > 1e-3


def test_guidance_uses_the_negative_prompt(pipes):
    pipe = pipes["worldstereo-camera"]
    cond = conditions(pipe)
    a = pipe(cond, prompt="a red house", negative_prompt="blurry", steps=1, guidance_scale=5.0, seed=2).latents
    b = pipe(cond, prompt="a red house", negative_prompt="static low quality", steps=1, guidance_scale=5.0, seed=2).latents
    c = pipe(cond, prompt="a red house", negative_prompt="blurry", steps=1, guidance_scale=1.0, seed=2).latents
    d = pipe(cond, prompt="a red house", negative_prompt="static low quality", steps=1, guidance_scale=1.0, seed=2).latents
    assert (a - b).abs().max() > 1e-4  # guided: the negative prompt matters
    assert torch.equal(c, d)  # unguided: it is not even encoded


@pytest.mark.parametrize("variant", ["worldstereo-memory", "worldstereo-memory-dmd"])
def test_cancel_between_steps_stops_promptly(pipes, variant):
    pipe = pipes[variant]
    calls = []
    with pytest.raises(JobCancelled, match="after step 1"):
        pipe(conditions(pipe), steps=None if pipe.is_dmd else 2, seed=0, callback=lambda i, n: calls.append(i),
             should_cancel=lambda: True)
    assert calls == [1]
    # a callback that raises (the job runner's cancellation) stops it as well
    with pytest.raises(RuntimeError, match="stop"):
        pipe(conditions(pipe), steps=None if pipe.is_dmd else 2, seed=0,
             callback=lambda i, n: (_ for _ in ()).throw(RuntimeError("stop")))


def test_dmd_schedule_and_bad_settings(pipes):
    dmd = pipes["worldstereo-memory-dmd"]
    with pytest.raises(KeyframeWorldsError, match="distilled for 4 steps"):
        dmd(conditions(dmd), steps=2)
    with pytest.raises(KeyframeWorldsError, match="without guidance"):
        dmd(conditions(dmd), guidance_scale=5.0)
    cam = pipes["worldstereo-camera"]
    with pytest.raises(KeyframeWorldsError, match="steps must be"):
        cam(conditions(cam), steps=0)
    with pytest.raises(KeyframeWorldsError, match="takes no reference"):
        cam(conditions(dmd), steps=1)
    mem = pipes["worldstereo-memory"]
    with pytest.raises(KeyframeWorldsError, match="needs reference_video"):
        mem(conditions(cam), steps=1)
    bad = conditions(mem)
    bad.ref_index = torch.tensor([2])
    with pytest.raises(KeyframeWorldsError, match=r"ref_index values must lie in \[0, 1\]"):
        mem(bad, steps=1)


def test_model_offload_mode_gives_the_same_result_on_the_cpu(folders, pipes):
    wan, variants = folders
    offloaded = WorldStereoPipeline.from_pretrained(variants["worldstereo-camera"], wan, device="cpu", offload="model")
    cond = conditions(offloaded)
    assert torch.equal(offloaded(cond, steps=1, seed=4).latents, pipes["worldstereo-camera"](cond, steps=1, seed=4).latents)


def test_missing_companions_are_named(folders, tmp_path):
    wan, variants = folders
    broken = tmp_path / "wan"
    shutil.copytree(wan, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match="vae/ is missing"):
        WorldStereoPipeline.from_pretrained(variants["worldstereo-camera"], broken, device="cpu")
    for p in (broken / "text_encoder").glob("*.safetensors"):
        p.unlink()
    (broken / "text_encoder" / "pytorch_model.bin").write_bytes(b"not loaded")
    shutil.copytree(wan / "vae", broken / "vae")
    with pytest.raises(CheckpointError, match="no safetensors weights.*pickle"):
        WorldStereoPipeline.from_pretrained(variants["worldstereo-camera"], broken, device="cpu")
    with pytest.raises(KeyframeWorldsError, match="offload"):
        WorldStereoPipeline.from_pretrained(variants["worldstereo-camera"], wan, device="cpu", offload="fast")


def test_variant_dmd_settings_are_read_from_config(tmp_path, folders):
    wan, _ = folders
    folder = write_tiny_variant(tmp_path / "dmd", "worldstereo-memory-dmd", seed=3,
                                dmd={"dmd_start_steps": 250, "dmd_end_steps": 1000, "gen_shift": 3, "dmd_steps": 3})
    pipe = WorldStereoPipeline.from_pretrained(folder, wan, device="cpu")
    calls = []
    pipe(conditions(pipe), seed=0, callback=lambda i, n: calls.append(n))
    assert calls == [3, 3, 3]


def test_condition_mode_and_negative_prompt_come_from_the_variant_config(tmp_path, folders, pipes):
    wan, _ = folders
    same_weights = dict(seed=11)  # as the module's camera variant
    folder = write_tiny_variant(tmp_path / "cam", "worldstereo-camera", **same_weights,
                                extra={"latent_cond_mode": "first_frame_only", "negative_prompt": "blurry"})
    pipe = WorldStereoPipeline.from_pretrained(folder, wan, device="cpu")
    assert pipe.latent_cond_mode == "first_frame_only" and pipe.negative_prompt == "blurry"
    cond = conditions(pipe)
    first_only = pipe(cond, steps=1, seed=0).latents
    full = pipes["worldstereo-camera"](cond, steps=1, seed=0, negative_prompt="blurry").latents
    assert torch.isfinite(first_only).all() and (first_only - full).abs().max() > 1e-4
    bad = write_tiny_variant(tmp_path / "bad", "worldstereo-camera", seed=1, extra={"latent_cond_mode": "half_vae"})
    with pytest.raises(KeyframeWorldsError, match="latent_cond_mode 'half_vae'"):
        WorldStereoPipeline.from_pretrained(bad, wan, device="cpu")
