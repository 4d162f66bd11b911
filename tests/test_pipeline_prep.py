"""Input preparation of the WorldStereo pipelines against the reference goldens and fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from keyframe_worlds.bridge.errors import KeyframeWorldsError
from keyframe_worlds.engine.pipelines.prep import (Reference, assign_generation_size, attach_references,
                                                   keyframe_indices, prepare_conditions, uint8_to_video, video_to_uint8)
from keyframe_worlds.engine.world.cameras import intrinsics_matrices, rescale_intrinsics, rescale_intrinsics_vec

from conftest import WORLDSTEREO_FIXTURES

GOLDENS = json.loads((WORLDSTEREO_FIXTURES / "pipeline_prep_goldens.json").read_text())["cases"]


@pytest.mark.parametrize("case", GOLDENS, ids=lambda c: c.get("scene", f"{c['orig_wh'][0]}x{c['orig_wh'][1]}"))
def test_generation_size_matches_goldens(case):
    w, h = case["orig_wh"]
    assert list(assign_generation_size(h, w)) == case["assign_scale_hw"]
    if "latent_hw" in case:
        H, W = case["assign_scale_hw"]
        assert [H // 8, W // 8] == case["latent_hw"]
        assert (H // 16) * (W // 16) == case["tokens_per_frame"]


@pytest.mark.parametrize("case", [c for c in GOLDENS if "scene" in c], ids=lambda c: c["scene"])
def test_keyframes_and_rescaled_intrinsics_match_goldens(case):
    cams = json.loads((WORLDSTEREO_FIXTURES / "examples" / "images" / case["scene"] / "camera.json").read_text())
    k_all = torch.tensor(np.array(cams["intrinsic"]), dtype=torch.float32)
    idx = keyframe_indices(k_all.shape[0])
    assert idx.tolist() == case["frame_indices_21"] and k_all.shape[0] == case["num_input_frames"]
    H, W = case["assign_scale_hw"]
    k = rescale_intrinsics(k_all[idx], tuple(case["orig_wh"]), (W, H))
    torch.testing.assert_close(k[0], torch.tensor(case["K0_scaled"]), rtol=0, atol=1e-4)
    # our (fx, fy, cx, cy) path gives the same matrices
    vec = torch.stack([k_all[idx, 0, 0], k_all[idx, 1, 1], k_all[idx, 0, 2], k_all[idx, 1, 2]], -1)
    torch.testing.assert_close(intrinsics_matrices(rescale_intrinsics_vec(vec, tuple(case["orig_wh"]), (W, H))), k)


def test_short_trajectories_keep_every_camera():
    assert keyframe_indices(5).tolist() == [0, 1, 2, 3, 4]
    assert keyframe_indices(30, 9).tolist() == np.linspace(0, 29, 9, dtype=int).tolist()
    with pytest.raises(KeyframeWorldsError):
        keyframe_indices(0)


def _memory_fixture_conditions():
    x = load_file(WORLDSTEREO_FIXTURES / "memory" / "inputs.safetensors")
    w2c = x["aux.target_extrinsics_w2c"].double()
    k = x["aux.intrinsics_px"]
    intr = torch.stack([k[:, 0, 0], k[:, 1, 1], k[:, 0, 2], k[:, 1, 2]], -1)
    frames, height, width = w2c.shape[0], 48, 64
    gen = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (frames, height, width, 3), generator=gen, dtype=torch.uint8)
    covered = torch.rand(frames, height, width, generator=gen) > 0.35
    refs = [Reference(rgb[0], torch.linalg.inv(x["aux.reference_extrinsics_w2c"][i].double()), int(j) + 1)
            for i, j in enumerate(x["ref_index"])]
    cond = prepare_conditions(rgb[0], rgb, covered, torch.linalg.inv(w2c), intr, (width, height), height, width,
                              memory=True, references=refs)
    return x, cond, rgb, covered


def test_cameras_from_our_convention_reproduce_the_reference_inputs():
    """Our c2w (OpenCV) + (fx, fy, cx, cy) cameras give the fixture's Pluecker map and pose vectors."""
    x, cond, _, _ = _memory_fixture_conditions()
    torch.testing.assert_close(cond.camera_embedding, x["camera_embedding"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cond.camera_qt, x["camera_qt"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cond.camera_qt_ref, x["camera_qt_ref"], rtol=1e-4, atol=1e-4)
    assert cond.ref_index.tolist() == x["ref_index"].tolist()


def test_render_mask_and_video_layout():
    _, cond, rgb, covered = _memory_fixture_conditions()
    assert cond.render_mask.shape == (1, 1, 4, 48, 64) and cond.render_video.shape == (1, 3, 4, 48, 64)
    # 1 = hole, frame 0 (the conditioning image) all covered
    assert torch.equal(cond.render_mask[0, 0, 1:], (~covered[1:]).float())
    assert cond.render_mask[0, 0, 0].sum() == 0
    assert torch.equal(cond.render_video[:, :, 0], cond.image)
    assert torch.equal(video_to_uint8(cond.render_video), rgb)  # exact round trip at the same size
    assert cond.reference_video.shape == (1, 3, 2, 48, 64)


def test_single_view_uses_the_image_as_its_own_reference():
    _, cond, rgb, covered = _memory_fixture_conditions()
    c2w = torch.eye(4).repeat(4, 1, 1).double()
    c2w[:, 0, 3] = torch.arange(4.0)
    intr = torch.tensor([[40.0, 40.0, 32.0, 24.0]]).repeat(4, 1)
    single = prepare_conditions(rgb[0], rgb, covered, c2w, intr, (64, 48), 48, 64, memory=True)
    assert single.ref_index.tolist() == [0]
    assert torch.equal(single.reference_video[:, :, 0], single.image)
    torch.testing.assert_close(single.camera_qt_ref[0, 0], single.camera_qt[0, 0])


def test_resizing_and_bad_inputs():
    frames = torch.full((2, 30, 40, 3), 200, dtype=torch.uint8)
    video = uint8_to_video(frames, 48, 64)
    assert video.shape == (1, 3, 2, 48, 64) and video.min() >= -1 and video.max() <= 1
    covered = torch.ones(2, 30, 40, dtype=torch.bool)
    c2w = torch.eye(4).repeat(2, 1, 1)
    intr = torch.tensor([[40.0, 40.0, 20.0, 15.0]]).repeat(2, 1)
    with pytest.raises(KeyframeWorldsError, match="multiples of 16"):
        prepare_conditions(frames[0], frames, covered, c2w, intr, (40, 30), 50, 64, memory=False)
    with pytest.raises(KeyframeWorldsError, match="same 2 keyframes"):
        prepare_conditions(frames[0], frames, covered, c2w[:1], intr, (40, 30), 48, 64, memory=False)
    with pytest.raises(KeyframeWorldsError, match="attach"):
        prepare_conditions(frames[0], frames, covered, c2w, intr, (40, 30), 48, 64, memory=True,
                           references=[Reference(frames[0], torch.eye(4), 2)])


def test_references_attach_at_their_first_keyframe():
    keyframes = np.array([0, 4, 8, 12, 16])
    pairs = torch.full((17,), -1)
    pairs[4], pairs[8], pairs[12], pairs[16] = 1, 1, 0, 2
    pairs[0] = 3  # keyframe 0 is the conditioning image: its pairing is ignored
    assert attach_references(pairs, keyframes) == [(1, 1), (0, 3), (2, 4)]
    assert attach_references(None, keyframes) == []
