"""Jobs on disk, the FIFO queue, and one worker thread per device.

Every job lives in its own folder under the job root::

    <job_root>/<job id>/
        spec.json       the validated job spec; reference paths point into inputs/
        status.json     state, stage, progress, error (written atomically)
        log.txt         what happened, with tracebacks of failures
        inputs/         the reference image (and depth), copied or uploaded
        out/            the result bundle (manifest.json appears last, when complete)

A job folder is first assembled under ``.incoming-<id>`` and renamed into
place, so a crash during submission leaves no half job. After a restart the
manager reads every folder back: finished jobs are listed as they were, and
jobs that were pending or running are queued again in their original order;
the runner then resumes them from their last finished segment.

The HTTP side only calls ``submit``/``get``/``list``/``cancel``; the worker
threads run jobs. Progress reaches the manager through :class:`JobProgress`,
which is also where cancellation and engine shutdown are checked.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from ...bridge.atomic import TEMPORARY_GLOB
from ...bridge.errors import KeyframeWorldsError, Problem, ValidationError
from ...bridge.spec import validate_job, write_json_atomic

log = logging.getLogger("keyframe_worlds.service")

SPEC_FILENAME = "spec.json"
STATUS_FILENAME = "status.json"
LOG_FILENAME = "log.txt"
INPUTS_DIRNAME = "inputs"
OUTPUT_DIRNAME = "out"
JOB_ID_PATTERN = re.compile(r"^j[0-9]{8}-[0-9a-f]{8}$")
# How often progress alone (no state change) is written to status.json.
STATUS_WRITE_INTERVAL_S = 0.25


class JobState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


class QueueFull(KeyframeWorldsError):
    """The queue already holds its limit of pending jobs."""


class DiskFull(KeyframeWorldsError):
    """The job root has no space left."""


class JobNotFound(KeyframeWorldsError):
    pass


class JobConflict(KeyframeWorldsError):
    """The request does not fit the job's state (e.g. cancelling a finished job)."""


class JobCancelled(Exception):
    """Raised from a progress check when the job was cancelled."""


class EngineStopping(Exception):
    """Raised from a progress check when the engine shuts down: the job stays queued and resumes at the next start."""


@dataclass
class JobStatus:
    """What ``GET /v1/jobs/{id}`` answers; also the content of ``status.json``.

    progress is 0-1 over the frames of all trajectories, including the part of
    the segment being denoised that is done; frames_done counts final frames;
    step / steps the denoising step of that segment (None when the generator
    does not denoise); eta_s the estimated seconds left (None until the rate
    is known); times are Unix seconds.
    """

    id: str
    seq: int
    name: str
    generator: str
    state: JobState = JobState.PENDING
    stage: str = "queued"
    progress: float = 0.0
    frames_done: int = 0
    frames_total: int = 0
    step: int | None = None  # denoising step (1-based) of the segment being generated; None when not denoising
    steps: int | None = None
    eta_s: float | None = None
    error: str | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    device: str | None = None
    attempts: int = 0  # how many times a worker started it (> 1: it was resumed after an engine restart)

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["state"] = self.state.value
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> "JobStatus":
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in doc.items() if k in known}
        values["state"] = JobState(values.get("state", "pending"))
        return cls(**values)

    def copy(self) -> "JobStatus":
        return JobStatus(**{**asdict(self), "state": self.state})


def new_job_id() -> str:
    return time.strftime("j%Y%m%d", time.gmtime()) + "-" + secrets.token_hex(4)


def describe_os_error(exc: OSError, where: Path) -> str:
    """A plain message for a failed write, naming the folder; disk full gets its own words."""
    if exc.errno == errno.ENOSPC:
        return f"disk full: no space left on the device holding {where} ({exc.strerror})"
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded for {where} ({exc.strerror})"
    name = f" {exc.filename}" if exc.filename else ""
    return f"cannot write{name} in {where}: {exc.strerror or exc}"


LOW_SPACE_BYTES = 1024 * 1024


