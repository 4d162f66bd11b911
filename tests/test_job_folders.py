"""Self-contained job folders: moved to another place they run unchanged, with this machine's models.

`keyframe-worlds run` as a subprocess on real job folders; the model folder and depth model come from the
command line or the environment (engine/run/machine.py), never from a path baked into the spec.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from conftest import VENV_BIN

from keyframe_worlds.bridge import ply
from keyframe_worlds.bridge.seed import write_seed_ply
from keyframe_worlds.engine.run.machine import DEPTH_MODEL_ENV, MODEL_DIR_ENV, MachineModels, apply_machine
from keyframe_worlds.engine.testing.service import tree_digest, write_preview_job
from keyframe_worlds.engine.testing.tiny_models import write_tiny_depth_model

CLI = str(VENV_BIN / "keyframe-worlds")


def run(*args, env=None, timeout=300):
    environ = {k: v for k, v in os.environ.items() if k not in (DEPTH_MODEL_ENV, MODEL_DIR_ENV)}
    environ.update(env or {})
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=environ)


def test_a_job_folder_moved_to_another_directory_runs_unchanged(tmp_path):
    spec = write_preview_job(tmp_path / "here" / "shot", frames=4, segment_length=2, cameras=2)
    # A scanned point seed travels with the folder too (reference.points, relative like the image and depth).
    rng = np.random.default_rng(0)
    seed_xyz = rng.uniform([-1, -1, 3], [1, 1, 5], (500, 3)).astype(np.float32)
    write_seed_ply(tmp_path / "here" / "shot" / "seed.ply", seed_xyz, rng.integers(0, 255, (500, 3)).astype(np.uint8))
    doc = json.loads(spec.read_text())
    doc["reference"]["points"] = "seed.ply"
    spec.write_text(json.dumps(doc))
    first = run("run", tmp_path / "here" / "shot", "--out", tmp_path / "bundle_here", "--quiet")
    assert first.returncode == 0, first.stderr
    (tmp_path / "there" / "deeper").mkdir(parents=True)
    moved = tmp_path / "there" / "deeper" / "renamed"
    (tmp_path / "here" / "shot").rename(moved)
    second = run("run", moved / "job.json", "--out", tmp_path / "bundle_there", "--quiet")
    assert second.returncode == 0, second.stderr
    here, there = tree_digest(tmp_path / "bundle_here"), tree_digest(tmp_path / "bundle_there")
    assert len(here) > 20 and here == there  # every file, the manifest included, byte for byte
    cloud = ply.read_ply(tmp_path / "bundle_there" / "points.ply").positions()
    assert np.isin(seed_xyz[:, 0], cloud[:, 0]).sum() > 250  # the seed, read from the moved folder, is in the world


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory):
    return write_tiny_depth_model(tmp_path_factory.mktemp("models") / "tiny-depth")


def test_the_depth_model_comes_from_the_machine(tmp_path, depth_model):
    """A reference without depth: the machine's depth model lifts it (no flat board), from the environment as from
    --depth-model; --depth-model also replaces a path another machine baked into the spec."""
    spec = write_preview_job(tmp_path / "job", frames=3, segment_length=3, with_depth=False)
    from_env = run("run", tmp_path / "job", "--out", tmp_path / "env", env={DEPTH_MODEL_ENV: str(depth_model)})
    assert from_env.returncode == 0, from_env.stderr
    assert f"this machine's depth model: {depth_model}" in from_env.stderr
    manifest = json.loads((tmp_path / "env" / "manifest.json").read_text())
    assert not any("flat board" in w for w in manifest["warnings"]), manifest["warnings"]
    none = run("run", tmp_path / "job", "--out", tmp_path / "none", "--quiet")
    assert any("flat board" in w for w in json.loads((tmp_path / "none" / "manifest.json").read_text())["warnings"])

    doc = json.loads(spec.read_text())
    doc["geometry"] = {"depth_model": "/models/of/another/machine/depth"}
    spec.write_text(json.dumps(doc))
    stale = run("run", tmp_path / "job", "--out", tmp_path / "stale", "--quiet", env={DEPTH_MODEL_ENV: str(depth_model)})
    # The spec's own choice comes before the environment's default, so a stale one is named, in one line...
    assert stale.returncode == 2 and "geometry.depth_model: folder not found: /models/of/another" in stale.stderr
    assert "Traceback" not in stale.stderr
    # ... and --depth-model replaces it: the same bundle as the environment's run.
    flag = run("run", tmp_path / "job", "--out", tmp_path / "flag", "--quiet", "--depth-model", depth_model)
    assert flag.returncode == 0, flag.stderr
    assert tree_digest(tmp_path / "flag") == tree_digest(tmp_path / "env")


def test_a_configured_folder_that_is_missing_is_one_line(tmp_path):
    write_preview_job(tmp_path / "job", frames=2, segment_length=2)
    out = run("run", tmp_path / "job", "--out", tmp_path / "b", "--model-dir", tmp_path / "nope")
    assert out.returncode == 2 and f"--model-dir: folder not found: {tmp_path / 'nope'}" in out.stderr
    out = run("run", tmp_path / "job", "--out", tmp_path / "b", env={DEPTH_MODEL_ENV: str(tmp_path / "gone")})
    assert out.returncode == 2 and f"${DEPTH_MODEL_ENV}: folder not found" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "b" / "manifest.json").exists()


def worldstereo_doc(**options):
    """A worldstereo job document's model part (apply_machine reads only the generator, options and geometry)."""
    return {"version": 1, "name": "ws", "generator": "worldstereo", "reference": {"image": "ref.png"},
            "trajectories": [], "options": dict(options)}


