"""Bridge subcommands of ``keyframe-worlds``: ``validate`` and ``trajectory convert``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import KeyframeWorldsError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("validate", help="check a job spec (or result manifest) and print every problem")
    p.add_argument("path", help="job.json, or a result bundle folder / manifest.json")
    p.add_argument("--no-files", action="store_true", help="do not check that referenced files exist")
    p.add_argument("--json", action="store_true", help="print the problems as JSON")
    p.set_defaults(handler=cmd_validate)

    traj = subparsers.add_parser("trajectory", help="camera trajectory files")
    traj_sub = traj.add_subparsers(dest="trajectory_command", required=True, metavar="COMMAND")
    from .formats import FORMATS

    c = traj_sub.add_parser("convert", help="convert a trajectory file between formats")
    c.add_argument("input", help="trajectory file or folder")
    c.add_argument("--to", required=True, choices=FORMATS, dest="to_format")
    c.add_argument("--from", choices=FORMATS, dest="from_format", help="input format (detected when omitted)")
    c.add_argument("--out", required=True, help="output file (folder for colmap and colmap-binary, or for several worldstereo cameras)")
    c.add_argument("--camera", action="append", help="only this camera (repeatable)")
    c.set_defaults(handler=cmd_trajectory_convert)


def cmd_validate(args: argparse.Namespace) -> int:
    from .spec import MANIFEST_FILENAME, read_json, validate_job, validate_manifest

    path = Path(args.path)
    if path.is_dir():
        path = path / MANIFEST_FILENAME
    doc = read_json(path, "document")
    is_manifest = path.name == MANIFEST_FILENAME or (isinstance(doc, dict) and "job" in doc and "generator_label" in doc)
    if is_manifest:
        what = "result manifest"
        problems = validate_manifest(doc, None if args.no_files else path.parent)
    else:
        what = "job spec"
        problems = validate_job(doc, base_dir=path.parent, check_files=not args.no_files)
    if args.json:
        print(json.dumps({"what": what, "valid": not problems, "problems": [p.to_json() for p in problems]}, indent=1))
    elif problems:
        print(f"{path}: {what} has {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
    else:
        print(f"{path}: valid {what}")
    return 1 if problems else 0


def cmd_trajectory_convert(args: argparse.Namespace) -> int:
    from .formats import POINT_FORMATS, read_trajectory_set, write_trajectory_set

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
