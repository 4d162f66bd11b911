"""``keyframe-worlds serve``: the engine service. Uvicorn, FastAPI and torch are imported inside the handler."""

from __future__ import annotations

import argparse
import sys

from ..run.commands import add_machine_arguments


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the engine service (HTTP on loopback); prints 'READY port=N' when it accepts requests",
        description="Run the engine service. The bearer token comes from the environment variable "
        "KEYFRAME_WORLDS_TOKEN or --token-file, never from the command line.",
        allow_abbrev=False,  # so "--token SECRET" is an error, not an abbreviation of --token-file
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback unless --allow-remote)")
    p.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (see the READY line)")
    p.add_argument("--job-root", required=True, help="folder holding one sub-folder per job")
    p.add_argument("--token-file", help="file holding the bearer token (else KEYFRAME_WORLDS_TOKEN)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    p.add_argument("--device", action="append", dest="devices",
                   help="worker device (repeatable: one worker each); default every CUDA GPU, else cpu")
    p.add_argument("--queue-size", type=int, default=32, help="most jobs waiting; more get HTTP 429 (default 32)")
    p.add_argument("--max-body-mb", type=float, default=512, help="request body limit in MiB (default 512)")
    p.add_argument("--read-timeout-s", type=float, default=10.0,
                   help="a request's headers must arrive within this many seconds, and its body may pause 3x as long; "
                        "slower or stalled connections are closed (default 10)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections kept; beyond it each new one closes the longest-idle one (default 256)")
    p.add_argument("--disk-budget-gb", type=float,
                   help="the most the job root may hold, in GB (10^9 bytes): past it submissions get HTTP 507 and a "
                        "running job stops (failed, resumable) until finished jobs are deleted; default no budget")
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="a folder whose files local-path submissions (JSON from loopback) may read, symlinks resolved "
                        "(repeatable); without it the engine reads uploads only")
    add_machine_arguments(p, "a submitted job's", "the job's")
    p.add_argument("--parent-pid", type=int, help="exit within seconds when this process has gone (the process manager passes Blender's)")
    p.set_defaults(handler=cmd_serve)

    jobs = subparsers.add_parser("jobs", help="list or delete the jobs of a running engine service",
                                 description="Talk to a running engine (keyframe-worlds serve). The token comes from "
                                 "KEYFRAME_WORLDS_TOKEN or --token-file, as for serve.")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    for name, help_text in (("list", "every job: id, state, name"),
                            ("delete", "delete finished, failed or cancelled jobs and their files")):
        q = jobs_sub.add_parser(name, help=help_text, allow_abbrev=False)
        q.add_argument("--url", required=True, help="the engine's address, e.g. http://127.0.0.1:8765 (its READY line names the port)")
        q.add_argument("--token-file", help="file holding the bearer token (else KEYFRAME_WORLDS_TOKEN)")
        if name == "delete":
            q.add_argument("job_ids", nargs="+", metavar="JOB_ID", help="the job(s) to delete")
        q.set_defaults(handler=cmd_jobs)


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from ...bridge.errors import KeyframeWorldsError
    from ...bridge.paths import check_output
    from ..run.machine import MachineModels
    from .server import ServiceConfig, read_token, serve


    check_output(args.job_root, "--job-root", folder=True, create_parents=True)
    if not 0 <= args.port <= 65535:
        raise KeyframeWorldsError(f"--port must be 0-65535, got {args.port}")
    if args.queue_size < 1:
        raise KeyframeWorldsError("--queue-size must be at least 1")
    if args.max_body_mb <= 0:
        raise KeyframeWorldsError("--max-body-mb must be positive")
    if not 0 < args.read_timeout_s <= 3600:
        raise KeyframeWorldsError(f"--read-timeout-s must be more than 0 and at most 3600, got {args.read_timeout_s}")
    if not 8 <= args.max_connections <= 10000:
        raise KeyframeWorldsError(f"--max-connections must be 8-10000, got {args.max_connections}")
    if args.disk_budget_gb is not None and not 0 < args.disk_budget_gb < 1e6:
        raise KeyframeWorldsError(f"--disk-budget-gb must be a positive number of GB, got {args.disk_budget_gb}")
    allowed = []
    for folder in args.allow_path:
        real = Path(os.path.realpath(folder))
        if not real.is_dir():
            raise KeyframeWorldsError(f"--allow-path {folder}: not a folder")
        allowed.append(real)
    config = ServiceConfig(
        job_root=Path(args.job_root).resolve(),
        token=read_token(args.token_file),
        host=args.host,
        port=args.port,
        allow_remote=args.allow_remote,
        devices=tuple(args.devices) if args.devices else None,
        queue_size=args.queue_size,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        parent_pid=args.parent_pid,
        read_timeout_s=args.read_timeout_s,
        max_connections=args.max_connections,
        disk_budget_bytes=None if args.disk_budget_gb is None else int(args.disk_budget_gb * 1e9),
        allowed_paths=tuple(allowed),
        machine=MachineModels.configure(args.model_dir, args.depth_model),
    )
    return serve(config)


def cmd_jobs(args: argparse.Namespace) -> int:
    from ...bridge.client import EngineClient
    from ...bridge.errors import ERROR_PREFIX, KeyframeWorldsError
    from .server import read_token

    failed = 0
    with EngineClient(args.url, read_token(args.token_file)) as client:
        if args.jobs_command == "list":
            for status in client.jobs():
                print(f"{status.id}  {status.state.value:<9}  {status.name}")
            return 0
        for job_id in args.job_ids:
            try:
                freed = client.delete(job_id)
            except KeyframeWorldsError as exc:  # one job's refusal does not stop the others
                print(f"{ERROR_PREFIX} {job_id}: {exc}", file=sys.stderr)
                failed += 1
                continue
            print(f"deleted {job_id} ({freed / 1e6:.1f} MB freed)")
    return 1 if failed else 0
