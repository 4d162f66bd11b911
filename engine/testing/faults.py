"""Fault injection the engine honours from its environment, for failures a test cannot cause otherwise.

Off unless a variable below is set. Full disk:

``KEYFRAME_WORLDS_FAULT_DISK_FULL_AFTER_WRITES=N`` in the engine's environment:
after N files opened for writing under the job root, every further open for
writing there fails with ``OSError(ENOSPC)``, as a full disk would. It acts
through an audit hook on ``open`` (Python's own file opens: Pillow, numpy,
JSON), so the service's error handling is exercised unchanged. Off unless the
variable is set; the service's tests use a real tmpfs when they run as root.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path

ENV = "KEYFRAME_WORLDS_FAULT_DISK_FULL_AFTER_WRITES"


def install_from_environment(job_root: Path) -> bool:
    value = os.environ.get(ENV)
    if not value:
        return False
    limit = int(value)
    root = str(Path(job_root).resolve())
    lock = threading.Lock()
    count = [0]

    def hook(event: str, args: tuple) -> None:
        if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path, mode = os.fsdecode(args[0]), args[1]
        flags = args[2] if len(args) > 2 else 0
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & (os.O_WRONLY | os.O_RDWR))
        if not writing or not os.path.abspath(path).startswith(root):
            return
        with lock:
            count[0] += 1
            full = count[0] > limit
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    sys.addaudithook(hook)
    return True


# --- worker faults: a process that is killed, crashes or hangs at a known point -------------------------------

#: After this many segment checkpoints in one process, the process kills itself with SIGKILL (``kill -9``),
#: so a test can interrupt ``keyframe-worlds run`` or a worker at a segment boundary it knows.
KILL_AFTER_CHECKPOINTS_ENV = "KEYFRAME_WORLDS_FAULT_KILL_AFTER_CHECKPOINTS"
#: When a job has this many final frames, the process stops responding: it sleeps without ever checking
#: for cancellation, as a generator stuck in a GPU kernel would.
HANG_AT_FRAMES_ENV = "KEYFRAME_WORLDS_FAULT_HANG_AT_FRAMES"
#: When a job has this many final frames, the process crashes with a segmentation fault.
CRASH_AT_FRAMES_ENV = "KEYFRAME_WORLDS_FAULT_CRASH_AT_FRAMES"

_checkpoints = [0]


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def after_checkpoint() -> None:
    """Called by the runner after every segment checkpoint."""
    limit = _int_env(KILL_AFTER_CHECKPOINTS_ENV)
    if limit is None:
        return
    _checkpoints[0] += 1
    if _checkpoints[0] >= limit:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def at_frames(frames_done: int) -> None:
    """Called by the runner whenever a frame is final."""
    hang = _int_env(HANG_AT_FRAMES_ENV)
    if hang is not None and frames_done >= hang:
        import time

        while True:  # deliberately deaf to cancellation
            time.sleep(3600)
    crash = _int_env(CRASH_AT_FRAMES_ENV)
    if crash is not None and frames_done >= crash:
        import ctypes

        ctypes.string_at(0)  # reads address 0: SIGSEGV
