"""Generators: what makes the frames of a segment. ``get_generator`` picks one by the job's name for it."""

from __future__ import annotations

from ...bridge.errors import KeyframeWorldsError
from .base import Generator, ReferenceFrame, SegmentRequest, SegmentResult


def get_generator(name: str, options: dict | None = None) -> Generator:
    """The generator a job names, configured by the job's ``options``."""
    options = dict(options or {})
    if name == "preview":
        from .preview import PreviewGenerator

        return PreviewGenerator.from_options(options)
    if name == "worldstereo":
        try:
            from .worldstereo import WorldStereoGenerator  # provided with the networks' pipeline
        except ImportError:
            raise KeyframeWorldsError(
                "the 'worldstereo' generator is not available in this engine yet; use generator 'preview'"
            ) from None
        return WorldStereoGenerator.from_options(options)
    raise KeyframeWorldsError(f"unknown generator {name!r}; available: preview, worldstereo")


__all__ = ["Generator", "ReferenceFrame", "SegmentRequest", "SegmentResult", "get_generator"]
