"""The world the generators continue: what the engine knows of the scene, in torch.

- ``cameras``: the torch twins of ``bridge/cameras.py`` (pixel grids, projection, unprojection,
  rigid inverse, intrinsics rescaling); the one place camera maths is written in torch.
- ``memory``: :class:`PointMemory`, the global-geometric memory (a coloured point cloud with
  confidence, fused frame by frame).
- ``render``: the memory rendered along cameras (RGB, z-depth, visibility mask).
- ``retrieval``: which earlier frames a segment should attend to (spatial-stereo memory).
- ``depth``: depth for generated frames behind :class:`DepthEstimator` (the weight-free completion).
- ``learned_depth``: depth networks from local Hugging Face folders through transformers.
- ``depth_alignment``: their predictions aligned to the memory and fused with it.
- ``flow``: WorldReel's 4D outputs: point maps, observed and rigid flow, scene flow, dynamic masks.
- ``inpaint``: classical hole filling (edge-aware push-pull) for colour and depth.

Nothing here knows of jobs, generators or the service.
"""
