"""Generate and Cancel in the UI: the engine works in its own process, a timer polls it on the main thread.

Nothing here blocks Blender while a job runs. ``Generate`` prepares the job
(trajectories, reference render), makes sure an engine is reachable (the one
in the preferences' URL, or one it starts with the engine Python), submits
the job and registers a ``bpy.app.timers`` callback. That callback is the
only code that touches Blender data while the job runs: it copies the job's
status into the scene's properties (which the panel and the status bar
draw) and, when the job has completed, imports the bundle.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import bpy

from ..bridge.errors import KeyframeWorldsError
from ..bridge.jobs import QUEUED_STAGE, JobState

POLL_INTERVAL_S = 0.5


@dataclass
class ActiveJob:
    scene_name: str
    job_id: str
    job_dir: Path
    client: object  # bridge.client.EngineClient (bridge is imported lazily: registering stays cheap)


_active: dict[str, ActiveJob] = {}  # by scene name
_engine = {"process": None}  # the engine this Blender session started (bridge.engine_process.EngineProcess)


def engine_client(context):
    """A client for a healthy engine: the preferences' URL, else one started with the engine Python (kept for the session)."""
    from ..bridge.client import EngineClient
    from .jobs import start_engine
    from .preferences import preferences

    prefs = preferences(context)
    if prefs is not None and prefs.engine_url:
        token_file = bpy.path.abspath(prefs.engine_token_file) if prefs.engine_token_file else ""
        try:
            token = Path(token_file).read_text().strip() if token_file else ""
        except OSError as exc:
            raise KeyframeWorldsError(f"cannot read the engine token file {token_file}: {exc}") from None
        client = EngineClient(prefs.engine_url, token)
        client.health()
        return client
    process = _engine["process"]
    if process is None or not process.running():
        job_root = Path(bpy.app.tempdir or tempfile.gettempdir()) / "keyframe_worlds_engine"
        process = start_engine(job_root, prefs.engine_python if prefs else None, prefs.device if prefs else "auto")
        _engine["process"] = process
    return process.client


def settings_with_preferences(settings, context):
    """The panel's settings plus what the preferences decide for every job (memory size, models)."""
    from dataclasses import replace

    from .preferences import preferences

    from .jobs import worldstereo_options

    prefs = preferences(context)
    props = context.scene.keyframe_worlds
    options = dict(settings.options)
    if settings.generator == "worldstereo":
        options.update(worldstereo_options(prefs.model_dir if prefs else None, props.variant,
                                           prefs.offload if prefs else "none", prefs.attention if prefs else None))
    if prefs is None:
        return replace(settings, options=options)
    geometry = dict(settings.geometry)
    if prefs.depth_model:
        geometry["depth_model"] = bpy.path.abspath(prefs.depth_model)
    return replace(settings, point_budget=prefs.point_budget, options=options, geometry=geometry)


def start_job(context) -> ActiveJob:
    """Prepare the scene's job and submit it; the timer takes over from here."""
    from .jobs import prepare_job

    scene = context.scene
    props = scene.keyframe_worlds
    if scene.name in _active:
        raise KeyframeWorldsError("a job is already running for this scene; cancel it first")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    job_dir = Path(bpy.path.abspath(props.output_dir)) / f"{props.job_name}-{stamp}"
    prepared = prepare_job(scene, settings_with_preferences(props.to_settings(scene), context), job_dir,
                           selected=context.selected_objects)
    client = engine_client(context)
    job = ActiveJob(scene.name, client.submit(prepared.spec_path).id, job_dir, client)
    _active[scene.name] = job
    props.state, props.stage, props.progress, props.message = JobState.PENDING.value, QUEUED_STAGE, 0.0, ""
    props.frames_done, props.frames_total, props.seconds_left = 0, 0, -1.0
    props.step, props.steps = 0, 0
    props.last_job_dir = str(job_dir)
    if not bpy.app.timers.is_registered(_poll):
        bpy.app.timers.register(_poll, first_interval=POLL_INTERVAL_S)
    return job


def cancel_job(scene) -> None:
    job = _active.get(scene.name)
    if job is None:
        raise KeyframeWorldsError("no job is running for this scene")
    job.client.cancel(job.job_id)
    scene.keyframe_worlds.stage = "cancelling"


def _poll() -> float | None:
    """Timer callback (main thread): copy every active job's status into its scene, import finished results."""
    for scene_name, job in list(_active.items()):
        scene = bpy.data.scenes.get(scene_name)
        if scene is None:
            _active.pop(scene_name, None)
            continue
        props = scene.keyframe_worlds
        try:
            status = job.client.status(job.job_id)
        except KeyframeWorldsError as exc:
            props.state, props.message = JobState.FAILED.value, f"lost the engine: {exc}"
            _active.pop(scene_name, None)
            continue
        props.state = status.state.value
        props.stage = status.stage or ""
        props.progress = float(status.progress)
        props.frames_done = int(status.frames_done)
        props.frames_total = int(status.frames_total)
        props.step, props.steps = int(status.step or 0), int(status.steps or 0)
        props.seconds_left = -1.0 if status.eta_s is None else float(status.eta_s)
        if status.finished_state:
            _active.pop(scene_name, None)
            if status.state is JobState.COMPLETED:
                _finish(scene, job, status.warnings)
            else:
                props.message = status.error or status.state.value
    _redraw()
    return POLL_INTERVAL_S if _active else None


def _finish(scene, job: ActiveJob, warnings: list[str] = ()) -> None:
    from .importers import import_bundle

    props = scene.keyframe_worlds
    try:
        bundle = job.client.download_bundle(job.job_id, job.job_dir / "bundle")
        result = import_bundle(scene, bundle)
    except KeyframeWorldsError as exc:
        props.state, props.message = JobState.FAILED.value, f"the result could not be imported: {exc}"
        return
    props.message = f"imported into {result.collection.name}" + "".join(f"; warning: {w}" for w in warnings)


def _redraw() -> None:
    wm = bpy.context.window_manager
    for window in getattr(wm, "windows", []):
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "STATUSBAR"):
                area.tag_redraw()


def stop_all() -> None:
    """On unregister and exit: stop polling and stop the engine this session started."""
    _active.clear()
    if bpy.app.timers.is_registered(_poll):
        bpy.app.timers.unregister(_poll)
    process = _engine["process"]
    if process is not None:
        process.stop()
    _engine["process"] = None


class KFW_OT_generate(bpy.types.Operator):
    """Generate the world along the chosen cameras (the engine works in the background)"""

    bl_idname = "keyframe_worlds.generate"
    bl_label = "Generate"

    def execute(self, context):
        try:
            job = start_job(context)
        except KeyframeWorldsError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        self.report({"INFO"}, f"Job {job.job_id} submitted; results go to {job.job_dir}")
        return {"FINISHED"}


class KFW_OT_cancel(bpy.types.Operator):
    """Cancel the running job (finished segments stay on disk)"""

    bl_idname = "keyframe_worlds.cancel"
    bl_label = "Cancel"

    def execute(self, context):
        try:
            cancel_job(context.scene)
        except KeyframeWorldsError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


classes = (KFW_OT_generate, KFW_OT_cancel)
