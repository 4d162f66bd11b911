"""The point renderer: projection convention, z-order, splats, determinism, against a brute-force reference."""

import numpy as np
import pytest
import torch

from keyframe_worlds.engine.world.render import PointRenderer, render_points

W, H = 40, 30
K = torch.tensor([50.0, 60.0, 20.0, 15.0])  # fx, fy, cx, cy


def brute_force(points, c2w, k, width, height, radius):
    """Per point, per covered pixel: keep the nearest (ties: lowest index). Returns index map, -1 = empty."""
    pts = points.double().numpy()
    c2w = c2w.double().numpy()
    cam = (pts - c2w[:3, 3]) @ c2w[:3, :3]
    fx, fy, cx, cy = k.tolist()
    best = np.full((height, width), np.inf)
    index = np.full((height, width), -1, dtype=np.int64)
    for i, (x, y, z) in enumerate(cam):
        if not z > 1e-3:
            continue
        u = np.float32(np.float32(fx * x + cx * z) / np.float32(z))
        v = np.float32(np.float32(fy * y + cy * z) / np.float32(z))
        if not (0 <= u < width and 0 <= v < height):
            continue
        col, row = int(u), int(v)
        zf = np.float32(z)
        for r in range(row - radius, row + radius + 1):
            for c in range(col - radius, col + radius + 1):
                if 0 <= r < height and 0 <= c < width and zf < best[r, c]:
                    best[r, c] = zf
                    index[r, c] = i
    return index


def test_point_lands_on_the_pixel_the_convention_says():
    # Camera at the origin looking along +z (OpenCV): x right, y down.
    point = torch.tensor([[0.3, -0.2, 2.0]])
    out = render_points(point, torch.tensor([[255, 0, 0]], dtype=torch.uint8), torch.eye(4), K, W, H, splat_radius_px=0)
    u = 50.0 * 0.3 / 2.0 + 20.0  # 27.5 -> column 27
    v = 60.0 * -0.2 / 2.0 + 15.0  # 9.0 -> row 9 (pixel 9 spans [9, 10))
    rows, cols = torch.nonzero(out.mask[0], as_tuple=True)
    assert (rows.tolist(), cols.tolist()) == ([int(v)], [int(u)])
    assert out.depth_z_m[0, 9, 27] == pytest.approx(2.0)
    assert out.rgb[0, 9, 27].tolist() == [255, 0, 0]
    assert out.point_index[0, 9, 27] == 0
    assert out.point_index[0].sum() == -(W * H - 1)


def test_splat_radius_covers_a_square_at_the_point_depth():
    point = torch.tensor([[0.0, 0.0, 4.0]])
    out = render_points(point, torch.tensor([[9, 8, 7]], dtype=torch.uint8), torch.eye(4), K, W, H, splat_radius_px=2)
    rows, cols = torch.nonzero(out.mask[0], as_tuple=True)
    assert sorted(set(rows.tolist())) == [13, 14, 15, 16, 17]
    assert sorted(set(cols.tolist())) == [18, 19, 20, 21, 22]
    assert int(out.mask.sum()) == 25
    assert torch.all(out.depth_z_m[0][out.mask[0]] == 4.0)


def test_nearest_point_wins_and_ties_go_to_the_lowest_index():
    same_pixel = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 2.0], [0.0, 0.0, 5.0], [0.0, 0.0, 2.0]])
    colors = torch.tensor([[1, 1, 1], [2, 2, 2], [3, 3, 3], [4, 4, 4]], dtype=torch.uint8)
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        out = render_points(same_pixel[order], colors[order], torch.eye(4), K, W, H, splat_radius_px=0)
        winner = int(out.point_index[0, 15, 20])
        assert same_pixel[order][winner, 2] == 2.0
        # Two points at depth 2: the one that comes first in this order wins.
        assert winner == min(i for i, o in enumerate(order) if o in (1, 3))


def test_points_behind_outside_or_nan_are_not_drawn():
    points = torch.tensor([
        [0.0, 0.0, -2.0],  # behind
        [0.0, 0.0, 0.0],  # at the camera centre
        [100.0, 0.0, 1.0],  # right of the image
        [float("nan"), 0.0, 1.0],
        [0.0, float("inf"), 1.0],
    ])
    out = render_points(points, torch.zeros(5, 3, dtype=torch.uint8), torch.eye(4), K, W, H)
    assert not out.mask.any()
    assert torch.all(out.point_index == -1)
    assert torch.all(out.depth_z_m == 0)


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_matches_brute_force_on_a_random_cloud(radius):
    g = torch.Generator().manual_seed(7)
    points = torch.rand(3000, 3, generator=g) * torch.tensor([6.0, 4.0, 5.0]) + torch.tensor([-3.0, -2.0, -1.0])
    colors = torch.randint(0, 256, (3000, 3), generator=g, dtype=torch.uint8)
    c2w = torch.eye(4)
    c2w[:3, 3] = torch.tensor([0.2, -0.1, -2.0])
    out = render_points(points, colors, c2w, K, W, H, splat_radius_px=radius)
    expected = brute_force(points, c2w, K, W, H, radius)
    assert (expected >= 0).sum() > 200
    np.testing.assert_array_equal(out.point_index[0].numpy(), expected)
    ok = expected >= 0
    np.testing.assert_array_equal(out.rgb[0].numpy()[ok], colors.numpy()[expected[ok]])
    assert torch.equal(out.mask[0], torch.from_numpy(ok))


def test_batch_equals_single_renders_and_is_deterministic():
    g = torch.Generator().manual_seed(3)
    points = torch.randn(5000, 3, generator=g) + torch.tensor([0.0, 0.0, 6.0])
    colors = torch.randint(0, 256, (5000, 3), generator=g, dtype=torch.uint8)
    c2w = torch.eye(4).repeat(3, 1, 1)
    c2w[1, :3, 3] = torch.tensor([0.5, 0.0, 0.0])
    c2w[2, :3, 3] = torch.tensor([0.0, 0.3, -1.0])
    intr = K.repeat(3, 1)
    renderer = PointRenderer(W, H)
    batch = renderer.render(points, colors, c2w, intr)
    again = renderer.render(points, colors, c2w, intr)
    for field in ("rgb", "depth_z_m", "mask", "point_index"):
        assert torch.equal(getattr(batch, field), getattr(again, field))
    for i in range(3):
        single = render_points(points, colors, c2w[i], intr[i], W, H)
        assert torch.equal(single.point_index[0], batch.point_index[i])
        assert torch.equal(single.depth_z_m[0], batch.depth_z_m[i])
    # Shuffling the points changes indices but not the picture (depths are distinct).
    perm = torch.randperm(5000, generator=g)
    shuffled = renderer.render(points[perm], colors[perm], c2w, intr)
    assert torch.equal(shuffled.rgb, batch.rgb)
    assert torch.equal(shuffled.depth_z_m, batch.depth_z_m)


def test_renderer_rejects_bad_sizes():
    with pytest.raises(ValueError):
        PointRenderer(0, 10)
    with pytest.raises(ValueError):
        PointRenderer(10, 10, splat_radius_px=-1)