def test_the_model_folder_fills_in_checkpoint_and_wan_folder_by_precedence(tmp_path):
    models = tmp_path / "models"
    for folder in ("worldstereo-memory", "worldstereo-memory-dmd", "Wan2.1-I2V-14B-480P-Diffusers"):
        (models / folder).mkdir(parents=True)
    (models / "Wan2.1-I2V-14B-480P-Diffusers" / "model_index.json").write_text("{}")
    wan = str(models / "Wan2.1-I2V-14B-480P-Diffusers")
    from_env = MachineModels.configure(environ={MODEL_DIR_ENV: str(models)})
    forced = MachineModels.configure(model_dir=str(models), environ={})
    assert not from_env.model_dir_forced and forced.model_dir_forced

    # A job that names no model: the machine's variant folder and Wan folder, whichever way it was configured.
    for machine in (from_env, forced):
        doc, notes = apply_machine(worldstereo_doc(variant="worldstereo-memory"), machine)
        assert doc["options"] == {"variant": "worldstereo-memory", "checkpoint": str(models / "worldstereo-memory"),
                                  "wan_dir": wan}
        assert len(notes) == 2
    # Paths baked in elsewhere: --model-dir replaces them; the environment keeps the spec's own checkpoint but not a
    # Wan folder that does not exist here.
    baked = worldstereo_doc(checkpoint="/elsewhere/worldstereo-memory-dmd", wan_dir="/elsewhere/wan")
    doc, _ = apply_machine(baked, forced)
    assert doc["options"] == {"checkpoint": str(models / "worldstereo-memory-dmd"), "wan_dir": wan}
    doc, _ = apply_machine(baked, from_env)
    assert doc["options"] == {"checkpoint": "/elsewhere/worldstereo-memory-dmd", "wan_dir": wan}
    assert baked["options"]["wan_dir"] == "/elsewhere/wan"  # the caller's document is not changed
    # The preview generator has no model folder: nothing changes.
    preview = {"generator": "preview", "options": {"segment_length": 4}}
    assert apply_machine(preview, forced) == (preview, [])
    # Without any configuration nothing is filled in (the generator's own check then names what is missing).
    assert apply_machine(worldstereo_doc(), MachineModels.configure(environ={}))[0]["options"] == {}


