"""``keyframe-worlds run`` (a job offline, resumable) and ``keyframe-worlds validate`` (a job or a bundle).

``validate`` lives with the engine because it also runs each generator's own
option check (``engine/generators/options.py``); neither it nor that check
imports torch, so it stays fast and works without the engine's dependencies.
Torch is imported inside ``run``'s handler. Under ``torchrun --nproc_per_node N`` ``run`` splits the
worldstereo transformer across the N processes; rank 0 runs the job and writes every file
(``engine/models/sequence_parallel.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_machine_arguments(p: argparse.ArgumentParser, whose: str, default: str) -> None:
    """``--depth-model`` and ``--model-dir``: this machine's models (``machine.MachineModels``), for ``run`` and ``serve``.
    whose / default: how the help names the spec they replace ("this job's", "the job's")."""
    p.add_argument("--depth-model", metavar="DIR",
                   help=f"a depth network's local Hugging Face folder, replacing {whose} geometry.depth_model "
                   f"(default: {default}, else $KEYFRAME_WORLDS_DEPTH_MODEL)")
    p.add_argument("--model-dir", metavar="DIR",
                   help="this machine's model folder (one folder per WorldStereo variant, and the Wan2.1 I2V folder), "
                   f"replacing {whose} options.checkpoint and wan_dir (default: {default}, else $KEYFRAME_WORLDS_WORLDSTEREO_DIR)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("validate", help="check a job spec (or result manifest) and print every problem")
    p.add_argument("path", help="job.json or a job folder holding one, or a result bundle folder / manifest.json")
    p.add_argument("--no-files", action="store_true", help="do not check that referenced files and folders exist")
    p.add_argument("--json", action="store_true", help="print the problems as JSON")
    p.set_defaults(handler=cmd_validate)

    p = subparsers.add_parser("run", help="run a job offline and write the result bundle",
                              description="Run a job offline. A checkpoint is written after every segment; "
                              "an interrupted run continues with --resume, equal to an uninterrupted one file for file.")
    p.add_argument("job", help="job spec (job.json), or a job folder holding one; relative paths in it are relative to its folder")
    p.add_argument("--out", required=True, help="bundle folder to write (created; an old manifest in it is removed first)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run of this job that --out holds, from its last finished segment")
    p.add_argument("--parents", action="store_true",
                   help="create the missing folders above --out (a farm's output root); without it a missing parent "
                   "is refused, as a mistyped path usually is")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda, cuda:1 ...")
    add_machine_arguments(p, "this job's", "the job's")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_run)


def job_problems(doc, base_dir: Path, check_files: bool = True) -> list:
    """Every problem of a job spec: the bridge's validator, then the generator's own option check."""
    from ...bridge.spec import validate_job
    from ..generators.options import check_options

    problems = validate_job(doc, base_dir=base_dir, check_files=check_files)
    if check_files and isinstance(doc, dict) and isinstance(doc.get("reference"), dict) \
            and not any(p.path.startswith("reference") or not p.path for p in problems):
        # The headers passed: now the content, decoded in full, as the run will read it.
        from ..io.inputs import reference_problems

        ref = doc["reference"]
        problems += reference_problems(base_dir / ref["image"], base_dir / ref["depth"] if ref.get("depth") else None)
    if isinstance(doc, dict) and isinstance(doc.get("generator"), str):
        reported = {p.path for p in problems}
        problems += [p for p in check_options(doc["generator"], doc.get("options", {}), check_paths=check_files)
                     if p.path not in reported]
    return problems


def cmd_validate(args: argparse.Namespace) -> int:
    from ...bridge.spec import JOB_FILENAME, MANIFEST_FILENAME, read_json, validate_manifest

    path = Path(args.path)
    if path.is_dir():
        # A bundle folder holds manifest.json; a job folder (what the add-on writes) holds job.json.
        path = path / (MANIFEST_FILENAME if (path / MANIFEST_FILENAME).exists() or not (path / JOB_FILENAME).exists()
                       else JOB_FILENAME)
    doc = read_json(path, "document")
    is_manifest = path.name == MANIFEST_FILENAME or (isinstance(doc, dict) and "job" in doc and "generator_label" in doc)
    if is_manifest:
        what = "result manifest"
        problems = validate_manifest(doc, None if args.no_files else path.parent)
    else:
        what = "job spec"
        problems = job_problems(doc, path.parent, check_files=not args.no_files)
    if args.json:
        print(json.dumps({"what": what, "valid": not problems, "problems": [p.to_json() for p in problems]}, indent=1))
    elif problems:
        print(f"{path}: {what} has {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
    else:
        print(f"{path}: valid {what}")
    return 1 if problems else 0


def load_job_here(path: str | Path, machine) -> tuple:
    """``(spec, notes)``: a job spec file (or a job folder's ``job.json``) with this machine's model folders filled
    in (``machine.apply_machine``; ``notes`` says what it filled), validated and resolved against its folder. One
    problem is one line."""
    from ...bridge.errors import KeyframeWorldsError, ValidationError
    from ...bridge.spec import JOB_FILENAME, JobSpec, read_json
    from .machine import apply_machine

    path = Path(path)
    if path.is_dir():
        path = path / JOB_FILENAME
    doc, notes = apply_machine(read_json(path, "job spec"), machine)
    try:
        return JobSpec.from_json(doc, base_dir=path.parent).resolve(path.parent), notes
    except ValidationError as exc:
        if len(exc.problems) != 1:
            raise ValidationError(f"job spec {path}", exc.problems) from None
        raise KeyframeWorldsError(f"job spec {path}: {exc.problems[0]}") from None  # one problem, one line


def cmd_run(args: argparse.Namespace) -> int:
    from ...bridge.errors import KeyframeWorldsError, ValidationError
    from ...bridge.paths import check_output
    from ..generators.options import check_options
    from .machine import MachineModels

    check_output(args.out, "--out", folder=True, create_parents=args.parents)
    spec, notes = load_job_here(args.job, MachineModels.configure(args.model_dir, args.depth_model))
    for note in notes:  # which of this machine's models the job got: worth a line in any log, quiet or not
        print(f"keyframe-worlds: this machine's {note}", file=sys.stderr)
    problems = check_options(spec.generator, spec.options)
    if problems:
        raise ValidationError(f"job spec {args.job}", problems)
    from ..models.sequence_parallel import launched_world_size, run_command

    if launched_world_size() > 1 and spec.generator != "worldstereo":
        raise KeyframeWorldsError(f"torchrun splits the worldstereo generator's transformer across processes; the "
                                  f"{spec.generator} generator has none: run this job with one process")

    def load_transformer(group):
        # the transformer alone, as WorldStereoPipeline.from_pretrained loads it (no text/image encoder, no VAE)
        import torch

        from ..generators.options import parse_worldstereo_options
        from ..models.weights import load_worldstereo

        opts = parse_worldstereo_options(spec.options)
        return load_worldstereo(opts.checkpoint, opts.wan_dir, device=group.device,
                                dtype=None if opts.dtype == "auto" else getattr(torch, opts.dtype),
                                expect_variant=opts.variant, offload=opts.offload)

    # Under torchrun rank 0 runs the job and writes every file; the others serve its transformer forwards.
    return run_command(args.device, lambda group: _run(args, spec, group), load_transformer)


def _run(args: argparse.Namespace, spec, group) -> int:
    import torch

    from ...bridge.errors import KeyframeWorldsError
    from ...bridge.jobs import Progress, TerminalProgress
    from . import checkpoint
    from .runner import run_job

    device = str(group.device) if group is not None else args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise KeyframeWorldsError(f"--device: {exc}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KeyframeWorldsError("--device cuda: no CUDA device is available to this torch build")
    saved = checkpoint.describe(args.out, spec)
    if saved is not None and not args.resume:
        raise KeyframeWorldsError(f"{args.out} holds an interrupted run of this job ({saved}): pass --resume to "
                                  "continue it, or choose another --out (or delete the folder) to start over")
    if args.resume and saved is None:
        print(f"keyframe-worlds: {args.out} holds no interrupted run of this job: starting from the beginning",
              file=sys.stderr)
    progress = Progress() if args.quiet else TerminalProgress()
    try:
        manifest = run_job(spec, args.out, progress=progress, device=device, resume=args.resume)
    except OSError as exc:  # a full disk, a folder it may not write: one line that says so
        from ...bridge.paths import failure_message

        raise KeyframeWorldsError(failure_message(exc, Path(args.out))) from None
    frames = sum(len(t.frames) for t in manifest.trajectories)
    print(f"wrote {args.out}: {frames} frame(s) from {len(manifest.trajectories)} camera(s), "
          f"{manifest.point_count} points, {len(manifest.meshes)} mesh(es); {manifest.generator_label}")
    return 0
