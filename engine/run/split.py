"""A job split by trajectory: parts that run at once on several devices, and their bundles fused into one.

Opt-in with the spec's ``execution.split_trajectories`` (``bridge/spec.py`` ``ExecutionOptions``, which says what it
gives up). Part ``k`` is the same job with ``execution.trajectories`` naming only its ``k``-th trajectory, so it runs
from the memory the reference alone gives (:func:`part_document`); the service runs each part on any free worker and
:func:`fuse_parts` then writes the job's one bundle:

- every file of every part (frames, depth, 4D outputs, cameras, video, meshes) as the part wrote it: each camera's
  files are named by its own stem, which are the whole job's stems (:func:`split_problem` refuses a job where they
  would not be);
- the fused cloud: the reference's points (source frame 0) once, from the first part (every part starts from the
  same reference memory), and each part's generated points with their source frame renumbered in the job's order;
  voxel-downsampled to ``output.point_budget`` as a memory is; consistency recomputed from the copied masks;
- the manifest: the cameras in the spec's order, every part's meshes and warnings.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ...bridge import ply
from ...bridge.spec import MANIFEST_FILENAME, JobSpec, ResultManifest, load_manifest
from ..world.memory import PointMemory
from .bundle import BundleWriter, safe_name
from .checkpoint import CHECKPOINT_DIRNAME

#: Where a split job's parts live inside its job folder: ``parts/<k>/`` (spec ``part.json`` beside ``out/``).
PARTS_DIRNAME = "parts"


def split_problem(spec: JobSpec) -> str | None:
    """Why ``spec`` is not split (it then runs whole), or None when its trajectories can run as parts."""
    if not spec.execution.split_trajectories:
        return "execution.split_trajectories is not set"
    names = [t.name for t in spec.run_trajectories()]
    if len(names) < 2:
        return "it has one trajectory"
    taken: set[str] = set()
    whole = [safe_name(n, taken) for n in names]
    if whole != [safe_name(n, set()) for n in names]:
        return "two camera names make the same file name, so the parts' files would collide"
    return None


def part_document(doc: dict, trajectory: str) -> dict:
    """The job document of the part that runs ``trajectory`` alone from the reference's memory."""
    part = copy.deepcopy(doc)
    part["execution"] = {"split_trajectories": False, "trajectories": [trajectory]}
    return part


def _copy_tree(source: Path, target: Path) -> None:
    """The part's files into the job's bundle (hard links where the file system allows: the same bytes, no copy)."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if relative.parts[0] == CHECKPOINT_DIRNAME or relative.as_posix() in (MANIFEST_FILENAME, "points.ply") or not path.is_file():
            continue
        destination = target / relative
        if destination.exists():
            destination.unlink()
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copyfile(path, destination)


def fuse_parts(spec: JobSpec, part_bundles: list[Path], out_dir: str | Path) -> ResultManifest:
    """Fuse the parts' bundles (one per trajectory of ``spec.run_trajectories()``, in that order) into ``out_dir``."""
    out_dir = Path(out_dir)
    manifests = [load_manifest(p) for p in part_bundles]
    first = manifests[0]
    bundle = BundleWriter(out_dir, spec.name, first.generator, first.generator_label, spec.seed, flow="none")
    memory = PointMemory("cpu", max_points=spec.output.point_budget)
    offset = 0
    warnings: list[str] = []
    for k, (part, manifest) in enumerate(zip(part_bundles, manifests)):
        _copy_tree(part, out_dir)
        bundle.trajectories.extend(manifest.trajectories)
        bundle.meshes.extend(manifest.meshes)
        warnings.extend(w for w in manifest.warnings if w not in warnings)
        cloud = ply.read_ply(part / manifest.point_cloud).vertex
        frame = cloud["frame"].astype(np.int64)
        keep = frame > 0 if k else np.ones(len(frame), bool)  # the shared reference's points once
        frame = np.where(frame > 0, frame + offset, 0)[keep]
        positions = np.stack([cloud[a] for a in ("x", "y", "z")], -1)[keep]
        colors = np.stack([cloud[c] for c in ("red", "green", "blue")], -1)[keep]
        memory.add_points(torch.from_numpy(np.ascontiguousarray(positions)), torch.from_numpy(np.ascontiguousarray(colors)),
                          torch.from_numpy(frame.astype(np.int32)), torch.from_numpy(cloud["confidence"][keep].copy()))
        offset += sum(len(t.frames) for t in manifest.trajectories)
    memory.enforce_budget()
    bundle.write_point_cloud(memory.positions_world.numpy(), memory.colors.numpy(), memory.confidence.numpy(),
                             memory.frame_index.numpy())
    return bundle.finish(tuple(warnings))
