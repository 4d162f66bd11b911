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
    from . import jobs_ui, operators, panels, preferences, properties

    return (properties, preferences, operators, jobs_ui, panels)


def register() -> None:
    import bpy

    from . import headless, panels, properties

    for module in _modules():
        for cls in module.classes:
            bpy.utils.register_class(cls)
    properties.register_properties()
    panels.register_status_bar()
    headless.register_blender_command()


def unregister() -> None:
    import bpy

    from . import headless, jobs_ui, model_manager, panels, properties

    jobs_ui.stop_all()
    model_manager.stop_all()
    headless.unregister_blender_command()
    panels.unregister_status_bar()
    properties.unregister_properties()
    for module in reversed(_modules()):
        for cls in reversed(module.classes):
            bpy.utils.unregister_class(cls)
