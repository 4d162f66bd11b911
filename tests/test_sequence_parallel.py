"""One transformer forward across processes (``engine/models/sequence_parallel.py``): Ulysses all-to-all
attention against plain attention, and ``torchrun --nproc_per_node 2`` runs of ``model check``,
``model check-pipeline`` and a tiny worldstereo ``run`` against the same commands in one process. All on
the CPU with the gloo backend; outputs must agree within float32 noise (1e-5 of their scale)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import REPO_ROOT, WORLDSTEREO_FIXTURES
from test_pipeline_check import copy_case
from keyframe_worlds.engine.models import sequence_parallel as sp
from keyframe_worlds.engine.models.attention import attend

PIPELINE = WORLDSTEREO_FIXTURES / "pipeline"
WAN = PIPELINE / "wan_tiny"
TOLERANCE = 1e-5  # of the reference's largest magnitude


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())


def torchrun(*argv: str, cwd=None, ok: bool = True, **env_extra: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 -m keyframe_worlds.cli ...`` on a free port."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "keyframe_worlds.cli", *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=cwd or REPO_ROOT.parent)
    if not ok:
        return result
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sequence-parallel over 2 processes (gloo)" in result.stderr, result.stderr
    return result


def shared_forwards(result: subprocess.CompletedProcess) -> int:
    line = next(l for l in result.stderr.splitlines() if "sequence-parallel over" in l)
    return int(line.split(": ")[-1].split()[0])


# -- the Ulysses wrapper, two gloo processes --------------------------------------------------------

def _ulysses_worker(rank: int, port: int, cases: tuple[tuple[int, ...], ...], heads: int, failures) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for lengths in cases:
            _check_ulysses(rank, lengths, heads)
    except BaseException as exc:  # report to the parent: spawn would only say the process failed
        failures.put(f"rank {rank}: {exc!r}")
        raise
    finally:
        dist.destroy_process_group()


def _check_ulysses(rank: int, lengths: tuple[int, ...], heads: int) -> None:
    torch.manual_seed(0)  # the same whole streams on both ranks
    streams = [tuple(torch.randn(2, n, heads, 8, dtype=torch.float64) for _ in range(3)) for n in lengths]
    whole = attend(*(torch.cat([s[i] for s in streams], dim=1) for i in range(3))).split(list(lengths), dim=1)
    shards = [sp.TokenShard(n, 2, rank) for n in lengths]
    local = [tuple(shard.take(t) for t in s) for s, shard in zip(streams, shards)]
    outs = sp.ulysses_attention(local, shards)
    for out, ref, shard in zip(outs, whole, shards):
        assert out.shape == (2, shard.chunk, heads, 8)
        gathered = shard.gather(out)
        assert gathered.shape == ref.shape
        assert torch.allclose(gathered, ref, atol=1e-12), float((gathered - ref).abs().max())
    # an uneven split: heads that do not divide by the ranks are refused with a clear message
    try:
        sp.ulysses_attention([tuple(t[:, :, :1] for t in local[0])], shards[:1])
    except sp.SequenceParallelError as exc:
        assert "1 attention heads cannot be split over 2 ranks" in str(exc)
    else:
        raise AssertionError("one head over two ranks was accepted")


def test_ulysses_attention_equals_attention_over_the_whole_sequence():
    """Token counts not divisible by 2 (padding cut off before attention): one stream of 7, then two
    streams (5 references, 7 targets) attended jointly as the stereo memory's [references | targets]."""
    failures = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(_ulysses_worker, args=(free_port(), ((7,), (5, 7)), 4, failures), nprocs=2, join=True)
    except mp.ProcessRaisedException:
        pass
    assert failures.empty(), failures.get()


def test_token_shard_slices_and_padding():
    shard = sp.TokenShard(7, 2, 1)
    assert (shard.chunk, shard.padded) == (4, 8)
    x = torch.arange(7.0).view(1, 7, 1)
    assert shard.take(x).flatten().tolist() == [4.0, 5.0, 6.0, 0.0]  # rank 1: the last 3 tokens and one pad
    assert sp.TokenShard(7, 2, 0).take(x).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    assert sp.TokenShard(7).take(x) is x  # alone: the whole stream, no copy


