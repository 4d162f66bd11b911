"""The global-geometric memory: lifting RGB-D, fusing only what is new, the budget, save/load."""

import pytest
import torch

from keyframe_worlds.bridge.errors import KeyframeWorldsError
from keyframe_worlds.engine.world.memory import PointMemory
from keyframe_worlds.engine.testing.synthetic import demo_scene, intrinsics_for_fov, look_at_c2w_opencv, raycast

W, H = 64, 48


@pytest.fixture(scope="module")
def views():
    scene = demo_scene()
    k = intrinsics_for_fov(W, H, 70.0)
    cams = [
        look_at_c2w_opencv((0.0, -4.0, 1.6), (0.0, 2.0, 0.8)),
        look_at_c2w_opencv((0.3, -4.0, 1.6), (0.3, 2.0, 0.8)),  # small step right: mostly the same content
        look_at_c2w_opencv((0.0, -4.0, 1.6), (-4.0, 1.0, 0.8)),  # turned left: mostly new content
    ]
    return scene, k, cams, [raycast(scene, c, k, W, H) for c in cams]


def test_lifted_reference_renders_back_to_itself(views):
    _, k, cams, rgbd = views
    rgb, depth = rgbd[0]
    memory = PointMemory.from_rgbd(rgb, depth, cams[0], k, splat_radius_px=0)
    assert len(memory) == int((depth > 0).sum())
    assert torch.all(memory.frame_index == 0) and torch.all(memory.confidence == 1.0)
    out = memory.render(cams[0][None], k[None], W, H)
    assert torch.equal(out.mask[0], depth > 0)
    assert torch.equal(out.rgb[0], rgb)
    torch.testing.assert_close(out.depth_z_m[0], depth, rtol=1e-5, atol=0)


def test_fusing_a_frame_twice_adds_nothing_and_confirms(views):
    _, k, cams, rgbd = views
    rgb, depth = rgbd[0]
    memory = PointMemory.from_rgbd(rgb, depth, cams[0], k)
    n = len(memory)
    stats = memory.fuse(rgb, depth, cams[0], k, frame_index=5, confidence=0.5)
    assert stats.added == 0
    # Splats hide some points behind nearer neighbours; most are seen again.
    assert stats.confirmed > 0.8 * n
    assert len(memory) == n
    assert memory.confidence.max() == pytest.approx(1.5)


def test_memory_grows_with_new_content_not_with_frames(views):
    _, k, cams, rgbd = views
    memory = PointMemory.from_rgbd(*rgbd[0], cams[0], k)
    n0 = len(memory)
    similar = memory.fuse(*rgbd[1], cams[1], k, frame_index=1)
    turned = memory.fuse(*rgbd[2], cams[2], k, frame_index=2)
    # A small sideways step reveals a little; turning away reveals most of the image.
    assert similar.added < 0.25 * n0
    assert turned.added > 0.5 * int((rgbd[2][1] > 0).sum())
    assert len(memory) == n0 + similar.added + turned.added
    assert set(memory.frame_index.unique().tolist()) == {0, 1, 2}
    new = memory.frame_index == 2
    assert torch.all(memory.confidence[new] == 0.5)


def test_budget_keeps_the_most_confident_point_per_voxel(views):
    _, k, cams, rgbd = views
    memory = PointMemory(max_points=None)
    memory.add_rgbd(*rgbd[0], cams[0], k, frame_index=0, confidence=0.2)
    memory.add_rgbd(*rgbd[0], cams[0], k, frame_index=1, confidence=0.9)  # same points, more confident
    n = len(memory)
    keep = memory.voxel_representatives(1e-4)  # far smaller than the spacing: one voxel per distinct point
    assert keep.numel() == n // 2
    assert torch.all(memory.frame_index[keep] == 1)
    memory.max_points = n // 5
    memory.enforce_budget()
    assert 0 < len(memory) <= n // 5
    assert torch.all(memory.frame_index == 1)


def test_save_and_load_round_trip(tmp_path, views):
    _, k, cams, rgbd = views
    memory = PointMemory.from_rgbd(*rgbd[0], cams[0], k)
    memory.fuse(*rgbd[2], cams[2], k, frame_index=2)
    path = tmp_path / "memory.npz"
    memory.save(path)
    loaded = PointMemory.load(path)
    assert len(loaded) == len(memory)
    for name in ("positions_world", "colors", "frame_index", "confidence"):
        assert torch.equal(getattr(loaded, name), getattr(memory, name))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a memory")
    with pytest.raises(KeyframeWorldsError, match="bad.npz"):
        PointMemory.load(bad)


def test_updating_an_earlier_render_equals_a_fresh_render(views):
    _, k, cams, rgbd = views
    memory = PointMemory.from_rgbd(*rgbd[0], cams[0], k)
    stamp = memory.stamp
    before = memory.render(cams[2][None], k[None], W, H)
    memory.fuse(*rgbd[2], cams[2], k, frame_index=2)
    assert memory.stamp[0] > stamp[0]
    updated = memory.render_update(before, stamp[0], cams[2], k)
    fresh = memory.render(cams[2][None], k[None], W, H)
    assert torch.equal(updated.depth_z_m, fresh.depth_z_m)
    assert torch.equal(updated.rgb, fresh.rgb)
    assert torch.equal(updated.mask, fresh.mask)
    # Fusing with the stale render as prior adds exactly what fusing without it adds.
    a = PointMemory.from_rgbd(*rgbd[0], cams[0], k)
    b = PointMemory.from_rgbd(*rgbd[0], cams[0], k)
    prior_a = (a.render(cams[1][None], k[None], W, H), a.stamp)
    a.fuse(*rgbd[2], cams[2], k, frame_index=2)
    b.fuse(*rgbd[2], cams[2], k, frame_index=2)
    sa = a.fuse(*rgbd[1], cams[1], k, frame_index=1, prior=prior_a)
    sb = b.fuse(*rgbd[1], cams[1], k, frame_index=1)
    assert sa == sb and len(a) == len(b)
