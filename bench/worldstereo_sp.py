"""WorldStereo with one segment split across GPUs (sequence parallel): seconds per segment on N ranks
against 1, and the scaling to expect on paper.

Run: .venv/bin/python bench/worldstereo_sp.py --nproc N      (measures; needs N CUDA GPUs)
     .venv/bin/python bench/worldstereo_sp.py --estimate     (on paper; no GPU needed: the README's table)

``--nproc N`` launches this script under ``torchrun`` twice, with 1 and with N processes; each builds
the full-size memory network of ``bench/worldstereo_gpu.py`` (random bfloat16 weights, the same seed on
every rank) and runs one ``worldstereo-memory-dmd`` segment (21 keyframes at 480 x 768, 8 references,
4 steps) through the real pipeline, rank 0 driving and the others serving the transformer
(``engine/models/sequence_parallel.py``). Printed: ``segment_s_1``, ``segment_s_N`` and their ratio.
Without N GPUs it says so and prints the RESULT line with ``nan``. ``--tiny`` runs the same code on the
CPU with the tiny configuration and gloo (a check of the script, not a benchmark).

``--estimate``: per transformer forward, compute time ``FLOPs / (peak x MFU)`` (``forward_flops`` of
``bench/worldstereo_gpu.py``) split P ways, plus the Ulysses traffic each rank sends: per self-attention
layer four all-to-alls (q, k, v in, the result out) of its ``L/P`` tokens x width in bfloat16, of which
``(P-1)/P`` leave the GPU (backbone layers over targets + references, control-branch layers over the
targets), the final gather of the tokens, and the step's new latents broadcast from rank 0; no overlap
of compute and communication is assumed. The encodes and the decode stay on rank 0 and are left out
(the figure is the denoising loop).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import print_result  # noqa: E402
from bench.worldstereo_gpu import FULL_BACKBONE, FULL_CONTROL, forward_flops  # noqa: E402

BYTES_BF16 = 2
#: Nominal per-GPU one-way bandwidths (bytes/s) the estimate is given for.
LINKS = {"NVLink 4 (H100 SXM, 450 GB/s)": 450e9, "PCIe 5.0 x16 (64 GB/s)": 64e9, "PCIe 4.0 x16 (32 GB/s)": 32e9}
#: The estimate's compute rate: dense bf16 peak of an H100 SXM and an assumed model FLOPs utilisation.
PEAK_FLOPS = 989e12
ASSUMED_MFU = 0.4
SEGMENT = dict(frames=21, height=480, width=768, refs=8)


@dataclass(frozen=True)
class ScalingEstimate:
    """One row: ``ranks`` GPUs on a link of ``bandwidth`` bytes/s; times per transformer forward."""

    ranks: int
    link: str
    compute_s: float
    traffic_bytes: float  # sent by each rank per forward
    comm_s: float

    @property
    def forward_s(self) -> float:
        return self.compute_s + self.comm_s

    def speedup(self, single_forward_s: float) -> float:
        return single_forward_s / self.forward_s


def traffic_per_forward(ranks: int, frames: int, height: int, width: int, refs: int,
                        backbone: dict = FULL_BACKBONE, control: dict = FULL_CONTROL) -> float:
    """Bytes each rank sends in one sequence-parallel forward (see the module docstring)."""
    if ranks == 1:
        return 0.0
    per_frame = (height // 16) * (width // 16)
    tokens, joint = frames * per_frame, (frames + refs) * per_frame
    width_backbone = backbone["num_attention_heads"] * backbone["attention_head_dim"]
    leaving = (ranks - 1) / ranks
    backbone_layers = backbone["num_layers"] * 4 * math.ceil(joint / ranks) * width_backbone * BYTES_BF16 * leaving
    control_layers = control["num_layers"] * 4 * math.ceil(tokens / ranks) * control["dim"] * BYTES_BF16 * leaving
    gather = math.ceil(tokens / ranks) * width_backbone * BYTES_BF16 * (ranks - 1)  # every rank's slice to all
    latents = backbone["in_channels"] * frames * (height // 8) * (width // 8) * BYTES_BF16  # broadcast by rank 0
    return backbone_layers + control_layers + gather + latents


def estimate_scaling(ranks: tuple[int, ...] = (2, 4, 8), links: dict[str, float] = LINKS,
                     peak_flops: float = PEAK_FLOPS, mfu: float = ASSUMED_MFU, forward_s: float | None = None,
                     **segment) -> list[ScalingEstimate]:
    """The paper estimate for the full-size network on ``segment`` (default :data:`SEGMENT`).
    ``forward_s``: a measured single-GPU forward time instead of ``FLOPs / (peak x mfu)``."""
    segment = {**SEGMENT, **segment}
    compute = forward_s if forward_s else forward_flops(FULL_BACKBONE, FULL_CONTROL, **segment) / (peak_flops * mfu)
    rows = [ScalingEstimate(1, "-", compute, 0.0, 0.0)]
    for p in ranks:
        for name, bandwidth in links.items():
            sent = traffic_per_forward(p, **segment)
            rows.append(ScalingEstimate(p, name, compute / p, sent, sent / bandwidth))
    return rows


def estimate_table(rows: list[ScalingEstimate]) -> list[str]:
    """The README's markdown table of :func:`estimate_scaling`."""
    single = rows[0].forward_s
    lines = ["| GPUs | link | compute / forward | sent per rank / forward | communication | speed-up of the denoising loop |",
             "|---|---|---|---|---|---|",
             f"| 1 | - | {single:.2f} s | - | - | 1.00 |"]
    for r in rows[1:]:
        lines.append(f"| {r.ranks} | {r.link} | {r.compute_s:.2f} s | {r.traffic_bytes / 1e9:.2f} GB | "
                     f"{r.comm_s * 1e3:.0f} ms | {r.speedup(single):.2f} |")
    return lines


