"""Depth for new frames: memory depth where visible, edge-aware completion elsewhere."""

import torch

from keyframe_worlds.engine.world.depth import DepthEstimator, MemoryDepthCompletion
from keyframe_worlds.engine.world.memory import PointMemory
from keyframe_worlds.engine.testing.synthetic import demo_scene, intrinsics_for_fov, look_at_c2w_opencv, raycast

W, H = 96, 64


def test_visible_pixels_keep_the_memory_depth_and_holes_get_the_true_depth_roughly():
    scene = demo_scene()
    k = intrinsics_for_fov(W, H, 70.0)
    ref = look_at_c2w_opencv((0.0, -4.0, 1.6), (0.0, 2.0, 0.8))
    moved = look_at_c2w_opencv((1.2, -3.6, 1.8), (0.2, 2.0, 0.8))
    memory = PointMemory.from_rgbd(*raycast(scene, ref, k, W, H), ref, k)
    true_rgb, true_depth = raycast(scene, moved, k, W, H)
    rendered = memory.render(moved[None], k[None], W, H)
    holes = ~rendered.mask[0]
    assert 0.02 < holes.float().mean() < 0.5  # the move disoccludes something
    estimator = MemoryDepthCompletion()
    assert isinstance(estimator, DepthEstimator)
    est = estimator.estimate(true_rgb[None], rendered)
    assert torch.equal(est.depth_z_m[0][~holes], rendered.depth_z_m[0][~holes])
    assert torch.all(est.depth_z_m > 0) and torch.all(torch.isfinite(est.depth_z_m))
    assert torch.all(est.confidence[0][holes] == 0.3) and torch.all(est.confidence[0][~holes] == 1.0)
    rel = ((est.depth_z_m[0] - true_depth).abs() / true_depth)[holes & (true_depth > 0)]
    assert rel.median() < 0.1
    # Far better than filling every hole with one typical depth.
    flat = rendered.depth_z_m[0][~holes].median()
    rel_flat = ((flat - true_depth).abs() / true_depth)[holes & (true_depth > 0)]
    assert rel.mean() < 0.8 * rel_flat.mean()


def test_colour_edges_keep_depth_edges_inside_a_hole():
    # Left half red at 2 m, right half blue at 6 m; a hole straddles the edge.
    depth = torch.where(torch.arange(W)[None, :] < W // 2, 2.0, 6.0).expand(H, W).clone()
    rgb = torch.zeros(H, W, 3, dtype=torch.uint8)
    rgb[:, : W // 2, 0] = 220
    rgb[:, W // 2 :, 2] = 220
    visible = torch.ones(H, W, dtype=torch.bool)
    visible[20:44, 30:66] = False
    filled = MemoryDepthCompletion(far_bias=0.0).complete(depth[None], visible[None], rgb[None])[0]
    hole = ~visible
    left = hole & (torch.arange(W)[None, :] < W // 2)
    right = hole & (torch.arange(W)[None, :] >= W // 2)
    torch.testing.assert_close(filled[left], torch.full_like(filled[left], 2.0), rtol=0.02, atol=0)
    torch.testing.assert_close(filled[right], torch.full_like(filled[right], 6.0), rtol=0.02, atol=0)


def test_without_colour_cues_holes_take_the_far_side():
    depth = torch.where(torch.arange(W)[None, :] < W // 2, 2.0, 6.0).expand(H, W).clone()
    visible = torch.ones(H, W, dtype=torch.bool)
    visible[20:44, 40:56] = False  # centred on the edge
    biased = MemoryDepthCompletion(far_bias=4.0).complete(depth[None], visible[None])[0]
    plain = MemoryDepthCompletion(far_bias=0.0).complete(depth[None], visible[None])[0]
    hole = ~visible
    assert biased[hole].median() > 5.0
    assert plain[hole].median() < biased[hole].median()


def test_frames_with_nothing_visible_get_the_fallback_depth():
    depth = torch.zeros(2, H, W)
    visible = torch.zeros(2, H, W, dtype=torch.bool)
    depth[1, :10], visible[1, :10] = 3.0, True
    out = MemoryDepthCompletion(fallback_depth_m=7.0).complete(depth, visible)
    assert torch.all(out[0] == 7.0)
    torch.testing.assert_close(out[1], torch.full_like(out[1], 3.0))
