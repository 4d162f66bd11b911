"""The add-on's enumerated choices, without ``bpy``, so the console command can build its parser cheaply."""

from ..bridge.spec import GENERATORS  # noqa: F401  (the job spec owns the generator names)

CAMERA_SOURCES = ("SCENE", "SELECTED", "ALL", "MARKERS")
REFERENCE_SOURCES = ("RENDER", "FILE")
DEPTH_SOURCES = ("SCENE", "FILE", "NONE")
#: The engine's offload modes (``engine/models/offload.OFFLOAD_MODES``; the add-on does not import the engine).
OFFLOAD_MODES = ("none", "model", "sequential")
