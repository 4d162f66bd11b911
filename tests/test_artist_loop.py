"""The artist's loop (issue 18): generate, import, change, generate again, with real bpy and a real engine.

- A second Generate after an import renders the same reference (image and depth) as the first: imported
  results never reach the reference render.
- Generate returns before anything is rendered; its stages run on the timer (headless bpy has no event loop,
  so the test calls the timer's own callback, ``jobs_ui._poll``, as Blender's loop would), and every error
  that needs no render comes before the render.
- Smaller things: relative bundle paths saved absolute, ``--mesh-every 0``, the reference file named as given.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import VENV_BIN
from test_headless import load_demo

CLI = str(VENV_BIN / "keyframe-worlds")


def run(*args, cwd=None, timeout=300):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def street_blend(tmp_path_factory):
    """The demo's street, small: 12 frames at 64x36, saved (built in a subprocess: the test process's bpy stays clean)."""
    folder = tmp_path_factory.mktemp("street")
    code = ("import bpy, importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('demo', {str(Path(load_demo.__code__.co_filename).parents[1] / 'scripts' / 'demo.py')!r})\n"
            "demo = importlib.util.module_from_spec(spec); spec.loader.exec_module(demo)\n"
            "demo.build_scene(12, 64, 36)\n"
            f"bpy.ops.wm.save_as_mainfile(filepath={str(folder / 'street.blend')!r})\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return folder / "street.blend"


def test_generate_import_generate_renders_the_same_reference(blank_blend, tmp_path):
    """The loop the animator lives in: the second job's reference and depth equal the first's, pixel for pixel,
    though the first job's point cloud and meshes now stand in the scene in front of that camera."""
    bpy = blank_blend
    from keyframe_worlds.addon.importers import import_bundle
    from keyframe_worlds.addon.jobs import JobSettings, prepare_job, run_through_engine
    from keyframe_worlds.addon.reference import render_still

    scene, _dolly, _crane = load_demo().build_scene(8, 64, 36)
    settings = JobSettings(name="loop", cameras="SCENE", samples=2)
    first = prepare_job(scene, settings, tmp_path / "first")
    bundle = run_through_engine(first.spec_path, tmp_path / "first" / "bundle", device="cpu")
    result = import_bundle(scene, bundle)
    assert result.point_cloud is not None and result.meshes
    second = prepare_job(scene, settings, tmp_path / "second")

    image_1 = np.asarray(Image.open(first.spec.reference.image))
    image_2 = np.asarray(Image.open(second.spec.reference.image))
    np.testing.assert_array_equal(image_1, image_2)
    np.testing.assert_array_equal(np.load(first.spec.reference.depth), np.load(second.spec.reference.depth))
    # The imported world is there and visible to a plain render from the same camera: without the hold-out the
    # references would differ.
    seen = np.asarray(Image.open(render_still(scene, scene.camera, 1, tmp_path / "with_results.png", samples=2)))
    assert np.abs(seen.astype(int) - image_1.astype(int)).mean() > 1.0


@pytest.fixture
def addon_scene(blank_blend, tmp_path):
    bpy = blank_blend
    import keyframe_worlds
    from keyframe_worlds.addon import jobs_ui

    load_demo().build_scene(12, 64, 36)
    keyframe_worlds.register()
    props = bpy.context.scene.keyframe_worlds
    props.output_dir = str(tmp_path / "jobs")
    props.job_name = "loop"
    props.cameras = "SCENE"
    yield bpy, props, tmp_path / "jobs"
    jobs_ui.stop_all()
    keyframe_worlds.unregister()


