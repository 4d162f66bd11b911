"""The preferences' model list and downloads: the engine's ``model list`` / ``model download`` in the background.

Blender never imports torch or huggingface_hub, so the add-on runs the
engine's own command with the engine Python (``python -m keyframe_worlds.cli
model list --json`` / ``model download NAME --dir MODELS --json``) and reads
its JSON. A reader thread collects the subprocess's output; only the
``bpy.app.timers`` callback (:func:`poll`) moves it into :data:`state`, which
the preferences draw, so Blender's UI never waits on the engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..bridge.errors import ERROR_PREFIX, KeyframeWorldsError

POLL_INTERVAL_S = 0.25
#: Longest a ``model list`` may take before it is given up (``--keys`` imports torch and reads every header).
LIST_TIMEOUT_S = 300.0


@dataclass
class DownloadProgress:
    name: str = ""
    files_done: int = 0
    files_total: int | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    text: str = ""  # the engine's words: "3 of 14 files, 1.2 of 65.0 GiB"

    @property
    def fraction(self) -> float:
        if self.bytes_total:
            return min(1.0, self.bytes_done / self.bytes_total)
        if self.files_total:
            return min(1.0, self.files_done / self.files_total)
        return 0.0


@dataclass
class ModelState:
    """What the preferences show: the last list (``model list --json``'s ``models``), and the running task."""

    models: list[dict] = field(default_factory=list)
    model_dir: str | None = None
    hf_cache: str | None = None
    warnings: list[str] = field(default_factory=list)
    listed_at: float | None = None
    keys_checked: bool = False
    task: str = ""  # "", "list" or "download"
    progress: DownloadProgress = field(default_factory=DownloadProgress)
    message: str = ""  # the last outcome, one line
    error: bool = False


state = ModelState()


class _Task:
    """One engine subprocess whose stdout lines a thread collects; :func:`poll` consumes them."""

    def __init__(self, kind: str, command: list[str]):
        self.kind = kind
        kwargs: dict = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
                                        env=env, **kwargs)
        self.lines: list[str] = []
        self.stderr = ""
        self.started = time.monotonic()
        self.announce = True
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self.lines.append(line)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self.stderr = self.process.stderr.read()

    def take_lines(self) -> list[str]:
        with self._lock:
            lines, self.lines = self.lines, []
        return lines

    def finished(self) -> bool:
        if self.process.poll() is None:
            return False
        for thread in self._threads:
            thread.join(timeout=5)
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def error_line(self) -> str:
        """The engine's one-line error (``keyframe-worlds: error: ...``), else its last stderr line."""
        lines = [l for l in self.stderr.splitlines() if l.strip()]
        errors = [l for l in lines if l.startswith(ERROR_PREFIX)]
        line = (errors or lines or [f"exited with status {self.process.returncode}"])[-1]
        return line.removeprefix(ERROR_PREFIX).lstrip()


_task: dict[str, _Task | None] = {"current": None}
_pending_list: dict[str, tuple | None] = {"args": None}  # a list to run once the download ends


def _command(python: str | os.PathLike, *args: str) -> list[str]:
    return [str(python), "-m", "keyframe_worlds.cli", "model", *args]


def busy() -> bool:
    return _task["current"] is not None


def _start(kind: str, command: list[str], announce: bool = True) -> None:
    """Start the subprocess; ``announce`` False keeps the last outcome on show (the list after a download)."""
    import bpy

    if busy():
        raise KeyframeWorldsError(f"the engine is still busy with a model {_task['current'].kind}")
    try:
        _task["current"] = _Task(kind, command)
    except OSError as exc:
        raise KeyframeWorldsError(f"cannot run the engine Python {command[0]}: {exc.strerror or exc}") from None
    _task["current"].announce = announce
    state.task = kind
    if announce:
        state.error = False
        state.message = "checking the models ..." if kind == "list" else "starting the download ..."
    if kind == "download":
        state.progress = DownloadProgress()
    if not bpy.app.timers.is_registered(poll):
        bpy.app.timers.register(poll, first_interval=POLL_INTERVAL_S)


