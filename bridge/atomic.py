"""Atomic file writes: write a temporary file beside the target, then rename it over the target.

A reader (or a resumed job) never sees half a file. Temporary files are named
``.<stem>.tmp-<pid><suffix>``: the suffix is kept so writers that go by the
extension (numpy's ``.npy``, Pillow's format guess) still work, and
``TEMPORARY_GLOB`` finds what an interrupted process left behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

TEMPORARY_GLOB = ".*.tmp-*"


def temporary_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    ``fsync``: flush the file to disk before the rename (for state that must survive a power cut).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove_temporary_files(folder: str | os.PathLike) -> int:
    """Delete the temporary files of interrupted atomic writes (``.<name>.tmp-<pid>...``); returns how many."""
    count = 0
    for path in Path(folder).rglob(TEMPORARY_GLOB):
        try:
            if path.is_file():
                path.unlink()
                count += 1
        except OSError:
            pass
    return count
