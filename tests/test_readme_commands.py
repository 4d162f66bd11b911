"""Every command the README prints runs as printed.

The convention: a fenced ```sh block in README.md holds commands, one a line (``#`` starts a comment); they are
run here, in README order, with ``bash`` in one scratch folder, each expected to exit 0. Other blocks (``json``,
indented output) are not commands. What the scratch folder holds before the first command, and what is
substituted into the commands (the same text everywhere it appears), is listed below; a command this machine
cannot run is listed in ``NOT_RUN`` with the reason, and each entry must still match a README line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, WORLDSTEREO_FIXTURES

README = REPO_ROOT / "README.md"
TOKEN = "readme-commands-token-0123456789"  # $KEYFRAME_WORLDS_TOKEN for every command (the service's 16-character minimum)

#: Placeholder -> what it becomes here. Paths relative to the repository root become absolute (the commands run in
#: a scratch folder); the model-folder placeholders name the tiny checkpoints under ../shared/fixtures.
SUBSTITUTIONS = {
    ".venv/bin/": f"{REPO_ROOT}/.venv/bin/",
    "MODELS/worldstereo-memory": str(WORLDSTEREO_FIXTURES / "memory"),
    "INPUTS.safetensors": str(WORLDSTEREO_FIXTURES / "memory" / "inputs.safetensors"),
    "CASE_DIR": str(WORLDSTEREO_FIXTURES / "pipeline" / "memory-dmd"),
    "WAN_DIR": str(WORLDSTEREO_FIXTURES / "pipeline" / "wan_tiny"),
    "MODELS": "models",  # after MODELS/worldstereo-memory: a model folder in the scratch folder, empty (nothing downloads)
    # Filled in while running: the port the `serve` command printed, and a job submitted to it.
    "PORT": None,
    "JOB_ID": None,
}

#: Commands (by how they start) not run here, and why.
NOT_RUN = {
    "make demo": "the full demo takes minutes; tests/test_demo.py runs it at 32 frames",
    "make test": "the whole suite, which this test is part of",
    "make extension": "tests/test_extension.py builds the zip and validates it with Blender's tool",
    ".venv/bin/keyframe-worlds model download ": "needs the network (the Hugging Face Hub) and tens of GB; "
                                                 "tests/test_model_hub.py runs it against a hub on loopback",
    "deadline bundle submit ": "needs an AWS Deadline Cloud farm and the network; tests/test_farm_openjd.py runs the "
                               "same template with the Open Job Description runtime",
    "blender ": "needs the Blender application, which this machine lacks; the next block runs the same commands "
                "through the bpy module (`keyframe-worlds scene`)",
}

#: A command starting with this is a server: started in the background, its READY line read, stopped at the end.
SERVER = ".venv/bin/keyframe-worlds serve "


def readme_commands() -> list[str]:
    """Every command line of every ```sh block, in order."""
    blocks = re.findall(r"^```sh\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def not_run_reason(command: str) -> str | None:
    return next((reason for prefix, reason in NOT_RUN.items() if command.startswith(prefix)), None)


def substitute(command: str, values: dict) -> str:
    for placeholder, value in values.items():
        if placeholder in command:
            assert value is not None, f"{placeholder} is not known yet when {command!r} runs"
            command = command.replace(placeholder, value)
    return command


def test_the_readme_commands_are_runnable_from_the_repository_root():
    commands = readme_commands()
    assert len(commands) > 15
    bare = [c for c in commands if c.split()[0] == "keyframe-worlds"]
    assert not bare, f"not on PATH after `make demo`; write .venv/bin/keyframe-worlds: {bare}"
    for prefix in NOT_RUN:
        assert any(c.startswith(prefix) for c in commands), f"NOT_RUN lists {prefix!r}, which the README no longer has"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The scratch folder, holding ``shot.blend``: the demo's street, 24 frames at 64x36 (cameras Dolly and Crane),
    and an empty ``models/`` (MODELS: what `model download` would fill)."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "models").mkdir()
    code = (
        "import sys, bpy\n"
        f"sys.path.insert(0, {str(REPO_ROOT / 'scripts')!r})\n"
        "import demo\n"
        "demo.build_scene(24, 64, 36)\n"
        f"bpy.ops.wm.save_as_mainfile(filepath={str(folder / 'shot.blend')!r})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return folder


def start_server(command: str, cwd: Path, env: dict) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        match = re.search(r"READY port=(\d+)", line)
        if match:
            return process, match.group(1)
    process.kill()
    raise AssertionError(f"{command!r} printed no READY line: {''.join(seen)[-2000:]}")


def submit_a_job(port: str, scratch: Path) -> str:
    """A finished job on the README's server, for `jobs delete JOB_ID`: the README's own jobs/shot010, submitted and
    cancelled (a job must have finished, failed or been cancelled to be deleted; cancelling keeps this test short)."""
    from keyframe_worlds.bridge.client import EngineClient

    with EngineClient(f"http://127.0.0.1:{port}", TOKEN) as client:
        job = client.submit(scratch / "jobs" / "shot010" / "job.json")
        client.cancel(job.id)
        status = client.wait(job.id, timeout=120, poll_s=0.1)
        assert status.state in ("cancelled", "completed"), status
        return job.id


def test_every_readme_command_runs_as_printed(scratch):
    env = {**os.environ, "KEYFRAME_WORLDS_TOKEN": TOKEN}
    values = dict(SUBSTITUTIONS)
    servers = []
    ran, skipped = [], []
    try:
        for command in readme_commands():
            reason = not_run_reason(command)
            if reason is not None:
                skipped.append((command, reason))
                continue
            if command.startswith(SERVER):
                process, values["PORT"] = start_server(substitute(command, values), scratch, env)
                servers.append(process)
                values["JOB_ID"] = submit_a_job(values["PORT"], scratch)
                ran.append(command)
                continue
            started = time.monotonic()
            out = subprocess.run(["bash", "-c", substitute(command, values)], cwd=scratch, env=env, capture_output=True,
                                 text=True, timeout=300)
            assert out.returncode == 0, f"{command}\nexit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
            ran.append(command)
            print(f"{time.monotonic() - started:6.1f} s  {command}")  # shown with -s: where this test's time goes
    finally:
        for process in servers:
            process.terminate()
            process.wait(timeout=30)
    assert servers and all(p.returncode is not None for p in servers)
    # What the commands were for: the files they say they write exist.
    for made in ("dolly.json", "sparse/cameras.txt", "transforms.json", "jobs/shot010/bundle/manifest.json",
                 "jobs/shot011/bundle/manifest.json", "shot_world.blend", "shot_4d.blend", "bundle/manifest.json"):
        assert (scratch / made).exists(), made
    assert len(ran) >= 15 and len(skipped) == sum(1 for c in readme_commands() if not_run_reason(c))