def test_generate_returns_before_the_render_and_shows_each_stage(addon_scene):
    from keyframe_worlds.addon import jobs, jobs_ui
    from keyframe_worlds.bridge.jobs import QUEUED_STAGE, STARTING_STAGE

    bpy, props, jobs_dir = addon_scene
    assert bpy.ops.keyframe_worlds.generate() == {"FINISHED"}
    # Nothing was rendered, no engine started: the operator only checked and queued the stages.
    assert not list(jobs_dir.rglob("reference.png")) and jobs_ui._engine["process"] is None
    assert (props.state, props.stage, props.progress) == ("pending", jobs.TRAJECTORY_STAGE, 0.0)
    stages, progress = [props.stage], [props.progress]
    deadline = time.monotonic() + 240
    while props.state == "pending" and props.stage != QUEUED_STAGE and time.monotonic() < deadline:
        jobs_ui._poll()
        stages.append(props.stage)
        progress.append(props.progress)
    assert stages[:6] == [jobs.TRAJECTORY_STAGE, jobs.RENDER_STAGE, jobs.RENDER_DEPTH_STAGE, jobs.SPEC_STAGE,
                          STARTING_STAGE, jobs_ui.SUBMIT_STAGE], stages
    assert progress[:5] == sorted(progress[:5]) and progress[4] > 0.5  # the bar moves with the stages
    (job_dir,) = jobs_dir.iterdir()
    assert (job_dir / "reference.png").is_file() and (job_dir / "reference_depth.npy").is_file()
    while props.state not in ("completed", "failed", "cancelled") and time.monotonic() < deadline:
        jobs_ui._poll()
        time.sleep(0.1)
    assert props.state == "completed", props.message
    assert "KFW loop" in bpy.data.collections


def test_cancel_between_stages_stops_before_the_render(addon_scene):
    from keyframe_worlds.addon import jobs, jobs_ui
    from keyframe_worlds.bridge.jobs import CANCELLING_STAGE

    bpy, props, jobs_dir = addon_scene
    assert bpy.ops.keyframe_worlds.generate() == {"FINISHED"}
    jobs_ui._poll()  # the trajectories
    assert props.stage == jobs.RENDER_STAGE
    assert bpy.ops.keyframe_worlds.cancel() == {"FINISHED"}
    assert props.stage == CANCELLING_STAGE and props.state == "pending"
    assert jobs_ui._poll() is None  # the job ended; the timer stops
    assert props.state == "cancelled" and "nothing was sent to the engine" in props.message
    assert not list(jobs_dir.rglob("reference.png")) and jobs_ui._engine["process"] is None
    assert bpy.ops.keyframe_worlds.generate() == {"FINISHED"}  # and the next Generate starts afresh
    assert props.state == "pending"


@pytest.mark.parametrize("case", ["depth file", "engine python", "frames", "reference file"])
def test_errors_that_need_no_render_come_before_it(addon_scene, monkeypatch, tmp_path, case):
    from keyframe_worlds.addon import jobs_ui
    from keyframe_worlds.bridge.engine_process import PYTHON_ENV

    bpy, props, jobs_dir = addon_scene
    if case == "depth file":
        props.depth, props.depth_path, expected = "FILE", str(tmp_path / "missing_depth.npy"), "reference depth not found"
    elif case == "engine python":
        monkeypatch.setenv(PYTHON_ENV, str(tmp_path / "no" / "python"))
        expected = "engine Python not found"
    elif case == "frames":
        props.use_scene_range, props.frame_start, props.frame_end = False, 5, 40
        expected = "outside the scene's frame range 1-12"
    else:
        fake = tmp_path / "fake.png"
        fake.write_text("not an image")
        props.reference, props.reference_path, props.depth, expected = "FILE", str(fake), "NONE", f"reference image {fake}"
    with pytest.raises(RuntimeError, match=expected):  # bpy raises the operator's reported error in scripts
        bpy.ops.keyframe_worlds.generate()
    assert props.state == "" and not jobs_ui._active
    assert not jobs_dir.exists() or not any(jobs_dir.iterdir())  # no job folder, nothing rendered


def test_model_folder_without_the_variant_fails_before_the_render(street_blend, tmp_path):
    out = run("scene", "generate", "--blend", street_blend, "--generator", "worldstereo", "--model-dir", tmp_path,
              "--out", tmp_path / "job")
    assert out.returncode == 2 and "options.checkpoint" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("keyframe-worlds: error: ")
    assert not (tmp_path / "job" / "reference.png").exists()


