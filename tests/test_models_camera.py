"""Camera normalisation, Pluecker maps and pose vectors against the reference goldens."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keyframe_worlds.bridge.errors import KeyframeWorldsError
from keyframe_worlds.engine.models import camera as C

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "worldstereo"
CASES = json.loads((FIXTURES / "camera_goldens.json").read_text())["cases"]
RTOL = 1e-4


@pytest.fixture(scope="module")
def goldens():
    return load_file(FIXTURES / "camera_goldens.safetensors")


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    return float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def run_case(case: dict, g: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    fn = case["fn"]
    if fn == "camera_center_normalization":
        out = C.camera_center_normalization(g[case["input"]], case["nframe"], case["camera_scale"],
                                            right_multiply=case["is_w2c"])
        return [(out, g[case["output"]])]
    if fn == "batch_sample_rays":
        o, d = C.pixel_rays(g[case["intrinsic"]], g[case["extrinsic"]], case["image_h"], case["image_w"])
        return [(o, g[case["output"][0]]), (d, g[case["output"][1]])]
    if fn == "embed_rays":
        return [(C.plucker_from_rays(g[case["rays_o"]], g[case["rays_d"]], case["nframe"]), g[case["output"]])]
    if fn == "get_camera_embedding":
        out = C.plucker_embedding(g[case["intrinsic"]], g[case["extrinsic"]], case["f"], case["h"], case["w"],
                                  normalize=case["normalize"], right_multiply=case.get("is_w2c", False))
        return [(out, g[case["output"]])]
    if fn == "unified_camera_normalization":
        a, b = C.unified_camera_normalization(g[case["w2c"]], g[case["w2c_ref"]], case["camera_scale"])
        return [(a, g[case["output"][0]]), (b, g[case["output"][1]])]
    if fn.startswith("camera_qt"):
        return [(C.camera_pose_vectors(g[case["input"][0]])[None], g[case["output"][0]]),
                (C.camera_pose_vectors(g[case["input"][1]])[None], g[case["output"][1]])]
    if fn == "matrix_to_quaternion":
        return [(C.matrix_to_quaternion(g[case["input"]]), g[case["output"]])]
    raise AssertionError(f"unhandled golden case {fn}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['fn'].split(' ')[0]}:{c['output'] if isinstance(c['output'], str) else c['output'][0]}")
def test_camera_golden(case, goldens):
    for ours, ref in run_case(case, goldens):
        assert rel(ours, ref) <= RTOL


def test_every_golden_function_is_covered():
    assert {c["fn"].split(" ")[0] for c in CASES} == {
        "camera_center_normalization", "batch_sample_rays", "embed_rays", "get_camera_embedding",
        "unified_camera_normalization", "camera_qt", "matrix_to_quaternion"}


def test_camera_qt_from_raw_cameras(goldens):
    ours, ours_ref = C.camera_qt(goldens["ucn.city062_refs_5_15.in_w2c"], goldens["ucn.city062_refs_5_15.in_w2c_ref"])
    assert rel(ours, goldens["camera_qt.city062_refs_5_15.camera_qt"]) <= RTOL
    assert rel(ours_ref, goldens["camera_qt.city062_refs_5_15.camera_qt_ref"]) <= RTOL


def test_normalised_first_camera_is_identity_at_scale(goldens):
    out = C.camera_center_normalization(goldens["traj.verdant050.w2c"], 21, camera_scale=2.0)
    assert torch.allclose(out[0, :3, :3], torch.eye(3), atol=1e-5)
    centre = -out[0, :3, :3].T @ out[0, :3, 3]
    assert math.isclose(float(centre.norm()), 2.0, rel_tol=1e-5)


def test_non_finite_cameras_give_a_zero_map(goldens):
    w2c = goldens["traj.city062.w2c"].clone()
    w2c[3, 0, 0] = float("nan")
    emb = C.plucker_embedding(goldens["traj.city062.K_small"], w2c, 21, 12, 16)
    assert emb.shape == (1, 6, 21, 12, 16) and not emb.any()


def test_quaternion_roundtrip_with_positive_real_part():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(64, 4, dtype=torch.float64), dim=-1)
    w, x, y, z = q.unbind(-1)
    rot = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], dim=-1).reshape(-1, 3, 3)
    out = C.matrix_to_quaternion(rot)
    expected = torch.where(q[:, :1] < 0, -q, q)
    assert torch.allclose(out, expected, atol=1e-9)
    assert (out[:, 0] >= 0).all()


@pytest.mark.parametrize("call", [
    lambda: C.camera_center_normalization(torch.eye(4)[None].repeat(5, 1, 1), 2),
    lambda: C.camera_center_normalization(torch.eye(3)[None], 1),
    lambda: C.pixel_rays(torch.eye(3)[None].repeat(2, 1, 1), torch.eye(4)[None], 4, 4),
    lambda: C.matrix_to_quaternion(torch.eye(4)),
])
def test_bad_shapes_are_named(call):
    with pytest.raises(KeyframeWorldsError):
        call()
