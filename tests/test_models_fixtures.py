"""The WorldStereo networks against the reference outputs in ../shared/fixtures/worldstereo/.

Each fixture folder is loaded as it is (config.json, transformer_config.json,
model.safetensors with every key), the forward runs on inputs.safetensors and
must reproduce outputs.safetensors to 1e-4 relative in float32 on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keyframe_worlds.engine.models.weights import load_worldstereo
from keyframe_worlds.engine.models.wan_transformer import WAN21_I2V_14B_480P, WanTransformerConfig
from keyframe_worlds.engine.models.worldstereo import (WorldStereoCameraModel, WorldStereoConfig,
                                                       WorldStereoMemoryModel, build_worldstereo)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "worldstereo"
RTOL = 1e-4


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|."""
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: load_worldstereo(FIXTURES / name) for name in ("camera", "memory")}


def forward_inputs(name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(FIXTURES / name / "inputs.safetensors").items() if not k.startswith("aux.")}


def outputs(name: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / name / "outputs.safetensors")


@pytest.mark.parametrize("name,cls", [("camera", WorldStereoCameraModel), ("memory", WorldStereoMemoryModel)])
def test_fixture_forward_matches_reference(models, name, cls):
    model = models[name]
    assert isinstance(model, cls)
    with torch.no_grad():
        ours = model(**forward_inputs(name))
    err = relative_error(ours, outputs(name)["output"])
    print(f"{name}: max relative error {err:.3e}")
    assert err <= RTOL


def test_camera_output_ignores_extrinsics_and_intrinsics(models):
    inputs = forward_inputs("camera")
    with torch.no_grad():
        with_cams = models["camera"](**inputs)
        inputs.pop("extrinsics"), inputs.pop("intrinsics")
        without = models["camera"](**inputs)
    assert torch.equal(with_cams, without)


@pytest.mark.parametrize("name", ["camera", "memory"])
def test_control_branch_matters_and_zeroed_residuals_match(models, name):
    model = models[name]
    inputs = forward_inputs(name)
    saved = {k: v.clone() for k, v in model.controlnet.proj_out.state_dict().items()}
    try:
        with torch.no_grad():
            for p in model.controlnet.proj_out.parameters():
                p.zero_()
            ours = model(**inputs)
    finally:
        model.controlnet.proj_out.load_state_dict(saved)
    reference = outputs(name)["output_with_controlnet_residuals_zeroed"]
    assert relative_error(ours, reference) <= RTOL
    assert (reference - outputs(name)["output"]).abs().max() > 1.0  # the branch really acts


def test_memory_without_camera_qt(models):
    inputs = forward_inputs("memory")
    inputs["camera_qt"] = inputs["camera_qt_ref"] = None
    with torch.no_grad():
        ours = models["memory"](**inputs)
    assert relative_error(ours, outputs("memory")["output_without_camera_qt"]) <= RTOL


def test_memory_reference_placement(models):
    inputs = forward_inputs("memory")
    inputs["ref_index"] = torch.tensor([2, 0])
    with torch.no_grad():
        ours = models["memory"](**inputs)
    assert relative_error(ours, outputs("memory")["output_ref_index_2_0"]) <= RTOL


def test_memory_update_ref_false():
    config = json.loads((FIXTURES / "memory" / "config.json").read_text())
    config["controlnet_cfg"]["update_ref"] = False
    backbone = WanTransformerConfig.from_dict(json.loads((FIXTURES / "memory" / "transformer_config.json").read_text()))
    model = build_worldstereo(WorldStereoConfig.from_dict(config), backbone)
    model.load_state_dict(load_file(FIXTURES / "memory" / "model.safetensors"))
    with torch.no_grad():
        ours = model(**forward_inputs("memory"))
    assert relative_error(ours, outputs("memory")["output_update_ref_false"]) <= RTOL


@pytest.mark.parametrize("name", ["camera", "memory"])
def test_intermediates_match(models, name):
    """Every hooked module output of the reference, by module path (ours uses the same paths)."""
    model = models[name]
    reference = load_file(FIXTURES / name / "intermediates.safetensors")
    captured: dict[str, list] = {}
    handles = []
    module_names = {key.split("#")[0] for key in reference if "#" in key}
    for module_name in module_names - {"rope", "controlnet_rope"}:
        module = model.get_submodule(module_name)
        handles.append(module.register_forward_hook(
            lambda mod, args, out, n=module_name: captured.setdefault(n, []).append(out)))
    try:
        with torch.no_grad():
            model(**forward_inputs(name))
    finally:
        for h in handles:
            h.remove()
    frames, rows, cols = model.token_grid(forward_inputs(name)["hidden_states"])
    if name == "memory":  # the stitched table: every target frame twice as wide
        captured["rope"] = [model.rope(frames, rows, 2 * cols)]
    else:
        captured["rope"] = [model.rope(frames, rows, cols)]
    captured["controlnet_rope"] = [model.controlnet.rope(frames, rows, cols)]
    checked = 0
    for key, expected in reference.items():
        if key.startswith("derived."):
            continue
        module_name, call = key.split("#call")
        index, _, element = call.partition(".")
        out = captured[module_name][int(index)]
        if element:
            out = out[int(element)]
        assert relative_error(out, expected) <= RTOL, key
        checked += 1
    assert checked >= 20


def _keys_and_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["camera", "memory"])
def test_tiny_key_set_matches_reference(name):
    tiny = json.loads((FIXTURES / "keys_tiny.json").read_text())[name]
    config = WorldStereoConfig.from_dict(json.loads((FIXTURES / name / "config.json").read_text()))
    backbone = WanTransformerConfig.from_dict(tiny["backbone_config"])
    with torch.device("meta"):
        model = build_worldstereo(config, backbone)
    assert _keys_and_shapes(model) == {e["key"]: e["shape"] for e in tiny["keys"]}
    assert sum(p.numel() for p in model.parameters()) == tiny["num_params"]


def _full_model(variant: dict, model_type: str):
    config = WorldStereoConfig.from_dict({"model_type": model_type, "base_model": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
                                          "controlnet_cfg": variant["controlnet_cfg"]})
    with torch.device("meta"):
        return build_worldstereo(config, WAN21_I2V_14B_480P)


@pytest.mark.parametrize("name", ["camera", "memory"])
def test_full_size_key_set_on_meta_device(name):
    full = json.loads((FIXTURES / "keys_full.json").read_text())
    assert WanTransformerConfig.from_dict(full["backbone_config"]) == WAN21_I2V_14B_480P
    variant = full["variants"][name]
    model = _full_model(variant, f"worldstereo-{name}")
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    assert _keys_and_shapes(model) == {e["key"]: e["shape"] for e in variant["keys"]}
    assert len(model.state_dict()) == variant["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == variant["num_params_total"]
    assert sum(p.numel() for p in model.controlnet.parameters()) == variant["num_params_controlnet"]


def test_full_size_ref_embedding_adds_one_table():
    extra = json.loads((FIXTURES / "keys_full.json").read_text())["memory_if_ref_embedding_true"]
    model = _full_model(extra, "worldstereo-memory")
    expected_extra = {e["key"]: e["shape"] for e in extra["extra_keys_vs_memory"]}
    keys = _keys_and_shapes(model)
    assert {k: keys[k] for k in expected_extra} == expected_extra
    assert len(keys) == extra["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == extra["num_params_total"]
