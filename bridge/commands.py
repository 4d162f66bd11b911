"""Bridge subcommands of ``keyframe-worlds``: ``trajectory convert`` (``validate`` is ``engine/run/commands.py``'s)."""

from __future__ import annotations

import argparse

from .errors import KeyframeWorldsError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    traj = subparsers.add_parser("trajectory", help="camera trajectory files")
    traj_sub = traj.add_subparsers(dest="trajectory_command", required=True, metavar="COMMAND")
    from .formats import FORMATS

    c = traj_sub.add_parser("convert", help="convert a trajectory file between formats")
    c.add_argument("input", help="trajectory file or folder")
    c.add_argument("--to", required=True, choices=FORMATS, dest="to_format")
    c.add_argument("--from", choices=FORMATS, dest="from_format", help="input format (detected when omitted)")
    c.add_argument("--out", required=True, help="output file (folder for colmap, or for several worldstereo cameras)")
    c.add_argument("--camera", action="append", help="only this camera (repeatable)")
    c.set_defaults(handler=cmd_trajectory_convert)


def cmd_trajectory_convert(args: argparse.Namespace) -> int:
    from .formats import read_trajectories, write_trajectories

    trajectories = read_trajectories(args.input, args.from_format)
    if args.camera:
        missing = [c for c in args.camera if c not in {t.name for t in trajectories}]
        if missing:
            raise KeyframeWorldsError(f"no camera named {', '.join(map(repr, missing))} in {args.input} (have: {', '.join(t.name for t in trajectories)})")
        trajectories = [t for t in trajectories if t.name in args.camera]
    written = write_trajectories(trajectories, args.out, args.to_format)
    frames = sum(len(t) for t in trajectories)
    print(f"wrote {len(trajectories)} camera(s), {frames} frame(s) as {args.to_format}: " + ", ".join(str(p) for p in written))
    return 0