def test_alone_every_helper_is_the_identity():
    assert sp.active() is None and sp.launched_world_size({}) == 1
    shard = sp.token_shard(10)
    assert (shard.world_size, shard.rank) == (1, 0)
    q, k, v = (torch.randn(1, 6, 2, 4) for _ in range(3))
    qr, kr, vr = (torch.randn(1, 3, 2, 4) for _ in range(3))
    with sp.token_streams(target=shard, reference=sp.token_shard(3)):
        out_ref, out = sp.attend_streams([(qr, kr, vr), (q, k, v)], (sp.REFERENCE_STREAM, sp.TARGET_STREAM))
    joint = attend(torch.cat([qr, q], 1), torch.cat([kr, k], 1), torch.cat([vr, v], 1))
    assert torch.equal(out_ref, joint[:, :3]) and torch.equal(out, joint[:, 3:])


def test_a_launch_without_torchrun_variables_is_one_clear_error():
    with pytest.raises(sp.SequenceParallelError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT is not set"):
        with sp.launch("cpu", environ={"WORLD_SIZE": "2"}):
            pass


# -- the commands under torchrun ---------------------------------------------------------------------

def test_model_check_on_two_processes_equals_one(tmp_path):
    """With the blocks' weights sharded by FSDP2 too (3 backbone + 2 control blocks of the tiny memory model)."""
    folder = WORLDSTEREO_FIXTURES / "memory"
    common = ["model", "check", "--checkpoint", str(folder), "--inputs", str(folder / "inputs.safetensors"),
              "--device", "cpu"]
    from keyframe_worlds.cli import main

    assert main([*common, "--out", str(tmp_path / "one.safetensors")]) == 0
    result = torchrun(*common, "--out", str(tmp_path / "two.safetensors"), **{sp.SHARD_WEIGHTS_ENV: "1"})
    assert shared_forwards(result) == 1
    assert "5 blocks' weights sharded (FSDP2)" in result.stderr
    one, two = load_file(tmp_path / "one.safetensors")["output"], load_file(tmp_path / "two.safetensors")["output"]
    assert relative_error(two, one) <= TOLERANCE
    assert relative_error(two, load_file(folder / "outputs.safetensors")["output"]) <= 1e-4  # and the golden
    assert result.stdout.count("written to") == 1  # rank 0 alone reports (and writes)


@pytest.mark.parametrize("bad", ["missing", "shape"])
def test_bad_input_is_one_line_and_no_rank_waits(tmp_path, bad):
    """Rank 0 fails before the first forward (no inputs file: the other rank is told to stop), or inside
    it (a wrong shape, found by both ranks): one error line, no traceback of a broken connection, a
    non-zero exit, no output."""
    folder = WORLDSTEREO_FIXTURES / "memory"
    inputs = tmp_path / "inputs.safetensors"
    if bad == "missing":
        expected = f"keyframe-worlds: error: inputs file not found: {inputs}"
    else:
        from safetensors.torch import save_file

        tensors = load_file(folder / "inputs.safetensors")
        tensors["camera_qt"] = tensors["camera_qt"][:, :3].contiguous()
        save_file(tensors, inputs)
        expected = "keyframe-worlds: error: camera_qt must be [1, 4, 7], got [1, 3, 7]"
    result = torchrun("model", "check", "--checkpoint", str(folder), "--inputs", str(inputs),
                      "--out", str(tmp_path / "out.safetensors"), "--device", "cpu", ok=False)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("keyframe-worlds")]
    assert ours == [expected], result.stderr
    assert "[rank1]" not in result.stderr and not (tmp_path / "out.safetensors").exists()


