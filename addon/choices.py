"""The add-on's enumerated choices, without ``bpy``, so the console command can build its parser cheaply."""

CAMERA_SOURCES = ("SCENE", "SELECTED", "ALL", "MARKERS")
REFERENCE_SOURCES = ("RENDER", "FILE")
DEPTH_SOURCES = ("SCENE", "FILE", "NONE")
GENERATORS = ("preview", "worldstereo")
