"""Running one job: reference -> memory -> segments -> result bundle, resumable.

- ``runner``: :func:`run_job`, the loop every entry point calls (``keyframe-worlds run``, the workers).
- ``bundle``: the result bundle writer (frames, depth, meshes, point cloud, manifest last).
- ``checkpoint``: the state saved after every segment, so an interrupted run resumes.
- ``progress``: the terminal progress bar over the bridge's progress protocol.
- ``machine``: this machine's model folder and depth model, filled into a job folder brought from elsewhere.
- ``split``: a job split by trajectory (``execution.split_trajectories``): its parts and their fusion.
- ``commands``: ``keyframe-worlds run`` and ``keyframe-worlds validate``.
"""
