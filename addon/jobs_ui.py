"""Generate and Cancel in the UI: the engine works in its own process, a timer polls it on the main thread.

``Generate`` checks everything that needs no render (the settings, cameras and frame range, the chosen files,
the model folder, the engine Python) and reports a problem at once; then it registers a ``bpy.app.timers``
callback and returns. That callback runs the preparation one stage per tick (trajectories, the reference
render, its depth, the job spec, starting the engine, submitting), so Blender redraws between stages and the
panel shows each with Cancel, which stops before the next stage. Blender's renderer and data cannot be used
from another thread, so each stage itself runs on the main thread: the reference render still holds the UI
for its own few seconds (a render started as Blender's background render job would need a window, which
headless Blender and the tests do not have, and would leave the scene's settings changed until it ends).
Once submitted, the same callback copies the engine job's status into the scene's properties (which the panel
and the status bar draw) and, when the job has completed, imports the bundle.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import bpy

from ..bridge.errors import KeyframeWorldsError
from ..bridge.jobs import CANCELLING_STAGE, FINISHED_STAGE, QUEUED_STAGE, STARTING_STAGE, JobState

POLL_INTERVAL_S = 0.5
STAGE_INTERVAL_S = 0.01  # between preparation stages: long enough for Blender to redraw the panel
#: Stage words of the submission, after the preparation's (``jobs.TRAJECTORY_STAGE`` ...).
SUBMIT_STAGE = "submitting the job"


@dataclass
class ActiveJob:
    scene_name: str
    job_dir: Path
    job_id: str = ""  # set once the engine has the job
    client: object = None  # bridge.client.EngineClient (bridge is imported lazily: registering stays cheap)
    stages: list = field(default_factory=list)  # the preparation's (stage word, function) still to run, main thread
    done_stages: int = 0
    cancel_requested: bool = False
    preparation: object = None  # jobs.JobPreparation: what the stages build (the job spec on disk)

    @property
    def submitted(self) -> bool:
        return bool(self.job_id)


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
    """Check the scene's job (everything that needs no render) and queue its preparation; the timer takes over.

    Raises ``KeyframeWorldsError`` for what is wrong before anything is rendered or started.
    """
    from .jobs import JobPreparation, engine_python
    from .preferences import preferences

    scene = context.scene
    props = scene.keyframe_worlds
    if scene.name in _active:
        raise KeyframeWorldsError("a job is already running for this scene; cancel it first")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    job_dir = Path(bpy.path.abspath(props.output_dir)) / f"{props.job_name}-{stamp}"
    settings = settings_with_preferences(props.to_settings(scene), context)  # a missing model folder fails here
    preparation = JobPreparation(scene, settings, job_dir, selected=context.selected_objects)
    prefs = preferences(context)
    process = _engine["process"]
    if not (prefs is not None and prefs.engine_url) and (process is None or not process.running()):
        engine_python(prefs.engine_python if prefs else None)  # no engine Python: say so before rendering
    job = ActiveJob(scene.name, job_dir, preparation=preparation,
                    stages=preparation.stages() + [(STARTING_STAGE, None), (SUBMIT_STAGE, None)])
    _active[scene.name] = job
    props.state, props.stage, props.progress, props.message = JobState.PENDING.value, job.stages[0][0], 0.0, ""
    props.frames_done, props.frames_total, props.seconds_left = 0, 0, -1.0
    props.step, props.steps = 0, 0
    props.last_job_dir = str(job_dir)
    if not bpy.app.timers.is_registered(_poll):
        bpy.app.timers.register(_poll, first_interval=STAGE_INTERVAL_S)
    return job


def cancel_job(scene) -> None:
    job = _active.get(scene.name)
    if job is None:
        raise KeyframeWorldsError("no job is running for this scene")
    if job.submitted:
        job.client.cancel(job.job_id)
    job.cancel_requested = True  # before submission: the next tick stops before its stage
    scene.keyframe_worlds.stage = CANCELLING_STAGE


def _prepare_step(scene, job: ActiveJob) -> None:
    """Run the job's next preparation stage (main thread), or stop it if cancelled; a failure ends the job."""
    props = scene.keyframe_worlds
    if job.cancel_requested:
        _active.pop(scene.name, None)
        props.state, props.stage = JobState.CANCELLED.value, FINISHED_STAGE[JobState.CANCELLED]
        props.message = f"cancelled before {job.stages[0][0]}; nothing was sent to the engine"
        if job.preparation is not None and job.preparation.discard():
            props.message += " (its half-made job folder was removed)"
            props.last_job_dir = ""
        return
    stage, function = job.stages.pop(0)
    try:
        if function is not None:
            function()
        elif stage == STARTING_STAGE:
            job.client = engine_client(bpy.context)
        else:  # SUBMIT_STAGE
            prepared = job.preparation.prepared
            job.job_id = job.client.submit(prepared.spec_path).id
            if prepared.warnings:
                props.message = "; ".join(f"warning: {w}" for w in prepared.warnings)
    except KeyframeWorldsError as exc:
        _active.pop(scene.name, None)
        props.state, props.message = JobState.FAILED.value, f"{stage}: {exc}"
        return
    job.done_stages += 1
    if job.submitted:
        props.stage, props.progress = QUEUED_STAGE, 0.0
    else:
        props.stage = job.stages[0][0]
        props.progress = job.done_stages / (job.done_stages + len(job.stages))


def _poll() -> float | None:
    """Timer callback (main thread): run a preparing job's next stage; copy every submitted job's status into its
    scene and import finished results."""
    preparing = False
    for scene_name, job in list(_active.items()):
        scene = bpy.data.scenes.get(scene_name)
        if scene is None:
            _active.pop(scene_name, None)
            continue
        props = scene.keyframe_worlds
        if not job.submitted:
            _prepare_step(scene, job)
            preparing = preparing or (scene_name in _active and not job.submitted)
            continue
        try:
            status = job.client.status(job.job_id)
        except KeyframeWorldsError as exc:
            props.state, props.message = JobState.FAILED.value, f"lost the engine: {exc}"
            _active.pop(scene_name, None)
            continue
        props.state = status.state.value
        props.stage = CANCELLING_STAGE if job.cancel_requested and not status.finished_state else (status.stage or "")
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
    if not _active:
        return None
    return STAGE_INTERVAL_S if preparing else POLL_INTERVAL_S


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
