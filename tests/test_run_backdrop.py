"""The reference's sky (pixels with no surface in its depth map) stays sky in the generated frames."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from keyframe_worlds.bridge import spec as bridge_spec


def test_reference_sky_survives_as_a_backdrop(tmp_path):
    from keyframe_worlds.engine.run.runner import run_job

    w, h = 64, 48
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[: h // 2] = (120, 170, 230)  # sky
    rgb[h // 2 :] = (90, 90, 80)  # ground
    depth = np.zeros((h, w), np.float32)
    depth[h // 2 :] = np.linspace(3.0, 8.0, h - h // 2)[::-1, None]
    Image.fromarray(rgb).save(tmp_path / "ref.png")
    np.save(tmp_path / "depth.npy", depth)
    frames = []
    for i, yaw in enumerate((0.0, 0.0, 0.15)):  # the reference view twice, then a small pan
        c, s = np.cos(yaw), np.sin(yaw)
        c2w = np.eye(4)
        c2w[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
        frames.append({"frame": i + 1, "c2w_opencv": c2w.tolist(), "fx": 50.0, "fy": 50.0, "cx": w / 2, "cy": h / 2})
    doc = {"version": 1, "name": "sky", "generator": "preview", "reference": {"image": "ref.png", "depth": "depth.npy"},
           "trajectories": [{"name": "Cam", "fps": 24, "width": w, "height": h, "frames": frames}]}
    (tmp_path / "job.json").write_text(json.dumps(doc))
    job = bridge_spec.load_job(tmp_path / "job.json")
    manifest = run_job(job, tmp_path / "bundle")
    files = manifest.trajectories[0].frames
    for f in files:
        out = np.asarray(Image.open(tmp_path / "bundle" / f.image).convert("RGB")).astype(float)
        sky = out[2 : h // 2 - 2].reshape(-1, 3)
        # The sky band is the reference's sky colour, not a blend of the ground.
        assert np.abs(sky.mean(0) - (120, 170, 230)).max() < 8, (f.frame, sky.mean(0))
