"""Failures named for what they are: a full disk while checkpointing (real safetensors on a real full tmpfs),
``run`` onto a full disk, a read-only job root (a server-side 500, not the client's 400), and preview
options refused before anything is queued. The tmpfs tests need root (mount); elsewhere they are skipped."""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import pytest
import requests

from conftest import VENV_BIN
from keyframe_worlds.engine.testing.service import Engine, write_preview_job

CLI = str(VENV_BIN / "keyframe-worlds")
TIMEOUT = 30


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, timeout=10)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {out.stderr.decode(errors='replace').strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def fill(folder: Path) -> None:
    """Fill the file system holding ``folder`` up to its last byte."""
    with open(folder / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    try:
        with open(folder / "filler2", "wb") as fh:
            while True:
                fh.write(b"\0" * 512)
                fh.flush()
    except OSError:
        pass


def test_a_full_disk_while_checkpointing_is_reported_as_disk_full(tmpfs, tmp_path):
    import torch

    from keyframe_worlds.engine.run.checkpoint import save_tensors
    from keyframe_worlds.bridge.paths import failure_message

    disk = tmpfs(tmp_path / "disk", "256k")
    (disk / ".checkpoint").mkdir()
    fill(disk)
    with pytest.raises(OSError) as caught:
        save_tensors({"memory.positions_world": torch.zeros(64, 1024)}, disk / ".checkpoint" / "state-000001.safetensors")
    assert caught.value.errno == errno.ENOSPC
    assert "SafetensorError" in repr(caught.value.__cause__)  # it really came from safetensors' Rust writer
    message = failure_message(caught.value, disk)
    assert message.startswith("disk full") and str(disk) in message and "internal error" not in message
    # the SafetensorError alone (as a caller that does not go through save_tensors would see it) reads the same
    assert failure_message(caught.value.__cause__, disk).startswith("disk full")
    assert not list((disk / ".checkpoint").iterdir())  # no half file left behind


def test_run_onto_a_full_disk_says_disk_full_in_one_line(tmpfs, tmp_path):
    spec = write_preview_job(tmp_path / "job", frames=60, segment_length=4)
    out_root = tmpfs(tmp_path / "small", "320k")
    result = subprocess.run([CLI, "run", str(spec), "--out", str(out_root / "out"), "--device", "cpu", "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "disk full" in lines[0] and "internal error" not in lines[0], result.stderr


def test_a_read_only_job_root_is_a_server_side_500_and_the_engine_keeps_serving(tmpfs, tmp_path):
    spec = write_preview_job(tmp_path / "job", frames=3)
    # serve refuses a job root it cannot write at start (tests/test_cli_outputs.py); this one becomes read-only
    # while the engine runs (its log is kept elsewhere, so the file system can be remounted).
    root = tmpfs(tmp_path / "root", "4m")
    with Engine(root, log_dir=tmp_path / "logs", extra_args=("--device", "cpu", "--allow-path", str(tmp_path / "job"))) as eng:
        eng.start()
        remount = subprocess.run(["mount", "-o", "remount,ro", str(root)], capture_output=True, timeout=10)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount the job root read-only: {remount.stderr.decode(errors='replace').strip()}")
        headers = {"Authorization": f"Bearer {eng.token}"}
        doc = json.loads(spec.read_text())
        doc["reference"] = {k: str(spec.parent / v) for k, v in doc["reference"].items()}
        r = requests.post(f"{eng.url}/v1/jobs", json=doc, headers=headers, timeout=TIMEOUT)
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert "Read-only file system" in error and str(root) in error and "internal error" not in error, error
        assert requests.get(f"{eng.url}/v1/health", timeout=TIMEOUT).status_code == 200
        assert requests.get(f"{eng.url}/v1/jobs", headers=headers, timeout=TIMEOUT).json()["jobs"] == []
        subprocess.run(["mount", "-o", "remount,rw", str(root)], capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with Engine(tmp_path_factory.mktemp("options") / "jobs",
                extra_args=("--device", "cpu", "--allow-path", str(tmp_path_factory.getbasetemp()))) as eng:
        eng.start()
        yield eng


@pytest.mark.parametrize("options,path", [({"depth_sigma": float("inf")}, "options.depth_sigma"),
                                          ({"depth_sigma": 0}, "options.depth_sigma"),
                                          ({"reference_depth_m": float("nan")}, "options.reference_depth_m"),
                                          ({"segment_length": 0}, "options.segment_length"),
                                          ({"temporal": "yes"}, "options.temporal")])
def test_preview_options_are_refused_before_queueing(engine, tmp_path, options, path):
    spec = write_preview_job(tmp_path / "job", frames=3)
    doc = json.loads(spec.read_text())
    doc["options"].update(options)
    doc["reference"] = {k: str(spec.parent / v) for k, v in doc["reference"].items()}
    headers = {"Authorization": f"Bearer {engine.token}", "Content-Type": "application/json"}
    r = requests.post(f"{engine.url}/v1/jobs", data=json.dumps(doc), headers=headers, timeout=TIMEOUT)  # Infinity/NaN as JSON allows
    assert r.status_code == 400 and [p["path"] for p in r.json()["problems"]] == [path], r.text
    assert requests.get(f"{engine.url}/v1/jobs", headers=headers, timeout=TIMEOUT).json()["jobs"] == []
