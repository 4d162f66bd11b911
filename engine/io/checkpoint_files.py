"""Weight files the engine opens: safetensors only, and the one refusal of pickle-based files.

Every loader (the WorldStereo networks, the Wan2.1 companions, learned depth
models) goes through these, so a folder with only ``.bin``/``.pt`` weights is
refused everywhere with the same words.
"""

from __future__ import annotations

from pathlib import Path

from ...bridge.errors import KeyframeWorldsError

#: Pickle-based weight files: never opened (unpickling can run arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(KeyframeWorldsError):
    """A checkpoint folder or file is missing, unreadable or not what it should be."""


def refuse_pickles(folder: Path, what: str) -> None:
    """Raise :class:`CheckpointError` when ``folder`` holds pickle weight files (call it when no safetensors were found)."""
    folder = Path(folder)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise CheckpointError(
            f"{what} {folder} holds only pickle weight files ({', '.join(pickles)}); they are not loaded because "
            "unpickling can run arbitrary code. Convert them to safetensors (or download the safetensors release)."
        )
