"""Jobs on disk, the FIFO queue, and one worker process per device.

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

The HTTP side only calls ``submit``/``get``/``list``/``cancel``/``retry``. Jobs
run in worker processes (``workers.py``, ``worker.py``), one per device; a
thread per device here hands each job to its worker, turns the worker's
progress events into the job's status, forwards a cancel, ends a worker that
does not stop within ``CANCEL_GRACE_S`` of it, and restarts a worker that died.

A job whose spec opts in with ``execution.split_trajectories`` runs as parts, one per trajectory
(``engine/run/split.py``): the worker that takes the job runs its first part and queues the others ahead of every
waiting job, so free workers take them at once; each part runs from the reference's memory into
``parts/<k>/out``, and the worker that finishes the last one fuses them into ``out/``. ``parts.json`` records
which worker ran which part, and when. A failed part fails the job (the others are stopped); a part that
completed is not run again when the job resumes. Once fused, the parts' bundles are removed (their files live on in
``out/``).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
import typing
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ...bridge.atomic import remove_temporary_files
from ...bridge.paths import describe_os_error, failure_message, free_bytes
from ...bridge.errors import KeyframeWorldsError, Problem, ValidationError
from ...bridge.jobs import FINISHED_STAGE, QUEUED_STAGE, STAGE_WORDS, STARTING_STAGE, JobState, JobStatus, ProgressEvent
from ...bridge.spec import MANIFEST_FILENAME, JobSpec, validate_job, write_json_atomic
from ...bridge.trajectory import safe_text, text_problems
from .workers import WorkerGone, WorkerHandle

log = logging.getLogger("keyframe_worlds.service")

SPEC_FILENAME = "spec.json"
STATUS_FILENAME = "status.json"
LOG_FILENAME = "log.txt"
INPUTS_DIRNAME = "inputs"
OUTPUT_DIRNAME = "out"
#: A split job's record of its parts: trajectory, state, device, worker pid, start and end (Unix seconds).
PARTS_FILENAME = "parts.json"
#: The stage word while a split job's parts are fused into its bundle.
FUSING_STAGE = "fusing the parts"
JOB_ID_PATTERN = re.compile(r"^j[0-9]{8}-[0-9a-f]{8}$")
# How often progress alone (no state change) is written to status.json.
STATUS_WRITE_INTERVAL_S = 0.25
#: Seconds a running job has to stop after a cancel before its worker process is ended (and restarted).
CANCEL_GRACE_S = 3.0
#: Seconds a running job has to stop when the engine shuts down before its worker is ended.
STOP_GRACE_S = 3.0


class QueueFull(KeyframeWorldsError):
    """The queue already holds its limit of pending jobs."""


class DiskFull(KeyframeWorldsError):
    """The job root has no space left."""


class StorageError(KeyframeWorldsError):
    """The engine cannot write its job root (read-only, no permission, ...): the server's problem, not the request's."""


class JobNotFound(KeyframeWorldsError):
    pass


class JobConflict(KeyframeWorldsError):
    """The request does not fit the job's state (e.g. cancelling a finished job)."""


def new_job_id() -> str:
    return time.strftime("j%Y%m%d", time.gmtime()) + "-" + secrets.token_hex(4)


#: How often the job root's size is measured again for the disk budget (walking it costs a little).
USAGE_INTERVAL_S = 0.5


