"""Engine subcommands of ``keyframe-worlds``: ``run``. Torch is imported inside the handler."""

from __future__ import annotations

import argparse


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run a job offline and write the result bundle")
    p.add_argument("job", help="job spec (job.json); relative paths in it are relative to its folder")
    p.add_argument("--out", required=True, help="bundle folder to write (created; an old manifest in it is removed first)")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from ...bridge.errors import KeyframeWorldsError
    from ...bridge.spec import load_job

    spec = load_job(args.job)
    import torch

    from .runner import ProgressReporter, TerminalProgress, run_job

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise KeyframeWorldsError(f"--device: {exc}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KeyframeWorldsError("--device cuda: no CUDA device is available to this torch build")
    progress = ProgressReporter() if args.quiet else TerminalProgress()
    manifest = run_job(spec, args.out, progress=progress, device=device)
    frames = sum(len(t.frames) for t in manifest.trajectories)
    print(f"wrote {args.out}: {frames} frame(s) from {len(manifest.trajectories)} camera(s), "
          f"{manifest.point_count} points, {len(manifest.meshes)} mesh(es); {manifest.generator_label}")
    return 0
