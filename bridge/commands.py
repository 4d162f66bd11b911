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
    c.add_argument("--to", required=True, choices=FORMATS, dest="to_format", help="the format to write")
    c.add_argument("--from", choices=FORMATS, dest="from_format", help="input format (detected when omitted)")
    c.add_argument("--out", required=True, help="output file (folder for colmap, colmap-binary and pano_bank, or for several worldstereo cameras)")
    c.add_argument("--camera", action="append", help="only this camera (repeatable)")
    c.set_defaults(handler=cmd_trajectory_convert)


def cmd_trajectory_convert(args: argparse.Namespace) -> int:
    from .formats import POINT_FORMATS, read_trajectory_set, write_trajectory_set

    from .paths import check_output

    # COLMAP and pano_bank write a folder; worldstereo a file, or a folder for several cameras; the others one file.
    folder = True if args.to_format in ("colmap", "colmap-binary", "pano_bank") else None if args.to_format == "worldstereo" else False
    check_output(args.out, "--out", folder=folder)
    tset = read_trajectory_set(args.input, args.from_format)
    names = [t.name for t in tset.trajectories]
    if args.camera:
        missing = [c for c in args.camera if c not in names]
        if missing:
            raise KeyframeWorldsError(f"no camera named {', '.join(map(repr, missing))} in {args.input} (have: {', '.join(names)})")
        tset = tset.select(args.camera)
    written = write_trajectory_set(tset, args.out, args.to_format)
    frames = sum(len(t) for t in tset.trajectories)
    points = ""
    if tset.points is not None:
        kept = args.to_format in POINT_FORMATS
        points = f", {len(tset.points)} point(s)" if kept else f"; {len(tset.points)} point(s) not written ({args.to_format} holds no points)"
    print(f"wrote {len(tset.trajectories)} camera(s), {frames} frame(s){points} as {args.to_format}: " + ", ".join(str(p) for p in written))
    return 0