def test_mesh_every_zero_is_a_clear_error(street_blend, tmp_path):
    out = run("scene", "generate", "--blend", street_blend, "--mesh-every", "0", "--out", tmp_path / "job")
    assert out.returncode == 2 and "--mesh-every" in out.stderr and "at least 1" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "job" / "reference.png").exists()


def test_a_fake_reference_is_named_as_given(street_blend, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"GIF89a not a png")
    out = run("scene", "generate", "--blend", street_blend, "--reference", fake, "--depth", "none", "--out", tmp_path / "job")
    (line,) = out.stderr.strip().splitlines()
    assert out.returncode == 2 and line.startswith(f"keyframe-worlds: error: reference image {fake}"), out.stderr
    assert "reference.png" not in line


def test_generate_prints_one_progress_line_and_import_warnings_and_saves_absolute_paths(street_blend, tmp_path):
    """``scene generate --import``: the progress is one line redrawn in place (carriage returns, no line per poll);
    the import's warnings are printed as ``scene import`` prints them; and a relative bundle path given to
    ``scene import`` is saved into the .blend absolute, so the file opens from anywhere."""
    import shutil

    blend = tmp_path / "work.blend"
    shutil.copy(street_blend, blend)
    # Bytes, not text: text mode would turn the bar's carriage returns into line breaks.
    out = subprocess.run([CLI, "scene", "generate", "--blend", str(blend), "--camera", "Dolly", "--depth", "none",
                          "--out", str(tmp_path / "job"), "--import"], capture_output=True, timeout=300)
    stdout, stderr = out.stdout.decode(), out.stderr.decode()
    assert out.returncode == 0, stdout[-2000:] + stderr[-2000:]
    bar_lines = [line for line in stdout.split("\n") if "frames" in line and "[" in line]
    assert len(bar_lines) == 1 and bar_lines[0].count("\r") > 1 and "100% done" in bar_lines[0], stdout
    imported = run("scene", "import", "--blend", street_blend, "job/bundle", "--save", "again.blend", cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    warnings = sorted(line for line in imported.stderr.splitlines() if line.startswith("warning: "))
    assert warnings, "a reference without depth and no depth model: the flat board is warned of"
    assert sorted(line for line in stderr.splitlines() if line.startswith("warning: ")) == warnings

    code = ("import bpy\n"
            f"bpy.ops.wm.open_mainfile(filepath={str(tmp_path / 'again.blend')!r})\n"
            "for path in [i.filepath for i in bpy.data.images if i.filepath] + [c.filepath for c in bpy.data.movieclips]:\n"
            "    print('MEDIA', path)\n")
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert check.returncode == 0, check.stderr[-2000:]
    media = [line[len("MEDIA "):] for line in check.stdout.splitlines() if line.startswith("MEDIA ")]
    assert media and all(Path(p).is_absolute() and Path(p).is_file() for p in media), media


def test_the_terminal_bar_for_a_remote_job_is_one_line():
    """``TerminalProgress.show_status``: every poll redraws the same line; a poll that changes nothing writes
    nothing; the line ends once, when the job has finished."""
    import io

    from keyframe_worlds.bridge.jobs import JobStatus, TerminalProgress

    stream = io.StringIO()
    bar = TerminalProgress(stream=stream, width=10)
    base = {"id": "j", "name": "n", "generator": "preview", "frames_total": 4}
    for state, stage, done in (("pending", "queued", 0), ("running", "generating frames", 1), ("running", "generating frames", 1),
                               ("running", "generating frames", 4), ("completed", "done", 4), ("completed", "done", 4)):
        bar.show_status(JobStatus.from_json({**base, "state": state, "stage": stage, "frames_done": done,
                                             "progress": done / 4}))
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") == 4, repr(text)
    assert "100% done, 4/4 frames" in text.split("\r")[-1]
