"""Start, watch, restart and stop the engine process (``keyframe-worlds serve``) for Blender.

Stdlib and requests only. The manager

- finds the engine's Python (the add-on preference, else ``KEYFRAME_WORLDS_ENGINE_PYTHON``),
- starts ``python -m keyframe_worlds.cli serve --port 0`` with a fresh token in
  its environment (never on the command line) and ``--parent-pid`` = this
  process, so the engine exits by itself within seconds if Blender is killed,
- reads the ``READY port=N`` line from the engine's log file and checks health,
- reports a crash with the engine's last log lines,
- restarts on request and stops the engine when this process exits (atexit).

    engine = EngineProcess(python=prefs.engine_python, job_root=prefs.job_root)
    client = engine.start()            # an EngineClient, health checked
    ...
    engine.stop()
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from .client import EngineClient, EngineUnavailable
from .errors import KeyframeWorldsError

PYTHON_ENV = "KEYFRAME_WORLDS_ENGINE_PYTHON"
TOKEN_ENV = "KEYFRAME_WORLDS_TOKEN"
READY_PATTERN = re.compile(r"^READY port=(\d+)\s*$", re.MULTILINE)
LOG_FILENAME = "engine.log"


class EngineCrashed(KeyframeWorldsError):
    """The engine process exited (or never became ready); the message ends with its last log lines."""


def resolve_engine_python(configured: str | os.PathLike | None = None) -> Path:
    """The engine environment's Python: a file, or a virtual environment folder holding one.

    ``configured`` is the add-on preference; empty falls back to the
    ``KEYFRAME_WORLDS_ENGINE_PYTHON`` environment variable.
    """
    value = str(configured or "").strip() or os.environ.get(PYTHON_ENV, "").strip()
    if not value:
        raise KeyframeWorldsError(f"no engine Python set: choose the engine environment's python in the add-on preferences (or set {PYTHON_ENV})")
    path = Path(os.path.expanduser(value))
    if path.is_dir():
        for candidate in (path / "bin" / "python", path / "Scripts" / "python.exe", path / "python.exe", path / "python"):
            if candidate.is_file():
                return candidate
        raise KeyframeWorldsError(f"engine Python: {path} is a folder without bin/python or Scripts/python.exe")
    if not path.is_file():
        raise KeyframeWorldsError(f"engine Python not found: {path}")
    if not os.access(path, os.X_OK):
        raise KeyframeWorldsError(f"engine Python is not executable: {path}")
    return path


def tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines)).rstrip()
    except OSError:
        return ""


class EngineProcess:
    """One engine subprocess. ``job_root``: where jobs live; ``log_dir``: where its log goes (default: job_root).

    ``extra_args``: more ``serve`` options (``--device cpu``, ``--queue-size 8``).
    ``ready_timeout``: seconds to wait for READY and a healthy answer.
    """

    def __init__(self, python: str | os.PathLike | None, job_root: str | os.PathLike, log_dir: str | os.PathLike | None = None,
                 extra_args: tuple[str, ...] = (), ready_timeout: float = 60.0, host: str = "127.0.0.1"):
        self.python = resolve_engine_python(python)
        self.job_root = Path(job_root)
        self.log_path = Path(log_dir or job_root) / LOG_FILENAME
        self.extra_args = tuple(extra_args)
        self.ready_timeout = ready_timeout
        self.host = host
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.token: str | None = None
        self.client: EngineClient | None = None
        self._atexit = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> EngineClient:
        """Start the engine (if not running), wait for READY and health; returns a client."""
        if self.running() and self.client is not None:
            return self.client
        self.job_root.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_urlsafe(32)
        env = dict(os.environ)
        env[TOKEN_ENV] = self.token
        env["PYTHONUNBUFFERED"] = "1"
        command = [str(self.python), "-m", "keyframe_worlds.cli", "serve", "--host", self.host, "--port", "0",
                   "--job-root", str(self.job_root), "--parent-pid", str(os.getpid()), *self.extra_args]
        kwargs: dict = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # Ctrl-C in Blender's terminal must not hit the engine mid-write
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- starting engine: {' '.join(command)}\n".encode())
            log.flush()
            start_offset = log.tell()
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, **kwargs)
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        self.port = self._wait_ready(start_offset)
        self.client = EngineClient(self.url, self.token)
        deadline = time.monotonic() + max(5.0, self.ready_timeout / 4)
        while True:
            try:
                self.client.health(timeout=5.0)
                return self.client
            except EngineUnavailable as exc:
                self.check()
                if time.monotonic() > deadline:
                    self.stop()
                    raise EngineCrashed(f"the engine printed READY but does not answer health: {exc}\n{self.last_log()}") from None
                time.sleep(0.1)

    def _wait_ready(self, offset: int) -> int:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            try:
                with open(self.log_path, "rb") as fh:
                    fh.seek(offset)
                    text = fh.read().decode("utf-8", errors="replace")
            except OSError:
                text = ""
            found = READY_PATTERN.search(text)
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                raise EngineCrashed(f"the engine exited with status {self.process.returncode} before it was ready:\n{self.last_log()}")
            time.sleep(0.05)
        self.stop()
        raise EngineCrashed(f"the engine was not ready within {self.ready_timeout:g} s:\n{self.last_log()}")

    def check(self) -> None:
        """Raise :class:`EngineCrashed` with the last log lines if the engine has exited."""
        if self.process is not None and self.process.poll() is not None:
            code = self.process.returncode
            self.client = None
            raise EngineCrashed(f"the engine has stopped (exit status {code}); its last log lines:\n{self.last_log()}")

    def last_log(self, lines: int = 20) -> str:
        return tail(self.log_path, lines)

    def restart(self) -> EngineClient:
        self.stop()
        return self.start()

    def stop(self, timeout: float = 10.0) -> int | None:
        """Ask the engine to stop (SIGTERM / CTRL_BREAK), kill it after ``timeout``; returns its exit status."""
        process, self.process = self.process, None
        if self.client is not None:
            self.client.close()
            self.client = None
        if process is None:
            return None
        if process.poll() is None:
            try:
                if sys.platform == "win32":
                    process.send_signal(signal.CTRL_BREAK_EVENT)
                else:
                    process.terminate()
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            except OSError:
                pass
        return process.returncode
