"""Real, small things for tests, benchmarks and the demo (nothing here is a mock).

- ``synthetic``: procedural scenes with exact depth (ray-cast), cameras looking at them.
- ``tiny_models``: tiny WorldStereo variant folders and a tiny Wan2.1 folder in the released layouts.
- ``service``: a preview job on disk and a real ``keyframe-worlds serve`` subprocess.
- ``faults``: fault injection the engine honours from its environment (a full disk, a hung or
  crashing worker), for failures a test cannot cause otherwise.
"""
