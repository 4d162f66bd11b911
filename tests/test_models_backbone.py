"""The Wan backbone on its own, the attention backends, and the config checks (tiny, CPU, seeded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keyframe_worlds.bridge.errors import KeyframeWorldsError
from keyframe_worlds.engine.models import attention
from keyframe_worlds.engine.models.control_branch import ControlBranchConfig
from keyframe_worlds.engine.models.offload import enable_sequential_offload
from keyframe_worlds.engine.models.weights import load_worldstereo
from keyframe_worlds.engine.models.stereo_memory import StereoMemoryConfig
from keyframe_worlds.engine.models.wan_transformer import (ModelConfigError, WanRotaryEmbedding,
                                                           WanTransformer3DModel, WanTransformerConfig)
from keyframe_worlds.engine.models.worldstereo import WorldStereoConfig

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "worldstereo"
TINY = json.loads((FIXTURES / "camera" / "transformer_config.json").read_text())


def camera_inputs() -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(FIXTURES / "camera" / "inputs.safetensors").items()}


def memory_inputs() -> dict[str, torch.Tensor]:
    """The memory fixture's forward inputs (its ``aux.*`` entries describe them, they are not inputs)."""
    return {k: v for k, v in load_file(FIXTURES / "memory" / "inputs.safetensors").items() if not k.startswith("aux.")}


def test_plain_backbone_equals_camera_model_without_control():
    """The backbone alone is the camera model with its control residuals switched off."""
    camera = load_worldstereo(FIXTURES / "camera")
    backbone = WanTransformer3DModel(WanTransformerConfig.from_dict(TINY))
    weights = {k: v for k, v in camera.state_dict().items() if not k.startswith("controlnet.")}
    backbone.load_state_dict(weights)  # strict: the backbone key set is exactly the rest
    inputs = camera_inputs()
    with torch.no_grad():
        plain = backbone(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
                         inputs["encoder_hidden_states_image"])
        for p in camera.controlnet.proj_out.parameters():
            p.zero_()
        no_control = camera(**inputs)
    assert torch.equal(plain, no_control)


def test_attention_backend_is_swappable():
    calls = []

    def explicit_softmax(q, k, v):
        calls.append(q.shape)
        scores = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) / q.shape[-1] ** 0.5
        return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v.double()).to(q.dtype)

    model = load_worldstereo(FIXTURES / "memory")
    inputs = memory_inputs()
    attention.register_attention_backend("explicit", explicit_softmax)
    attention.set_attention_backend("explicit")
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        attention.set_attention_backend("native")
    # 3 blocks x (joint self + text + image) + 2 control blocks
    assert len(calls) == 3 * 3 + 2
    ref = load_file(FIXTURES / "memory" / "outputs.safetensors")["output"]
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    with pytest.raises(KeyframeWorldsError, match="unknown attention backend"):
        attention.set_attention_backend("flash9")


def test_sequential_offload_hooks_keep_the_result():
    model = load_worldstereo(FIXTURES / "camera")
    enable_sequential_offload(model, torch.device("cpu"))
    assert all(len(block._forward_pre_hooks) == 1 for block in model.blocks)
    with torch.no_grad():
        out = model(**camera_inputs())
    assert torch.equal(out, load_file(FIXTURES / "camera" / "outputs.safetensors")["output"])


def test_block_streaming_keeps_two_blocks_on_the_device_and_copies_nothing_back():
    """Streaming to the CPU itself still makes a copy per visit, so the test sees which blocks hold a
    device copy while each block runs, and that afterwards every block is back on its own CPU memory."""
    model = load_worldstereo(FIXTURES / "memory")
    host = [[t.data_ptr() for t in (*b.parameters(), *b.buffers())] for b in model.blocks]
    streamer = enable_sequential_offload(model, torch.device("cpu"))
    assert model.block_streamer is streamer
    copied = lambda: {j for j, b in enumerate(model.blocks)  # noqa: E731
                      if [t.data_ptr() for t in (*b.parameters(), *b.buffers())] != host[j]}
    seen = []
    for i, block in enumerate(model.blocks):  # registered after the streamer's hooks, so they run after them
        block.register_forward_pre_hook(lambda module, args, i=i: seen.append((i, copied())))
    with torch.no_grad():
        out = model(**memory_inputs())
    n = len(model.blocks)
    assert [i for i, _ in seen] == list(range(n))
    # while block i runs, it and the next one (block 0 again after the last: the next step's) are there
    assert all(blocks == {i, (i + 1) % n} for i, blocks in seen) and streamer.max_on_device == 2
    assert copied() == {0}
    streamer.release()
    assert copied() == set()  # back on the very same CPU memory: nothing was copied back
    ref = load_file(FIXTURES / "memory" / "outputs.safetensors")["output"]
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none); the CPU test above covers the logic")
def test_block_streaming_on_a_gpu_equals_the_resident_model():
    inputs = {k: v.cuda() for k, v in memory_inputs().items()}
    resident = load_worldstereo(FIXTURES / "memory").cuda()
    streamed = load_worldstereo(FIXTURES / "memory")
    enable_sequential_offload(streamed, torch.device("cuda"))
    with torch.no_grad():
        expected = resident(**inputs)
        for _ in range(2):  # the second forward starts from the block prefetched by the first
            torch.testing.assert_close(streamed(**inputs), expected)
    assert all(p.is_pinned() for b in streamed.blocks for p in b.parameters() if not p.is_cuda)