def folder_bytes(folder: Path) -> int:
    """The bytes the files under ``folder`` take on disk (allocated blocks; apparent size where unknown)."""
    total = 0
    stack = [str(folder)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)
                            total += getattr(st, "st_blocks", 0) * 512 or st.st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def stored_status(doc: Any) -> JobStatus:
    """A status read back from disk, checked so it can be answered: right types, UTF-8 text.

    Text an older engine stored unchecked (a lone surrogate in a job name) is repaired with backslash
    escapes rather than dropping the job; a field of the wrong type raises ValueError.
    """
    if not isinstance(doc, dict):
        raise ValueError(f"not an object: {type(doc).__name__}")
    if text_problems(doc):
        doc = _repaired_text(doc)
    status = JobStatus.from_json(doc)
    hints = typing.get_type_hints(JobStatus)
    for f in dataclasses.fields(JobStatus):
        value, kind = getattr(status, f.name), hints[f.name]
        if f.name == "state":
            continue
        if f.name == "warnings":
            ok = isinstance(value, list) and all(isinstance(w, str) for w in value)
        else:
            kinds = typing.get_args(kind) or (kind,)
            ok = ((value is None and type(None) in kinds)
                  or (isinstance(value, str) and str in kinds)
                  or (isinstance(value, (int, float)) and not isinstance(value, bool) and float in kinds)
                  or (isinstance(value, int) and not isinstance(value, bool) and int in kinds))
        if isinstance(value, float) and not math.isfinite(value):
            ok = False
        if not ok:
            raise ValueError(f"field {f.name!r} has the wrong type ({type(value).__name__})")
    if not JOB_ID_PATTERN.match(status.id):
        raise ValueError(f"id {status.id[:40]!r} is not a job id")
    return status


def _repaired_text(value: Any) -> Any:
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, dict):
        return {safe_text(k) if isinstance(k, str) else k: _repaired_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_repaired_text(v) for v in value]
    return value


@dataclass
class _Part:
    """One trajectory of a split job, run on its own (``engine/run/split.py``)."""

    index: int
    trajectory: str
    folder: Path  # parts/<k>: spec.json, out/
    frames: int
    state: str = "pending"  # pending, running, then a worker outcome (worker.OUTCOMES)
    work: float = 0.0  # frames done (and in flight), for the job's progress
    device: str | None = None
    pid: int | None = None
    started: float | None = None
    finished: float | None = None

    def to_json(self) -> dict:
        return {"index": self.index, "trajectory": self.trajectory, "state": self.state, "device": self.device,
                "pid": self.pid, "started": self.started, "finished": self.finished}


@dataclass
class _Job:
    status: JobStatus
    folder: Path
    cancel: threading.Event = field(default_factory=threading.Event)
    last_write: float = 0.0
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    # rate of this attempt, for the time left: when the first frame report came, and the work done then
    first_report: float | None = None
    first_work: float = 0.0
    budget_error: str | None = None  # set when the disk budget stopped this attempt
    parts: list[_Part] | None = None  # a split job's parts (this attempt); None: it runs whole
    part_error: tuple[str, str] | None = None  # (error, traceback) of the first part that failed


