"""The Blender extension: built and validated by Blender's own tool, installed, enabled, registered, unregistered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile

from conftest import REPO_ROOT

INSTALL_AND_CHECK = r"""
import json, sys
import bpy, addon_utils
zip_path = sys.argv[1]
result = {}
result["install"] = list(bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True))
module = "bl_ext.user_default.keyframe_worlds"
result["enabled"] = module in {a.module for a in bpy.context.preferences.addons}
result["operators"] = sorted(op for op in dir(bpy.ops.keyframe_worlds))
result["panel"] = hasattr(bpy.types, "KFW_PT_main")
result["scene_props"] = hasattr(bpy.context.scene, "keyframe_worlds")
result["prefs"] = bpy.context.preferences.addons[module].preferences is not None
result["export_op_registered"] = hasattr(bpy.types, "KEYFRAME_WORLDS_OT_export_trajectory")
# The operators run from the installed copy: export the default scene's camera.
bpy.ops.wm.read_homefile(app_template="")
out = zip_path + ".traj.json"
result["export"] = list(bpy.ops.keyframe_worlds.export_trajectory(filepath=out, format="keyframe-worlds"))
result["exported_frames"] = len(json.load(open(out))["trajectories"][0]["frames"])
addon_utils.disable(module, default_set=True)
result["after_disable"] = {
    "panel": hasattr(bpy.types, "KFW_PT_main"),
    "scene_props": hasattr(bpy.types.Scene, "keyframe_worlds"),
    "export_op_registered": hasattr(bpy.types, "KEYFRAME_WORLDS_OT_export_trajectory"),
    "enabled": module in {a.module for a in bpy.context.preferences.addons},
}
print("RESULT-JSON " + json.dumps(result))
"""


def test_manifest_is_honest():
    manifest = tomllib.loads((REPO_ROOT / "blender_manifest.toml").read_text())
    assert manifest["id"] == "keyframe_worlds"
    assert manifest["blender_version_min"] == "4.2.0"
    assert set(manifest["permissions"]) == {"files", "network"}
    assert "loopback" in manifest["permissions"]["network"]
    for excluded in ("/engine/", "/tests/", "/bench/"):
        assert excluded in manifest["build"]["paths_exclude_pattern"]


def test_build_validate_install_enable_unregister(tmp_path):
    import shutil

    dist = tmp_path / "dist"
    # What the README's headless examples leave in the checkout (an untracked folder) must stay out of the zip.
    stray = REPO_ROOT / "sparse-kfw-extension-test"
    stray.mkdir(exist_ok=True)
    (stray / "points3D.txt").write_text("# not part of the extension\n" * 1000)
    try:
        build = subprocess.run(["make", "-s", "extension", f"DIST={dist}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(stray, ignore_errors=True)
    assert build.returncode == 0, build.stdout + build.stderr
    (zip_path,) = dist.glob("keyframe_worlds-*.zip")
    names = zipfile.ZipFile(zip_path).namelist()
    assert not [n for n in names if n.startswith("sparse-kfw-extension-test")], names
    assert "blender_manifest.toml" in names and "__init__.py" in names and "addon/operators.py" in names
    assert "bridge/spec.py" in names
    assert not [n for n in names if n.startswith(("engine/", "tests/", "bench/", ".venv/")) or "__pycache__" in n]

    env = dict(os.environ, BLENDER_USER_RESOURCES=str(tmp_path / "blender_user"))
    run = subprocess.run([sys.executable, "-c", INSTALL_AND_CHECK, str(zip_path)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    line = next(l for l in run.stdout.splitlines() if l.startswith("RESULT-JSON "))
    result = json.loads(line[len("RESULT-JSON "):])
    assert result["install"] == ["FINISHED"]
    assert result["enabled"] and result["panel"] and result["export_op_registered"]
    assert {"export_trajectory", "import_trajectory", "generate", "cancel", "import_result", "open_folder"} <= set(result["operators"])
    assert result["export"] == ["FINISHED"] and result["exported_frames"] == 250
    assert result["scene_props"] and result["prefs"]
    assert result["after_disable"] == {"panel": False, "scene_props": False, "export_op_registered": False, "enabled": False}
    # Installed into the isolated user folder, not the machine's.
    assert (tmp_path / "blender_user" / "extensions" / "user_default" / "keyframe_worlds" / "blender_manifest.toml").is_file()
