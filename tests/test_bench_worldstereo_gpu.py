"""``bench/worldstereo_gpu.py`` on a machine without a GPU: a clear message, the traced memory figures,
a RESULT line, exit 0; and ``--tiny`` runs the whole benchmark path (every offload mode and weight storage,
the attention backends, guidance batched and in two calls) on the CPU."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT


def run_bench(*args: str) -> tuple[str, dict]:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "worldstereo_gpu.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(result) == 1, done.stdout
    figures = dict(item.split("=", 1) for item in result[0].split()[1:])
    return done.stdout, figures


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path; with a GPU the script benchmarks it")
def test_without_a_gpu_it_says_so_and_still_reports_the_traced_memory():
    out, figures = run_bench()
    assert "no CUDA GPU on this machine, so nothing was measured" in out
    assert figures["device"] == "none"
    gpu_only = ("dmd_segment_s", "memory_segment_s", "memory_segment_s_two_calls", "peak_gb", "mfu",
                "peak_gb_model_float8", "mfu_native", "mfu_cudnn", "mfu_flash", "mfu_sage", "mfu_guided_batched",
                "mfu_guided_two_calls")
    assert all(math.isnan(float(figures[k])) for k in gpu_only)
    need = {m: float(figures[f"traced_need_gb_{m}"]) for m in ("none", "model", "sequential")}
    assert need["sequential"] < 24 < need["model"] < need["none"]  # block streaming is the mode for a 24 GB card
    assert 0 < float(figures["traced_act_gb"]) < need["sequential"]
    for mode in ("none", "model", "sequential"):
        float8, pair = float(figures[f"traced_need_gb_{mode}_float8"]), float(figures[f"traced_need_gb_{mode}_pair"])
        assert float8 < need[mode] < pair  # float8 storage saves, a batch of two costs activations
    assert float(figures["traced_need_gb_model_float8"]) < 40 < need["model"]  # float8: model offload on 48 GB
    table = out[out.index("offload  storage"):].splitlines()
    assert len(table) >= 7 and "sequential   float8" in table[6] and "80:y/y" in table[1]


def test_tiny_configuration_runs_every_offload_mode_on_the_cpu():
    out, figures = run_bench("--tiny", "--memory-steps", "2")
    assert figures["device"] == "cpu-tiny"
    for key in ("dmd_segment_s", "memory_segment_s", "memory_segment_s_two_calls", "dmd_segment_s_model_compute",
                "dmd_segment_s_sequential_compute", "dmd_segment_s_none_float8", "dmd_segment_s_model_float8"):
        assert 0 < float(figures[key]) < 120
    assert "memory, batched guidance: 2 guided steps took" in out and "two calls per step: 2 guided" in out
    assert "attention   cudnn: not measured: attention 'cudnn' needs a CUDA GPU" in out
    assert "attention  native: denoising steps" in out
