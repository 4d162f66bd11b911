"""Exit when the parent process disappears, so a killed Blender leaves no orphaned GPU process."""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable

POLL_INTERVAL_S = 0.5


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still exists (POSIX: signal 0; Windows: an open handle still running)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        SYNCHRONIZE, WAIT_TIMEOUT = 0x00100000, 0x00000102
        handle = kernel32.OpenProcess(SYNCHRONIZE, False, pid)
        if not handle:
            return False
        try:
            return kernel32.WaitForSingleObject(handle, 0) == WAIT_TIMEOUT
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def watch_parent(parent_pid: int, on_gone: Callable[[], None], interval: float = POLL_INTERVAL_S) -> threading.Thread:
    """Call ``on_gone`` once, from a daemon thread, when ``parent_pid`` has exited.

    On POSIX an orphan is re-parented (to init or a subreaper), so a changed
    ``getppid`` also counts as gone: that catches a recycled pid as well.
    """
    original_ppid = os.getppid() if sys.platform != "win32" else None
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            reparented = original_ppid is not None and original_ppid == parent_pid and os.getppid() != parent_pid
            if reparented or not process_alive(parent_pid):
                on_gone()
                return

    thread = threading.Thread(target=loop, name="parent-watchdog", daemon=True)
    thread.stop = stop  # type: ignore[attr-defined]
    thread.start()
    return thread
