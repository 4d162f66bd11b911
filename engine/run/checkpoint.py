"""Segment checkpoints of a running job, so an engine killed mid-job resumes from its last finished segment.

After every segment the runner calls :func:`save`; it writes, inside the
bundle folder::

    .checkpoint/state-<n>.safetensors   the 3D memory and the retrieval history (tensors)
    .checkpoint/state.json              where the run stands, and which tensors file belongs to it

The tensors file gets a new name each time and ``state.json`` is replaced
atomically after it, so a kill at any instant leaves a consistent pair (the
previous one or the new one). Tensors are read back with safetensors only,
never unpickled. The frames, depth maps and meshes of finished segments are
already in the bundle (written atomically); resuming re-reads the PNGs of the
trajectory in progress to feed its video again, so the resumed bundle equals
an uninterrupted run's file for file (for deterministic generators).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ...bridge.atomic import atomic_write
from ...bridge.errors import KeyframeWorldsError
from ...bridge.spec import JobSpec, ResultFrame, ResultMesh, ResultTrajectory, write_json_atomic

CHECKPOINT_DIRNAME = ".checkpoint"
STATE_FILENAME = "state.json"
# 2: frames carry their 4D outputs (a version-1 checkpoint's frames have none, so its job starts over)
CHECKPOINT_VERSION = 2


def spec_digest(spec: JobSpec) -> str:
    """Identifies the job a checkpoint belongs to (a changed spec must start over).

    Paths count by what they name, not where: each reference file by its name and size, each folder (reference
    views, the machine's model folders) by its name. So a job folder moved, or run on another farm worker that
    mounts it elsewhere or keeps its models elsewhere, resumes; a different reference file starts over (a file
    rewritten in place to the very same size is not told apart).
    """
    doc = spec.to_json()
    reference = doc.get("reference", {})
    for key in ("image", "depth", "points", "views"):
        if isinstance(reference.get(key), str):
            reference[key] = _path_identity(reference[key])
    for section, key in (("options", "checkpoint"), ("options", "wan_dir"), ("geometry", "depth_model")):
        values = doc.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str):
            values[key] = _path_identity(values[key])
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _path_identity(path: str) -> list:
    """``[name, size in bytes]`` of a file, ``[name]`` of a folder or of what cannot be read."""
    target = Path(path)
    try:
        return [target.name, target.stat().st_size] if target.is_file() else [target.name]
    except OSError:
        return [target.name]


@dataclass
class RunState:
    """Where a run stands after a segment.

    trajectory: index of the trajectory in progress; next_start: its next segment's first frame index
    (== its length when it is finished but not yet closed); done: frames done over all trajectories;
    global_index: the memory's frame index of the next frame; finished: the closed trajectories' manifest
    entries and meshes; frames / meshes: those of the trajectory in progress.
    """

    trajectory: int
    next_start: int
    done: int
    global_index: int
    finished: list[ResultTrajectory]
    frames: list[ResultFrame]
    meshes: list[ResultMesh]
    finished_meshes: list[ResultMesh]


def _frames_json(frames) -> list:
    return [f.to_json() for f in frames]


def _meshes_json(meshes) -> list:
    return [[m.trajectory, m.frame, m.path, m.texture] for m in meshes]


def _meshes_from(doc) -> list[ResultMesh]:
    return [ResultMesh(a, int(b), c, d) for a, b, c, d in doc]


def _frames_from(doc) -> list[ResultFrame]:
    return [ResultFrame.from_json(f) for f in doc]


def save(out_dir: str | os.PathLike, spec: JobSpec, state: RunState, memory, history) -> None:
    """Write the checkpoint after a segment (see the module docstring)."""
    folder = Path(out_dir) / CHECKPOINT_DIRNAME
    folder.mkdir(exist_ok=True)
    tensors = {
        "memory.positions_world": memory.positions_world.contiguous(),
        "memory.colors": memory.colors.contiguous(),
        "memory.frame_index": memory.frame_index.contiguous(),
        "memory.confidence": memory.confidence.contiguous(),
    }
    candidates = []
    for i, (cand, frame) in enumerate(zip(history.candidates, history.frames)):
        tensors[f"candidate.{i}.c2w"] = cand.c2w_opencv
        tensors[f"candidate.{i}.intrinsics"] = cand.intrinsics
        tensors[f"candidate.{i}.depth"] = cand.depth_z_m
        tensors[f"frame.{i}.rgb"] = frame.rgb
        tensors[f"frame.{i}.depth"] = frame.depth_z_m
        tensors[f"frame.{i}.c2w"] = frame.c2w_opencv
        tensors[f"frame.{i}.intrinsics"] = frame.intrinsics
        candidates.append({"key": list(cand.key), "frame_key": list(frame.key), "width": cand.width, "height": cand.height})
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}  # own storage each
    previous = _read_state(folder)
    number = (previous or {}).get("number", 0) + 1
    name = f"state-{number:06d}.safetensors"
    save_tensors(tensors, folder / name)
    doc = {
        "version": CHECKPOINT_VERSION,
        "spec": spec_digest(spec),
        "number": number,
        "tensors": name,
        "trajectory": state.trajectory,
        "next_start": state.next_start,
        "done": state.done,
        "global_index": state.global_index,
        "memory_generation": memory.stamp[1],
        "candidates": candidates,
        "finished": [{"trajectory": rt.trajectory.name, "video": rt.video, "source_video": rt.source_video,
                      "frames": _frames_json(rt.frames)} for rt in state.finished],
        "frames": _frames_json(state.frames),
        "meshes": _meshes_json(state.meshes),
        "finished_meshes": _meshes_json(state.finished_meshes),
    }
    write_json_atomic(folder / STATE_FILENAME, doc)
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


#: How the Rust side of safetensors words the OS errors it meets (it raises SafetensorError, not OSError).
_OS_ERROR_NUMBER = re.compile(r"\(os error (\d+)\)")


def save_tensors(tensors: dict, path: Path) -> None:
    """``tensors`` as a safetensors file at ``path``, atomically; an OS failure is raised as the OSError it is.

    safetensors writes in Rust and reports a full disk as ``SafetensorError: ... No space left on device
    (os error 28)``; turned back into ``OSError(ENOSPC)`` here, every caller names it as a full disk.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        with atomic_write(path, fsync=True) as tmp:
            save_file(tensors, str(tmp))
    except SafetensorError as exc:
        found = _OS_ERROR_NUMBER.search(str(exc))
        if found is None:
            raise
        number = int(found.group(1))
        raise OSError(number, os.strerror(number), str(path)) from exc


def _read_state(folder: Path) -> dict | None:
    try:
        doc = json.loads((folder / STATE_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("version") == CHECKPOINT_VERSION else None


def describe(out_dir: str | os.PathLike, spec: JobSpec) -> str | None:
    """``"24 of 96 frames done"`` when ``out_dir`` holds a checkpoint of this spec, else None."""
    doc = _read_state(Path(out_dir) / CHECKPOINT_DIRNAME)
    if doc is None or doc.get("spec") != spec_digest(spec):
        return None
    return f"{int(doc.get('done', 0))} of {sum(len(t) for t in spec.run_trajectories())} frames done"


def load(out_dir: str | os.PathLike, spec: JobSpec, memory, history_type, candidate_type, frame_type,
         trajectories: tuple | None = None):
    """The saved run of this spec in ``out_dir``, or None when there is none (or it belongs to another spec).

    Restores into ``memory`` (a fresh PointMemory) and returns (RunState, history). trajectories: the cameras the
    frames were generated for, by name (default ``spec``'s; a job with distorted cameras generates for pinholes).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(out_dir) / CHECKPOINT_DIRNAME
    doc = _read_state(folder)
    if doc is None or doc.get("spec") != spec_digest(spec):
        return None
    try:
        tensors = load_file(str(folder / doc["tensors"]), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise KeyframeWorldsError(f"the job's checkpoint {folder / doc['tensors']} is unreadable ({exc}); delete {folder} to start over") from None
    memory.restore(tensors["memory.positions_world"], tensors["memory.colors"], tensors["memory.frame_index"],
                   tensors["memory.confidence"], int(doc["memory_generation"]))
    candidates, frames = [], []
    for i, c in enumerate(doc["candidates"]):
        candidates.append(candidate_type(tuple(c["key"]), tensors[f"candidate.{i}.c2w"], tensors[f"candidate.{i}.intrinsics"],
                                         int(c["width"]), int(c["height"]), tensors[f"candidate.{i}.depth"]))
        frames.append(frame_type(tuple(c["frame_key"]), tensors[f"frame.{i}.rgb"], tensors[f"frame.{i}.depth"],
                                 tensors[f"frame.{i}.c2w"], tensors[f"frame.{i}.intrinsics"]))
    by_name = {t.name: t for t in (spec.trajectories if trajectories is None else trajectories)}
    # The trajectories as generated; the runner gives each its source lens again when it finishes.
    finished = [ResultTrajectory(by_name[f["trajectory"]], tuple(_frames_from(f["frames"])), f["video"],
                                 source_video=f.get("source_video")) for f in doc["finished"]]
    state = RunState(
        trajectory=int(doc["trajectory"]), next_start=int(doc["next_start"]), done=int(doc["done"]),
        global_index=int(doc["global_index"]), finished=finished, frames=_frames_from(doc["frames"]),
        meshes=_meshes_from(doc["meshes"]), finished_meshes=_meshes_from(doc["finished_meshes"]),
    )
    return state, history_type(candidates, frames)


def replay_video(output, frames: list[ResultFrame]) -> None:
    """Give a resumed trajectory's new video writer the frames written before the interruption (lossless PNGs), and
    its last frame (PNG and npy depth, exact) to the 4D outputs, which that frame gets when the next one arrives."""
    output.replay(frames)


def remove(out_dir: str | os.PathLike) -> None:
    """Delete the checkpoint of a finished run."""
    import shutil

    shutil.rmtree(Path(out_dir) / CHECKPOINT_DIRNAME, ignore_errors=True)
