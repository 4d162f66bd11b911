"""Run the service: bind, print ``READY port=N``, serve with uvicorn, stop cleanly.

The socket is bound here (port 0 picks a free one) and handed to uvicorn, so
the READY line can name the real port; it is printed once uvicorn has
started, that is when requests are accepted.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from ...bridge.errors import KeyframeWorldsError
from ..run.machine import MachineModels

log = logging.getLogger("keyframe_worlds.service")

TOKEN_ENV = "KEYFRAME_WORLDS_TOKEN"
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``serve`` needs. devices: one worker each; None picks every GPU, else the CPU."""

    job_root: Path
    token: str
    host: str = "127.0.0.1"
    port: int = 0
    allow_remote: bool = False
    devices: tuple[str, ...] | None = None
    queue_size: int = 32
    max_body_bytes: int = 512 * 1024 * 1024
    parent_pid: int | None = None
    read_timeout_s: float = 10.0  # request headers must arrive within it; a body may pause 3x as long
    max_connections: int = 256  # beyond it a new connection closes the longest-idle one
    disk_budget_bytes: int | None = None  # the most the job root may hold; None: no budget
    allowed_paths: tuple[Path, ...] = ()  # folders local-path submissions may read (resolved); none: uploads only
    machine: MachineModels | None = None  # this machine's models (--model-dir, --depth-model, their variables)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | None) -> str:
    """The token from ``--token-file`` or the environment; never from the command line."""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise KeyframeWorldsError(f"cannot read the token file {token_file}: {exc.strerror or exc}") from None
        source = f"token file {token_file}"
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        source = f"environment variable {TOKEN_ENV}"
        if not token:
            raise KeyframeWorldsError(f"no token: set {TOKEN_ENV} or pass --token-file (every request but health must carry it)")
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise KeyframeWorldsError(f"the token from the {source} must be at least {MIN_TOKEN_LENGTH} characters without spaces")
    return token


def available_generators() -> tuple[str, ...]:
    """The generators this engine can run: preview always; worldstereo when its pipeline is installed."""
    import importlib.util

    names = ["preview"]
    try:
        if importlib.util.find_spec("keyframe_worlds.engine.generators.worldstereo") is not None:
            names.append("worldstereo")
    except (ImportError, ValueError):
        pass
    return tuple(names)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if sys.platform != "win32":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this: without it uvicorn's separate header and body writes
    # meet the client's delayed ACK and every response waits ~40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise KeyframeWorldsError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def serve(config: ServiceConfig) -> int:
    """Run until SIGINT/SIGTERM or the parent's death; returns the exit status."""
    import asyncio

    from .devices import check_devices, detect_devices
    from .jobs import JobManager

    if not is_loopback_host(config.host) and not config.allow_remote:
        raise KeyframeWorldsError(f"refusing to listen on {config.host}: not a loopback address; pass --allow-remote to serve other machines")
    if config.parent_pid is not None and config.parent_pid <= 0:
        raise KeyframeWorldsError(f"--parent-pid must be a process id, got {config.parent_pid}")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    devices = check_devices(list(config.devices)) if config.devices else detect_devices()
    from ..testing.faults import install_from_environment

    if install_from_environment(config.job_root):
        log.warning("fault injection on: the job root behaves as a full disk after a number of writes (tests only)")
    manager = JobManager(config.job_root, devices, config.queue_size, disk_budget_bytes=config.disk_budget_bytes)
    # The workers start now, so their imports overlap the HTTP side's (FastAPI, uvicorn) and the first job waits less.
    manager.start()
    try:
        sock = bind(config.host, config.port)
    except BaseException:
        manager.stop(timeout=5.0)
        raise
    import uvicorn

    from ..generators.options import check_options
    from .app import AppSettings, create_app
    from .protocol import guarded_protocol
    from .watchdog import watch_parent

    settings = AppSettings(token=config.token, max_body_bytes=config.max_body_bytes,
                           generators=available_generators(), gpu_memory=manager.gpu_memory,
                           check_options=check_options, allowed_paths=config.allowed_paths, machine=config.machine)
    app = create_app(manager, settings)
    port = sock.getsockname()[1]

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if not self.should_exit:
                print(f"READY port={port}", flush=True)

        async def shutdown(self, sockets=None):
            await super().shutdown(sockets=sockets)
            # Before uvicorn re-raises the stop signal: interrupt the running job so it
            # is recorded as such (it resumes at the next start) and its temporary files go.
            manager.stop(timeout=5.0)

    # The read timeouts and the connection cap are in the protocol (protocol.py says why uvicorn's own
    # settings are not enough); limit_concurrency stays above the cap as the bound on requests served at once.
    protocol = guarded_protocol(header_timeout_s=config.read_timeout_s, body_idle_s=3 * config.read_timeout_s,
                                max_connections=config.max_connections)
    uv_config = uvicorn.Config(app, http=protocol, log_level="warning", access_log=False, timeout_keep_alive=30,
                               limit_concurrency=2 * config.max_connections, timeout_graceful_shutdown=3, lifespan="off")
    server = Server(uv_config)

    if config.parent_pid is not None:
        def parent_gone() -> None:
            log.warning("parent process %d has exited: stopping the engine", config.parent_pid)
            server.should_exit = True
            manager.stopping.set()
            # Whatever still runs after this grace period is cut short: every output is
            # written atomically and checkpointed, so a hard exit loses no finished work.
            timer = threading.Timer(2.5, lambda: os._exit(3))
            timer.daemon = True
            timer.start()

        watch_parent(config.parent_pid, parent_gone)

    log.info("serving %s on http://%s:%d with %s worker(s) on %s", config.job_root, config.host, port, len(devices), ", ".join(devices))
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        manager.stop(timeout=5.0)
        sock.close()
    return 0
