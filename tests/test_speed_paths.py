"""The speed and memory paths on the CPU, each against the path it replaces: batched guidance against two
transformer calls, the attention dispatcher against PyTorch's SDPA, float8 block storage against bfloat16
weights (within what float8 allows), model offload without copy-back against the result and the host
memory it had; and the memory modes the engine picks for 24, 32, 48 and 80 GB cards (no GPU needed).

Tolerances: batched guidance and the dispatcher are float32 re-orderings at most (1e-6 of the output's
scale; the dispatcher's native backend is the same SDPA call, so bit for bit). float8 e4m3 keeps 3
mantissa bits: each stored weight is off by up to 2^-4 = 6.25% of itself, so the output may be off by
up to 6.25% of its largest magnitude (2.8% measured on the fixtures' tiny networks); exactly, it equals
the bfloat16 network run with its block weights rounded to float8.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import WORLDSTEREO_FIXTURES
from keyframe_worlds.bridge.errors import KeyframeWorldsError, ValidationError
from keyframe_worlds.engine.generators.options import check_options, parse_worldstereo_options
from keyframe_worlds.engine.models import attention
from keyframe_worlds.engine.models.budget import (MEMORY_MODES, InsufficientGPUMemoryError, check_gpu_memory,
                                                  estimate_memory, pick_batched_guidance)
from keyframe_worlds.engine.models.memory_trace import LiveBytes, trace_forward
from keyframe_worlds.engine.models.names import ATTENTION_BACKENDS
from keyframe_worlds.engine.models.offload import DeviceVisits, apply_float8_storage, float8_storage_modules
from keyframe_worlds.engine.models.wan_transformer import WAN21_I2V_14B_480P, WanTransformerConfig
from keyframe_worlds.engine.models.weights import cast_for_inference, load_worldstereo, parameter_bytes
from keyframe_worlds.engine.models.worldstereo import WorldStereoConfig, build_worldstereo
from keyframe_worlds.engine.pipelines.prep import prepare_conditions
from keyframe_worlds.engine.pipelines.worldstereo import WorldStereoPipeline
from keyframe_worlds.engine.testing.tiny_models import write_tiny_variant, write_tiny_wan_folder

FIXTURES = WORLDSTEREO_FIXTURES
GiB = 1024**3
FLOAT8_TOLERANCE = 2.0**-4  # of the output's largest magnitude, see the module docstring
F, H, W = 3, 64, 64


def fixture_inputs(variant: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(FIXTURES / variant / "inputs.safetensors").items() if not k.startswith("aux.")}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# -- batched guidance --------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["camera", "memory"])
def test_one_call_on_a_batch_of_two_equals_two_calls(variant):
    model = load_worldstereo(FIXTURES / variant)
    inputs = fixture_inputs(variant)
    negative = torch.randn(inputs["encoder_hidden_states"].shape, generator=torch.Generator().manual_seed(3))
    pair = {k: v if k == "ref_index" or not torch.is_tensor(v) or v.ndim == 0 else torch.cat([v, v])
            for k, v in inputs.items()}
    pair["encoder_hidden_states"] = torch.cat([inputs["encoder_hidden_states"], negative])
    pair["timestep"] = inputs["timestep"].reshape(-1)[:1].expand(2)
    with torch.no_grad():
        both = model(**pair)
        cond = model(**inputs)
        uncond = model(**{**inputs, "encoder_hidden_states": negative})
    assert relative(both[:1], cond) < 1e-6 and relative(both[1:], uncond) < 1e-6
    assert relative(cond, uncond) > 1e-3  # the two prompts do differ, so the halves are not interchangeable


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    wan = write_tiny_wan_folder(root / "wan")
    return wan, {v: write_tiny_variant(root / v, v, seed=21) for v in ("worldstereo-memory", "worldstereo-camera")}


def conditions(memory: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (H, W, 3), generator=gen, dtype=torch.uint8)
    render = torch.randint(0, 256, (F, H, W, 3), generator=gen, dtype=torch.uint8)
    covered = torch.rand(F, H, W, generator=gen) > 0.3
    c2w = torch.eye(4, dtype=torch.float64).repeat(F, 1, 1)
    c2w[:, 0, 3] = torch.arange(F) * 0.3
    intr = torch.tensor([[45.0, 45.0, 32.0, 32.0]]).repeat(F, 1)
    return prepare_conditions(image, render, covered, c2w, intr, (W, H), H, W, memory=memory)


def forwards_per_step(pipe, cond, **kw):
    batches = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        out = pipe(cond, prompt="a stone bridge", negative_prompt="blurry", steps=1, seed=3, **kw)
    finally:
        hook.remove()
    return out, batches


def test_pipeline_batched_guidance_equals_two_calls_per_step(folders):
    wan, variants = folders
    pipe = WorldStereoPipeline.from_pretrained(variants["worldstereo-memory"], wan, device="cpu")
    assert pipe.batched_guidance  # the default where it fits (on the CPU: always)
    cond = conditions(memory=True)
    batched, batches = forwards_per_step(pipe, cond)
    assert batches == [2]  # one call per step, prompt and negative prompt together
    pipe.batched_guidance = False
    two, batches = forwards_per_step(pipe, cond)
    assert batches == [1, 1]
    assert relative(batched.latents, two.latents) < 1e-5


# -- attention through diffusers' dispatcher -------------------------------------------------------

def test_native_backend_goes_through_the_dispatcher_and_equals_sdpa(monkeypatch):
    from diffusers.models import attention_dispatch

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, 16, generator=gen) for _ in range(3))
    k, v = k[:, :29], v[:, :29]  # cross-attention: other key length
    calls = []
    real = attention_dispatch.dispatch_attention_fn
    monkeypatch.setattr(attention_dispatch, "dispatch_attention_fn",
                        lambda *a, **kw: calls.append(kw["backend"]) or real(*a, **kw))
    assert attention.get_attention_backend() == "native"
    out = attention.attend(q, k, v)
    assert calls == [attention_dispatch.AttentionBackendName.NATIVE]
    assert out.shape == (2, 37, 3, 16) and torch.equal(out, attention.sdpa_attention(q, k, v))
    scores = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) / 16**0.5
    explicit = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v.double())
    assert relative(out, explicit) < 1e-6


def test_the_network_through_the_dispatcher_equals_it_through_plain_sdpa():
    model = load_worldstereo(FIXTURES / "memory")
    inputs = fixture_inputs("memory")
    attention.register_attention_backend("plain-sdpa", attention.sdpa_attention)
    with torch.no_grad():
        dispatched = model(**inputs)
        with attention.attention_backend("plain-sdpa"):
            plain = model(**inputs)
    assert attention.get_attention_backend() == "native"
    assert torch.equal(dispatched, plain)


@pytest.mark.parametrize("name", ["cudnn", "flash", "sage"])
def test_gpu_backends_are_refused_on_the_cpu_naming_the_device(name):
    with pytest.raises(attention.AttentionBackendError) as err:
        attention.check_attention_backend(name, "cpu", torch.bfloat16)
    assert len(str(err.value).splitlines()) == 1
    needs = {"flash": "flash-attn package", "sage": "sageattention package"}.get(name, "needs a CUDA GPU")
    if name in ("flash", "sage") and importlib.util.find_spec({"flash": "flash_attn", "sage": "sageattention"}[name]):
        needs = "needs a CUDA GPU"  # the package is there: then the device is what is missing
    assert needs in str(err.value)


@pytest.mark.parametrize("name,package", [("flash", "flash_attn"), ("sage", "sageattention")])
def test_a_missing_kernel_package_is_named(name, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")  # this checks the message for its absence
    with pytest.raises(attention.AttentionBackendError, match=f"needs the .* package .*pip install"):
        attention.check_attention_backend(name, "cuda", torch.bfloat16)


def test_downloading_and_unknown_backends_are_refused():
    with pytest.raises(attention.AttentionBackendError, match="downloads its kernels at run time"):
        attention.check_attention_backend("flash_hub", "cuda", torch.bfloat16)
    with pytest.raises(attention.AttentionBackendError, match="unknown attention backend 'xformers'"):
        attention.check_attention_backend("xformers", "cuda", torch.bfloat16)
    with pytest.raises(attention.AttentionBackendError, match="bfloat16 or float16 only"):
        attention.check_attention_backend("cudnn", "cuda", torch.float32)
    attention.check_attention_backend("native", "cpu", torch.float32)


def test_attention_and_storage_options_are_checked_without_torch_work(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    base = {"checkpoint": str(tmp_path)}
    opts = parse_worldstereo_options({**base, "attention": "sage", "weights_storage": "float8",
                                      "batched_guidance": False})
    assert (opts.attention, opts.weights_storage, opts.batched_guidance) == ("sage", "float8", False)
    defaults = parse_worldstereo_options(base)
    assert (defaults.attention, defaults.weights_storage, defaults.batched_guidance) == ("native", "compute", None)
    problems = check_options("worldstereo", {**base, "attention": "flash_hub", "weights_storage": "int4",
                                             "batched_guidance": "yes"})
    assert {p.path for p in problems} == {"options.attention", "options.weights_storage", "options.batched_guidance"}
    assert all(name in next(p.reason for p in problems if p.path == "options.attention")
               for name in ATTENTION_BACKENDS)


def test_a_pipeline_refuses_a_gpu_backend_on_the_cpu_before_loading(folders):
    wan, variants = folders
    with pytest.raises(KeyframeWorldsError, match="attention 'cudnn' needs a CUDA GPU"):
        WorldStereoPipeline.from_pretrained(variants["worldstereo-camera"], wan, device="cpu", attention="cudnn")
    with pytest.raises(ValidationError):
        parse_worldstereo_options({"checkpoint": str(variants["worldstereo-camera"]), "attention": "flash3"})


# -- float8 storage ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["camera", "memory"])
def test_float8_storage_is_within_float8_of_bfloat16(variant):
    inputs = fixture_inputs(variant)
    bf16 = load_worldstereo(FIXTURES / variant, dtype=torch.bfloat16)
    stored = load_worldstereo(FIXTURES / variant, dtype=torch.bfloat16)
    layers = apply_float8_storage(stored)
    # every Linear of the blocks (attention q/k/v/out, image k/v, MLP): 3 blocks x 12
    assert layers == len(float8_storage_modules(stored)) == 3 * 12
    saved = sum(p.numel() for _, m in float8_storage_modules(stored) for p in m.parameters())
    assert parameter_bytes(bf16) - parameter_bytes(stored) == saved  # 2 bytes -> 1 per stored weight
    assert stored.patch_embedding.weight.dtype == torch.bfloat16 and stored.controlnet.proj_in.weight.dtype \
        == torch.bfloat16  # outside the blocks nothing changes
    # the same network with its block weights rounded to float8 and kept in bfloat16: equal exactly
    rounded = load_worldstereo(FIXTURES / variant, dtype=torch.bfloat16)
    for _, layer in float8_storage_modules(rounded):
        for p in layer.parameters():
            p.data = p.data.to(torch.float8_e4m3fn).to(torch.bfloat16)
    with torch.no_grad():
        out_bf16, out_f8, out_rounded = bf16(**inputs).float(), stored(**inputs).float(), rounded(**inputs).float()
    assert torch.equal(out_f8, out_rounded)
    assert 1e-3 < relative(out_f8, out_bf16) < FLOAT8_TOLERANCE
    assert stored.blocks[0].ffn.net[2].weight.dtype == torch.float8_e4m3fn  # stored as float8 again after use


def test_float8_pipeline_runs_and_stays_close(folders):
    wan, variants = folders
    cond = conditions(memory=False)
    runs = {}
    for storage in ("compute", "float8"):
        pipe = WorldStereoPipeline.from_pretrained(variants["worldstereo-camera"], wan, device="cpu",
                                                   dtype=torch.bfloat16, weights_storage=storage)
        runs[storage] = pipe(cond, prompt="a stone bridge", steps=1, seed=2).latents
    assert 0 < relative(runs["float8"], runs["compute"]) < FLOAT8_TOLERANCE
    with pytest.raises(KeyframeWorldsError, match="unknown weights_storage 'int4'"):
        WorldStereoPipeline.from_pretrained(variants["worldstereo-camera"], wan, device="cpu", weights_storage="int4")


def test_the_trace_counts_a_layer_cast_but_not_the_weights_it_puts_back():
    with torch.device("meta"):
        linear = torch.nn.Linear(1000, 1000, bias=False).to(torch.bfloat16)
    holder = torch.nn.Module()
    holder.blocks = torch.nn.ModuleList([torch.nn.Sequential(linear)])
    holder.patch_embedding = linear  # the compute dtype's source
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

    apply_layerwise_casting_hook(linear, torch.float8_e4m3fn, torch.bfloat16, non_blocking=False)
    weights = [linear.weight.data]
    ignore = {torch.multiprocessing.reductions.StorageWeakRef(w.untyped_storage()).cdata for w in weights}
    with torch.no_grad(), LiveBytes(ignore, weight_dtypes=(torch.float8_e4m3fn,)) as live:
        x = torch.empty(10, 1000, dtype=torch.bfloat16, device="meta")
        y = linear(x)
        z = y * 2  # the next operation sees what was freed since
    bf16_weight, activation = 1000 * 1000 * 2, 10 * 1000 * 2
    assert live.peak == bf16_weight + 2 * activation  # the cast copy lived while the layer ran (beside x, y)
    assert live.current == 3 * activation  # x, y, z: the cast copy is gone, the float8 weight never counted
    assert z.dtype == torch.bfloat16 and linear.weight.dtype == torch.float8_e4m3fn


def tiny_meta_memory_model():
    tiny = json.loads((FIXTURES / "memory" / "transformer_config.json").read_text())
    config = json.loads((FIXTURES / "memory" / "config.json").read_text())
    with torch.device("meta"):
        model = build_worldstereo(WorldStereoConfig.from_dict(config), WanTransformerConfig.from_dict(tiny))
    return cast_for_inference(model, torch.bfloat16)


def test_traced_activations_with_float8_storage_and_a_batch_of_two():
    plain = trace_forward(tiny_meta_memory_model(), frames=3, height=64, width=64, num_refs=2)
    stored = tiny_meta_memory_model()
    apply_float8_storage(stored)
    f8 = trace_forward(stored, frames=3, height=64, width=64, num_refs=2)
    largest_cast = estimate_memory(stored, frames=3, height=64, width=64, num_refs=2).float8_cast_bytes
    assert largest_cast > 0
    assert plain.peak_bytes <= f8.peak_bytes <= plain.peak_bytes + largest_cast
    pair = trace_forward(tiny_meta_memory_model(), frames=3, height=64, width=64, num_refs=2, batch=2)
    assert 1.5 * plain.peak_bytes < pair.peak_bytes <= 2 * plain.peak_bytes


# -- the memory modes for real cards --------------------------------------------------------------

@pytest.fixture(scope="module")
def full_memory_model():
    variant = json.loads((FIXTURES / "keys_full.json").read_text())["variants"]["memory"]
    config = WorldStereoConfig.from_dict({"model_type": "worldstereo-memory-dmd", "base_model": "x/y",
                                          "controlnet_cfg": variant["controlnet_cfg"]})
    with torch.device("meta"):
        model = build_worldstereo(config, WAN21_I2V_14B_480P)
    return cast_for_inference(model, torch.bfloat16)


def card(gb: int) -> int:
    """Free bytes on a card sold as ``gb`` GB (10^9 bytes) with half a GiB taken by the display and driver."""
    return gb * 10**9 - GiB // 2


def test_float8_storage_halves_the_blocks(full_memory_model):
    estimate = estimate_memory(full_memory_model)
    f8_transformer, f8_block, cast = estimate.weights("float8")
    assert 0.5 * estimate.largest_block_bytes <= f8_block < 0.51 * estimate.largest_block_bytes
    assert 17 * GiB < f8_transformer < 18.5 * GiB < 32 * GiB < estimate.transformer_bytes
    assert 0 < cast < 0.2 * GiB  # one 5120 x 13824 MLP weight in bfloat16
    needs = [estimate.required(*mode) for mode in MEMORY_MODES]
    for offload in ("none", "model", "sequential"):
        assert estimate.required(offload, "float8") < estimate.required(offload, "compute")
    assert needs[0] == max(needs) and needs[-1] == min(needs)


@pytest.mark.parametrize("gb,expected", [(24, ("sequential", "compute")), (32, ("sequential", "compute")),
                                         (48, ("model", "float8")), (80, ("none", "compute"))])
def test_the_engine_picks_the_fastest_mode_each_card_fits(full_memory_model, gb, expected):
    estimate = estimate_memory(full_memory_model)  # memory-dmd, 21 keyframes at 480x768, 8 references
    assert estimate.fastest_fitting(card(gb)) == expected
    check_gpu_memory(estimate, card(gb), expected[0], weights_storage=expected[1])
    if expected != MEMORY_MODES[0]:
        with pytest.raises(InsufficientGPUMemoryError) as err:
            check_gpu_memory(estimate, card(gb), "none", what="worldstereo-memory-dmd")
        settings = f"set offload to {expected[0]!r}" + (" and weights_storage to 'float8'"
                                                          if expected[1] == "float8" else "")
        assert settings in str(err.value) and len(str(err.value).splitlines()) == 1


def test_guided_runs_batch_where_the_pair_fits(full_memory_model):
    pair = estimate_memory(full_memory_model, batch=2)
    single = estimate_memory(full_memory_model)
    assert pair.activation_bytes == 2 * single.activation_bytes
    assert pick_batched_guidance(full_memory_model, card(80), "none") is True
    assert pick_batched_guidance(full_memory_model, card(24), "sequential") is False  # two calls fit, a pair not
    assert single.required("sequential") < card(24) < pair.required("sequential")
    assert pick_batched_guidance(full_memory_model, card(24), "sequential", guided=False) is True
    with pytest.raises(InsufficientGPUMemoryError, match="set batched_guidance to false"):
        check_gpu_memory(pair, card(24), "sequential")


# -- offload=model without copy-back ------------------------------------------------------------

def test_device_visits_keep_one_host_copy():
    model = load_worldstereo(FIXTURES / "camera")
    inputs = fixture_inputs("camera")
    with torch.no_grad():
        expected = model(**inputs)
    tensors = list(model.parameters()) + list(model.buffers())
    host_ptrs = [t.data_ptr() for t in tensors]
    visits = DeviceVisits(model, torch.device("cpu"), copy=True)  # a separate "device" copy, observable on the CPU
    assert visits.host_copies == 0  # the weights were in host memory already: nothing copied
    for _ in range(3):  # three segments
        visits.enter()
        device_ptrs = [t.data_ptr() for t in tensors]
        assert not set(device_ptrs) & set(host_ptrs)  # it computes on its own copy
        with torch.no_grad():
            assert torch.equal(model(**inputs), expected)
        visits.leave()
        assert [t.data_ptr() for t in tensors] == host_ptrs  # back on the very host tensors: no copy back
    assert visits.visits == 3 and visits.host_copies == 0


def test_model_offload_pipeline_visits_without_copying_back(folders):
    wan, variants = folders
    reference = WorldStereoPipeline.from_pretrained(variants["worldstereo-memory"], wan, device="cpu")
    pipe = WorldStereoPipeline.from_pretrained(variants["worldstereo-memory"], wan, device="cpu", offload="model")
    modules = [pipe.transformer, *pipe.companions.modules().values()]
    for module in modules:  # copying visits, as on a GPU
        pipe._visits[id(module)] = DeviceVisits(module, torch.device("cpu"), copy=True)
    host_ptrs = {id(m): [p.data_ptr() for p in m.parameters()] for m in modules}
    cond = conditions(memory=True)
    for segment in range(2):
        out = pipe(cond, prompt="a stone bridge", steps=1, seed=segment)
        assert torch.equal(out.latents, reference(cond, prompt="a stone bridge", steps=1, seed=segment).latents)
    for module in modules:
        assert [p.data_ptr() for p in module.parameters()] == host_ptrs[id(module)]
        assert pipe._visits[id(module)].host_copies == 0
    assert pipe._visits[id(pipe.transformer)].visits == 2  # once per segment
    assert pipe._visits[id(pipe.companions.vae)].visits == 4  # encode and decode per segment