def test_check_pipeline_on_two_processes_equals_one(tmp_path):
    """The memory case (reference stream, guidance), without its extra diagnostic calls to keep it short:
    every step's intermediates and the final latents of 2 processes against 1."""
    case = copy_case("memory", tmp_path)
    meta = json.loads((case / "case.json").read_text())
    meta.pop("diag_keys")
    (case / "case.json").write_text(json.dumps(meta))
    from keyframe_worlds.cli import main

    argv = ["model", "check-pipeline", str(case), "--wan-dir", str(WAN), "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "one.safetensors")]) == 0
    result = torchrun(*argv, "--out", str(tmp_path / "two.safetensors"))
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert set(one) == set(two)
    assert relative_error(two["final_latents"], one["final_latents"]) <= TOLERANCE
    for key in one:
        if key.startswith("step") and one[key].is_floating_point():
            assert relative_error(two[key], one[key]) <= TOLERANCE, key
    # one shared forward a step at least (two when guidance runs as separate forwards)
    assert meta["steps"] <= shared_forwards(result) <= 2 * meta["steps"]
    assert result.stdout.count("tensors written to") == 1  # rank 0 alone reports (and writes)


def test_a_tiny_worldstereo_run_on_two_processes_equals_one(tmp_path):
    """The job runner drives the pipeline on rank 0 (and writes the bundle); rank 1 writes nothing."""
    from keyframe_worlds.bridge.spec import load_manifest
    from keyframe_worlds.cli import main
    from keyframe_worlds.engine.io.images import read_rgb
    from keyframe_worlds.engine.testing.tiny_models import write_tiny_variant, write_tiny_wan_folder
    from test_worldstereo_generator import write_job

    wan = write_tiny_wan_folder(tmp_path / "models" / "wan")
    variant = write_tiny_variant(tmp_path / "models" / "worldstereo-memory-dmd", "worldstereo-memory-dmd", seed=21)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    opts = {"checkpoint": str(variant), "wan_dir": str(wan), "size": [48, 64], "keyframes": 3, "keyframe_stride": 2,
            "device": "cpu"}
    write_job(job_dir, opts, walk_n=5)
    job = json.loads((job_dir / "job.json").read_text())
    job["trajectories"] = job["trajectories"][:1]  # one camera, one segment of 5 frames (3 generated)
    (job_dir / "job.json").write_text(json.dumps(job))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    assert main(["run", str(job_dir / "job.json"), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    result = torchrun("run", str(job_dir / "job.json"), "--out", str(tmp_path / "two"), "--quiet", cwd=tmp_path)
    assert shared_forwards(result) == 4  # the distilled sampler's 4 steps, no guidance
    one, two = load_manifest(tmp_path / "one"), load_manifest(tmp_path / "two")
    assert [len(t.frames) for t in two.trajectories] == [5]
    for a, b in zip(one.trajectories[0].frames, two.trajectories[0].frames):
        rgb_one = read_rgb(tmp_path / "one" / a.image).astype(int)
        rgb_two = read_rgb(tmp_path / "two" / b.image).astype(int)
        # 8-bit frames of latents within float32 noise: equal but where a value sits on a rounding edge
        assert np.abs(rgb_one - rgb_two).max() <= 1 and (rgb_one == rgb_two).mean() > 0.99
    # nothing but the two bundles was written (rank 1 ran in tmp_path too, and wrote no file)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")
                   if p.relative_to(tmp_path).parts[0] not in ("one", "two"))
    assert set(after) == set(before)


# -- bench/worldstereo_sp.py: the paper estimate the README quotes, and the no-GPU path ----------------

def _bench():
    sys.path.insert(0, str(REPO_ROOT))
    import bench.worldstereo_sp as bench

    return bench


def test_the_readme_scaling_table_is_the_estimate_function_output():
    bench = _bench()
    rows = bench.estimate_scaling()
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for line in bench.estimate_table(rows):
        assert line in readme, f"README lacks (or has another) estimate row: {line}"
    # the traffic each rank sends: four bfloat16 all-to-alls of its tokens per attention layer, (P-1)/P leaving
    per_frame = (480 // 16) * (768 // 16)
    tokens, joint = 21 * per_frame, 29 * per_frame
    for p in (2, 4, 8):
        expected = (40 * 4 * (joint / p) * 5120 * 2 + 20 * 4 * (tokens / p) * 1024 * 2) * (p - 1) / p
        sent = bench.traffic_per_forward(p, 21, 480, 768, 8)
        assert expected < sent < expected * 1.05  # plus the final gather and the latents: a few %
    assert bench.traffic_per_forward(1, 21, 480, 768, 8) == 0
    single = rows[0].forward_s
    by_link = {(r.ranks, r.link): r for r in rows[1:]}
    for p in (2, 4, 8):
        nvlink, pcie4 = by_link[(p, next(iter(bench.LINKS)))], by_link[(p, list(bench.LINKS)[-1])]
        assert pcie4.speedup(single) < nvlink.speedup(single) < p  # communication only ever costs
        assert nvlink.compute_s == pytest.approx(single / p)
    measured = bench.estimate_scaling(forward_s=10.0)
    assert measured[0].forward_s == 10.0 and measured[1].compute_s == 5.0


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="checks the path without the GPUs to measure on")
def test_the_bench_without_gpus_says_so_and_prints_nan(capsys, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(sys, "argv", ["worldstereo_sp.py", "--nproc", "2"])
    assert bench.main() == 0
    out = capsys.readouterr().out
    assert "2 CUDA GPUs are needed for --nproc 2" in out
    assert "RESULT segment_s_1=nan segment_s_2=nan speedup=nan device=none" in out