def start_list(python: str | os.PathLike, model_dir: str | None, keys: bool = False, announce: bool = True) -> None:
    """Run ``model list --json`` (``--keys``: with the key check) for ``model_dir``; :func:`poll` reads the result."""
    args = ["list", "--json"] + (["--keys"] if keys else []) + (["--dir", str(model_dir)] if model_dir else [])
    _start("list", _command(python, *args), announce)
    state.keys_checked = keys


def start_download(python: str | os.PathLike, names: list[str], model_dir: str) -> None:
    """Run ``model download NAMES --dir MODEL_DIR --json``; progress reaches :data:`state` through :func:`poll`,
    and the list is refreshed when it ends."""
    if not model_dir:
        raise KeyframeWorldsError("set the Model Folder first: downloads go there, one folder per model")
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    _start("download", _command(python, "download", *names, "--dir", str(model_dir), "--json"))
    _pending_list["args"] = (python, model_dir, False)


def cancel() -> None:
    """Stop the running download (huggingface_hub resumes it next time) or list."""
    task = _task["current"]
    if task is not None:
        task.stop()


def _apply_list(text: str, announce: bool) -> None:
    try:
        data = json.loads(text)
        models = data["models"]
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyframeWorldsError(f"the engine's model list is not what was expected ({exc})") from None
    state.models = models
    state.model_dir = data.get("model_dir")
    state.hf_cache = data.get("hf_cache")
    state.warnings = list(data.get("warnings") or [])
    state.listed_at = time.time()
    if announce:
        complete = sum(1 for m in models if m.get("complete"))
        state.message = f"{complete} of {len(models)} models complete" + (" (keys checked)" if state.keys_checked
                                                                          else "")


def _apply_download_line(line: str) -> None:
    try:
        event = json.loads(line)
    except ValueError:
        return  # not ours (a library's stray print)
    kind = event.get("event")
    if kind == "start":
        state.progress = DownloadProgress(name=event.get("name", ""))
        state.message = f"downloading {event.get('name')} from {event.get('repo_id')}"
    elif kind == "progress":
        state.progress = DownloadProgress(event.get("name", ""), event.get("files_done", 0), event.get("files_total"),
                                          event.get("bytes_done", 0), event.get("bytes_total"), event.get("text", ""))
    elif kind == "done":
        state.message = f"{event.get('name')} complete in {event.get('path')}"
    elif kind == "error":
        state.message, state.error = event.get("message", "download failed"), True


def poll() -> float | None:
    """The timer: move the subprocess's output into :data:`state`; None (timer ends) once nothing runs."""
    task = _task["current"]
    if task is None:
        return None
    if task.kind == "download":
        for line in task.take_lines():
            _apply_download_line(line)
    elif time.monotonic() - task.started > LIST_TIMEOUT_S:
        task.stop()
    if not task.finished():
        _redraw()
        return POLL_INTERVAL_S
    _task["current"] = None
    state.task = ""
    rest = task.take_lines()
    if task.kind == "list":
        if task.process.returncode == 0:
            try:
                _apply_list("".join(rest), task.announce)
            except KeyframeWorldsError as exc:
                state.message, state.error = str(exc), True
        elif task.announce:
            state.message, state.error = f"model list failed: {task.error_line()}", True
    else:
        for line in rest:
            _apply_download_line(line)
        if task.process.returncode != 0 and not state.error:
            state.message, state.error = (f"download stopped: {task.error_line()}" if task.process.returncode > 0
                                          else "download cancelled (run it again to resume)"), True
        pending, _pending_list["args"] = _pending_list["args"], None
        if pending is not None:
            try:
                start_list(*pending, announce=False)  # the download's outcome stays on show
            except KeyframeWorldsError:
                pass
            else:
                _redraw()
                return POLL_INTERVAL_S
    _redraw()
    return None


def stop_all() -> None:
    """Unregistering: stop what runs and the timer."""
    import bpy

    cancel()
    task = _task["current"]
    if task is not None:
        task.finished()
    _task["current"] = None
    _pending_list["args"] = None
    state.task = ""
    if bpy.app.timers.is_registered(poll):
        bpy.app.timers.unregister(poll)


def _redraw() -> None:
    import bpy

    wm = getattr(bpy.context, "window_manager", None)
    for window in (wm.windows if wm is not None else []):
        for area in window.screen.areas:
            if area.type == "PREFERENCES":
                area.tag_redraw()

