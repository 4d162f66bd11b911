"""Loading a variant folder on top of a Wan2.1 I2V diffusers folder, and every way that can go wrong.

The "released" layout is rebuilt from the fixtures in tmp_path: a tiny Wan
diffusers folder holding the backbone keys (``transformer/config.json`` +
safetensors) and a variant folder whose ``model.safetensors`` holds only the
keys that differ from the backbone (control branch, camera MLP).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from keyframe_worlds.bridge.errors import KeyframeWorldsError
from keyframe_worlds.cli import main as cli_main
from keyframe_worlds.engine.models.weights import (CheckpointError, KeyMismatchError, ModelPaths, WrongVariantError, default_hf_cache_dir, load_worldstereo, resolve_hf_cache)
from keyframe_worlds.engine.models.wan_transformer import ModelConfigError

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "worldstereo"
REPO_ID = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"


def is_variant_key(key: str) -> bool:
    return key.startswith(("controlnet.", "camera_embedding.", "ref_index_embedding."))


def write_base(root: Path, name: str, sharded: bool = False) -> Path:
    """A tiny Wan2.1 I2V diffusers folder (transformer only) with the fixture's backbone weights."""
    weights = {k: v for k, v in load_file(FIXTURES / name / "model.safetensors").items() if not is_variant_key(k)}
    transformer = root / "transformer"
    transformer.mkdir(parents=True)
    shutil.copy(FIXTURES / name / "transformer_config.json", transformer / "config.json")
    if not sharded:
        save_file(weights, transformer / "diffusion_pytorch_model.safetensors")
        return root
    keys = sorted(weights)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for file, part in halves.items():
        save_file({k: weights[k] for k in part}, transformer / file)
    index = {"metadata": {}, "weight_map": {k: f for f, part in halves.items() for k in part}}
    (transformer / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return root


def write_variant(root: Path, name: str, base_model: str = REPO_ID, extra: dict | None = None,
                  drop: tuple[str, ...] = (), config_changes: dict | None = None) -> Path:
    """A released-style variant folder: config.json + only the differing keys."""
    root.mkdir(parents=True)
    config = json.loads((FIXTURES / name / "config.json").read_text())
    config["base_model"] = base_model
    config.update(config_changes or {})
    (root / "config.json").write_text(json.dumps(config))
    weights = {k: v for k, v in load_file(FIXTURES / name / "model.safetensors").items()
               if is_variant_key(k) and k not in drop}
    weights.update(extra or {})
    save_file(weights, root / "model.safetensors")
    return root


def fixture_forward(model, name: str) -> torch.Tensor:
    inputs = {k: v for k, v in load_file(FIXTURES / name / "inputs.safetensors").items() if not k.startswith("aux.")}
    with torch.no_grad():
        return model(**inputs)


def assert_matches_golden(out: torch.Tensor, name: str) -> None:
    ref = load_file(FIXTURES / name / "outputs.safetensors")["output"]
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-4


@pytest.mark.parametrize("name", ["camera", "memory"])
def test_variant_on_backbone_folder_matches_golden(tmp_path, name):
    base = write_base(tmp_path / "wan", name)
    variant = write_variant(tmp_path / name, name)
    model = load_worldstereo(variant, base)
    report = model.load_report
    assert report.base_model_dir == base
    assert report.keys_from_backbone > 0 and report.keys_from_variant > 0
    assert report.keys_from_backbone + report.keys_from_variant == len(model.state_dict())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert_matches_golden(fixture_forward(model, name), name)


def test_sharded_backbone_and_relative_base_model(tmp_path):
    write_base(tmp_path / "wan", "camera", sharded=True)
    variant = write_variant(tmp_path / "camera", "camera", base_model="../wan")
    model = load_worldstereo(variant)  # base_model resolved relative to the variant folder
    assert model.load_report.base_model_dir.resolve() == (tmp_path / "wan").resolve()
    assert_matches_golden(fixture_forward(model, "camera"), "camera")


def test_variant_keys_override_backbone_keys(tmp_path):
    base = write_base(tmp_path / "wan", "camera")
    new_head = torch.full((64, 32), 0.5)
    variant = write_variant(tmp_path / "camera", "camera", extra={"proj_out.weight": new_head})
    model = load_worldstereo(variant, base)
    assert torch.equal(model.proj_out.weight, new_head)


def test_engine_setting_path_is_used(tmp_path):
    base = write_base(tmp_path / "somewhere" / "wan", "camera")
    variant = write_variant(tmp_path / "camera", "camera", base_model="not/cached")
    model = load_worldstereo(variant, paths=ModelPaths(wan_i2v_dir=base, hf_cache_dir=tmp_path / "empty"))
    assert model.load_report.base_model_dir == base


def make_hf_cache(cache: Path, revision: str = "0123abcd", with_ref: bool = True) -> Path:
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = write_base(repo / "snapshots" / revision, "memory")
    if with_ref:
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_base_model_resolved_from_hf_cache(tmp_path):
    snapshot = make_hf_cache(tmp_path / "hub")
    (tmp_path / "hub" / ("models--" + REPO_ID.replace("/", "--")) / "snapshots" / "stale").mkdir()
    variant = write_variant(tmp_path / "worldstereo-memory", "memory")
    model = load_worldstereo(variant, paths=ModelPaths(hf_cache_dir=tmp_path / "hub"))
    assert model.load_report.base_model_dir == snapshot
    assert_matches_golden(fixture_forward(model, "memory"), "memory")


def test_hf_cache_without_ref_takes_a_complete_snapshot(tmp_path):
    snapshot = make_hf_cache(tmp_path / "hub", with_ref=False)
    assert resolve_hf_cache(REPO_ID, tmp_path / "hub") == snapshot
    assert resolve_hf_cache("Other/model", tmp_path / "hub") is None
    assert resolve_hf_cache("../not-a-repo-id", tmp_path / "hub") is None


def test_hf_cache_location_follows_the_environment(tmp_path):
    assert default_hf_cache_dir({"HF_HUB_CACHE": str(tmp_path / "a")}) == tmp_path / "a"
    assert default_hf_cache_dir({"HF_HOME": str(tmp_path / "b")}) == tmp_path / "b" / "hub"
    assert default_hf_cache_dir({"XDG_CACHE_HOME": str(tmp_path / "c")}) == tmp_path / "c" / "huggingface" / "hub"
    paths = ModelPaths.from_env({"KEYFRAME_WORLDS_WAN_I2V_DIR": str(tmp_path / "wan"), "HF_HOME": str(tmp_path)})
    assert paths.wan_i2v_dir == tmp_path / "wan" and paths.hf_cache_dir == tmp_path / "hub"


def test_unresolvable_base_model_lists_what_was_tried(tmp_path):
    variant = write_variant(tmp_path / "camera", "camera")
    with pytest.raises(CheckpointError) as err:
        load_worldstereo(variant, paths=ModelPaths(hf_cache_dir=tmp_path / "hub"))
    message = str(err.value)
    assert REPO_ID in message and "Hugging Face cache" in message and "KEYFRAME_WORLDS_WAN_I2V_DIR" in message


def test_wrong_explicit_base_folder(tmp_path):
    variant = write_variant(tmp_path / "camera", "camera")
    with pytest.raises(CheckpointError, match="not a Wan2.1 diffusers folder"):
        load_worldstereo(variant, tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_worldstereo(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="variant config not found"):
        load_worldstereo(tmp_path / "empty")
    variant = write_variant(tmp_path / "camera", "camera")
    (variant / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights not found"):
        load_worldstereo(variant)


def test_pickles_are_refused(tmp_path):
    variant = write_variant(tmp_path / "camera", "camera")
    (variant / "model.safetensors").rename(variant / "model.bin")
    with pytest.raises(CheckpointError, match="pickle") as err:
        load_worldstereo(variant)
    assert "model.bin" in str(err.value)
    base = write_base(tmp_path / "wan", "camera")
    shard = base / "transformer" / "diffusion_pytorch_model.safetensors"
    shard.rename(shard.with_suffix(".bin"))
    variant2 = write_variant(tmp_path / "camera2", "camera")
    with pytest.raises(CheckpointError, match="pickle"):
        load_worldstereo(variant2, base)


def test_corrupt_safetensors(tmp_path):
    variant = write_variant(tmp_path / "camera", "camera")
    (variant / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_worldstereo(variant)


def test_wrong_variant_asked_for(tmp_path):
    variant = write_variant(tmp_path / "memory", "memory")
    with pytest.raises(WrongVariantError, match="worldstereo-camera"):
        load_worldstereo(variant, expect_variant="worldstereo-camera")


def test_config_and_weights_of_different_variants(tmp_path):
    base = write_base(tmp_path / "wan", "memory")
    memory_cfg = json.loads((FIXTURES / "memory" / "config.json").read_text())
    # memory weights under a camera config
    variant = write_variant(tmp_path / "a", "memory")
    camera_cfg = json.loads((FIXTURES / "camera" / "config.json").read_text())
    camera_cfg["base_model"] = REPO_ID
    (variant / "config.json").write_text(json.dumps(camera_cfg))
    with pytest.raises(WrongVariantError, match="memory variant"):
        load_worldstereo(variant, base)
    # camera weights under a memory config
    variant = write_variant(tmp_path / "b", "camera")
    memory_cfg["base_model"] = REPO_ID
    (variant / "config.json").write_text(json.dumps(memory_cfg))
    with pytest.raises(WrongVariantError, match="worldstereo-camera"):
        load_worldstereo(variant, base)


def test_unknown_model_type(tmp_path):
    variant = write_variant(tmp_path / "x", "camera", config_changes={"model_type": "worldstereo-panorama"})
    with pytest.raises(ModelConfigError, match="worldstereo-panorama"):
        load_worldstereo(variant)


def test_model_type_from_folder_name(tmp_path):
    base = write_base(tmp_path / "wan", "camera")
    variant = write_variant(tmp_path / "worldstereo-camera", "camera")
    config = json.loads((variant / "config.json").read_text())
    del config["model_type"]
    (variant / "config.json").write_text(json.dumps(config))
    assert load_worldstereo(variant, base).variant.model_type == "worldstereo-camera"


def test_missing_key_is_listed(tmp_path):
    base = write_base(tmp_path / "wan", "camera")
    variant = write_variant(tmp_path / "camera", "camera", drop=("controlnet.proj_in.weight",))
    with pytest.raises(KeyMismatchError) as err:
        load_worldstereo(variant, base)
    assert err.value.missing == ["controlnet.proj_in.weight"]
    assert "controlnet.proj_in.weight" in str(err.value) and "1 missing" in str(err.value)


def test_unexpected_and_misshapen_keys_are_listed(tmp_path):
    base = write_base(tmp_path / "wan", "camera")
    variant = write_variant(tmp_path / "camera", "camera", extra={
        "controlnet.extra_layer.weight": torch.zeros(2),
        "controlnet.proj_in.bias": torch.zeros(17),
    })
    with pytest.raises(KeyMismatchError) as err:
        load_worldstereo(variant, base)
    assert err.value.unexpected == ["controlnet.extra_layer.weight"]
    assert err.value.mismatched == ["controlnet.proj_in.bias (file [17], network [16])"]
    assert "controlnet.extra_layer.weight" in str(err.value)


def test_backbone_config_mismatch_between_variant_and_base(tmp_path):
    base = write_base(tmp_path / "wan", "camera")
    config = json.loads((base / "transformer" / "config.json").read_text())
    config["num_layers"] = 2
    (base / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_layers"):
        load_worldstereo(FIXTURES / "camera", base)


def test_unneeded_norm_added_q_keys_are_ignored(tmp_path):
    base = write_base(tmp_path / "wan", "camera")
    path = base / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    weights["blocks.0.attn2.norm_added_q.weight"] = torch.ones(32)
    save_file(weights, path)
    model = load_worldstereo(write_variant(tmp_path / "camera", "camera"), base)
    assert model.load_report.ignored_backbone_keys == ["blocks.0.attn2.norm_added_q.weight"]


def test_bfloat16_load_keeps_the_fp32_parts(tmp_path):
    model = load_worldstereo(FIXTURES / "camera", dtype=torch.bfloat16)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["controlnet.controlnet_blocks.0.ffn.0.weight"] == torch.bfloat16
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32
    assert dtypes["blocks.0.norm2.weight"] == torch.float32
    out = fixture_forward(model, "camera")
    assert out.dtype == torch.bfloat16
    ref = load_file(FIXTURES / "camera" / "outputs.safetensors")["output"]
    assert float((out.float() - ref).abs().max() / ref.abs().max()) < 0.1  # bf16 rounding, same function


# -- the command line ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["camera", "memory"])
def test_model_check_command_reproduces_golden(tmp_path, capsys, name):
    out = tmp_path / "out.safetensors"
    rc = cli_main(["model", "check", "--checkpoint", str(FIXTURES / name), "--inputs",
                   str(FIXTURES / name / "inputs.safetensors"), "--out", str(out), "--device", "cpu",
                   "--compare", str(FIXTURES / name / "outputs.safetensors")])
    assert rc == 0
    assert_matches_golden(load_file(out)["output"], name)
    assert f"worldstereo-{name}" in capsys.readouterr().out


def test_model_check_on_released_layout(tmp_path):
    base = write_base(tmp_path / "wan", "memory")
    variant = write_variant(tmp_path / "memory", "memory")
    out = tmp_path / "out.safetensors"
    rc = cli_main(["model", "check", "--checkpoint", str(variant), "--base-model", str(base), "--inputs",
                   str(FIXTURES / "memory" / "inputs.safetensors"), "--out", str(out)])
    assert rc == 0
    assert_matches_golden(load_file(out)["output"], "memory")


def test_model_check_reports_a_mismatch(tmp_path, capsys):
    golden = load_file(FIXTURES / "camera" / "outputs.safetensors")
    save_file({"output": golden["output"] + 1.0}, tmp_path / "wrong.safetensors")
    rc = cli_main(["model", "check", "--checkpoint", str(FIXTURES / "camera"), "--inputs",
                   str(FIXTURES / "camera" / "inputs.safetensors"), "--out", str(tmp_path / "o.safetensors"),
                   "--compare", str(tmp_path / "wrong.safetensors")])
    assert rc == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_model_check_errors_exit_2(tmp_path, capsys):
    rc = cli_main(["model", "check", "--checkpoint", str(FIXTURES / "memory"), "--inputs",
                   str(FIXTURES / "camera" / "inputs.safetensors"), "--out", str(tmp_path / "o.safetensors")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "extrinsics" in err and "reference_latent" in err
    rc = cli_main(["model", "check", "--checkpoint", str(tmp_path / "missing"), "--inputs",
                   str(FIXTURES / "camera" / "inputs.safetensors"), "--out", str(tmp_path / "o.safetensors")])
    assert rc == 2 and "checkpoint folder not found" in capsys.readouterr().err
    rc = cli_main(["model", "check", "--checkpoint", str(FIXTURES / "camera"), "--inputs",
                   str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o.safetensors")])
    assert rc == 2 and "inputs file not found" in capsys.readouterr().err


def test_forward_input_errors_are_clear():
    model = load_worldstereo(FIXTURES / "memory")
    inputs = {k: v for k, v in load_file(FIXTURES / "memory" / "inputs.safetensors").items()
              if not k.startswith("aux.")}
    bad = dict(inputs, ref_index=torch.tensor([0, 3]))
    with pytest.raises(KeyframeWorldsError, match=r"ref_index values must lie in \[0, 2\]"):
        model(**bad)
    bad = dict(inputs, render_mask=inputs["render_mask"][..., :32])
    with pytest.raises(KeyframeWorldsError, match="render_mask must be"):
        model(**bad)
    bad = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :77])
    with pytest.raises(KeyframeWorldsError, match="512"):
        model(**bad)
    bad = dict(inputs, camera_embedding=None)
    with pytest.raises(KeyframeWorldsError, match="pass camera_embedding"):
        model(**bad)
    bad = dict(inputs, reference_latent=None)
    with pytest.raises(KeyframeWorldsError, match="reference_latent"):
        model(**bad)
