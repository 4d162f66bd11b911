"""The job vocabulary both sides share: state words, the job status, progress, and cancellation.

One definition each, imported by the engine (runner, workers, service), the
HTTP client, the add-on's panel and the terminal bar:

- :class:`JobState`: ``pending``, ``running``, ``completed``, ``failed``, ``cancelled``.
- :class:`JobStatus`: what ``GET /v1/jobs/{id}`` answers and ``status.json`` holds; the
  service's OpenAPI schema is generated from it (``STATUS_FIELD_DOCS``).
- :class:`Progress`: the one progress protocol a running job reports through
  (stage, frames, denoising step, message); its :meth:`Progress.check` is where
  cancellation takes effect, by raising :class:`JobCancelled`, the one cancel exception.
- :class:`TerminalProgress`, :func:`describe_progress`, :func:`format_status`: how
  progress reads on a terminal, in the panel and in the status bar.

Stdlib only (this module runs inside Blender's Python too).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import Any, Callable, TextIO

from .errors import KeyframeWorldsError


class JobState(str, Enum):
    """A job's state. A ``str`` enum, so ``status.state == "completed"`` reads naturally."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATES

    def __str__(self) -> str:
        return self.value


FINISHED_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_STATES = frozenset({JobState.PENDING, JobState.RUNNING})

#: The runner's stages (what ``Progress.stage`` is called with), as a person reads them in a status.
STAGE_WORDS = {
    "reference": "reading the reference",
    "memory": "building the 3D memory",
    "generate": "generating frames",
    "export": "writing the point cloud",
    "done": "done",
}
#: Stage words of the queue and of a finished job (not the runner's).
QUEUED_STAGE = "queued"
STARTING_STAGE = "starting"
#: The stage word of a running job asked to cancel, until it stops (its state stays ``running`` until then).
CANCELLING_STAGE = "cancelling"
FINISHED_STAGE = {JobState.COMPLETED: "done", JobState.FAILED: "failed", JobState.CANCELLED: "cancelled"}


class CancelReason(str, Enum):
    """Why a job stops early: the user asked (the job ends ``cancelled``), or the engine is shutting down
    (the job is interrupted, not cancelled: it stays queued and resumes at the next start)."""

    CANCELLED = "cancelled"
    ENGINE_STOPPING = "engine stopping"


class JobCancelled(KeyframeWorldsError):
    """A job stopped at a progress check (:meth:`Progress.check`); ``reason`` says why."""

    def __init__(self, message: str = "job cancelled", reason: CancelReason = CancelReason.CANCELLED):
        super().__init__(message)
        self.reason = CancelReason(reason)


#: One line per status field: the OpenAPI document's descriptions (the service builds its schema from these).
STATUS_FIELD_DOCS = {
    "id": "the job id",
    "seq": "submission order",
    "name": "the job spec's name",
    "generator": "the job spec's generator",
    "state": "pending, running, completed, failed or cancelled",
    "stage": "what the job is doing, in words",
    "progress": "0-1 over the frames of all trajectories, moving within a segment as it is denoised",
    "frames_done": "final frames",
    "frames_total": "frames of all trajectories",
    "step": "denoising step (1-based) of the segment being generated; null when not denoising",
    "steps": "denoising steps of that segment",
    "eta_s": "estimated seconds left; null until it can be estimated",
    "error": "why the job failed, in one line",
    "created": "Unix seconds",
    "started": "Unix seconds of the first start",
    "finished": "Unix seconds",
    "device": "the device the job's generator runs on",
    "attempts": "times a worker started the job; above 1 after a resume",
    "warnings": "what a person must know about how the result is made (a reference that became a flat board, ...)",
    "queue_position": "0 = next to run; null when not pending",
}


@dataclass
class JobStatus:
    """A job's status: what ``GET /v1/jobs/{id}`` answers, ``status.json`` holds and the client returns.

    progress is 0-1 over the frames of all trajectories, including the part of
    the segment being denoised that is done; frames_done counts final frames;
    step / steps the denoising step of that segment (None when not denoising);
    eta_s the estimated seconds left (None until the rate is known); times are
    Unix seconds. See ``STATUS_FIELD_DOCS``.
    """

    id: str
    name: str
    generator: str
    seq: int = 0
    state: JobState = JobState.PENDING
    stage: str = QUEUED_STAGE
    progress: float = 0.0
    frames_done: int = 0
    frames_total: int = 0
    step: int | None = None
    steps: int | None = None
    eta_s: float | None = None
    error: str | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    device: str | None = None
    attempts: int = 0
    queue_position: int | None = None
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = JobState(self.state)

    @property
    def finished_state(self) -> bool:
        return self.state.finished

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["state"] = self.state.value
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> "JobStatus":
        """From a status document; keys this version does not know are ignored (a newer engine may add some)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})

    def copy(self, **changes: Any) -> "JobStatus":
        return replace(self, **changes)


# --- progress ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report of a running job.

    stage: one of ``STAGE_WORDS``' keys; done / total: frames for ``generate`` (final
    frames only), otherwise steps of the stage; in_flight: frames' worth of work done
    on the segment being denoised (segment frames x step / steps); step / steps: that
    segment's denoising step (None when not denoising); message: a few words.
    """

    stage: str
    done: int
    total: int
    in_flight: float = 0.0
    step: int | None = None
    steps: int | None = None
    message: str = ""

    @property
    def fraction(self) -> float:
        return min(1.0, (self.done + max(0.0, self.in_flight)) / self.total) if self.total > 0 else 1.0


