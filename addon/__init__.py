"""The Blender side of Keyframe Worlds: the only package that imports ``bpy``.

Each UI module exposes ``classes``; ``register`` gathers them in order.
Operators are thin: they read properties, call the plain functions in
``scene_cameras`` (the same ones scripts use), and report the project's one
error type.
"""

from __future__ import annotations

import bpy

from . import operators, panels

_MODULES = (operators, panels)


def _classes():
    for module in _MODULES:
        yield from module.classes


def register() -> None:
    for cls in _classes():
        bpy.utils.register_class(cls)


def unregister() -> None:
    for cls in reversed(list(_classes())):
        bpy.utils.unregister_class(cls)
