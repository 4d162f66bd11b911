"""Output paths of the command line, checked before any work: one clear message instead of a traceback later.

``check_output`` refuses an output that is a file where a folder is wanted (or the reverse), whose
parent folder is missing or is a file, or that this process may not write (``os.access``, which also
sees a read-only file system). ``describe_os_error`` words an OSError that still happens (a disk that
fills halfway) as one line, and ``failure_message`` what a failed job's status says.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
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


def wan_folder_in(model_dir: str | os.PathLike) -> Path | None:
    """The Wan2.1 image-to-video diffusers folder inside a model folder: the first sub-folder (by name) whose name
    contains ``Wan2.1`` and that holds ``model_index.json`` (the layout the README gives the model folder). The one
    rule the add-on and the engine's machine configuration both follow."""
    found = sorted(p for p in Path(model_dir).iterdir()
                   if p.is_dir() and "wan2.1" in p.name.lower() and (p / "model_index.json").is_file())
    return found[0] if found else None


def describe_os_error(exc: OSError, where: str | os.PathLike | None = None) -> str:
    """One line for an OSError: the file and the system's words; a full disk says so. With ``where`` (the
    folder being written, e.g. a job's bundle), the line names it."""
    name = f"{exc.filename}: " if exc.filename else ""
    if where is None:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"disk full: {name}{exc.strerror or exc}"
        return f"{name}{exc.strerror or exc}"
    if exc.errno == errno.ENOSPC:
        return f"disk full: no space left on the device holding {where} ({exc.strerror})"
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded for {where} ({exc.strerror})"
    name = f" {exc.filename}" if exc.filename else ""
    return f"cannot write{name} in {where}: {exc.strerror or exc}"


LOW_SPACE_BYTES = 1024 * 1024


def free_bytes(folder: str | os.PathLike) -> int:
    """Space left for an unprivileged writer on the device holding ``folder`` (a large number if unknown)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def failure_message(exc: BaseException, out_dir: Path) -> str:
    """What a failed job's status says: the project's own message, or plain words for system errors.

    A full disk is named as such even when it surfaces wrapped in another error.
    """
    for cause in _chain(exc):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return describe_os_error(cause, out_dir)
    for cause in _chain(exc):
        # Native writers (safetensors, ffmpeg's wrappers) carry the OS error in their text only.
        if not isinstance(cause, OSError) and re.search(r"No space left on device|\(os error 28\)", str(cause)):
            return f"disk full: no space left on the device holding {out_dir} ({type(cause).__name__}: {cause})"
    if any(isinstance(c, OSError) for c in _chain(exc)) and free_bytes(out_dir) < LOW_SPACE_BYTES:
        # Some writers report a short write without an errno (numpy: "N requested and M written").
        return f"disk full: no space left on the device holding {out_dir} ({free_bytes(out_dir)} bytes free; {exc})"
    if isinstance(exc, KeyframeWorldsError):
        return str(exc)
    if isinstance(exc, OSError):
        return describe_os_error(exc, out_dir)
    if isinstance(exc, MemoryError):
        return "out of memory"
    return f"internal error: {type(exc).__name__}: {exc}"

