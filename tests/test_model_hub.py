"""``model download`` and ``model list``, and the add-on's model list and Download, without the network.

The released repositories are rebuilt at tiny size (``write_tiny_release_repos``: the WorldStereo release with
one folder per variant and files a download must skip, the Wan2.1 I2V diffusers folder with a sharded
transformer) and served by a Hub on loopback (``LocalHub``), so huggingface_hub itself writes the hub cache in
its own layout (``blobs/``, ``snapshots/<commit>/``, ``refs/main``). Everything after that runs with
``HF_HUB_OFFLINE=1`` against that cache, or with ``HF_ENDPOINT`` at a closed port: no request leaves the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keyframe_worlds.engine.models.hub import (DOWNLOAD_PATTERNS, HUB_MODELS, WAN_I2V_NAME, WAN_I2V_REPO,
                                               WORLDSTEREO_REPO)
from keyframe_worlds.engine.models.names import CAMERA_VARIANT, MEMORY_DMD_VARIANT, MEMORY_VARIANT
from keyframe_worlds.engine.testing.local_hub import LocalHub, write_tiny_release_repos

DEPTH_REPO = "depth-anything/Tiny-Depth-hf"
SHARD_1 = "transformer/diffusion_pytorch_model-00001-of-00002.safetensors"
SKIPPED = ("training_state.pt", "README.md", "demo.mp4", "i2v_input.JPG")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes: a connection is refused at once


def run_cli(*args: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keyframe_worlds.cli", "model", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def hf_env(cache: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "KEYFRAME_WORLDS_"))}
    env.update({"HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", **extra})
    return env


def allowed_files(folder: Path, prefix: str = "") -> dict[str, int]:
    """Relative path -> size of the files under ``folder`` a download fetches (huggingface_hub's own filter)."""
    from huggingface_hub.utils import filter_repo_objects

    files = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    patterns = [prefix + p for p in DOWNLOAD_PATTERNS]
    return {f: files[f] for f in filter_repo_objects(sorted(files), allow_patterns=patterns)}


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The tiny release repositories (the memory-dmd variant is left out: a model the cache lacks)."""
    from keyframe_worlds.engine.testing.tiny_models import write_tiny_depth_model

    root = tmp_path_factory.mktemp("release")
    repos = write_tiny_release_repos(root, variants=(CAMERA_VARIANT, MEMORY_VARIANT))
    repos[DEPTH_REPO] = write_tiny_depth_model(root / "depth")
    (repos[DEPTH_REPO] / "weights.bin").write_bytes(b"not fetched: a pickle")
    return repos


@pytest.fixture(scope="module")
def hub_cache(release, tmp_path_factory):
    """A hub cache written by huggingface_hub itself: ``model download`` against the loopback Hub."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    with LocalHub(release) as hub:
        env = hf_env(cache, HF_ENDPOINT=hub.url)
        run = run_cli("download", CAMERA_VARIANT, MEMORY_VARIANT, WAN_I2V_NAME, DEPTH_REPO, "--json", env=env)
        commits = {repo: hub.commit(repo) for repo in release}
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return cache, commits, json_lines(run.stdout)


def snapshot(cache: Path, repo_id: str, commits: dict) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commits[repo_id]


# -- the command line --------------------------------------------------------------------------------------------


def test_download_help_documents_every_option(tmp_path):
    run = run_cli("download", "--help", env=hf_env(tmp_path))
    assert run.returncode == 0
    text = " ".join(run.stdout.split())
    for option in ("--dir", "--revision", "--json", "NAME"):
        assert option in text
    for model in HUB_MODELS:
        assert model.name in text and model.repo_id in text
    for word in ("HF_HUB_CACHE", "HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE", "resume", "*.safetensors"):
        assert word in text
    listing = " ".join(run_cli("list", "--help", env=hf_env(tmp_path)).stdout.split())
    for option in ("--dir", "--keys", "--json", "KEYFRAME_WORLDS_WORLDSTEREO_DIR", "complete"):
        assert option in listing


def test_list_on_an_empty_folder_and_cache(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    env = hf_env(tmp_path / "no-cache")
    run = run_cli("list", "--dir", str(models), env=env)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == f"model folder: {models}" and lines[1] == f"hugging face cache: {tmp_path / 'no-cache'}"
    for model in HUB_MODELS:
        (row,) = [l for l in lines if l.startswith(model.name + " ")]
        assert "not present" in row and model.repo_id in row
    data = json.loads(run_cli("list", "--dir", str(models), "--json", env=env).stdout)
    assert [m["name"] for m in data["models"]] == [m.name for m in HUB_MODELS]
    assert all(m["copies"] == [] and m["complete"] is False for m in data["models"])
    missing = run_cli("list", "--dir", str(tmp_path / "nowhere"), env=env)
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0 and "no such folder" in missing.stderr


def test_download_builds_the_hub_cache_in_its_own_layout(release, hub_cache):
    cache, commits, events = hub_cache
    for repo_id in release:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        assert (repo / "refs" / "main").read_text() == commits[repo_id]
        assert (repo / "blobs").is_dir()
    release_snapshot = snapshot(cache, WORLDSTEREO_REPO, commits)
    fetched = {str(p.relative_to(release_snapshot)) for p in release_snapshot.rglob("*") if p.is_file()}
    assert fetched == {f"{v}/{f}" for v in (CAMERA_VARIANT, MEMORY_VARIANT) for f in ("config.json", "model.safetensors")}
    wan = snapshot(cache, WAN_I2V_REPO, commits)
    assert (wan / SHARD_1).is_symlink() and (wan / "tokenizer" / "tokenizer.json").is_file()
    everywhere = [p.name for c in release for p in snapshot(cache, c, commits).rglob("*")]
    assert not [name for name in everywhere if name in SKIPPED or name.endswith((".pt", ".bin"))]
    # the JSON events: start, progress up to every byte of the fetched files, done, per model
    by_name: dict[str, list[dict]] = {}
    for event in events:
        by_name.setdefault(event["name"], []).append(event)
    expected_bytes = {CAMERA_VARIANT: sum(allowed_files(release[WORLDSTEREO_REPO], f"{CAMERA_VARIANT}/").values()),
                      WAN_I2V_NAME: sum(allowed_files(release[WAN_I2V_REPO]).values()),
                      DEPTH_REPO: sum(allowed_files(release[DEPTH_REPO]).values())}
    for name, total in expected_bytes.items():
        kinds = [e["event"] for e in by_name[name]]
        assert kinds[0] == "start" and kinds[-1] == "done" and "progress" in kinds
        last = [e for e in by_name[name] if e["event"] == "progress"][-1]
        assert last["bytes_total"] == total and last["bytes_done"] == total
        assert last["files_done"] == last["files_total"] and f"of {last['files_total']} files" in last["text"]
        assert by_name[name][-1]["size_bytes"] == total


def test_list_on_the_hub_cache(release, hub_cache):
    cache, commits, _ = hub_cache
    env = hf_env(cache, HF_HUB_OFFLINE="1")
    data = json.loads(run_cli("list", "--json", env=env).stdout)
    assert data["hf_cache"] == str(cache) and data["model_dir"] is None
    models = {m["name"]: m for m in data["models"]}
    for name, repo_id in ((CAMERA_VARIANT, WORLDSTEREO_REPO), (MEMORY_VARIANT, WORLDSTEREO_REPO),
                          (WAN_I2V_NAME, WAN_I2V_REPO), (DEPTH_REPO, DEPTH_REPO)):
        (copy,) = models[name]["copies"]
        assert models[name]["complete"] and copy["complete"] and copy["problems"] == []
        assert copy["source"] == "hf cache" and copy["revision"] == commits[repo_id]
        prefix = f"{name}/" if repo_id == WORLDSTEREO_REPO else ""
        assert copy["size_bytes"] == sum(allowed_files(release[repo_id], prefix).values())
    assert models[MEMORY_DMD_VARIANT]["copies"] == [] and not models[MEMORY_DMD_VARIANT]["complete"]
    assert models[DEPTH_REPO]["kind"] == "depth"
    text = run_cli("list", env=env).stdout
    (row,) = [l for l in text.splitlines() if l.startswith(MEMORY_DMD_VARIANT + " ")]
    assert "not present" in row
    (row,) = [l for l in text.splitlines() if l.strip().startswith("hf cache") and l.rstrip().endswith(
        f"{MEMORY_VARIANT} (revision {commits[WORLDSTEREO_REPO][:12]})")]
    assert " complete " in row and "KiB" in row


def test_a_file_an_index_names_is_missing(hub_cache, tmp_path):
    cache, commits, _ = hub_cache
    broken = tmp_path / "hub"
    shutil.copytree(cache, broken, symlinks=True)
    (snapshot(broken, WAN_I2V_REPO, commits) / SHARD_1).unlink()  # the link the index names
    (snapshot(broken, WORLDSTEREO_REPO, commits) / CAMERA_VARIANT / "model.safetensors").resolve().unlink()  # its blob
    depth_blob = (snapshot(broken, DEPTH_REPO, commits) / "model.safetensors").resolve()
    os.truncate(depth_blob, depth_blob.stat().st_size - 100)  # a download cut short
    data = json.loads(run_cli("list", "--json", env=hf_env(broken, HF_HUB_OFFLINE="1")).stdout)
    models = {m["name"]: m for m in data["models"]}
    (wan,) = models[WAN_I2V_NAME]["copies"]
    assert not wan["complete"]
    assert wan["problems"] == [f"{SHARD_1} (named by diffusion_pytorch_model.safetensors.index.json) is missing"]
    (camera,) = models[CAMERA_VARIANT]["copies"]
    assert not camera["complete"] and camera["problems"] == ["model.safetensors is missing"]
    assert models[MEMORY_VARIANT]["complete"]  # the same snapshot's other variant is untouched
    (depth,) = models[DEPTH_REPO]["copies"]
    assert not depth["complete"] and depth["problems"][0].startswith("model.safetensors is not a whole safetensors file")
    assert any("Blob missing" in w for w in data["warnings"])  # huggingface_hub's scan reports the broken link
    # the key check (model list --keys) tells the memory variant, complete itself, that its backbone lacks a shard
    from keyframe_worlds.engine.io.checkpoint_files import CheckpointError
    from keyframe_worlds.engine.models.weights import ModelPaths, check_variant_weights

    memory = snapshot(broken, WORLDSTEREO_REPO, commits) / MEMORY_VARIANT
    with pytest.raises(CheckpointError, match="shards listed in .* are missing: .*00001-of-00002"):
        check_variant_weights(memory, paths=ModelPaths(hf_cache_dir=broken))
    assert "keys from" in check_variant_weights(snapshot(cache, WORLDSTEREO_REPO, commits) / MEMORY_VARIANT,
                                                paths=ModelPaths(hf_cache_dir=cache))


def test_offline_download_into_a_plain_folder_then_list_and_load(release, hub_cache, tmp_path):
    cache, commits, _ = hub_cache
    models = tmp_path / "models"
    env = hf_env(cache, HF_HUB_OFFLINE="1")
    run = run_cli("download", MEMORY_VARIANT, WAN_I2V_NAME, DEPTH_REPO, "--dir", str(models), env=env)
    assert run.returncode == 0, run.stderr
    assert f"{MEMORY_VARIANT}: complete" in run.stdout
    variant = models / MEMORY_VARIANT
    wan = models / WAN_I2V_REPO.split("/")[1]
    assert sorted(p.name for p in variant.iterdir()) == ["config.json", "model.safetensors"]
    assert {str(p.relative_to(wan)) for p in wan.rglob("*") if p.is_file()} == set(allowed_files(release[WAN_I2V_REPO]))
    assert (models / "Tiny-Depth-hf" / "model.safetensors").is_file() and not (models / "Tiny-Depth-hf" / "weights.bin").exists()
    # the plain folder's files are the cache's blobs (hard links), not copies
    blob = (snapshot(cache, WAN_I2V_REPO, commits) / SHARD_1).resolve()
    assert os.path.samefile(wan / SHARD_1, blob)
    listing = json.loads(run_cli("list", "--dir", str(models), "--keys", "--json", env=env).stdout)
    by_name = {m["name"]: m for m in listing["models"]}
    folder_copy = [c for c in by_name[MEMORY_VARIANT]["copies"] if c["source"] == "model folder"]
    assert folder_copy[0]["path"] == str(variant) and folder_copy[0]["complete"] and folder_copy[0]["keys"] == "ok"
    assert [c["source"] for c in by_name[WAN_I2V_NAME]["copies"]] == ["model folder", "hf cache"]
    # the variant's base_model (the Wan repository id) resolves to the folder beside it
    from keyframe_worlds.engine.models.weights import ModelPaths, load_worldstereo

    model = load_worldstereo(variant, paths=ModelPaths(hf_cache_dir=tmp_path / "no-cache"))
    assert model.load_report.base_model_dir == wan and model.load_report.keys_from_backbone > 0


def test_download_without_network_or_cache_is_one_line(tmp_path):
    empty = tmp_path / "hub"
    for extra, words in (({}, "the Hub cannot be reached"), ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set")):
        run = run_cli("download", MEMORY_DMD_VARIANT, "--dir", str(tmp_path / "models"), env=hf_env(empty, **extra))
        assert run.returncode == 2, run.stdout + run.stderr
        assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.startswith("keyframe-worlds: error: cannot download hanshanxue/WorldStereo") and words in run.stderr
    run = run_cli("download", "worldstereo-huge", env=hf_env(empty))
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "unknown model 'worldstereo-huge'" in run.stderr
    run = run_cli("download", MEMORY_DMD_VARIANT, "--json", env=hf_env(empty, HF_HUB_OFFLINE="1"))
    events = json_lines(run.stdout)
    assert [e["event"] for e in events] == ["start", "error"] and "HF_HUB_OFFLINE" in events[-1]["message"]


def test_hub_refusals_and_an_interrupted_download(tmp_path):
    """A repository the Hub does not have is one line; a dropped connection leaves a partial file that the next run
    resumes with a Range request (huggingface_hub writes in 10 MiB chunks, so the file is larger than that)."""
    import numpy as np
    from safetensors.numpy import save_file

    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text('{"model_type": "depth_anything"}')
    save_file({"w": np.arange(6 * 1024 * 1024, dtype=np.float32)}, str(big / "model.safetensors"))  # 24 MiB
    with LocalHub({"org/big-depth": big}, drop_once=("model.safetensors",)) as hub:
        env = hf_env(tmp_path / "hub", HF_ENDPOINT=hub.url)
        gone = run_cli("download", "org/not-there", env=env)
        assert gone.returncode == 2 and "no such repository" in gone.stderr and gone.stderr.count("\n") == 1
        first = run_cli("download", "org/big-depth", "--dir", str(tmp_path / "models"), env=env)
        assert first.returncode == 2 and "interrupted" in first.stderr and "again to resume" in first.stderr
        assert first.stderr.count("\n") == 1, first.stderr
        second = run_cli("download", "org/big-depth", "--dir", str(tmp_path / "models"), env=env)
        assert second.returncode == 0, second.stderr
        ranges = [r for method, path, r in hub.requests if method == "GET" and path.endswith("model.safetensors") and r]
    assert ranges and int(ranges[-1].split("=")[1].split("-")[0]) >= 10 * 1024 * 1024
    assert (tmp_path / "models" / "big-depth" / "model.safetensors").read_bytes() == (big / "model.safetensors").read_bytes()


def test_hf_cache_lookup_goes_through_huggingface_hub(hub_cache):
    from keyframe_worlds.engine.models.weights import resolve_hf_cache

    cache, commits, _ = hub_cache
    assert resolve_hf_cache(WAN_I2V_REPO, cache) == snapshot(cache, WAN_I2V_REPO, commits)
    assert resolve_hf_cache(WORLDSTEREO_REPO, cache) is None  # no transformer/ there
    assert resolve_hf_cache(WORLDSTEREO_REPO, cache, required=f"{MEMORY_VARIANT}/config.json") == \
        snapshot(cache, WORLDSTEREO_REPO, commits)


# -- the add-on ---------------------------------------------------------------------------------------------------


@pytest.fixture
def addon(blank_blend, monkeypatch):
    import keyframe_worlds
    from keyframe_worlds.addon import model_manager

    for key in [k for k in os.environ if k.startswith(("HF_", "KEYFRAME_WORLDS_"))]:
        monkeypatch.delenv(key)
    keyframe_worlds.register()
    yield blank_blend, model_manager
    keyframe_worlds.unregister()
    model_manager.state.__init__()


def poll_until_idle(model_manager, timeout: float = 240.0) -> list[str]:
    """Blender's timer loop, by hand (headless bpy has none): what the preferences showed at each tick."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model_manager.poll()
        seen.append(f"{model_manager.state.task}|{model_manager.state.progress.text}|{model_manager.state.message}")
        if not model_manager.busy():
            return seen
        time.sleep(0.05)
    raise AssertionError(f"still busy: {seen[-3:]}")


def test_addon_lists_checks_and_downloads_in_the_background(addon, hub_cache, tmp_path, monkeypatch):
    bpy, model_manager = addon
    cache, commits, _ = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = tmp_path / "models"
    models.mkdir()

    assert bpy.ops.keyframe_worlds.models_check(model_dir=str(models), keys=False) == {"FINISHED"}
    assert model_manager.busy()  # the operator returned while the engine lists
    poll_until_idle(model_manager)
    state = model_manager.state
    assert not state.error, state.message
    listed = {m["name"]: m for m in state.models}
    assert state.model_dir == str(models) and state.hf_cache == str(cache)
    assert listed[MEMORY_VARIANT]["complete"] and not listed[MEMORY_DMD_VARIANT]["complete"]
    assert [c["source"] for c in listed[MEMORY_VARIANT]["copies"]] == ["hf cache"]
    assert state.message == f"{sum(m['complete'] for m in state.models)} of {len(state.models)} models complete"

    assert bpy.ops.keyframe_worlds.models_download(model_name=MEMORY_VARIANT, model_dir=str(models)) == {"FINISHED"}
    with pytest.raises(RuntimeError, match="busy"):
        bpy.ops.keyframe_worlds.models_check(model_dir=str(models))
    seen = poll_until_idle(model_manager)
    assert any(s.startswith("download|") for s in seen)
    assert not state.error, state.message
    assert state.message == f"{MEMORY_VARIANT} complete in {models / MEMORY_VARIANT}"
    assert state.progress.files_done == state.progress.files_total == 2 and state.progress.fraction == 1.0
    # the list refreshed by itself after the download: the variant now has a copy in the model folder
    listed = {m["name"]: m for m in state.models}
    assert [c["source"] for c in listed[MEMORY_VARIANT]["copies"]] == ["model folder", "hf cache"]
    assert (models / MEMORY_VARIANT / "model.safetensors").is_file()

    # a model the offline cache lacks: the engine's one line reaches the preferences, Blender raises nothing
    assert bpy.ops.keyframe_worlds.models_download(model_name=MEMORY_DMD_VARIANT, model_dir=str(models)) == {"FINISHED"}
    poll_until_idle(model_manager)
    assert state.error and "HF_HUB_OFFLINE is set" in state.message and "\n" not in state.message
    with pytest.raises(RuntimeError, match="Model Folder"):
        bpy.ops.keyframe_worlds.models_download(model_name=MEMORY_VARIANT)  # no folder chosen, none in the preferences
