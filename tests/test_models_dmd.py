"""The DMD few-step schedule against the reference goldens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keyframe_worlds.bridge.errors import KeyframeWorldsError
from keyframe_worlds.engine.models.dmd_scheduler import DMDScheduler, DMDSchedulerConfig

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "worldstereo"
CONFIGS = json.loads((FIXTURES / "dmd_scheduler_goldens.json").read_text())["configs"]


@pytest.fixture(scope="module")
def goldens():
    return load_file(FIXTURES / "dmd_scheduler_goldens.safetensors")


def scheduler_for(case: dict) -> DMDScheduler:
    return DMDScheduler(DMDSchedulerConfig(start_timesteps=case["start_timesteps"],
                                           num_train_timesteps=case["num_train_timesteps"],
                                           shift=case["shift"], steps=case["dmd_steps"]))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-4 * b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("case", CONFIGS, ids=lambda c: c["tensor_prefix"])
def test_schedule_matches(case, goldens):
    s = scheduler_for(case)
    prefix = case["tensor_prefix"]
    assert s.timesteps.dtype == torch.float32
    assert torch.equal(s.timesteps, goldens[f"{prefix}.timesteps"])  # float32 rounding, exactly
    assert torch.equal(s.timesteps, torch.tensor(case["timesteps"], dtype=torch.float32))
    assert close(s.sigmas, goldens[f"{prefix}.sigmas"])


@pytest.mark.parametrize("case", CONFIGS, ids=lambda c: c["tensor_prefix"])
def test_steps_rollout_and_noise_match(case, goldens):
    s = scheduler_for(case)
    prefix = case["tensor_prefix"]
    velocity, sample = goldens["step_inputs.model_output"], goldens["step_inputs.sample"]
    for i in range(case["dmd_steps"]):
        assert close(s.step(velocity, sample, i), goldens[f"{prefix}.step{i}.prev_sample"]), i
    x = sample
    for i in range(case["dmd_steps"]):
        x = s.step(velocity, x, i)
    assert close(x, goldens[f"{prefix}.rollout_constant_model_output"])
    noise = goldens["add_noise_inputs.noise"]
    assert close(s.add_noise(sample, noise, s.timesteps[:1]), goldens[f"{prefix}.add_noise_at_t0"])
    assert close(s.add_noise(sample, noise, s.timesteps[-1:]), goldens[f"{prefix}.add_noise_at_t_last"])


def test_last_step_lands_on_the_clean_sample():
    s = DMDScheduler()
    clean, noise = torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
    x = s.add_noise(clean, noise, s.timesteps[0])
    for i in range(len(s.timesteps)):
        x = s.step(noise - clean, x, i)  # the exact velocity of the straight path
    assert torch.allclose(x, clean, atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(shift=0), dict(steps=0), dict(start_timesteps=1000),
                                    dict(num_train_timesteps=-1)])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(KeyframeWorldsError):
        DMDSchedulerConfig(**kwargs)


def test_step_index_out_of_range():
    with pytest.raises(KeyframeWorldsError, match="step index 4"):
        DMDScheduler().step(torch.zeros(1), torch.zeros(1), 4)
