"""The preview generator: memory render where visible, background-coloured fills, stable over frames."""

import pytest
import torch

from keyframe_worlds.bridge.errors import KeyframeWorldsError
from keyframe_worlds.engine.generators import SegmentRequest, get_generator
from keyframe_worlds.engine.generators.preview import PreviewGenerator
from keyframe_worlds.engine.world.memory import PointMemory
from keyframe_worlds.engine.testing.synthetic import Box, Scene, intrinsics_for_fov, look_at_c2w_opencv, raycast

W, H = 96, 64
WALL = (60, 90, 200)
BOX = (220, 40, 30)


def scene():
    # A red box well in front of a blue wall on a grey floor: moving sideways uncovers wall and floor.
    return Scene(boxes=(
        Box((-6, -6, -0.1), (6, 8, 0.0), (128, 128, 128), 100.0),
        Box((-6, 6, 0.0), (6, 6.1, 4.0), WALL, 100.0),
        Box((-0.6, 0.0, 0.0), (0.6, 1.0, 1.6), BOX, 100.0),
    ))


def request_along(memory, eyes, k):
    c2w = torch.stack([look_at_c2w_opencv(e, (e[0], 4.0, 0.8)) for e in eyes])
    intr = k[None].repeat(len(eyes), 1)
    return SegmentRequest(c2w, intr, W, H, memory.render(c2w, intr, W, H), memory)


@pytest.fixture(scope="module")
def setup():
    s = scene()
    k = intrinsics_for_fov(W, H, 60.0)
    ref = look_at_c2w_opencv((0.0, -3.0, 1.2), (0.0, 4.0, 0.8))
    memory = PointMemory.from_rgbd(*raycast(s, ref, k, W, H), ref, k)
    return s, k, memory


def test_visible_pixels_are_the_render_and_holes_take_the_background(setup):
    s, k, memory = setup
    eyes = [(0.25 * i, -3.0, 1.2) for i in range(6)]
    request = request_along(memory, eyes, k)
    out = PreviewGenerator().generate(request)
    assert out.rgb.shape == (6, H, W, 3) and out.rgb.dtype == torch.uint8
    mask = request.rendered.mask
    assert torch.equal(out.rgb[mask], request.rendered.rgb[mask])
    assert torch.equal(out.depth.depth_z_m[mask], request.rendered.depth_z_m[mask])
    holes = ~mask[-1]
    assert holes.sum() > 50  # the last camera uncovers wall and floor left of the box
    assert torch.all(out.rgb[~mask].int().sum(-1) > 0)  # every hole is filled (the scene has no black)
    true_rgb, true_depth = raycast(s, request.c2w_opencv[-1], k, W, H)
    filled = out.rgb[-1][holes].float()
    to_truth = (filled - true_rgb[holes].float()).norm(dim=1).mean()
    to_box = (filled - torch.tensor(BOX).float()).norm(dim=1).mean()
    assert to_truth < 0.5 * to_box
    # Filled depth lies behind the box edge that uncovered it.
    assert out.depth.depth_z_m[-1][holes].median() > 0.9 * true_depth[holes].median()
    assert torch.all(out.depth.confidence[mask] == 1.0) and torch.all(out.depth.confidence[~mask] == 0.3)


def nearest_difference(warped, valid, frame):
    """Per pixel, the smallest mean |colour difference| to the warped image within one pixel (resampling slack)."""
    best = torch.full(frame.shape[:2], float("inf"))
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            shifted = torch.roll(warped, (dy, dx), (0, 1)).float()
            ok = torch.roll(valid, (dy, dx), (0, 1))
            diff = (shifted - frame.float()).abs().mean(-1)
            best = torch.where(ok, torch.minimum(best, diff), best)
    return best


def test_fills_are_stable_across_frames(setup):
    _, k, memory = setup
    eyes = [(0.6 + 0.04 * i, -3.0, 1.2) for i in range(5)]
    request = request_along(memory, eyes, k)

    def flicker(generator):
        """Mean colour change of hole pixels between consecutive frames, following the camera."""
        out = generator.generate(request)
        changes = []
        for t in range(1, 5):
            prev = PointMemory(max_points=None, splat_radius_px=0)
            holes = ~request.rendered.mask[t - 1]
            prev.add_rgbd(out.rgb[t - 1], out.depth.depth_z_m[t - 1], request.c2w_opencv[t - 1], k, 0, 1.0, where=holes)
            warped = prev.render(request.c2w_opencv[t : t + 1], k[None], W, H)
            common = warped.mask[0] & ~request.rendered.mask[t]
            assert common.sum() > 300
            changes.append(nearest_difference(warped.rgb[0], warped.mask[0], out.rgb[t])[common].mean())
        return torch.stack(changes).mean()

    stable = flicker(PreviewGenerator(temporal=True))
    independent = flicker(PreviewGenerator(temporal=False))
    assert stable < 0.25
    assert stable < 0.2 * independent


def test_preview_is_the_default_and_says_it_is_a_preview():
    generator = get_generator("preview", {"segment_length": 8})
    assert generator.segment_length == 8
    assert "preview" in generator.label and "no learned model" in generator.label
    with pytest.raises(KeyframeWorldsError, match="options.steps: unknown option of the preview generator"):
        get_generator("preview", {"steps": 4})
    with pytest.raises(KeyframeWorldsError, match="segment_length"):
        get_generator("preview", {"segment_length": 0})
    with pytest.raises(KeyframeWorldsError, match="unknown generator"):
        get_generator("nope")