class Progress:
    """The progress protocol of a running job; subclass and override :meth:`report` (and :meth:`log`).

    The runner calls :meth:`stage` when it enters a stage and :meth:`frames` as frames finish or
    a segment's denoising steps pass; both call :meth:`check`, which raises :class:`JobCancelled`
    when :meth:`cancel_reason` gives a reason. ``cancel_event`` (a ``threading.Event``, or
    anything with ``is_set``) set from elsewhere cancels the job.
    """

    def __init__(self, cancel_event: threading.Event | None = None):
        self.cancel_event = cancel_event
        self._where = ""

    # what subclasses override
    def report(self, event: ProgressEvent) -> None:
        """Called at every stage change, frame and denoising step; the default does nothing."""

    def log(self, message: str) -> None:
        """A line for the job's log; the default drops it."""

    def warn(self, message: str) -> None:
        """Something a person must know about the result (it reaches the status, the log and the manifest);
        the default logs it."""
        self.log(f"warning: {message}")

    def cancel_reason(self) -> CancelReason | None:
        return CancelReason.CANCELLED if self.cancel_event is not None and self.cancel_event.is_set() else None

    # what the runner calls
    def stage(self, stage: str, message: str = "", done: int = 0, total: int = 1) -> None:
        self._emit(ProgressEvent(stage, int(done), int(total), message=message))

    def frames(self, done: int, total: int, message: str = "", in_flight: float = 0.0, step: int | None = None,
               steps: int | None = None) -> None:
        self._emit(ProgressEvent("generate", int(done), int(total), float(in_flight),
                                 None if steps is None else int(step), None if steps is None else int(steps), message))

    def check(self) -> None:
        """Raise :class:`JobCancelled` if the job was cancelled or the engine is stopping."""
        reason = self.cancel_reason()
        if reason is not None:
            what = "job cancelled" if reason is CancelReason.CANCELLED else "job interrupted: the engine is stopping"
            raise JobCancelled(f"{what}{self._where}", reason)

    def cancelled(self) -> bool:
        """Whether a check would stop the job now (for loops that poll without raising)."""
        return self.cancel_reason() is not None

    def _emit(self, event: ProgressEvent) -> None:
        self.report(event)
        step = f", denoising step {event.step}/{event.steps}" if event.steps else ""
        self._where = f" during {event.stage} ({event.done}/{event.total}{step})"
        self.check()


class TerminalProgress(Progress):
    """A one-line progress bar on a stream (stderr by default): ``generate [####....] 12/48 2.1 frames/s ...``."""

    def __init__(self, stream: TextIO | None = None, width: int = 30, cancel_event: threading.Event | None = None):
        super().__init__(cancel_event)
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self._last_stage: str | None = None
        self._last_status: str | None = None  # show_status's last line, and whether it has ended it
        self._status_ended = False

    def warn(self, message: str) -> None:
        self.stream.write(f"\nwarning: {message}\n")
        self.stream.flush()

    def show_status(self, status: "JobStatus") -> None:
        """The same one updating line for a job the engine runs elsewhere (a client's polls): ``format_status``,
        redrawn in place (carriage return), ended with a newline once the job has finished. Polls that change
        nothing are not redrawn."""
        line = format_status(status, self.width)
        if line != self._last_status:
            self._last_status = line
            self.stream.write("\r" + line[:160].ljust(100))
        if status.finished_state and not self._status_ended:
            self._status_ended = True
            self.stream.write("\n")
        self.stream.flush()

    def report(self, event: ProgressEvent) -> None:
        elapsed = time.perf_counter() - self.start
        if event.steps:
            text = f"{event.done}/{event.total} {event.message} step {event.step}/{event.steps}"
        else:
            rate = f" {event.done / elapsed:5.1f} frames/s" if event.stage == "generate" and elapsed > 0 else ""
            text = f"{event.done}/{event.total}{rate} {event.message}"
        filled = int(round(self.width * event.fraction))
        line = f"\r{event.stage:>9} [{'#' * filled}{'.' * (self.width - filled)}] {text}"
        if self._last_stage not in (None, event.stage):
            self.stream.write("\n")
        self._last_stage = event.stage
        self.stream.write(line[:160].ljust(100))
        if event.stage == "done":
            self.stream.write("\n")
        self.stream.flush()


def describe_progress(stage: str, frames_done: int, frames_total: int, step: int | None = None,
                      steps: int | None = None, eta_s: float | None = None) -> str:
    """``"generating frames, 31/60 frames, step 3/4, 0:12 left"``: what the panel, the status bar and the terminal show.

    step / steps: the denoising step of the segment in flight (None or 0: not denoising);
    eta_s: seconds left (None or negative: not known yet).
    """
    parts = [stage]
    if frames_total:
        parts.append(f"{frames_done}/{frames_total} frames")
    if steps:
        parts.append(f"step {step}/{steps}")
    if eta_s is not None and eta_s >= 0:
        minutes, seconds = divmod(int(eta_s + 0.5), 60)
        parts.append(f"{minutes}:{seconds:02d} left")
    return ", ".join(p for p in parts if p)


def format_status(status: JobStatus, width: int = 30) -> str:
    """One terminal line: ``[#####.....]  52% generating frames, 31/60 frames, step 3/4, 0:12 left``."""
    filled = int(round(status.progress * width))
    text = describe_progress(status.stage, status.frames_done, status.frames_total, status.step, status.steps,
                             status.eta_s)
    return f"[{'#' * filled}{'.' * (width - filled)}] {status.progress:4.0%} {text}"


StatusCallback = Callable[[JobStatus], None]
