"""The preview generator end to end at 832x480: render, fill, depth, fuse, encode (PNG, EXR, npy, MP4, meshes, 4D outputs).

Run: .venv/bin/python bench/preview.py [--frames 48] [--repeat 3]

A ray-cast room is the reference RGB-D (832x480, about 400k points); one
camera walks sideways and forward through it. ``run_job`` writes the whole
bundle into a temporary folder; fps = frames / wall time of run_job (median
of the repeats), with the job's default ``geometry`` (every 4D output: point
maps, DIS flow, rigid and scene flow, dynamic masks). Alternating with it, the
same job with ``"geometry": {"flow": "none", "point_maps": false}`` shows what
the 4D outputs cost, and the same job with an OPENCV lens on its camera what a
distorted camera costs (the reference undistorted, every frame also written in
the lens: ``source/`` PNGs and MP4). Beside them, the same frames through the stages one at a
time (memory render only, render + fill without writing files) show where the
time goes. Target: 10 fps or more on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from keyframe_worlds.bridge.spec import load_job  # noqa: E402
from keyframe_worlds.engine.generators import SegmentRequest  # noqa: E402
from keyframe_worlds.engine.generators.preview import PreviewGenerator  # noqa: E402
from keyframe_worlds.engine.io.images import write_png  # noqa: E402
from keyframe_worlds.engine.world.memory import PointMemory  # noqa: E402
from keyframe_worlds.engine.run.runner import run_job  # noqa: E402
from keyframe_worlds.engine.testing.synthetic import demo_scene, intrinsics_for_fov, look_at_c2w_opencv, raycast  # noqa: E402

W, H = 832, 480


NO_4D = {"flow": "none", "point_maps": False}


#: The lens of the distorted alternative: a typical wide-angle barrel.
LENS = {"model": "OPENCV", "params": [-0.24, 0.071, 0.0012, -0.0017]}


def write_job(folder: Path, frames: int, geometry: dict | None = None, name: str = "job.json", lens: dict | None = None) -> Path:
    k = intrinsics_for_fov(W, H, 70.0)
    cams = []
    for i in range(frames):
        s = i / max(frames - 1, 1)
        c2w = look_at_c2w_opencv((-0.8 + 1.6 * s, -4.2 + 1.0 * s, 1.6), (0.4 * np.sin(3 * s), 2.0, 0.8))
        cams.append({"frame": i + 1, "c2w_opencv": c2w.tolist(), "fx": float(k[0]), "fy": float(k[1]), "cx": float(k[2]), "cy": float(k[3]),
                     **({} if lens is None else {"distortion": lens})})
    rgb, depth = raycast(demo_scene(), torch.tensor(cams[0]["c2w_opencv"], dtype=torch.float64), k, W, H)
    write_png(folder / "ref.png", rgb.numpy())
    np.save(folder / "ref_depth.npy", depth.numpy())
    job = {
        "version": 1, "name": "bench-preview", "generator": "preview",
        "reference": {"image": "ref.png", "depth": "ref_depth.npy"},
        "trajectories": [{"name": "Camera", "fps": 24.0, "width": W, "height": H, "frames": cams}],
        "output": {"mesh_every": 16, "mesh_stride": 4},
    }
    if geometry is not None:
        job["geometry"] = geometry
    path = folder / name
    path.write_text(json.dumps(job))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {W}x{H}, {args.frames} frames per run")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = load_job(write_job(tmp, args.frames))
        spec_no_4d = load_job(write_job(tmp, args.frames, NO_4D, "job_no_4d.json"))
        spec_lens = load_job(write_job(tmp, args.frames, None, "job_lens.json", LENS))
        walls, walls_no_4d, walls_lens = [], [], []
        for r in range(args.repeat):
            for label, job, times in (("4D outputs on ", spec, walls), ("4D outputs off", spec_no_4d, walls_no_4d),
                                      ("OPENCV lens, 4D on", spec_lens, walls_lens)):
                out = tmp / f"out{r}-{label.split()[-1]}"
                t0 = time.perf_counter()
                manifest = run_job(job, out)
                times.append(time.perf_counter() - t0)
                four_d = sum(1 for f in manifest.trajectories[0].frames if f.point_map or f.flow_observed)
                print(f"  run {r + 1}, {label}: {times[-1]:.2f} s -> {args.frames / times[-1]:.1f} fps, "
                      f"{manifest.point_count:,} points in the cloud, {four_d} frames with 4D files")
                shutil.rmtree(out)  # 16 MB a frame of 4D files: do not let the repeats fill the disk
        wall = statistics.median(walls)
        fps = args.frames / wall
        fps_no_4d = args.frames / statistics.median(walls_no_4d)
        fps_lens = args.frames / statistics.median(walls_lens)

        # Stage by stage, same frames, no files.
        traj = spec.trajectories[0]
        ref = tmp / "ref.png"
        from keyframe_worlds.engine.io.images import read_rgb

        k = torch.tensor([traj.fx[0], traj.fy[0], traj.cx[0], traj.cy[0]])
        memory = PointMemory.from_rgbd(torch.from_numpy(read_rgb(ref)), torch.from_numpy(np.load(tmp / "ref_depth.npy")),
                                       torch.from_numpy(traj.c2w_opencv[0]), k)
        c2w = torch.from_numpy(traj.c2w_opencv[:16])
        intr = k[None].repeat(16, 1)
        t0 = time.perf_counter()
        rendered = memory.render(c2w, intr, W, H)
        render_ms = 1e3 * (time.perf_counter() - t0) / 16
        t0 = time.perf_counter()
        PreviewGenerator().generate(SegmentRequest(c2w, intr, W, H, rendered, memory))
        fill_ms = 1e3 * (time.perf_counter() - t0) / 16
        holes = float((~rendered.mask).float().mean())
    print(f"memory render alone: {render_ms:.1f} ms/frame ({len(memory):,} points); preview fill of the render: "
          f"{fill_ms:.1f} ms/frame ({100 * holes:.1f}% of pixels are holes)")
    print(f"end to end (render, fill, depth, fuse, PNG+EXR+npy+MP4+meshes, 4D outputs): median {wall:.2f} s for {args.frames} "
          f"frames = {fps:.1f} fps; without the 4D outputs {fps_no_4d:.1f} fps (ratio {fps / fps_no_4d:.2f}); with an OPENCV "
          f"lens {fps_lens:.1f} fps (ratio {fps_lens / fps:.2f})")
    print(f"RESULT fps={fps:.1f} fps_no_4d={fps_no_4d:.1f} ratio_4d={fps / fps_no_4d:.3f} fps_lens={fps_lens:.1f} "
          f"ratio_lens={fps_lens / fps:.3f} frames={args.frames} width={W} height={H} render_ms={render_ms:.1f} fill_ms={fill_ms:.1f}")


if __name__ == "__main__":
    main()
