"""The push-pull hole filling behind the preview: exact outside holes, edge-aware inside, never empty."""

import torch

from keyframe_worlds.engine.world.inpaint import fill_rgb, push_pull_fill

H, W = 40, 60


def halves():
    depth = torch.where(torch.arange(W)[None, :] < W // 2, 2.0, 6.0).expand(H, W).clone()
    rgb = torch.zeros(H, W, 3, dtype=torch.uint8)
    rgb[:, : W // 2, 0] = 200
    rgb[:, W // 2 :, 2] = 200
    return depth, rgb


def test_depth_guide_gives_each_side_of_a_hole_its_own_colour():
    depth, rgb = halves()
    valid = torch.ones(H, W, dtype=torch.bool)
    valid[10:30, 15:45] = False
    out = fill_rgb(rgb[None], valid[None], depth[None])[0]
    assert torch.equal(out[valid], rgb[valid])
    assert torch.all(out[10:30, 15:30, 0] > 190) and torch.all(out[10:30, 15:30, 2] < 10)
    assert torch.all(out[10:30, 30:45, 2] > 190) and torch.all(out[10:30, 30:45, 0] < 10)
    plain = fill_rgb(rgb[None], valid[None])[0]

    def mixed(img):
        return int(((img[..., 0] > 30) & (img[..., 2] > 30)).sum())

    assert mixed(out) == 0 and mixed(plain) > 0  # without the guide the two sides blend


def test_holes_whose_guide_matches_nothing_are_still_filled():
    depth, rgb = halves()
    valid = torch.ones(H, W, dtype=torch.bool)
    valid[5:35, 20:40] = False
    depth[5:35, 20:40] = 50.0  # no valid neighbour anywhere near this depth
    out = fill_rgb(rgb[None], valid[None], depth[None])[0]
    assert torch.all(out[~valid].float().sum(-1) > 150)


def test_push_bias_fills_from_the_far_side_and_an_empty_image_stays_zero():
    log_d = torch.log(halves()[0])[None, None]
    valid = torch.ones(1, H, W, dtype=torch.bool)
    valid[0, :, 24:36] = False
    far = push_pull_fill(log_d, valid, push_bias=8.0)[0, 0].exp()
    plain = push_pull_fill(log_d, valid)[0, 0].exp()
    assert far[:, 24:36].median() > 5.0 > plain[:, 24:36].median()
    nothing = push_pull_fill(torch.ones(1, 2, H, W), torch.zeros(1, H, W, dtype=torch.bool))
    assert torch.all(nothing == 0)
