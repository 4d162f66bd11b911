"""Keyframe Worlds.

The repository root is both the Blender extension (Blender imports this
package and calls ``register``) and the Python package ``keyframe_worlds``
that the engine and the command line use. Importing it must stay cheap and
must not import ``bpy``: the add-on is imported only when Blender registers it.
"""

__version__ = "0.1.0"


def register() -> None:
    from . import addon

    addon.register()


def unregister() -> None:
    from . import addon

    addon.unregister()
