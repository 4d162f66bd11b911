"""The engine: runs in its own environment with torch; never imports ``bpy``.

Layers, each importing only those before it (a test checks):

- ``io``: image, EXR and MP4 files.
- ``world``: the memory, its renderer, retrieval, depth, hole filling, torch camera maths.
- ``models``: the WorldStereo networks, their weights, offload and memory budget.
- ``pipelines``: the WorldStereo sampling pipelines on those networks.
- ``testing``: synthetic scenes, tiny model folders, service helpers, fault injection.
- ``generators``: what makes a segment's frames (``preview``, ``worldstereo``) and their options.
- ``run``: one job end to end (runner, bundle, checkpoints, progress, ``run``/``validate``).
- ``service``: ``keyframe-worlds serve``: HTTP, the job queue, one worker process per device.
"""
