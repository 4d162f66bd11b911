"""The contract shared by the add-on and the engine.

Stdlib and numpy only (plus ``requests`` for the client): this package must
import inside Blender's bundled Python and in the engine's environment alike.
It never imports ``bpy`` or ``torch``.
"""
