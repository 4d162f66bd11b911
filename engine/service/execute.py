"""The bridge between a worker and the job runner (``engine/runner.py``).

The worker hands over the job's ``spec.json``, its bundle folder and the job's
:class:`~.jobs.JobProgress`; this module loads the spec (reference paths point
into the job's ``inputs/``), adapts progress to the runner's reporter and runs
the job on the worker's device.
"""

from __future__ import annotations

from pathlib import Path

from ...bridge.errors import KeyframeWorldsError, Problem
from ...bridge.spec import load_job
from .jobs import EngineStopping, JobCancelled, JobProgress

# The runner's stage names, as a person reads them in a status.
STAGE_WORDS = {
    "reference": "reading the reference",
    "memory": "building the 3D memory",
    "generate": "generating frames",
    "export": "writing the point cloud",
    "done": "done",
}


def run_spec(spec_path: Path, out_dir: Path, progress: JobProgress, device: str) -> None:
    from ..run.runner import JobCancelled as RunnerCancelled
    from ..run.runner import ProgressReporter, run_job

    class Reporter(ProgressReporter):
        """Forwards every step to the job's progress, which raises there on cancel or shutdown."""

        def __init__(self) -> None:
            super().__init__()
            self._stage: str | None = None

        def _enter(self, stage: str, message: str) -> None:
            if stage != self._stage:
                self._stage = stage
                progress.stage(STAGE_WORDS.get(stage, stage))
                if message:
                    progress.log(f"{stage}: {message}")

        def report(self, stage: str, done: int, total: int, message: str = "") -> None:
            self._enter(stage, message)
            if stage == "generate":
                progress.frames(done, total)
            progress.check()

        def report_denoise(self, done: int, total: int, in_flight: float, step: int, steps: int, message: str = "") -> None:
            self._enter("generate", message)
            progress.frames(done, total, in_flight, step, steps)

        def cancelled(self) -> bool:
            try:
                progress.check()
            except (JobCancelled, EngineStopping):
                return True
            return False

    spec = load_job(spec_path)
    try:
        run_job(spec, out_dir, progress=Reporter(), device=device, resume=True)
    except RunnerCancelled:
        progress.check()  # the runner stopped on our word: say why (cancelled, or the engine stopping)
        raise


def check_options(generator: str, options: dict) -> list[Problem]:
    """The generator's own check of a job's ``options``, before the job is queued (cheap: no model loads).

    Returns problems with their ``options.<name>`` field paths; empty when the options are fine.
    """
    try:
        if generator == "preview":
            from ..generators.preview import PreviewGenerator

            PreviewGenerator.from_options(options)
        elif generator == "worldstereo":
            from ..generators.worldstereo import parse_options

            parse_options(options)
    except KeyframeWorldsError as exc:
        problems = []
        for line in str(exc).splitlines():
            line = line.strip().lstrip("- ").strip()
            path, sep, reason = line.partition(": ")
            if sep and path.startswith("options"):
                problems.append(Problem(path, reason))
            elif line:
                problems.append(Problem("options", line))
        return problems or [Problem("options", str(exc))]
    return []
