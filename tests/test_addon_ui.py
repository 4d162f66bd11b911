"""The UI's Generate/Cancel against a real engine service subprocess, with the real operators.

Headless bpy has no event loop, so the test calls the timer's own callback
(``jobs_ui._poll``) as Blender's loop would, and checks what it writes into
the scene's properties.
"""

from __future__ import annotations

import time

import pytest

from test_headless import load_demo


@pytest.fixture
def addon_scene(blank_blend, tmp_path):
    bpy = blank_blend
    import keyframe_worlds
    from keyframe_worlds.addon import jobs_ui

    load_demo().build_scene(24, 64, 36)
    keyframe_worlds.register()
    props = bpy.context.scene.keyframe_worlds
    props.output_dir = str(tmp_path / "jobs")
    props.job_name = "ui"
    props.cameras = "SCENE"
    yield bpy, props
    jobs_ui.stop_all()
    keyframe_worlds.unregister()


def poll_until(props, states, timeout=180.0):
    from keyframe_worlds.addon import jobs_ui

    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs_ui._poll()
        seen.append((props.state, props.stage, props.frames_done))
        if props.state in states:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"job did not reach {states}: last {seen[-3:]}")


def test_generate_runs_in_the_background_and_imports(addon_scene):
    bpy, props = addon_scene
    t0 = time.monotonic()
    assert bpy.ops.keyframe_worlds.generate() == {"FINISHED"}
    submitted_after = time.monotonic() - t0
    assert props.state == "pending"  # the operator returned before the engine finished anything
    seen = poll_until(props, ("completed", "failed", "cancelled"))
    assert props.state == "completed", props.message
    assert any(state == "running" for state, _, _ in seen) or seen[0][0] in ("pending", "running")
    assert props.frames_done == props.frames_total == 24 and props.progress == pytest.approx(1.0)
    assert props.message.startswith("imported into KFW ui")
    collection = bpy.data.collections["KFW ui"]
    assert any(o.type == "POINTCLOUD" for o in collection.objects)
    assert submitted_after < 60  # preparing the job (reference render) and starting the engine, not the job


def test_cancel_mid_job(addon_scene):
    bpy, props = addon_scene
    bpy.context.scene.frame_end = 400  # long enough that the cancel lands mid-job
    assert bpy.ops.keyframe_worlds.generate() == {"FINISHED"}
    poll_until(props, ("running",))
    assert bpy.ops.keyframe_worlds.cancel() == {"FINISHED"}
    poll_until(props, ("cancelled", "completed", "failed"))
    assert props.state == "cancelled", props.message
    assert props.frames_done < 400
    assert "KFW ui" not in bpy.data.collections  # nothing imported from a cancelled job
    with pytest.raises(RuntimeError, match="no job is running"):
        bpy.ops.keyframe_worlds.cancel()


def test_engine_error_is_shown_not_raised(addon_scene):
    bpy, props = addon_scene
    props.reference = "FILE"
    props.reference_path = "/nonexistent/ref.png"
    props.depth = "NONE"
    with pytest.raises(RuntimeError, match="reference image not found"):
        bpy.ops.keyframe_worlds.generate()  # the operator reports the error (bpy raises it as RuntimeError in scripts)
    assert props.state == ""


def test_preferences_reach_the_worldstereo_options(addon_scene, tmp_path):
    bpy, props = addon_scene
    from keyframe_worlds.addon.jobs import worldstereo_options
    from keyframe_worlds.addon.jobs_ui import settings_with_preferences
    from keyframe_worlds.bridge.errors import KeyframeWorldsError

    models = tmp_path / "models"
    (models / "worldstereo-memory").mkdir(parents=True)
    (models / "worldstereo-memory" / "config.json").write_text("{}")
    wan = models / "Wan2.1-I2V-14B-480P-Diffusers"
    wan.mkdir()
    (wan / "model_index.json").write_text("{}")
    options = worldstereo_options(str(models), "worldstereo-memory", "sequential")
    assert options == {"variant": "worldstereo-memory", "offload": "sequential",
                       "checkpoint": str(models / "worldstereo-memory"), "wan_dir": str(wan)}
    with pytest.raises(KeyframeWorldsError, match="variant"):
        worldstereo_options(str(models), "worldstereo-huge")
    with pytest.raises(KeyframeWorldsError, match="model folder not found"):
        worldstereo_options(str(tmp_path / "nowhere"), "worldstereo-memory")
    with pytest.raises(KeyframeWorldsError, match="worldstereo-camera is not a WorldStereo variant folder"):
        worldstereo_options(str(models), "worldstereo-camera")
    props.generator, props.variant = "worldstereo", "worldstereo-camera"
    settings = settings_with_preferences(props.to_settings(bpy.context.scene), bpy.context)
    assert settings.options["variant"] == "worldstereo-camera"
    props.generator = "preview"
    assert settings_with_preferences(props.to_settings(bpy.context.scene), bpy.context).options == {}


def test_progress_shows_the_denoising_step_of_the_segment_in_flight(addon_scene):
    from keyframe_worlds.bridge.jobs import format_status
    from keyframe_worlds.addon.panels import progress_text
    from keyframe_worlds.bridge.jobs import JobStatus

    _, props = addon_scene
    props.stage, props.frames_done, props.frames_total, props.seconds_left = "generating frames", 10, 24, 75.4
    props.step, props.steps = 3, 4
    assert progress_text(props) == "generating frames, 10/24 frames, step 3/4, 1:15 left"
    props.step, props.steps, props.seconds_left = 0, 0, -1.0  # not denoising, time left not known yet
    assert progress_text(props) == "generating frames, 10/24 frames"
    status = JobStatus.from_json({"id": "j", "name": "n", "generator": "worldstereo", "state": "running",
                                  "stage": "generating frames", "progress": 0.5, "frames_done": 10, "frames_total": 24,
                                  "step": 2, "steps": 40, "eta_s": 3.0, "error": None, "unknown_field": 1})
    assert format_status(status).endswith(" 50% generating frames, 10/24 frames, step 2/40, 0:03 left")


def test_cancel_while_preparing_sends_nothing_and_leaves_no_folder(addon_scene, tmp_path):
    bpy, props = addon_scene
    from keyframe_worlds.addon import jobs_ui

    assert bpy.ops.keyframe_worlds.generate() == {"FINISHED"}
    jobs_ui._poll()  # the first stage: the cameras read, the job folder made
    (folder,) = (tmp_path / "jobs").iterdir()
    assert props.last_job_dir == str(folder)
    assert bpy.ops.keyframe_worlds.cancel() == {"FINISHED"}
    poll_until(props, ("cancelled", "completed", "failed"), timeout=30)
    assert props.state == "cancelled" and "nothing was sent to the engine" in props.message, props.message
    assert "half-made job folder was removed" in props.message
    assert not folder.exists() and list((tmp_path / "jobs").iterdir()) == [] and props.last_job_dir == ""
