"""`make demo`, small (about 32 frames at 256x160): the bundle matches its manifest, the imported world is where it belongs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from keyframe_worlds.bridge import cameras as conv
from keyframe_worlds.bridge.ply import read_ply
from keyframe_worlds.bridge.spec import load_manifest

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--out", str(out), "--frames", "32",
                          "--size", "256x160", "--samples", "4", "--world-size", "320x180"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[done]" in run.stdout
    assert "use_nodes" not in run.stderr  # no deprecated calls in the demo's scene building
    return out


def test_bundle_matches_manifest(demo_out):
    bundle = demo_out / "job" / "bundle"
    manifest = load_manifest(bundle)  # every listed file exists, every camera is valid
    assert [t.trajectory.name for t in manifest.trajectories] == ["Dolly", "Crane"]
    assert sum(len(t.frames) for t in manifest.trajectories) == 32
    for rt in manifest.trajectories:
        assert (bundle / rt.video).stat().st_size > 1000
        image = Image.open(bundle / rt.frames[0].image)
        assert image.size == (256, 160)
        assert np.load(bundle / rt.frames[0].depth_npy).shape == (160, 256)
    assert (demo_out / "videos" / "Dolly.mp4").is_file() and (demo_out / "videos" / "Crane.mp4").is_file()
    for picture in ("contact_sheet.png", "world.png"):
        pixels = np.asarray(Image.open(demo_out / picture).convert("L"), dtype=np.float32)
        assert pixels.std() > 5, f"{picture} is blank"


def test_points_project_back_onto_their_frames(demo_out):
    bundle = demo_out / "job" / "bundle"
    manifest = load_manifest(bundle)
    cloud = read_ply(bundle / manifest.point_cloud)
    assert cloud.count == manifest.point_count > 1000
    # Global frame index: 0 is the reference, then every generated frame in trajectory order.
    views = [(rt.trajectory, i, f) for rt in manifest.trajectories for i, f in enumerate(rt.frames)]
    rng = np.random.default_rng(0)
    picked = rng.choice(cloud.count, size=min(3000, cloud.count), replace=False)
    positions = cloud.positions()[picked].astype(np.float64)
    source = cloud.vertex["frame"][picked]
    generated = source >= 1
    assert generated.mean() > 0.2, "the memory grew with generated frames"
    close = total = 0
    for g in np.unique(source[generated]):
        traj, i, f = views[int(g) - 1]
        sel = source == g
        uv, z = conv.project_points_opencv(positions[sel], traj.c2w_opencv[i], traj.k[i])
        inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < traj.width) & (uv[:, 1] >= 0) & (uv[:, 1] < traj.height)
        assert inside.all(), f"points of {traj.name} frame {f.frame} project outside that frame"
        depth = np.load(bundle / f.depth_npy)
        d = depth[uv[:, 1].astype(int), uv[:, 0].astype(int)]
        close += int((np.abs(d - z) <= 0.05 * z).sum())
        total += int(sel.sum())
    # Voxel downsampling moves points a little; nearly all still land on their frame's surface.
    assert close / total > 0.9, close / total


def test_demo_blend_opens_with_the_imported_world(demo_out):
    code = (
        "import bpy\n"
        f"bpy.ops.wm.open_mainfile(filepath={str(demo_out / 'demo.blend')!r})\n"
        "c = bpy.data.collections['KFW demo']\n"
        "clouds = [o for o in c.objects if o.type == 'POINTCLOUD']\n"
        "meshes = [o for o in c.objects if o.type == 'MESH']\n"
        "print(len(clouds), len(clouds[0].data.points), len(meshes),"
        " bpy.data.objects['Dolly'].data.show_background_images, bpy.data.objects['Crane'].data.show_background_images)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    clouds, points, meshes, dolly_bg, crane_bg = run.stdout.split()[-5:]
    manifest = load_manifest(demo_out / "job" / "bundle")
    assert (int(clouds), int(points)) == (1, manifest.point_count)
    assert int(meshes) == sum(-(-len(rt.frames) // 8) for rt in manifest.trajectories)
    assert dolly_bg == crane_bg == "True"


def test_the_pictures_are_what_the_readme_says(demo_out):
    """The crane moves (its two contact-sheet rows differ); world.png has the size asked for; the depth panels use a
    scale set by the scene, not by the far sky board: the generated first frame's depth spans many colours."""
    manifest = load_manifest(demo_out / "job" / "bundle")
    crane = manifest.trajectories[1].trajectory
    assert np.linalg.norm(crane.c2w_opencv[-1, :3, 3] - crane.c2w_opencv[0, :3, 3]) > 5.0
    assert Image.open(demo_out / "world.png").size == (320, 180)
    sheet = Image.open(demo_out / "contact_sheet.png")
    assert sheet.width > 3 * 256 and sheet.height > 5 * 160  # a label column, three panels; inputs plus four rows
