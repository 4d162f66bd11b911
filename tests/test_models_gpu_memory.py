"""The GPU memory estimate and the error that names an offload mode that would fit (no GPU needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from keyframe_worlds.engine.models import attention
from keyframe_worlds.engine.models.budget import (GPU_OVERHEAD_BYTES, InsufficientGPUMemoryError, MemoryEstimate, check_gpu_memory, estimate_memory)
from keyframe_worlds.engine.models.offload import OFFLOAD_MODES
from keyframe_worlds.engine.models.weights import cast_for_inference, load_worldstereo
from keyframe_worlds.engine.models.memory_trace import LiveBytes, trace_forward
from keyframe_worlds.engine.models.wan_transformer import WAN21_I2V_14B_480P
from keyframe_worlds.engine.models.worldstereo import WorldStereoConfig, build_worldstereo

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "worldstereo"
GiB = 1024**3


@pytest.fixture(scope="module")
def full_memory_model():
    variant = json.loads((FIXTURES / "keys_full.json").read_text())["variants"]["memory"]
    config = WorldStereoConfig.from_dict({"model_type": "worldstereo-memory-dmd", "base_model": "x/y",
                                          "controlnet_cfg": variant["controlnet_cfg"]})
    with torch.device("meta"):
        model = build_worldstereo(config, WAN21_I2V_14B_480P)
    return cast_for_inference(model, torch.bfloat16), variant


def test_full_size_weights_in_bf16(full_memory_model):
    model, variant = full_memory_model
    estimate = estimate_memory(model)
    # bf16 everywhere except the small float32 parts: just above two bytes per parameter
    assert variant["bytes_if_bf16"] <= estimate.transformer_bytes < variant["bytes_if_bf16"] * 1.01
    assert estimate.resident_bytes + 40 * estimate.largest_block_bytes == estimate.transformer_bytes
    needs = [estimate.required(mode) for mode in OFFLOAD_MODES]
    assert needs == sorted(needs, reverse=True)  # each mode is leaner than the one before
    assert 50 * GiB < needs[0] < 80 * GiB  # all resident fits an 80 GB card, not a 48 GB one
    assert needs[2] < 24 * GiB  # block streaming fits a 24 GB card at 480x768, 21 frames


def test_live_bytes_counts_what_is_alive_at_the_worst_moment():
    mb4 = 1000 * 1000 * 4
    with LiveBytes() as live:
        a = torch.empty(1000, 1000, device="meta")
        b = a @ a
        c = b + 1  # a, b and c alive: the peak
        del b
        d = c * 2  # b was freed first: still three
        d.add_(1)  # in place and views allocate nothing
        e = d.view(-1)
        del a, c
        f = e + 0.5
    assert live.peak == 3 * mb4 and live.current == 2 * mb4 and f.shape == (1000 * 1000,)


def test_traced_full_size_forward_is_within_the_estimate_and_sequential_fits_24_gb(full_memory_model):
    """The whole 17.6 G-parameter forward at 480x768, 21 latent frames, on the meta device: the measured
    peak of live activations stays under the analytic estimate the engine refuses modes with, and with it
    the block-streaming mode needs well under 24 GiB."""
    model, _ = full_memory_model
    for refs in (1, 8):
        trace = trace_forward(model, frames=21, height=480, width=768, num_refs=refs)
        estimate = estimate_memory(model, frames=21, height=480, width=768, num_refs=refs)
        assert trace.ops > 5000  # the whole network ran: 40 blocks, 20 control blocks
        assert 0.6 * estimate.activation_bytes < trace.peak_bytes <= estimate.activation_bytes
        sequential = (estimate.resident_bytes + 2 * estimate.largest_block_bytes + trace.peak_bytes
                      + GPU_OVERHEAD_BYTES)
        assert max(sequential, max(estimate.aux_bytes.values()) + GPU_OVERHEAD_BYTES) < 20 * GiB
        assert estimate.required("sequential") < 24 * GiB
    assert attention.get_attention_backend() == "native"  # the trace's stand-in is gone again


def test_activations_grow_with_resolution_and_references(full_memory_model):
    model, _ = full_memory_model
    small = estimate_memory(model, frames=21, height=480, width=768, num_refs=1)
    more_refs = estimate_memory(model, frames=21, height=480, width=768, num_refs=8)
    bigger = estimate_memory(model, frames=21, height=720, width=1280, num_refs=1)
    assert small.activation_bytes < more_refs.activation_bytes < bigger.activation_bytes


def test_enough_memory_passes(full_memory_model):
    model, _ = full_memory_model
    estimate = estimate_memory(model)
    check_gpu_memory(estimate, 80 * GiB, "none")
    check_gpu_memory(estimate, 24 * GiB, "sequential")


def test_too_little_memory_names_a_mode_that_fits(full_memory_model):
    model, _ = full_memory_model
    estimate = estimate_memory(model)
    with pytest.raises(InsufficientGPUMemoryError) as err:
        check_gpu_memory(estimate, 24 * GiB, "none", what="worldstereo-memory-dmd")
    message = str(err.value)
    assert "'none'" in message and "24.0 GiB is free" in message
    assert "set offload to 'sequential'" in message


ESTIMATE = MemoryEstimate(transformer_bytes=10 * GiB, largest_block_bytes=GiB, resident_bytes=GiB,
                          aux_bytes={"text_encoder": 5 * GiB, "vae": GiB // 2}, activation_bytes=2 * GiB)


@pytest.mark.parametrize("free,requested,suggested", [
    (15 * GiB, "none", "model"),       # model offload: max(10 + 2, 5) + 2 = 14
    (9 * GiB, "none", "sequential"),   # sequential: 1 + 2 + 2 + 2 = 7
    (9 * GiB, "model", "sequential"),
])
def test_suggestion_is_the_fastest_mode_that_fits(free, requested, suggested):
    with pytest.raises(InsufficientGPUMemoryError, match=f"set offload to '{suggested}'"):
        check_gpu_memory(ESTIMATE, free, requested)


def test_when_nothing_fits_the_smallest_need_is_given():
    with pytest.raises(InsufficientGPUMemoryError, match=r"Even offload 'sequential' needs about 7.0 GiB"):
        check_gpu_memory(ESTIMATE, 5 * GiB, "none")


def test_requirements_by_mode():
    assert ESTIMATE.required("none") == int(19.5 * GiB)
    assert ESTIMATE.required("model") == 14 * GiB
    assert ESTIMATE.required("sequential") == 7 * GiB
    with pytest.raises(Exception, match="unknown offload mode"):
        ESTIMATE.required("disk")


def test_loader_checks_memory_before_allocating():
    with pytest.raises(InsufficientGPUMemoryError):
        load_worldstereo(FIXTURES / "camera", free_memory_bytes=GiB // 2)
    assert load_worldstereo(FIXTURES / "camera", free_memory_bytes=64 * GiB) is not None


def test_companion_sizes_come_from_the_backbone_folder(tmp_path, full_memory_model):
    from safetensors.torch import save_file

    model, _ = full_memory_model
    (tmp_path / "text_encoder").mkdir()
    save_file({"a": torch.zeros(1000, 10), "b": torch.zeros(500)}, tmp_path / "text_encoder" / "model-00001-of-00001.safetensors")
    estimate = estimate_memory(model, base_dir=tmp_path)
    assert estimate.aux_bytes["text_encoder"] == 10_500 * 2  # read from the header, at bf16
    assert estimate.aux_bytes["vae"] == 127_000_000 * 2  # absent: the Wan2.1 default
