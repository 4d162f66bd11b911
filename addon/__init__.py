"""The Blender side of Keyframe Worlds: the only package that imports ``bpy``.

Each UI module exposes ``classes``; ``register`` gathers them in order.
Operators are thin: they read properties, call the plain functions in
``scene_cameras``, ``reference``, ``jobs`` and ``importers`` (the same ones
scripts and the headless commands use), and report the project's one error
type. ``bpy`` is imported inside ``register`` so that the console command
can import ``addon.headless`` for its argument parser without Blender.
"""

from __future__ import annotations


def _modules():
    from . import operators, panels

    return (operators, panels)


def register() -> None:
    import bpy

    from . import headless

    for module in _modules():
        for cls in module.classes:
            bpy.utils.register_class(cls)
    headless.register_blender_command()


def unregister() -> None:
    import bpy

    from . import headless

    headless.unregister_blender_command()
    for module in reversed(_modules()):
        for cls in reversed(module.classes):
            bpy.utils.unregister_class(cls)
