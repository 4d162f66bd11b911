"""``keyframe-worlds serve``: the engine service. Uvicorn, FastAPI and torch are imported inside the handler."""

from __future__ import annotations

import argparse


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
    p.add_argument("--parent-pid", type=int, help="exit within seconds when this process has gone (the process manager passes Blender's)")
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ...bridge.errors import KeyframeWorldsError
    from .server import ServiceConfig, read_token, serve

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
    )
    return serve(config)