def free_bytes(folder: Path) -> int:
    """Space left for an unprivileged writer on the device holding ``folder`` (a large number if unknown)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def failure_message(exc: BaseException, out_dir: Path) -> str:
    """What a failed job's status says: the project's own message, or plain words for system errors.

    A full disk is named as such even when it surfaces wrapped in another error.
    """
    for cause in _chain(exc):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return describe_os_error(cause, out_dir)
    if any(isinstance(c, OSError) for c in _chain(exc)) and free_bytes(out_dir) < LOW_SPACE_BYTES:
        # Some writers report a short write without an errno (numpy: "N requested and M written").
        return f"disk full: no space left on the device holding {out_dir} ({free_bytes(out_dir)} bytes free; {exc})"
    if isinstance(exc, KeyframeWorldsError):
        return str(exc)
    if isinstance(exc, OSError):
        return describe_os_error(exc, out_dir)
    if isinstance(exc, MemoryError):
        return "out of memory"
    return f"internal error: {type(exc).__name__}: {exc}"


def remove_temporary_files(folder: Path) -> int:
    """Delete the temporary files of interrupted atomic writes (``.<name>.tmp-<pid>...``); returns how many."""
    count = 0
    for path in folder.rglob(TEMPORARY_GLOB):
        try:
            if path.is_file():
                path.unlink()
                count += 1
        except OSError:
            pass
    return count


# The runner: (spec_path, out_dir, progress, device) -> None. It writes the bundle into out_dir,
# skipping segments an earlier attempt finished, and raises KeyframeWorldsError on bad input.
Runner = Callable[[Path, Path, "JobProgress", str], None]


class JobProgress:
    """The one progress interface a running job reports through; ``check`` is where cancel takes effect.

    The runner calls ``stage(name)`` when it moves to a new stage and
    ``frames(done, total)`` as frames finish; both call ``check``. A cancelled
    job raises :class:`JobCancelled` there, an engine shutting down raises
    :class:`EngineStopping`.
    """

    def __init__(self, manager: "JobManager", job_id: str, cancel: threading.Event):
        self._manager = manager
        self.job_id = job_id
        self._cancel = cancel
        self._first_frame_time: float | None = None
        self._first_frame_done = 0

    def check(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled()
        if self._manager.stopping.is_set():
            raise EngineStopping()

    def stage(self, name: str) -> None:
        self._manager._update(self.job_id, stage=str(name))
        self.check()

    def frames(self, done: int, total: int, in_flight: float = 0.0, step: int | None = None,
               steps: int | None = None) -> None:
        """``done`` of ``total`` frames are final; ``in_flight``: frames' worth of work done on the segment
        being generated (see ``ProgressReporter.denoise``), at denoising ``step`` of ``steps`` (None: not denoising)."""
        now = time.monotonic()
        done, total = int(done), int(total)
        work = done + max(0.0, float(in_flight))  # in frames; what progress and the rate are measured in
        eta = None
        if self._first_frame_time is None:
            # Work done before this attempt (a resume) does not count towards the rate.
            self._first_frame_time, self._first_frame_done = now, work
        elif work > self._first_frame_done:
            rate = (now - self._first_frame_time) / (work - self._first_frame_done)
            eta = max(0.0, rate * (total - work))
        progress = min(1.0, work / total) if total > 0 else 0.0
        self._manager._update(self.job_id, frames_done=done, frames_total=total, progress=progress, eta_s=eta,
                              step=None if steps is None else int(step), steps=None if steps is None else int(steps))
        self.check()

    def log(self, message: str) -> None:
        self._manager.log(self.job_id, message)


@dataclass
class _Job:
    status: JobStatus
    folder: Path
    cancel: threading.Event = field(default_factory=threading.Event)
    last_write: float = 0.0
    write_lock: threading.Lock = field(default_factory=threading.Lock)


class JobManager:
    """The jobs of one job root: folders, FIFO queue, and one worker per device.

    ``devices``: one worker thread each ("cuda:0", "cpu", ...). ``queue_size``:
    most pending jobs; ``submit`` raises :class:`QueueFull` beyond it.
    """

    def __init__(self, job_root: str | os.PathLike, runner: Runner, devices: list[str], queue_size: int = 32):
        self.root = Path(job_root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.runner = runner
        self.devices = list(devices) or ["cpu"]
        self.queue_size = int(queue_size)
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._jobs: dict[str, _Job] = {}
        self._pending: deque[str] = deque()
        self._seq = 0
        self._threads: list[threading.Thread] = []
        self._load()

    # --- start-up -------------------------------------------------------------

    def _load(self) -> None:
        """Read every job folder back; requeue the jobs that had not finished."""
        for leftover in self.root.glob(".incoming-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        found: list[_Job] = []
        for folder in self.root.iterdir():
            if not (folder.is_dir() and JOB_ID_PATTERN.match(folder.name)):
                continue
            try:
                status = JobStatus.from_json(json.loads((folder / STATUS_FILENAME).read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.warning("skipping job folder %s: unreadable %s (%s)", folder, STATUS_FILENAME, exc)
                continue
            if status.id != folder.name:
                log.warning("skipping job folder %s: its status names job %s", folder, status.id)
                continue
            found.append(_Job(status, folder))
        for job in sorted(found, key=lambda j: j.status.seq):
            self._jobs[job.status.id] = job
            self._seq = max(self._seq, job.status.seq)
            if not job.status.state.finished:
                job.status.state, job.status.stage, job.status.eta_s = JobState.PENDING, "queued (resumes after engine restart)", None
                self._pending.append(job.status.id)
                self.log(job.status.id, "engine restarted: job queued again; it resumes from its last finished segment")
                self._write_status(job)

    def start(self) -> None:
        for device in self.devices:
            thread = threading.Thread(target=self._work, args=(device,), name=f"worker-{device}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the workers; a running job is interrupted (not cancelled) and resumes at the next start."""
        self.stopping.set()
        with self._wake:
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # --- the HTTP side ----------------------------------------------------------

    def submit(self, spec_doc: dict, inputs: dict[str, Callable[[Path], None]]) -> JobStatus:
        """Create and queue a job.

        ``spec_doc`` must already be valid apart from its reference files;
        ``inputs`` maps a spec key ("image", "depth") to a function that writes
        that file to the path given. The reference paths are rewritten to
        ``inputs/reference_<key><suffix>`` and the spec is validated again with
        the files in place. Raises QueueFull, DiskFull or ValidationError.
        """
        with self._lock:
            if self.stopping.is_set():
                raise JobConflict("the engine is shutting down")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} jobs waiting); try again when one has started")
        job_id = new_job_id()
        incoming = self.root / f".incoming-{job_id}"
        try:
            spec = json.loads(json.dumps(spec_doc))
            (incoming / INPUTS_DIRNAME).mkdir(parents=True)
            reference = spec["reference"]
            for key, write in inputs.items():
                suffix = Path(reference[key]).suffix.lower()
                relative = f"{INPUTS_DIRNAME}/reference_{key}{suffix}"
                write(incoming / relative)
                reference[key] = relative
            problems = validate_job(spec, base_dir=incoming, check_files=True)
            if problems:
                raise ValidationError("job spec", problems)
            write_json_atomic(incoming / SPEC_FILENAME, spec)
            frames_total = sum(len(t["frames"]) for t in spec["trajectories"])
            with self._lock:
                if len(self._pending) >= self.queue_size:
                    raise QueueFull(f"the queue is full ({self.queue_size} jobs waiting); try again when one has started")
                self._seq += 1
                status = JobStatus(id=job_id, seq=self._seq, name=spec["name"], generator=spec["generator"],
                                   frames_total=frames_total, created=time.time())
                write_json_atomic(incoming / STATUS_FILENAME, status.to_json())
                os.replace(incoming, self.root / job_id)
                job = _Job(status, self.root / job_id)
                self._jobs[job_id] = job
                self._pending.append(job_id)
                self._wake.notify()
                snapshot = status.copy()
        except OSError as exc:
            shutil.rmtree(incoming, ignore_errors=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(describe_os_error(exc, self.root)) from None
            raise KeyframeWorldsError(describe_os_error(exc, self.root)) from None
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        self.log(job_id, f"submitted: {snapshot.name!r}, generator {snapshot.generator}, {frames_total} frames")
        return snapshot

    def get(self, job_id: str) -> JobStatus:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id!r}")
            return job.status.copy()

    def list(self) -> list[JobStatus]:
        with self._lock:
            return [j.status.copy() for j in sorted(self._jobs.values(), key=lambda j: j.status.seq)]

    def folder(self, job_id: str) -> Path:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id!r}")
            return job.folder

    def queue_position(self, job_id: str) -> int | None:
        with self._lock:
            try:
                return self._pending.index(job_id)
            except ValueError:
                return None

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a pending job at once, a running one at its next progress check. Finished segments stay on disk."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id!r}")
            state = job.status.state
            if state.finished:
                raise JobConflict(f"job {job_id} has already {state.value} and cannot be cancelled")
            job.cancel.set()
            if state is JobState.PENDING:
                self._pending.remove(job_id)
                job.status.state, job.status.stage = JobState.CANCELLED, "cancelled"
                job.status.finished, job.status.eta_s = time.time(), None
                self._write_status(job)
            snapshot = job.status.copy()
        self.log(job_id, "cancel requested" if state is JobState.RUNNING else "cancelled while queued")
        return snapshot

    def counts(self) -> dict[str, int]:
        with self._lock:
            counts = {s.value: 0 for s in JobState}
            for job in self._jobs.values():
                counts[job.status.state.value] += 1
            return counts

    # --- logging and status ---------------------------------------------------------

    def log(self, job_id: str, message: str) -> None:
        """Append a line to the job's log; a full disk must not turn logging into a crash."""
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {message}\n"
        try:
            with open(self.root / job_id / LOG_FILENAME, "a", encoding="utf-8") as fh:
                fh.write(line)
        except OSError:
            log.warning("job %s: cannot write its log: %s", job_id, message)

    def _write_status(self, job: _Job) -> None:
        """status.json through a temporary file; a failed write keeps the previous file whole."""
        job.last_write = time.monotonic()
        doc = job.status.to_json()
        with job.write_lock:
            try:
                write_json_atomic(job.folder / STATUS_FILENAME, doc)
            except OSError as exc:
                log.warning("job %s: cannot write %s: %s", job.status.id, STATUS_FILENAME, exc)
                remove_temporary_files(job.folder)

    def _update(self, job_id: str, **changes: Any) -> None:
        """Progress from the worker; written to disk on a stage change or every STATUS_WRITE_INTERVAL_S.

        The file is written outside the manager's lock, so status reads never wait on the disk.
        """
        with self._lock:
            job = self._jobs[job_id]
            stage_changed = "stage" in changes and changes["stage"] != job.status.stage
            for key, value in changes.items():
                setattr(job.status, key, value)
            due = stage_changed or time.monotonic() - job.last_write >= STATUS_WRITE_INTERVAL_S
            if due:
                job.last_write = time.monotonic()
                doc = job.status.to_json()
        if due:
            with job.write_lock:
                try:
                    write_json_atomic(job.folder / STATUS_FILENAME, doc)
                except OSError as exc:
                    log.warning("job %s: cannot write %s: %s", job_id, STATUS_FILENAME, exc)
                    remove_temporary_files(job.folder)

    # --- workers ------------------------------------------------------------------------

    def _next(self) -> _Job | None:
        with self._wake:
            while not self._pending and not self.stopping.is_set():
                self._wake.wait()
            if self.stopping.is_set():
                return None
            job = self._jobs[self._pending.popleft()]
            job.status.state, job.status.stage = JobState.RUNNING, "starting"
            job.status.started = job.status.started or time.time()
            job.status.attempts += 1
            self._write_status(job)
            return job

    def _work(self, device: str) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            with self._lock:
                job.status.device = device
            self._run(job, device)

    def _run(self, job: _Job, device: str) -> None:
        job_id = job.status.id
        progress = JobProgress(self, job_id, job.cancel)
        out_dir = job.folder / OUTPUT_DIRNAME
        attempt = job.status.attempts
        self.log(job_id, f"running on {device} (attempt {attempt})")
        state, error, trace = JobState.COMPLETED, None, ""
        try:
            out_dir.mkdir(exist_ok=True)
            # A killed earlier attempt may have left half-written temporary files; nothing else writes here now.
            removed = remove_temporary_files(job.folder)
            if removed:
                self.log(job_id, f"removed {removed} temporary file(s) an interrupted attempt left")
            self.runner(job.folder / SPEC_FILENAME, out_dir, progress, device)
        except JobCancelled:
            state = JobState.CANCELLED
        except EngineStopping:
            # Not a failure: the status stays "running" on disk and the next start resumes the job.
            self.log(job_id, "engine stopping: job interrupted, it resumes at the next start")
            remove_temporary_files(job.folder)
            return
        except Exception as exc:  # a bug in a generator must fail the job, not the worker
            state, error, trace = JobState.FAILED, failure_message(exc, out_dir), traceback.format_exc()
        if state is not JobState.COMPLETED:
            self.log(job_id, f"{state.value}: {error or ''}\n{trace}".rstrip())
            removed = remove_temporary_files(job.folder)
            if removed:
                self.log(job_id, f"removed {removed} partly written temporary file(s)")
        else:
            self.log(job_id, "completed")
        with self._lock:
            s = job.status
            s.state, s.error, s.finished, s.eta_s, s.step, s.steps = state, error, time.time(), None, None, None
            s.stage = {"completed": "done", "cancelled": "cancelled", "failed": "failed"}[state.value]
            if state is JobState.COMPLETED:
                s.progress, s.frames_done = 1.0, s.frames_total
            self._write_status(job)


def problems_json(problems: list[Problem]) -> list[dict]:
    return [p.to_json() for p in problems]