class JobManager:
    """The jobs of one job root: folders, FIFO queue, and one worker process per device.

    ``devices``: one worker each ("cuda:0", "cpu", ...). ``queue_size``: most
    pending jobs; ``submit`` raises :class:`QueueFull` beyond it. Nothing runs
    until :meth:`start`.
    """

    def __init__(self, job_root: str | os.PathLike, devices: list[str], queue_size: int = 32,
                 disk_budget_bytes: int | None = None):
        self.root = Path(job_root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.devices = list(devices) or ["cpu"]
        self.queue_size = int(queue_size)
        self.disk_budget_bytes = disk_budget_bytes
        self._usage: tuple[float, int] | None = None  # (when measured, bytes)
        self._usage_lock = threading.Lock()
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._jobs: dict[str, _Job] = {}
        self._pending: deque[str] = deque()
        self._parts: deque[tuple[str, int]] = deque()  # split jobs' parts waiting for a worker: served first
        self._seq = 0
        self._threads: list[threading.Thread] = []
        self.workers = [WorkerHandle(device, str(self.root)) for device in self.devices]
        self._load()

    # --- start-up -------------------------------------------------------------

    def _load(self) -> None:
        """Read every job folder back; requeue the jobs that had not finished."""
        for pattern in (".incoming-*", ".deleting-*"):
            for leftover in self.root.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
        found: list[_Job] = []
        for folder in self.root.iterdir():
            if not (folder.is_dir() and JOB_ID_PATTERN.match(folder.name)):
                continue
            try:
                status = stored_status(json.loads((folder / STATUS_FILENAME).read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                # One bad folder must not break listing the others: it is left on disk, unlisted.
                log.warning("skipping job folder %s: unreadable %s (%s)", folder, STATUS_FILENAME, safe_text(str(exc)))
                continue
            if status.id != folder.name:
                log.warning("skipping job folder %s: its status names job %s", folder, status.id)
                continue
            found.append(_Job(status, folder))
        for job in sorted(found, key=lambda j: j.status.seq):
            self._jobs[job.status.id] = job
            self._seq = max(self._seq, job.status.seq)
            if not job.status.state.finished:
                job.status.state, job.status.stage, job.status.eta_s = JobState.PENDING, f"{QUEUED_STAGE} (resumes after engine restart)", None
                self._pending.append(job.status.id)
                self.log(job.status.id, "engine restarted: job queued again; it resumes from its last finished segment")
                self._write_status(job)

    def start(self) -> None:
        """Start every worker process and the thread that supervises it."""
        for worker in self.workers:
            worker.start()
            thread = threading.Thread(target=self._work, args=(worker,), name=f"supervise-{worker.device}", daemon=True)
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
        for worker in self.workers:
            worker.kill()

    def worker_info(self) -> list[dict]:
        return [w.info().to_json() for w in self.workers]

    def gpu_memory(self) -> list[dict]:
        """Each GPU worker's device memory, as it last reported it (the server itself never touches a GPU)."""
        return [m for m in (w.gpu_memory() for w in self.workers) if m is not None]

    # --- the HTTP side ----------------------------------------------------------

    def submit(self, spec_doc: dict, inputs: dict[str, Callable[[Path], None]], notes: tuple[str, ...] = ()) -> JobStatus:
        """Create and queue a job.

        ``spec_doc`` must already be valid apart from its reference files;
        ``inputs`` maps a spec key ("image", "depth") to a function that writes
        that file to the path given. The reference paths are rewritten to
        ``inputs/reference_<key><suffix>`` and the spec is validated again with
        the files in place. notes: lines for the job's log (which of this machine's models it got). Raises
        QueueFull, DiskFull or ValidationError.
        """
        with self._lock:
            if self.stopping.is_set():
                raise JobConflict("the engine is shutting down")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} jobs waiting); try again when one has started")
        over = self.over_budget(fresh=True)
        if over:
            raise DiskFull(over)
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
            if not problems:
                # The headers passed (sizes within the limits): the content is decoded once now, so a truncated
                # or corrupt file is a 400 here and not a failed job later.
                from ..io.inputs import reference_problems

                problems = reference_problems(incoming / reference["image"],
                                              incoming / reference["depth"] if reference.get("depth") else None)
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
            if exc.filename and not Path(os.path.abspath(exc.filename)).is_relative_to(self.root.resolve()):
                # Reading a local-path reference failed: the request's file, not the engine's storage.
                raise KeyframeWorldsError(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
            raise StorageError(f"the engine cannot store the job: {describe_os_error(exc, self.root)} "
                               f"(a problem of the engine's job root, not of the request)") from None
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        self.log(job_id, f"submitted: {snapshot.name!r}, generator {snapshot.generator}, {frames_total} frames")
        for note in notes:
            self.log(job_id, f"this machine's {note}")
        return snapshot

    def get(self, job_id: str) -> JobStatus:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id!r}")
            return job.status.copy(queue_position=self._position(job_id))

    def list(self) -> list[JobStatus]:
        with self._lock:
            return [j.status.copy(queue_position=self._position(j.status.id))
                    for j in sorted(self._jobs.values(), key=lambda j: j.status.seq)]

    def _position(self, job_id: str) -> int | None:
        try:
            return self._pending.index(job_id)
        except ValueError:
            return None

    def folder(self, job_id: str) -> Path:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id!r}")
            return job.folder

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
                job.status.state, job.status.stage = JobState.CANCELLED, FINISHED_STAGE[JobState.CANCELLED]
                job.status.finished, job.status.eta_s = time.time(), None
                self._write_status(job)
            snapshot = job.status.copy()
        self.log(job_id, "cancel requested" if state is JobState.RUNNING else "cancelled while queued")
        return snapshot

    def retry(self, job_id: str) -> JobStatus:
        """Queue a failed or cancelled job again; it resumes from its last finished segment."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id!r}")
            state = job.status.state
            if state not in (JobState.FAILED, JobState.CANCELLED):
                raise JobConflict(f"job {job_id} is {state.value}: only a failed or cancelled job can be retried")
            if self.stopping.is_set():
                raise JobConflict("the engine is shutting down")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} jobs waiting); try again when one has started")
            job.cancel = threading.Event()
            s = job.status
            s.state, s.stage, s.error, s.finished, s.eta_s = JobState.PENDING, f"{QUEUED_STAGE} (retry)", None, None, None
            self._pending.append(job_id)
            self._write_status(job)
            self._wake.notify()
            snapshot = s.copy()
        self.log(job_id, f"retry requested after it {state.value}: queued again, it resumes from its last finished segment")
        return snapshot

    def delete(self, job_id: str) -> int:
        """Delete a finished, failed or cancelled job and its folder; returns the bytes freed.

        The folder is first renamed to ``.deleting-<id>`` (atomic), so a crash halfway through removing it
        never leaves half a job listed; the next start removes what is left.
        """
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id!r}")
            state = job.status.state
            if not state.finished:
                raise JobConflict(f"job {job_id} is {state.value}: cancel it first, then delete it")
            doomed = self.root / f".deleting-{job_id}"
            try:
                os.replace(job.folder, doomed)
            except FileNotFoundError:
                doomed = None
            except OSError as exc:
                raise StorageError(f"cannot delete job {job_id}: {describe_os_error(exc, self.root)}") from None
            del self._jobs[job_id]
        freed = folder_bytes(doomed) if doomed is not None else 0
        if doomed is not None:
            shutil.rmtree(doomed, ignore_errors=True)
        with self._usage_lock:
            self._usage = None
        log.info("deleted job %s (%d bytes)", job_id, freed)
        return freed

    def disk(self) -> dict:
        """What the job root uses, its budget (None: none) and the space left on its device, in bytes."""
        return {"used_bytes": self.usage_bytes(), "budget_bytes": self.disk_budget_bytes, "free_bytes": free_bytes(self.root)}

    def usage_bytes(self, fresh: bool = False) -> int:
        """The job root's size in bytes, measured at most every USAGE_INTERVAL_S unless ``fresh``."""
        with self._usage_lock:
            if not fresh and self._usage is not None and time.monotonic() - self._usage[0] < USAGE_INTERVAL_S:
                return self._usage[1]
        used = folder_bytes(self.root)
        with self._usage_lock:
            self._usage = (time.monotonic(), used)
        return used

    def over_budget(self, fresh: bool = False) -> str | None:
        """The message when the job root has used its disk budget, else None."""
        if self.disk_budget_bytes is None:
            return None
        used = self.usage_bytes(fresh=fresh)
        if used < self.disk_budget_bytes:
            return None
        return (f"disk budget used: the job root {self.root} holds {used / 1e9:.3f} GB of its {self.disk_budget_bytes / 1e9:.3f} GB "
                f"(serve --disk-budget-gb); delete finished jobs (DELETE /v1/jobs/{{id}}, keyframe-worlds jobs delete) to make room")

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

    def _next(self) -> tuple[_Job, _Part | None] | None:
        """The next work for a free worker: a waiting part of a split job, else the next job (None: stopping)."""
        with self._wake:
            while not self._pending and not self._parts and not self.stopping.is_set():
                self._wake.wait()
            if self.stopping.is_set():
                return None
            if self._parts:
                job_id, index = self._parts.popleft()
                job = self._jobs[job_id]
                return job, job.parts[index]
            job = self._jobs[self._pending.popleft()]
            job.status.state, job.status.stage = JobState.RUNNING, STARTING_STAGE
            job.status.started = job.status.started or time.time()
            job.status.attempts += 1
            job.first_report, job.first_work = None, 0.0
            job.parts, job.part_error = None, None
            self._write_status(job)
            return job, None

    def _work(self, worker: WorkerHandle) -> None:
        """The supervising thread of one worker: jobs in, status out, until the engine stops."""
        try:
            worker.wait_ready()
        except WorkerGone as exc:
            log.error("%s", exc)
        while True:
            item = self._next()
            if item is None:
                worker.shutdown()
                return
            job, part = item
            if part is None:
                part = self._split(job)
                if part is None and job.parts is not None:
                    continue  # every part had completed before (a resumed job): it has been fused
            if part is None:
                with self._lock:
                    job.status.device = worker.device
                self._run(job, worker)
            else:
                self._run_part(job, part, worker)

    # --- split jobs -----------------------------------------------------------------------

    def _split(self, job: _Job) -> _Part | None:
        """For a job that opts in to ``execution.split_trajectories``: make its parts, queue all but the first ahead
        of every waiting job and return the first (None: the job runs whole, or every part had completed and the job
        was fused here)."""
        from ..run.split import PARTS_DIRNAME, part_document, split_problem

        job_id = job.status.id
        try:
            spec = JobSpec.from_json(json.loads((job.folder / SPEC_FILENAME).read_text(encoding="utf-8")),
                                     base_dir=job.folder, check_files=False).resolve(job.folder)
        except (OSError, ValueError, KeyframeWorldsError):
            return None  # the worker reads it again and reports what is wrong as the job's failure
        if not spec.execution.split_trajectories:
            return None
        problem = split_problem(spec)
        if problem:
            self.log(job_id, f"not split ({problem}): the trajectories run one after another")
            return None
        parts = []
        for k, trajectory in enumerate(spec.run_trajectories()):
            folder = job.folder / PARTS_DIRNAME / str(k)
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / SPEC_FILENAME).is_file():
                write_json_atomic(folder / SPEC_FILENAME, part_document(spec.to_json(), trajectory.name))
            part = _Part(k, trajectory.name, folder, len(trajectory))
            if (folder / OUTPUT_DIRNAME / MANIFEST_FILENAME).is_file():
                part.state, part.work = "completed", float(len(trajectory))  # finished before the job was interrupted
            parts.append(part)
        waiting = [p for p in parts if p.state == "pending"]
        with self._wake:
            job.parts = parts
            for part in reversed(waiting[1:]):
                self._parts.appendleft((job_id, part.index))
            self._wake.notify_all()
        self._write_parts(job)
        self.log(job_id, f"split into {len(parts)} parts, one per trajectory, each from the reference's memory "
                         f"({len(parts) - len(waiting)} completed before)")
        if not waiting:
            self._finish_split(job)
            return None
        return waiting[0]

    def _write_parts(self, job: _Job) -> None:
        with self._lock:
            doc = [p.to_json() for p in job.parts or ()]
        try:
            write_json_atomic(job.folder / PARTS_FILENAME, doc)
        except OSError as exc:
            log.warning("job %s: cannot write %s: %s", job.status.id, PARTS_FILENAME, exc)

    def _run_part(self, job: _Job, part: _Part, worker: WorkerHandle) -> None:
        """Run one part of a split job on ``worker``; the last part to end finishes the job."""
        job_id = job.status.id
        outcome, error, trace = "failed", None, ""
        if job.cancel.is_set():
            outcome = "cancelled"  # cancelled (or a part failed) before this part started
        else:
            try:
                out_dir = part.folder / OUTPUT_DIRNAME
                out_dir.mkdir(exist_ok=True)
                remove_temporary_files(part.folder)
                worker.ensure_started()
                worker.cancel.clear()
                worker.stop.clear()
                with self._lock:
                    part.state, part.device, part.pid, part.started = "running", worker.device, worker.info().pid, time.time()
                    job.status.device = ", ".join(p.device for p in job.parts if p.device and p.state == "running")
                self._write_parts(job)
                self.log(job_id, f"part {part.index + 1}/{len(job.parts)} ({part.trajectory}) running on the worker "
                                 f"for {worker.device} (pid {part.pid})")
                worker.send(("run", job_id, str(part.folder / SPEC_FILENAME), str(out_dir)))
                worker.set_state("busy")
                outcome, error, trace = self._supervise(job, worker, part)
            except WorkerGone as exc:
                outcome, error = "failed", f"{exc} while running part {part.index + 1} ({part.trajectory})"
                self._restart(worker)
            except OSError as exc:
                outcome, error = "failed", failure_message(exc, part.folder)
            if worker.alive():
                worker.set_state("idle")
        with self._lock:
            part.state, part.finished = outcome, time.time()
            if outcome == "failed" and job.part_error is None:
                job.part_error = (f"part {part.index + 1} ({part.trajectory}): {error}", trace)
                job.cancel.set()  # the other parts stop: the job has failed
            last = all(p.state not in ("pending", "running") for p in job.parts)
        self._write_parts(job)
        self.log(job_id, f"part {part.index + 1}/{len(job.parts)} ({part.trajectory}) {outcome}")
        if last:
            self._finish_split(job)

    def _finish_split(self, job: _Job) -> None:
        """Every part has ended: fuse them into the job's bundle, or end the job as its parts did."""
        from ..run.split import fuse_parts

        outcomes = {p.state for p in job.parts}
        error, trace = job.part_error or (None, "")
        if outcomes == {"completed"}:
            self._update(job.status.id, stage=FUSING_STAGE)
            try:
                spec = JobSpec.from_json(json.loads((job.folder / SPEC_FILENAME).read_text(encoding="utf-8")),
                                         base_dir=job.folder, check_files=False).resolve(job.folder)
                fuse_parts(spec, [p.folder / OUTPUT_DIRNAME for p in job.parts], job.folder / OUTPUT_DIRNAME)
                self.log(job.status.id, f"fused {len(job.parts)} parts into {OUTPUT_DIRNAME}/")
                for part in job.parts:  # their files live on in the bundle (hard links, or copies): not twice on disk
                    shutil.rmtree(part.folder / OUTPUT_DIRNAME, ignore_errors=True)
                outcome = "completed"
            except Exception as exc:  # a fusion that fails must fail the job, not the supervising thread
                import traceback

                outcome, error, trace = "failed", f"fusing the parts failed: {failure_message(exc, job.folder)}", traceback.format_exc()
        elif "failed" in outcomes:
            outcome = "failed"
        elif "interrupted" in outcomes:
            outcome = "interrupted"
        else:
            outcome = "cancelled"
        self._finish(job, outcome, error, trace)

    def _run(self, job: _Job, worker: WorkerHandle) -> None:
        job_id = job.status.id
        out_dir = job.folder / OUTPUT_DIRNAME
        self.log(job_id, f"running on the worker for {worker.device} (attempt {job.status.attempts})")
        outcome, error, trace = "failed", None, ""
        try:
            out_dir.mkdir(exist_ok=True)
            # A killed earlier attempt may have left half-written temporary files; nothing else writes here now.
            removed = remove_temporary_files(job.folder)
            if removed:
                self.log(job_id, f"removed {removed} temporary file(s) an interrupted attempt left")
            worker.ensure_started()
            worker.cancel.clear()
            worker.stop.clear()
            worker.send(("run", job_id, str(job.folder / SPEC_FILENAME), str(out_dir)))
            worker.set_state("busy")
            outcome, error, trace = self._supervise(job, worker)
        except WorkerGone as exc:
            outcome = "failed"
            error = (f"{exc} while running this job; the worker was restarted. Finished segments are kept: "
                     f"retry the job (POST /v1/jobs/{job_id}/retry) to resume from them")
            self._restart(worker)
        except OSError as exc:
            outcome, error = "failed", failure_message(exc, out_dir)
        if worker.alive():
            worker.set_state("idle")
        self._finish(job, outcome, error, trace)

    def _finish(self, job: _Job, outcome: str, error: str | None, trace: str) -> None:
        """End an attempt of a job with a worker outcome: its state, status and log."""
        job_id = job.status.id
        if outcome == "interrupted":
            # Not a failure: the status stays "running" on disk and the next start resumes the job.
            self.log(job_id, "engine stopping: job interrupted, it resumes at the next start")
            remove_temporary_files(job.folder)
            return
        state = JobState(outcome)
        if job.budget_error and state is JobState.CANCELLED:
            state, error = JobState.FAILED, f"{job.budget_error}; then retry this job, it resumes from its finished segments"
        job.budget_error = None
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
            s.stage = FINISHED_STAGE[state]
            if state is JobState.COMPLETED:
                s.progress, s.frames_done = 1.0, s.frames_total
            self._write_status(job)
        with self._usage_lock:
            self._usage = None  # the job's files changed the job root's size: measure it again when asked

    def _supervise(self, job: _Job, worker: WorkerHandle, part: _Part | None = None) -> tuple[str, str | None, str]:
        """Relay the worker's messages for ``job`` (or one ``part`` of it) until it finishes; end the worker if a
        cancel or a stop is not honoured in time. Returns (outcome, error, traceback)."""
        job_id = job.status.id
        deadline: float | None = None
        while True:
            if deadline is None and job.cancel.is_set():
                worker.cancel.set()
                deadline = time.monotonic() + CANCEL_GRACE_S
            elif deadline is None and self.stopping.is_set():
                worker.stop.set()
                deadline = time.monotonic() + STOP_GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                cancelled = job.cancel.is_set()
                worker.kill()
                self._restart(worker)
                if cancelled:
                    return "cancelled", (f"the job did not stop within {CANCEL_GRACE_S:.0f} s of the cancel: its worker "
                                         f"process was ended and restarted (finished segments are kept)"), ""
                return "interrupted", None, ""
            if deadline is None and not job.cancel.is_set() and self.disk_budget_bytes is not None:
                over = self.over_budget()
                if over:
                    # Stopped like a cancel (finished segments stay), recorded as failed with the reason.
                    job.budget_error = over
                    job.cancel.set()
                    continue
            message = worker.receive(0.05 if deadline is not None else 0.25)
            if message is None:
                continue
            kind = message[0]
            if kind == "finished" and message[1] == job_id:
                return message[2], message[3], message[4]
            if kind == "event" and message[1] == job_id:
                self._progress(job, message[2], part)
            elif kind == "log" and message[1] == job_id:
                self.log(job_id, message[2])
            elif kind == "warning" and message[1] == job_id:
                self.log(job_id, f"warning: {message[2]}")
                with self._lock:
                    if message[2] not in job.status.warnings:
                        job.status.warnings = [*job.status.warnings, message[2]]
            elif kind == "device" and message[1] == job_id and part is None:
                with self._lock:
                    job.status.device = message[2]
                self.log(job_id, f"the generator runs on {message[2]}")

    def _restart(self, worker: WorkerHandle) -> None:
        """Start a fresh worker for the next job (unless the engine is stopping)."""
        if self.stopping.is_set():
            return
        try:
            worker.start()
            log.warning("restarted the worker process for %s", worker.device)
        except OSError as exc:
            log.error("cannot restart the worker process for %s: %s", worker.device, exc)

    def _progress(self, job: _Job, event: ProgressEvent, part: _Part | None = None) -> None:
        """A progress event from the worker -> the job's status (stage words, frames, step, time left).

        A part's frames count towards its job's: done and total are summed over the parts."""
        changes: dict[str, Any] = {"stage": STAGE_WORDS.get(event.stage, event.stage)}
        if event.stage == "generate":
            now = time.monotonic()
            work = event.done + max(0.0, event.in_flight)  # in frames; what progress and the rate are measured in
            if part is not None:
                with self._lock:
                    part.work = work
                    work = sum(p.work for p in job.parts)
                    total = sum(p.frames for p in job.parts)
                done = int(work)
                event = dataclasses.replace(event, done=done, total=total, in_flight=work - done)
            eta = None
            if job.first_report is None:
                # Work done before this attempt (a resume) does not count towards the rate.
                job.first_report, job.first_work = now, work
            elif work > job.first_work:
                rate = (now - job.first_report) / (work - job.first_work)
                eta = max(0.0, rate * (event.total - work))
            changes.update(frames_done=event.done, frames_total=event.total, progress=event.fraction, eta_s=eta,
                           step=event.step, steps=event.steps)
        elif event.message and changes["stage"] != job.status.stage:
            self.log(job.status.id, f"{event.stage}: {event.message}")
        self._update(job.status.id, **changes)


def problems_json(problems: list[Problem]) -> list[dict]:
    return [p.to_json() for p in problems]
