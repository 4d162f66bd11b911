"""WorldReel's 4D outputs at 832x480 on the CPU: milliseconds per frame of each, beside the preview generator's frame.

Run: .venv/bin/python bench/geometry.py [--frames 8] [--repeat 5]

A ray-cast room (``engine.testing.synthetic.demo_scene``) seen by a camera that walks and pans, as in
bench/preview.py, gives exact RGB + z-depth frames. For each consecutive pair the bench times, one at a time and
in rounds so the machine's load falls on all of them alike:

- observed flow: DIS (``engine/world/flow.py``'s ``DisFlow``) forward and backward (the check needs both);
- rigid flow, the forward-backward check, scene flow, the dynamic mask, point maps;
- writing them: the point map, the two flows and the scene flow as EXR, the mask as PNG (as the bundle does);

and, beside them, the preview generator's own frame: a 16-frame segment rendered from the memory and filled
(``PreviewGenerator.generate``), divided by 16; and a tiny depth network's frame: a random-weight Depth Anything
folder (``engine.testing.tiny_models.write_tiny_depth_model``) loaded as a downloaded one is, run through its image
processor and aligned to the memory render (``AlignedLearnedDepth.estimate``) in batches of 4 frames: the cost of
``geometry.depth_model`` without the network's own weight (a real network adds its forward pass on top). Figures are medians over frames and rounds. Everything runs on the
calling thread (the bundle runs the 4D work on its writer thread, beside the generator).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import print_result  # noqa: E402

from keyframe_worlds.engine.generators import SegmentRequest  # noqa: E402
from keyframe_worlds.engine.generators.preview import PreviewGenerator  # noqa: E402
from keyframe_worlds.engine.io.exr import write_exr  # noqa: E402
from keyframe_worlds.engine.run import bundle as bundle_module  # noqa: E402
from keyframe_worlds.engine.testing.synthetic import demo_scene, intrinsics_for_fov, look_at_c2w_opencv, raycast  # noqa: E402
from keyframe_worlds.engine.testing.tiny_models import write_tiny_depth_model  # noqa: E402
from keyframe_worlds.engine.world.depth_alignment import AlignedLearnedDepth  # noqa: E402
from keyframe_worlds.engine.world.learned_depth import load_depth_estimator  # noqa: E402
from keyframe_worlds.engine.world import flow  # noqa: E402
from keyframe_worlds.engine.world.memory import PointMemory  # noqa: E402

W, H = 832, 480


def cameras(frames: int) -> list[torch.Tensor]:
    out = []
    for i in range(frames):
        s = i / 47  # the first frames of bench/preview.py's 48-frame walk
        out.append(look_at_c2w_opencv((-0.8 + 1.6 * s, -4.2 + 1.0 * s, 1.6), (0.4 * np.sin(3 * s), 2.0, 0.8)))
    return out


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, 1e3 * (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {W}x{H}, {args.frames} frames, {args.repeat} rounds")

    k = intrinsics_for_fov(W, H, 70.0)
    cams = cameras(max(args.frames, 2))
    scene = demo_scene()
    frames = [tuple(x.numpy() for x in raycast(scene, c, k, W, H)) for c in cams]
    c2w = [c.numpy() for c in cams]
    intr = k.numpy()
    estimator = flow.DisFlow()

    memory = PointMemory.from_rgbd(torch.from_numpy(frames[0][0]), torch.from_numpy(frames[0][1]), cams[0], k)
    seg_c2w = torch.stack(cameras(16))
    seg_k = k[None].repeat(16, 1)
    preview = PreviewGenerator()

    samples: dict[str, list[float]] = {key: [] for key in (
        "observed", "point_map", "rigid", "fb_check", "scene", "mask", "write", "preview", "tiny_depth")}
    depth_batch = 4
    batch_c2w, batch_k = seg_c2w[:depth_batch], seg_k[:depth_batch]
    batch_rgb = torch.from_numpy(np.stack([frames[i % len(frames)][0] for i in range(depth_batch)]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny_depth = AlignedLearnedDepth(load_depth_estimator(write_tiny_depth_model(tmp / "depth-anything-tiny"), device="cpu"))
        batch_render = memory.render(batch_c2w, batch_k, W, H)
        for _round in range(args.repeat):
            _r, preview_ms = timed(lambda: preview.generate(SegmentRequest(seg_c2w, seg_k, W, H, memory.render(seg_c2w, seg_k, W, H), memory)))
            samples["preview"].append(preview_ms / 16)
            tiny_depth.reset()
            _d, depth_ms = timed(lambda: tiny_depth.estimate(batch_rgb, batch_render, point_confidence=memory.confidence,
                                                              intrinsics=batch_k))
            samples["tiny_depth"].append(depth_ms / depth_batch)
            for i in range(len(frames) - 1):
                (rgb, depth), (rgb_next, depth_next) = frames[i], frames[i + 1]
                (fwd, bwd), ms = timed(lambda: estimator.forward_backward(rgb, rgb_next))
                samples["observed"].append(ms)
                points, ms = timed(lambda: flow.point_map(depth, c2w[i], intr))
                samples["point_map"].append(ms)
                points_next = flow.point_map(depth_next, c2w[i + 1], intr)  # the bundle has it from the frame's own point map
                rigid, ms = timed(lambda: flow.rigid_flow(points, c2w[i + 1], intr))
                samples["rigid"].append(ms)
                followed, ms = timed(lambda: flow.forward_backward_check(fwd, bwd))
                samples["fb_check"].append(ms)
                motion, ms = timed(lambda: flow.scene_flow(points, fwd, followed, depth_next, points_next))
                samples["scene"].append(ms)
                mask, ms = timed(lambda: flow.dynamic_mask(fwd, rigid, followed, rgb, rgb_next))
                samples["mask"].append(ms)

                def write() -> None:
                    write_exr(tmp / "p.exr", {"X": points[..., 0], "Y": points[..., 1], "Z": points[..., 2]},
                              compression=bundle_module.FOUR_D_COMPRESSION)
                    for name, f in (("o", fwd), ("r", rigid)):
                        write_exr(tmp / f"{name}.exr", {"u": f[..., 0], "v": f[..., 1]}, compression=bundle_module.FOUR_D_COMPRESSION)
                    write_exr(tmp / "s.exr", {"X": motion[..., 0], "Y": motion[..., 1], "Z": motion[..., 2]},
                              compression=bundle_module.FOUR_D_COMPRESSION)
                    bundle_module._write_mask_png(tmp / "m.png", mask)

                _none, ms = timed(write)
                samples["write"].append(ms)
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}

    med = {key: statistics.median(v) for key, v in samples.items()}
    compute = sum(med[k] for k in ("observed", "point_map", "rigid", "fb_check", "scene", "mask"))
    total = compute + med["write"]
    print(f"per frame at {W}x{H} (median of {len(samples['observed'])} frame pairs):")
    print(f"  observed flow (DIS fast, forward + backward): {med['observed']:.1f} ms")
    print(f"  point map: {med['point_map']:.1f} ms   rigid flow: {med['rigid']:.1f} ms   forward-backward check: {med['fb_check']:.1f} ms")
    print(f"  scene flow: {med['scene']:.1f} ms   dynamic mask: {med['mask']:.1f} ms")
    print(f"  writing them (4 EXR, compression {bundle_module.FOUR_D_COMPRESSION}; the mask as PNG): {med['write']:.1f} ms, "
          f"{sum(sizes.values()) / 1e6:.1f} MB a frame ({', '.join(f'{n} {s / 1e6:.2f}' for n, s in sorted(sizes.items()))})")
    print(f"  all 4D outputs: {compute:.1f} ms computing + {med['write']:.1f} ms writing = {total:.1f} ms a frame")
    print(f"preview generator's own frame (memory render + fill): {med['preview']:.1f} ms; 4D outputs / preview frame = "
          f"{total / med['preview']:.2f}")
    print(f"tiny depth network (random-weight Depth Anything, processor + forward + alignment to the memory): "
          f"{med['tiny_depth']:.1f} ms a frame")
    print_result(observed_flow_ms=round(med["observed"], 2), rigid_flow_ms=round(med["rigid"], 2), scene_flow_ms=round(med["scene"], 2),
                 point_map_ms=round(med["point_map"], 2), fb_check_ms=round(med["fb_check"], 2), mask_ms=round(med["mask"], 2),
                 write_ms=round(med["write"], 2), total_4d_ms=round(total, 2), preview_frame_ms=round(med["preview"], 2),
                 ratio_4d_vs_preview=round(total / med["preview"], 3), tiny_depth_ms=round(med["tiny_depth"], 2), mb_per_frame=round(sum(sizes.values()) / 1e6, 2),
                 width=W, height=H)


if __name__ == "__main__":
    main()
