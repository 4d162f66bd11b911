"""The engine: 3D memory, renderer, generators, reconstruction, result bundle.

Runs in its own environment with torch. Never imports ``bpy``.
"""