def test_serve_gives_submitted_jobs_this_machines_depth_model(tmp_path, depth_model):
    """`serve --depth-model` (as `run --depth-model`): a submitted spec that names no depth model gets the machine's,
    its log says so, and the bundle equals `run`'s with the same flag; a stale path in a spec is replaced."""
    from keyframe_worlds.bridge.spec import load_manifest
    from keyframe_worlds.engine.testing.service import Engine

    spec = write_preview_job(tmp_path / "job", frames=3, segment_length=3, with_depth=False)
    offline = run("run", tmp_path / "job", "--out", tmp_path / "offline", "--quiet", "--depth-model", depth_model)
    assert offline.returncode == 0, offline.stderr
    import requests

    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu", "--depth-model", str(depth_model),
                                               "--allow-path", str(tmp_path / "job"))) as engine:
        client = engine.start()
        plain = client.submit(json.loads(spec.read_text()), base_dir=tmp_path / "job")  # uploaded
        # With local paths, and a depth model of another machine baked in: replaced, as `run --depth-model` does.
        doc = json.loads(spec.read_text())
        doc["geometry"] = {"depth_model": "/models/of/another/machine/depth"}
        response = requests.post(f"{engine.url}/v1/jobs", params={"base_dir": str(tmp_path / "job")}, json=doc, timeout=30,
                                 headers={"Authorization": f"Bearer {engine.token}"})
        assert response.status_code == 201, response.text
        for name, job_id in (("plain", plain.id), ("stale", response.json()["id"])):
            done = client.wait(job_id, timeout=120)
            assert done.state == "completed", client.log(done.id)
            assert f"this machine's depth model: {depth_model}" in client.log(done.id)
            bundle = client.download_bundle(done.id, tmp_path / name)
            assert not any("flat board" in w for w in load_manifest(bundle).warnings)
            downloaded, offline_files = tree_digest(bundle), tree_digest(tmp_path / "offline")
            assert len(downloaded) > 10 and downloaded == {k: offline_files.get(k) for k in downloaded}


def test_a_job_killed_then_moved_resumes_from_its_checkpoint(tmp_path):
    """kill -9 mid-job, then the job folder moves (another farm worker mounting it elsewhere): `run --resume` from
    the new place continues from the checkpoint and writes the uninterrupted run's bundle. A reference replaced by
    another file is another job: its run starts over."""
    import signal

    from keyframe_worlds.engine.testing import faults

    write_preview_job(tmp_path / "a" / "shot", frames=12, segment_length=2)
    killed = run("run", tmp_path / "a" / "shot", "--out", tmp_path / "out", "--quiet",
                 env={faults.KILL_AFTER_CHECKPOINTS_ENV: "3"})
    assert killed.returncode == -signal.SIGKILL
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "shot").rename(tmp_path / "b" / "moved")
    # The checkpoint is still this job's: without --resume the run says so and stops.
    told = run("run", tmp_path / "b" / "moved", "--out", tmp_path / "out", "--quiet")
    assert told.returncode == 2 and "6 of 12 frames done" in told.stderr and "--resume" in told.stderr, told.stderr
    resumed = run("run", tmp_path / "b" / "moved", "--out", tmp_path / "out", "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    whole = run("run", tmp_path / "b" / "moved", "--out", tmp_path / "whole", "--quiet")
    assert whole.returncode == 0, whole.stderr
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "whole")

    killed = run("run", tmp_path / "b" / "moved", "--out", tmp_path / "again", "--quiet",
                 env={faults.KILL_AFTER_CHECKPOINTS_ENV: "3"})
    assert killed.returncode == -signal.SIGKILL
    doc = json.loads((tmp_path / "b" / "moved" / "job.json").read_text())
    reference = tmp_path / "b" / "moved" / doc["reference"]["image"]
    reference.write_bytes(reference.read_bytes() + b"\0")  # another file: one byte longer
    # No longer this job's checkpoint: the run starts over without being told to resume.
    fresh = run("run", tmp_path / "b" / "moved", "--out", tmp_path / "again", "--quiet")
    assert fresh.returncode == 0, fresh.stderr
