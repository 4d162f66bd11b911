"""The worker process: runs jobs on one device and keeps the last model warm.

The service starts one per device (``workers.WorkerHandle``) with
``multiprocessing``'s *spawn* start method, so the worker is a fresh
interpreter that owns its device, its torch threads and its CUDA context; a
crash, a hang or an out-of-memory there takes only its job with it.

Protocol over the pipe (tuples, pickled by ``multiprocessing``):

    server -> worker   ("run", job_id, spec_path, out_dir)       run one job, resuming from its checkpoint
                       ("exit",)                                  finish
    worker -> server   ("ready", pid, memory)                     started, waiting for a job (memory: see device_memory)
                       ("broken", message)                        its device cannot be used; the worker exits
                       ("memory", memory)                         the device's memory after a job
                       ("event", job_id, ProgressEvent)           progress (bridge.jobs)
                       ("log", job_id, message)                   a line for the job's log
                       ("warning", job_id, message)               a warning for the job's status and log
                       ("model", description, loads)              the warm model and how many loads so far
                       ("device", job_id, device)                 the device the job's generator is built on
                       ("finished", job_id, outcome, error, trace)   outcome: completed, failed, cancelled, interrupted

Cancellation comes through two shared events, read at every progress check:
``cancel`` (the user cancelled: the job ends ``cancelled``) and ``stop`` (the
engine is stopping: the job is interrupted and resumes at the next start).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import time
import traceback
from pathlib import Path

from ...bridge.jobs import CancelReason, JobCancelled, Progress, ProgressEvent
from ...bridge.spec import JobSpec, load_job

#: Outcome words of a finished run (``interrupted``: the engine stopped; the job resumes at the next start).
OUTCOMES = ("completed", "failed", "cancelled", "interrupted")
#: The worker yields the CPU to the server (and to Blender on the same machine) when both want it: status answers stay
#: prompt while a CPU-heavy job runs, and the job still gets every cycle nobody else asks for.
WORKER_NICENESS = 10


class WorkerProgress(Progress):
    """Progress of the job in this worker: every event goes up the pipe; cancel comes down as shared events."""

    def __init__(self, conn, job_id: str, cancel, stop):
        super().__init__()
        self._conn, self._job_id, self._cancel, self._stop = conn, job_id, cancel, stop

    def report(self, event: ProgressEvent) -> None:
        self._conn.send(("event", self._job_id, event))

    def log(self, message: str) -> None:
        self._conn.send(("log", self._job_id, str(message)))

    def warn(self, message: str) -> None:
        self._conn.send(("warning", self._job_id, str(message)))

    def cancel_reason(self) -> CancelReason | None:
        if self._cancel.is_set():
            return CancelReason.CANCELLED
        if self._stop.is_set():
            return CancelReason.ENGINE_STOPPING
        return None


def model_key(spec: JobSpec, device: str) -> str:
    """What a warm model is for: the generator, the options that build it, the device (runner options excluded)."""
    from ..generators.options import RUNNER_OPTIONS

    options = {k: v for k, v in spec.options.items() if k not in RUNNER_OPTIONS}
    return json.dumps([spec.generator, options, device], sort_keys=True, default=str)


class WarmModel:
    """The last generator this worker built, kept between jobs of the same generator, options and device."""

    def __init__(self, device: str):
        self.device = device
        self.key: str | None = None
        self.generator = None
        self.depth_key: str | None = None
        self.depth_network = None
        self.loads = 0  # generators built with weights (worldstereo): what a warm model saves

    def get(self, spec: JobSpec, progress: Progress):
        from ..generators import get_generator

        key = model_key(spec, self.device)
        if key == self.key and self.generator is not None:
            progress.log(f"model warm: reusing the {spec.generator} generator on {self.device} (no weights loaded)")
            return self.generator
        self.release()
        started = time.perf_counter()
        generator = get_generator(spec.generator, spec.options, self.device)
        if spec.generator != "preview":
            self.loads += 1
            progress.log(f"loaded the {spec.generator} generator on {self.device} in {time.perf_counter() - started:.1f} s")
        self.key, self.generator = key, generator
        return generator

    def depth(self, spec: JobSpec, progress: Progress):
        """The job's learned depth estimator (its network kept warm like the generator), or None (the runner's default)."""
        geometry = spec.geometry
        if not geometry.depth_model:
            return None
        from ..world.depth_alignment import AlignedLearnedDepth
        from ..world.learned_depth import load_depth_estimator

        key = json.dumps([geometry.depth_model, geometry.device, self.device])
        if key != self.depth_key or self.depth_network is None:
            device = self.device if geometry.device == "auto" else geometry.device
            started = time.perf_counter()
            self.depth_network, self.depth_key = load_depth_estimator(geometry.depth_model, device=device), key
            self.loads += 1
            progress.log(f"loaded the depth model {geometry.depth_model} on {device} in {time.perf_counter() - started:.1f} s")
        else:
            progress.log(f"depth model warm: reusing {geometry.depth_model}")
        return AlignedLearnedDepth(self.depth_network)  # a fresh alignment history for each job

    def release(self, depth_too: bool = False) -> None:
        """Free the warm generator (and the GPU memory it held); with ``depth_too`` the depth network as well."""
        if depth_too:
            self.depth_network = self.depth_key = None
        if self.generator is None and not depth_too:
            return
        self.key = self.generator = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def describe(self) -> str | None:
        return None if self.key is None else f"{json.loads(self.key)[0]} on {self.device}"


def generator_device(generator, default: str) -> str:
    """The device a generator's model lives on (its pipeline's), else the worker's."""
    pipeline = getattr(generator, "pipeline", None)
    device = getattr(pipeline, "device", None)
    return str(device) if device is not None else str(default)


