"""The server's side of a worker process: start it, talk to it, end it, say how it died.

One :class:`WorkerHandle` per device. The process is started with
multiprocessing's *spawn* method (a fresh interpreter; never ``fork``, which
would copy the server's threads and, on a GPU machine, a CUDA context), and
runs :func:`.worker.worker_main`. See ``worker.py`` for the pipe protocol.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass

from .worker import worker_main

#: Seconds a new worker may take to import torch and say it is ready.
START_TIMEOUT_S = 120.0


def describe_exit(exitcode: int | None) -> str:
    """``"killed by signal 9 (SIGKILL)"``, ``"exited with status 3"``: how a worker process ended."""
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        what = {"SIGKILL": "killed (SIGKILL: kill -9, or the system's out-of-memory killer)",
                "SIGSEGV": "crashed (SIGSEGV: segmentation fault)",
                "SIGABRT": "aborted (SIGABRT)", "SIGBUS": "crashed (SIGBUS)"}.get(name)
        return what or f"ended by signal {-exitcode} ({name})"
    return f"exited with status {exitcode}"


@dataclass
class WorkerInfo:
    """What health reports of a worker. state: starting, idle, busy, dead."""

    device: str
    pid: int | None
    state: str
    model: str | None
    loads: int
    restarts: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


class WorkerGone(Exception):
    """The worker process ended (or could not be started); ``args[0]`` says how."""


class WorkerHandle:
    """The worker process of one device. Not thread-safe: one supervising thread owns it."""

    def __init__(self, device: str, job_root: str):
        self.device = device
        self.job_root = str(job_root)
        self._ctx = multiprocessing.get_context("spawn")
        self.process = None
        self.conn = None
        self.cancel = self._ctx.Event()
        self.stop = self._ctx.Event()
        self.model: str | None = None
        self.memory: dict | None = None  # the GPU's name and free/total bytes, as the worker last reported them
        self.loads = 0
        self.restarts = 0
        self.state = "dead"
        self._lock = threading.Lock()  # guards the fields health reads

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the process (without waiting for it to be ready)."""
        # Fresh events for each process: one killed while it held an event's lock would leave that lock held.
        self.cancel, self.stop = self._ctx.Event(), self._ctx.Event()
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=worker_main, name=f"kfw-worker-{self.device}", daemon=True,
                                    args=(self.device, child, self.cancel, self.stop, os.getpid(), self.job_root))
        process.start()
        child.close()
        with self._lock:
            if self.process is not None:
                self.restarts += 1
            self.process, self.conn, self.state, self.model = process, parent, "starting", None

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Block until the worker said ready; raises :class:`WorkerGone` if it died or took too long."""
        if self.state != "starting":
            return
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(min(0.5, max(0.0, deadline - time.monotonic())))
            if message is not None and message[0] == "ready":
                with self._lock:
                    self.state, self.memory = "idle", message[2]
                return
            if message is not None and message[0] == "broken":
                self.kill()
                raise WorkerGone(message[1])
            if time.monotonic() >= deadline:
                self.kill()
                raise WorkerGone(f"the worker process for {self.device} did not start within {timeout:.0f} s")

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def ensure_started(self) -> None:
        if not self.alive():
            self.start()
        self.wait_ready()

    def exit_description(self) -> str:
        if self.process is None:
            return "was never started"
        self.process.join(1.0)
        return describe_exit(self.process.exitcode)

    def kill(self) -> None:
        """End the process at once (SIGKILL); its job's checkpoints make that safe."""
        process = self.process
        if process is not None and process.is_alive():
            process.kill()
            process.join(5.0)
        self._closed()

    def shutdown(self, timeout: float = 3.0) -> None:
        """Ask the worker to exit; kill it when it does not within ``timeout`` seconds."""
        if self.alive():
            try:
                self.conn.send(("exit",))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout)
        self.kill()

    def _closed(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        with self._lock:
            self.conn, self.state = None, "dead"

    # --- messages --------------------------------------------------------------------------

    def send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except (BrokenPipeError, OSError, AttributeError):
            raise WorkerGone(f"the worker process for {self.device} {self.exit_description()}") from None

    def receive(self, timeout: float) -> tuple | None:
        """The next message within ``timeout`` seconds, or None; raises :class:`WorkerGone` when the process ended."""
        conn = self.conn
        if conn is None:
            raise WorkerGone(f"the worker process for {self.device} {self.exit_description()}")
        try:
            if not conn.poll(timeout):
                if not self.alive():
                    raise EOFError
                return None
            message = conn.recv()
        except (EOFError, OSError):
            description = self.exit_description()
            self._closed()
            raise WorkerGone(f"the worker process for {self.device} {description}") from None
        if message[0] == "model":
            with self._lock:
                self.model, self.loads = message[1], int(message[2])
            return None
        if message[0] == "memory":
            with self._lock:
                self.memory = message[1]
            return None
        return message

    def set_state(self, state: str) -> None:
        with self._lock:
            self.state = state

    def gpu_memory(self) -> dict | None:
        with self._lock:
            return None if self.memory is None else dict(self.memory)

    def info(self) -> WorkerInfo:
        with self._lock:
            pid = self.process.pid if self.process is not None and self.state != "dead" else None
            return WorkerInfo(self.device, pid, self.state, self.model, self.loads, self.restarts)
