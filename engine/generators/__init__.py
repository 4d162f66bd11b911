"""Generators: what makes the frames of a segment.

- ``base``: the interface (:class:`Generator`, :class:`SegmentRequest`, :class:`SegmentResult`).
- ``options``: every generator's job options, checked without torch (:func:`check_options`).
- ``preview``: the memory rendered along the cameras, holes filled classically (no weights).
- ``worldstereo``: WorldStereo video diffusion conditioned on the memory.

``get_generator`` builds the one a job names. The names below load their module on first use,
so ``options`` imports without torch.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "Generator": "base",
    "ReferenceFrame": "base",
    "SegmentRequest": "base",
    "SegmentResult": "base",
    "check_options": "options",
}

__all__ = sorted(_EXPORTS) + ["get_generator"]

__getattr__ = lazy_exports(__name__, _EXPORTS)


def get_generator(name: str, options: dict | None = None, device=None):
    """The generator a job names, configured by the job's ``options``, built on ``device`` (a torch
    device or its string; None: the generator's own default)."""
    from ...bridge.errors import KeyframeWorldsError
    from ...bridge.spec import GENERATORS

    options = dict(options or {})
    if name == "preview":
        from .preview import PreviewGenerator

        generator = PreviewGenerator.from_options(options)
    elif name == "worldstereo":
        from .worldstereo import WorldStereoGenerator

        generator = WorldStereoGenerator.from_options(options, device=device)
    else:
        raise KeyframeWorldsError(f"unknown generator {name!r}; available: {', '.join(GENERATORS)}")
    return generator