def is_cuda_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def run_one(conn, warm: WarmModel, job_id: str, spec_path: str, out_dir: str, cancel, stop) -> tuple[str, str | None, str]:
    """Run one job; returns (outcome, error, traceback)."""
    import torch

    from ..run.runner import run_job
    from ...bridge.paths import failure_message

    progress = WorkerProgress(conn, job_id, cancel, stop)
    try:
        spec = load_job(spec_path)
        generator = warm.get(spec, progress)
        depth = warm.depth(spec, progress)
        device = torch.device(warm.device)
        conn.send(("device", job_id, generator_device(generator, warm.device)))
        conn.send(("model", warm.describe(), warm.loads))
        run_job(spec, out_dir, progress=progress, device=device, generator=generator, resume=True, depth_estimator=depth)
        return "completed", None, ""
    except JobCancelled as exc:
        return ("cancelled" if exc.reason is CancelReason.CANCELLED else "interrupted"), None, ""
    except Exception as exc:  # a bug in a generator must fail the job, not the worker
        trace = traceback.format_exc()
        if is_cuda_oom(exc):
            warm.release(depth_too=True)
            return "failed", (f"out of GPU memory on {warm.device} ({exc}); the warm model was freed. Try a leaner "
                              "'offload' option (model, sequential), 'weights_storage': 'float8', or a smaller size"), trace
        return "failed", failure_message(exc, Path(out_dir)), trace


def device_memory(device) -> dict | None:
    """What health shows of a GPU: its name and free/total bytes (None for the CPU)."""
    import torch

    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return {"device": str(device), "name": torch.cuda.get_device_name(device), "free_bytes": int(free),
            "total_bytes": int(total)}


def open_device(name: str):
    """The torch device a worker was started for, checked; raises with a plain message when it cannot be used."""
    import torch

    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{name}: this engine's torch sees no CUDA device")
        if (device.index or 0) >= torch.cuda.device_count():
            raise RuntimeError(f"{name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)  # kernels this process launches without a device go here, not to cuda:0
    return device


def worker_main(device: str, conn, cancel, stop, parent_pid: int, job_root: str) -> None:
    """The worker process's entry point (see the module docstring)."""
    # Ctrl-C in a terminal reaches the whole process group: the server stops its workers in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ..testing.faults import install_from_environment
    from .watchdog import watch_parent

    if hasattr(os, "nice"):
        os.nice(WORKER_NICENESS)
    watch_parent(parent_pid, lambda: os._exit(3))  # the server is gone: nobody is left to report to
    install_from_environment(Path(job_root))
    from ..run import runner  # noqa: F401  (torch and the runner load now, while the server starts, not at the first job)

    try:
        torch_device = open_device(device)
        memory = device_memory(torch_device)
    except Exception as exc:  # a wrong device must say so, not leave the server waiting
        conn.send(("broken", f"the worker for {device} cannot use its device: {exc}"))
        return
    warm = WarmModel(device)
    conn.send(("ready", os.getpid(), memory))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "exit":
            return
        _, job_id, spec_path, out_dir = message
        outcome, error, trace = run_one(conn, warm, job_id, spec_path, out_dir, cancel, stop)
        try:
            conn.send(("memory", device_memory(torch_device)))
            conn.send(("finished", job_id, outcome, error, trace))
        except (BrokenPipeError, OSError):
            return
