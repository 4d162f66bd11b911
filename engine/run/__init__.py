"""Running one job: reference -> memory -> segments -> result bundle, resumable.

- ``runner``: :func:`run_job`, the loop every entry point calls (``keyframe-worlds run``, the workers).
- ``bundle``: the result bundle writer (frames, depth, meshes, point cloud, manifest last).
- ``checkpoint``: the state saved after every segment, so an interrupted run resumes.
- ``progress``: the terminal progress bar over the bridge's progress protocol.
- ``commands``: ``keyframe-worlds run`` and ``keyframe-worlds validate``.
"""
