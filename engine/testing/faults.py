"""Fault injection for tests where a real full disk cannot be made (no root for a small tmpfs).

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
