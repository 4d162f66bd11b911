"""Output paths of the command line, checked before any work: one clear message instead of a traceback later.

``check_output`` refuses an output that is a file where a folder is wanted (or the reverse), whose
parent folder is missing or is a file, or that this process may not write (``os.access``, which also
sees a read-only file system). ``describe_os_error`` words an OSError that still happens (a disk that
fills halfway) as one line.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .errors import KeyframeWorldsError


def check_output(path: str | os.PathLike, what: str, folder: bool | None, create_parents: bool = False) -> Path:
    """``path`` if it can be written as ``what`` (a folder, a file, or either for None); else KeyframeWorldsError.

    ``create_parents``: a missing parent folder is fine (the command creates it), so the nearest existing
    ancestor must be a writable folder instead.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if folder is True and not path.is_dir():
            raise KeyframeWorldsError(f"{what} {path} is a file, not a folder")
        if folder is False and path.is_dir():
            raise KeyframeWorldsError(f"{what} {path} is a folder; give a file name")
        if not os.access(path, os.W_OK):
            raise KeyframeWorldsError(f"{what} {path} is not writable by this user")
        return path
    parent = path.absolute().parent
    if create_parents:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.exists():
        raise KeyframeWorldsError(f"{what} {path}: its folder {parent} does not exist")
    if not parent.is_dir():
        raise KeyframeWorldsError(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise KeyframeWorldsError(f"{what} {path}: cannot create it, the folder {parent} is not writable by this user")
    return path


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError: the file and the system's words; a full disk says so."""
    name = f"{exc.filename}: " if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: {name}{exc.strerror or exc}"
    return f"{name}{exc.strerror or exc}"