# -- measuring ------------------------------------------------------------------------------------

def worker(tiny: bool) -> None:
    """One rank of a launch (or the single process): build, drive or serve, print the time on rank 0."""
    from bench.worldstereo_gpu import build, conditions, run_segment
    from keyframe_worlds.engine.models import sequence_parallel as sp
    from keyframe_worlds.engine.pipelines.worldstereo import WorldStereoPipeline

    with sp.launch("cpu" if tiny else "cuda") as group:
        device = group.device if group is not None else torch.device("cpu" if tiny else "cuda")
        torch.manual_seed(0)  # the same random weights on every rank
        net, companions, _, _ = build(tiny, device, torch.float32 if tiny else torch.bfloat16)
        if group is not None and not group.is_driver:
            del companions
            sp.serve(net, group)
            return
        segment = dict(frames=3, height=128, width=128, refs=2) if tiny else SEGMENT
        cond = conditions(**segment)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        pipe = WorldStereoPipeline(net, companions, device=device)
        with sp.driving(group):
            run_segment(pipe, cond, None, None, sync)  # warm-up: kernels, allocator
            total, steps = run_segment(pipe, cond, None, None, sync)
        print("SEGMENT " + json.dumps({"segment_s": total, "steps_s": steps}), flush=True)


def launch(ranks: int, tiny: bool) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(port), __file__, "--worker"] + (["--tiny"] if tiny else [])
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if result.returncode:
        raise SystemExit(f"worldstereo_sp: the {ranks}-process run failed:\n{result.stdout}{result.stderr}")
    line = next(l for l in result.stdout.splitlines() if l.startswith("SEGMENT "))
    return json.loads(line[len("SEGMENT "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=None, help="GPUs (processes) to split the segment over")
    parser.add_argument("--estimate", action="store_true", help="print the paper estimate (no GPU needed)")
    parser.add_argument("--forward-s", type=float, default=None,
                        help="with --estimate: a measured single-GPU forward (a median denoising step of "
                             "bench/worldstereo_gpu.py's memory-dmd segment) instead of FLOPs at the assumed MFU")
    parser.add_argument("--tiny", action="store_true", help="check the script on the CPU (tiny configuration, gloo)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.tiny)
        return 0
    if args.estimate or args.nproc is None:
        rows = estimate_scaling(forward_s=args.forward_s)
        basis = (f"a measured {args.forward_s:g} s single-GPU forward" if args.forward_s
                 else f"MFU {ASSUMED_MFU} of {PEAK_FLOPS / 1e12:.0f} TFLOP/s")
        print(f"paper estimate, {SEGMENT['frames']} keyframes at {SEGMENT['height']}x{SEGMENT['width']} with "
              f"{SEGMENT['refs']} references, {basis}:")
        print("\n".join(estimate_table(rows)))
        single = rows[0].forward_s
        print_result(**{f"est_speedup_{r.ranks}_{r.link.split(' (')[0].replace(' ', '_')}": r.speedup(single)
                        for r in rows[1:]})
        if args.nproc is None:
            return 0
    n = args.nproc
    if n < 1:
        raise SystemExit("worldstereo_sp: --nproc must be at least 1")
    available = torch.cuda.device_count()
    if not args.tiny and available < n:
        print(f"worldstereo_sp: {n} CUDA GPUs are needed for --nproc {n}, this machine has {available}: nothing was "
              "measured (--estimate gives the expected scaling; --tiny checks the script on the CPU)")
        print_result(**{"segment_s_1": float("nan"), f"segment_s_{n}": float("nan"), "speedup": float("nan"),
                        "device": "none"})
        return 0
    one = launch(1, args.tiny)
    many = launch(n, args.tiny) if n > 1 else one
    print(f"memory-dmd segment: {one['segment_s']:.2f} s on 1 process, {many['segment_s']:.2f} s on {n}")
    print_result(**{"segment_s_1": one["segment_s"], f"segment_s_{n}": many["segment_s"],
                    "speedup": one["segment_s"] / many["segment_s"],
                    "device": "cpu-tiny" if args.tiny else torch.cuda.get_device_name(0)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
