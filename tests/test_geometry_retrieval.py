"""Retrieval of memory frames on scenes where the right answer is known."""

import pytest
import torch

from keyframe_worlds.engine.world.memory import PointMemory
from keyframe_worlds.engine.world.retrieval import CandidateView, retrieve, target_samples
from keyframe_worlds.engine.testing.synthetic import demo_scene, intrinsics_for_fov, look_at_c2w_opencv, raycast

W, H = 64, 48
RED_BOX = (-0.25, 1.75, 0.6)
YELLOW_BOX = (-2.6, -0.6, 0.3)
GREEN_BOX = (2.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def world():
    scene = demo_scene()
    k = intrinsics_for_fov(W, H, 70.0)
    memory = PointMemory(max_points=None)
    for eye, target in (((0, -4.5, 1.6), (0, 2, 0.8)), ((-3, -4, 1.6), (-3, 2, 0.5)), ((3, -4, 1.6), (2, 2, 0.8))):
        c2w = look_at_c2w_opencv(eye, target)
        memory.fuse(*raycast(scene, c2w, k, W, H), c2w, k, frame_index=0, confidence=1.0)
    return scene, k, memory


def view(scene, k, key, eye, target, with_depth=True):
    c2w = look_at_c2w_opencv(eye, target)
    depth = raycast(scene, c2w, k, W, H)[1] if with_depth else None
    return CandidateView(key, c2w, k, W, H, depth)


def targets_looking_at(point, eyes, k):
    c2w = torch.stack([look_at_c2w_opencv(e, point) for e in eyes])
    return c2w, k[None].repeat(len(eyes), 1)


def test_picks_the_views_of_what_the_target_sees_and_skips_duplicates_and_occluded(world):
    scene, k, memory = world
    c2w, intr = targets_looking_at(RED_BOX, [(-0.6 + 0.3 * i, -3.5, 1.4) for i in range(4)], k)
    samples = target_samples(memory, c2w, intr, W, H, scale=0.5)
    assert all(s.shape[0] > 100 for s in samples)
    candidates = [
        view(scene, k, "front-left", (-1.0, -3.0, 1.5), RED_BOX),
        view(scene, k, "front-right", (0.8, -2.8, 1.7), RED_BOX),
        view(scene, k, "side", (-2.5, -0.5, 1.5), RED_BOX),
        view(scene, k, "away", (0.0, -4.8, 1.5), (0.0, -10.0, 1.0)),
        view(scene, k, "dup-a", (-1.0, -3.0, 1.5), RED_BOX),
        view(scene, k, "dup-b", (-1.0, -3.0, 1.5), RED_BOX),
        view(scene, k, "behind-wall", (0.0, 8.0, 1.5), RED_BOX),
    ]
    result = retrieve(samples, candidates, max_frames=8)
    assert sorted(result.selected) == [0, 1, 2]
    assert result.scores[0] > 0.5 and result.scores[3] < 0.02 and result.scores[6] < 0.02
    assert result.scores[4] == result.scores[0]  # duplicates score the same but add no new viewpoint
    three = retrieve(samples, candidates, max_frames=2)
    assert three.selected[0] == int(result.scores[:3].argmax())  # the best first
    assert len(three.selected) == 2 and set(three.selected) <= {0, 1, 2}

    # Without its depth map, the view through the wall looks as good as the others: the
    # visibility test is what rules it out.
    blind = candidates[:6] + [view(scene, k, "behind-wall", (0.0, 8.0, 1.5), RED_BOX, with_depth=False)]
    assert retrieve(samples, blind).scores[6] > 0.3


def test_each_target_frame_pairs_with_the_reference_that_saw_its_part(world):
    scene, k, memory = world
    # The camera pans from the yellow box (left) to the green box (right).
    eye = (0.0, -4.5, 1.5)
    looks = [YELLOW_BOX, (-1.5, 0.0, 0.6), (1.0, 0.3, 0.8), GREEN_BOX]
    c2w = torch.stack([look_at_c2w_opencv(eye, p) for p in looks])
    intr = k[None].repeat(4, 1)
    samples = target_samples(memory, c2w, intr, W, H, scale=0.5)
    candidates = [
        view(scene, k, "green", (2.5, -2.0, 1.8), GREEN_BOX),
        view(scene, k, "yellow", (-3.0, -3.0, 1.2), YELLOW_BOX),
    ]
    result = retrieve(samples, candidates, max_frames=2)
    assert sorted(result.selected) == [0, 1]
    paired = [result.selected[p] for p in result.pairs.tolist()]
    assert paired[0] == 1 and paired[-1] == 0
    assert result.overlap[1, 0] > result.overlap[0, 0] and result.overlap[0, 3] > result.overlap[1, 3]


def test_no_candidates_or_no_overlap_gives_an_empty_pick(world):
    scene, k, memory = world
    c2w, intr = targets_looking_at(RED_BOX, [(0.0, -3.5, 1.4)], k)
    samples = target_samples(memory, c2w, intr, W, H)
    empty = retrieve(samples, [])
    assert empty.selected == () and empty.pairs.tolist() == [-1]
    away = retrieve(samples, [view(scene, k, "away", (0.0, -4.8, 1.5), (0.0, -10.0, 1.0))])
    assert away.selected == () and away.pairs.tolist() == [-1]