def test_rotary_tables_rotate_pairs_by_position():
    rope = WanRotaryEmbedding(head_dim=128, patch_size=(1, 2, 2), max_seq_len=1024)
    assert rope.parts() == (44, 42, 42)
    cos, sin = rope(2, 3, 4)
    assert cos.shape == (1, 24, 1, 128) and cos.dtype == torch.float32
    assert torch.equal(cos[0, 0, 0], torch.ones(128))  # position (0, 0, 0): no rotation
    # token (frame 1, row 0, col 0): only the time part turns, its first pair by 1 radian
    assert torch.allclose(cos[0, 12, 0, :2], torch.cos(torch.tensor(1.0)).repeat(2))
    assert torch.equal(cos[0, 12, 0, 44:], torch.ones(84))
    with pytest.raises(KeyframeWorldsError, match="exceeds the rotary table"):
        rope(2, 3, 2000)


def test_latent_not_divisible_by_patch_is_refused():
    model = load_worldstereo(FIXTURES / "camera")
    inputs = camera_inputs()
    inputs["hidden_states"] = inputs["hidden_states"][..., :7]
    with pytest.raises(KeyframeWorldsError, match="not divisible by the patch"):
        model(**inputs)


@pytest.mark.parametrize("change,needle", [
    ({"qk_norm": "layer_norm"}, "qk_norm"),
    ({"attention_head_dim": 15}, "even"),
    ({"added_kv_proj_dim": 48}, "added_kv_proj_dim"),
    ({"image_dim": None}, "both be set"),
    ({"patch_size": [1, 2]}, "patch_size"),
    ({"num_layers": 0}, "num_layers"),
    ({"window_size": [-1, -1]}, "window_size"),
    ({"_class_name": "UNet3DConditionModel"}, "UNet3DConditionModel"),
])
def test_backbone_config_errors_name_the_field(change, needle):
    with pytest.raises(ModelConfigError, match=needle):
        WanTransformerConfig.from_dict({**TINY, **change})


def test_backbone_config_round_trip():
    config = WanTransformerConfig.from_dict(TINY)
    assert config.inner_dim == 32 and config.patch_size == (1, 2, 2)
    assert WanTransformerConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("change,needle", [
    ({"dim": 15}, "divisible by num_heads"),
    ({"mid_channels": 12}, "multiple of 8"),
    ({"add_channels": 3}, "add_channels"),
    ({"num_layers": -1}, "num_layers"),
])
def test_control_config_errors(change, needle):
    cfg = json.loads((FIXTURES / "camera" / "config.json").read_text())["controlnet_cfg"]
    with pytest.raises(ModelConfigError, match=needle):
        ControlBranchConfig.from_dict({**cfg, **change})
    with pytest.raises(ModelConfigError, match="missing ffn_dim"):
        ControlBranchConfig.from_dict({k: v for k, v in cfg.items() if k != "ffn_dim"})


def test_memory_config_needs_update_ref_and_pose_size():
    with pytest.raises(ModelConfigError, match="update_ref"):
        StereoMemoryConfig.from_dict({"main_camera_embedding": True, "camera_embedding_dim": 7})
    with pytest.raises(ModelConfigError, match="camera_embedding_dim"):
        StereoMemoryConfig.from_dict({"update_ref": True, "main_camera_embedding": True})


def test_variant_config_checks():
    memory = json.loads((FIXTURES / "memory" / "config.json").read_text())
    config = WorldStereoConfig.from_dict({**memory, "model_type": "worldstereo-memory-dmd", "dmd_start_steps": 250,
                                          "dmd_end_steps": 1000, "gen_shift": 5.0, "dmd_steps": 4,
                                          "future_setting": 1})
    assert config.dmd.steps == 4 and config.extra == {"future_setting": 1}
    with pytest.raises(ModelConfigError, match="incomplete"):
        WorldStereoConfig.from_dict({**memory, "model_type": "worldstereo-memory-dmd", "dmd_steps": 4})
    with pytest.raises(ModelConfigError, match="5B"):
        WorldStereoConfig.from_dict({**memory, "base_model": "Wan-AI/Wan2.2-TI2V-5B-Diffusers"})
    backbone = WanTransformerConfig.from_dict(TINY)
    too_deep = dict(memory, controlnet_cfg={**memory["controlnet_cfg"], "num_layers": 4})
    with pytest.raises(ModelConfigError, match="exceeds"):
        WorldStereoConfig.from_dict(too_deep).check_backbone(backbone)
    t2v = WanTransformerConfig.from_dict({**TINY, "in_channels": 16, "image_dim": None, "added_kv_proj_dim": None})
    with pytest.raises(ModelConfigError, match="in_channels 36"):
        WorldStereoConfig.from_dict(memory).check_backbone(t2v)


def test_command_line_lists_model_commands_without_torch():
    import subprocess
    import sys

    code = ("import sys; from keyframe_worlds.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    result = subprocess.run([sys.executable, "-m", "keyframe_worlds.cli", "model", "check", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--checkpoint" in result.stdout and "--inputs" in result.stdout
