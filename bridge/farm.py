"""Shots on a render farm: self-contained job folders and the Open Job Description template that runs them.

A job folder (``job.json`` with its reference image and depth beside it, every path relative to the folder,
trajectories inside the spec) runs anywhere with ``keyframe-worlds run JOB_DIR --out BUNDLE``; the models come from
the machine that runs it (``engine/run/machine.py``). :func:`openjd_template` describes a set of such folders as
one Open Job Description job (``jobtemplate-2023-09``, what AWS Deadline Cloud workers run):

- job parameters ``EnginePython`` (the engine environment's Python on the worker), ``ModelDir`` (the worker's model
  folder; empty: the worker's ``$KEYFRAME_WORLDS_WORLDSTEREO_DIR``), ``OutputDir`` (where the bundles go, one
  sub-folder per shot) and ``JobsDir`` (the folder holding the job folders; Deadline's job attachments upload it);
- step ``Generate``: one task per job folder (task parameter ``Shot``, the folder's path inside ``JobsDir``), each
  running ``keyframe-worlds run`` with ``--resume`` (a requeued task continues from its last finished segment) and ``--parents`` (the output root may not exist yet);
- step ``Validate``, after it: ``keyframe-worlds validate`` of each task's bundle.

Stdlib only: the add-on's "Export for farm" writes the template inside Blender.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path, PurePosixPath

from .errors import KeyframeWorldsError, Problem, ValidationError
from .spec import JOB_FILENAME, read_json, validate_job, view_images, write_json_atomic

OPENJD_SPECIFICATION = "jobtemplate-2023-09"
#: The task parameter naming a job folder inside ``JobsDir`` (also the bundle's folder inside ``OutputDir``).
SHOT_PARAMETER = "Shot"
GENERATE_STEP = "Generate"
VALIDATE_STEP = "Validate"
#: How the worker runs the engine's command line (the console script may not be on a worker's PATH; its Python is).
ENGINE_MODULE = "keyframe_worlds.cli"
#: File names a template may have; ``.json`` is written as JSON, the others as YAML.
TEMPLATE_SUFFIXES = (".yaml", ".yml", ".json")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_PLAIN_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
#: Words YAML 1.1 readers (PyYAML) take for booleans or null: never written as a bare key.
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def safe_folder_name(text: str) -> str:
    """A folder name made of letters, digits, ``.``, ``_`` and ``-`` (others become ``_``), never empty or a dot name."""
    name = _SAFE_NAME.sub("_", text).strip("._") or "shot"
    return name


def portability_problems(doc: dict) -> list[Problem]:
    """What ties a (valid) job spec to this machine: an absolute path, or a reference path leaving its folder.

    Models are the running machine's (``--model-dir``, ``--depth-model``, their environment variables), so an
    absolute ``options.checkpoint``/``wan_dir`` or ``geometry.depth_model`` is named too.
    """
    problems = []
    reference = doc.get("reference", {})
    for key in ("image", "depth", "points", "views"):
        value = reference.get(key)
        if isinstance(value, str) and (Path(value).is_absolute() or PurePosixPath(value).is_absolute()
                                       or ".." in PurePosixPath(value.replace("\\", "/")).parts):
            problems.append(Problem(f"reference.{key}", f"{value!r} is outside the job folder: copy the file into it "
                                    "and give its path relative to the folder"))
    model = (doc.get("geometry") or {}).get("depth_model")
    if isinstance(model, str) and Path(model).is_absolute():
        problems.append(Problem("geometry.depth_model", f"{model!r} is a path on this machine: remove it, the machine "
                                "that runs the job supplies its depth model (--depth-model, $KEYFRAME_WORLDS_DEPTH_MODEL)"))
    options = doc.get("options") or {}
    for key in ("checkpoint", "wan_dir"):
        value = options.get(key) if isinstance(options, dict) else None
        if isinstance(value, str) and Path(value).is_absolute():
            problems.append(Problem(f"options.{key}", f"{value!r} is a path on this machine: remove it, the machine that "
                                    "runs the job supplies its model folder (--model-dir, $KEYFRAME_WORLDS_WORLDSTEREO_DIR)"))
    return problems


def _views_outside(folder: Path, doc: dict) -> list[Problem]:
    """``reference.views`` images (of a valid spec) that lie outside the job folder, links followed."""
    views = doc.get("reference", {}).get("views")
    if not isinstance(views, str) or portability_problems({"reference": {"views": views}}):
        return []
    root = folder.resolve()
    outside = [path for _traj, _i, path in view_images(folder / views) if not path.resolve().is_relative_to(root)]
    if not outside:
        return []
    return [Problem("reference.views", f"{len(outside)} of its images lie outside the job folder (the first: "
                    f"{outside[0]}): copy them into it")]


def check_job_folder(folder: str | os.PathLike) -> dict:
    """The job spec of a self-contained job folder, checked (valid, files present, nothing outside the folder);
    raises :class:`ValidationError` naming the folder and every problem."""
    folder = Path(folder)
    path = folder / JOB_FILENAME
    if not path.is_file():
        raise KeyframeWorldsError(f"{folder}: not a job folder (no {JOB_FILENAME})")
    doc = read_json(path, "job spec")
    problems = validate_job(doc, base_dir=folder, check_files=True)
    if not problems:
        problems = portability_problems(doc) + _views_outside(folder, doc)
    if problems:
        raise ValidationError(f"job folder {folder}", problems)
    return doc


def openjd_template(job_dirs: list[str | os.PathLike], template_dir: str | os.PathLike, name: str | None = None,
                    engine_python: str | None = None, output_dir: str | None = None, gpu: bool | None = None) -> dict:
    """The Open Job Description job template (a dict, as JSON/YAML would hold it) running ``job_dirs``.

    Every folder is checked (:func:`check_job_folder`). ``JobsDir`` is their deepest common folder, by default (when
    it lies inside ``template_dir``, the folder the template is written to) relative to the template, so template
    and job folders move together; each task's ``Shot`` is a folder's POSIX path inside it. ``engine_python`` / ``output_dir``: defaults of those
    parameters (None: the submitter must give them). ``gpu``: ask the farm for a GPU per Generate task (None:
    when any job uses the ``worldstereo`` generator).
    """
    if not job_dirs:
        raise KeyframeWorldsError("give at least one job folder")
    folders = [Path(d).resolve() for d in job_dirs]
    docs = [check_job_folder(folder) for folder in folders]
    if len(set(folders)) != len(folders):
        raise KeyframeWorldsError("a job folder is given twice")
    root = Path(os.path.commonpath([str(f) for f in folders])) if len(folders) > 1 else folders[0].parent
    shots = [f.relative_to(root).as_posix() for f in folders]
    # Open Job Description joins a relative PATH default to the template's folder and refuses one that walks up
    # out of it, so JobsDir has a default only when the job folders lie inside the template's folder.
    template_dir = Path(template_dir).resolve()
    jobs_default = root.relative_to(template_dir).as_posix() if root.is_relative_to(template_dir) else None
    if gpu is None:
        gpu = any(doc.get("generator") == "worldstereo" for doc in docs)

    def path_parameter(key: str, kind: str, flow: str, description: str, default: str | None) -> dict:
        parameter = {"name": key, "type": "PATH", "objectType": kind, "dataFlow": flow, "description": description}
        if default is not None:
            parameter["default"] = default
        return parameter

    python = "{{Param.EnginePython}}"
    shot_space = {"taskParameterDefinitions": [{"name": SHOT_PARAMETER, "type": "STRING", "range": shots}]}
    bundle = "{{Param.OutputDir}}/{{Task.Param.%s}}" % SHOT_PARAMETER
    generate = {
        "name": GENERATE_STEP,
        "description": "Run one job folder with keyframe-worlds run; a requeued task resumes from its last finished segment",
        "parameterSpace": shot_space,
        "script": {"actions": {"onRun": {"command": python, "args": [
            "-m", ENGINE_MODULE, "run", "{{Param.JobsDir}}/{{Task.Param.%s}}" % SHOT_PARAMETER, "--out", bundle,
            "--model-dir", "{{Param.ModelDir}}", "--resume", "--parents", "--quiet"]}}},
    }
    if gpu:
        generate["hostRequirements"] = {"amounts": [{"name": "amount.worker.gpu", "min": 1}]}
    validate = {
        "name": VALIDATE_STEP,
        "description": "Check each bundle's manifest and files with keyframe-worlds validate",
        "dependencies": [{"dependsOn": GENERATE_STEP}],
        "parameterSpace": json.loads(json.dumps(shot_space)),
        "script": {"actions": {"onRun": {"command": python, "args": ["-m", ENGINE_MODULE, "validate", bundle]}}},
    }
    return {
        "specificationVersion": OPENJD_SPECIFICATION,
        "name": name or f"Keyframe Worlds: {root.name or 'shots'}",
        "description": f"{len(shots)} Keyframe Worlds job folder(s): {', '.join(shots)}",
        "parameterDefinitions": [
            path_parameter("EnginePython", "FILE", "NONE", "The Python of the engine's environment on the worker "
                           "(the one with keyframe-worlds and torch installed)", engine_python),
            path_parameter("ModelDir", "DIRECTORY", "NONE", "The worker's model folder (one folder per WorldStereo "
                           "variant, and the Wan2.1 I2V folder); empty: the worker's $KEYFRAME_WORLDS_WORLDSTEREO_DIR", ""),
            path_parameter("OutputDir", "DIRECTORY", "OUT", "Where the result bundles go, one folder per shot", output_dir),
            path_parameter("JobsDir", "DIRECTORY", "IN", "The folder holding the job folders (default: relative to "
                           "this template's folder)", jobs_default),
        ],
        "steps": [generate, validate],
    }


def to_yaml(value, indent: int = 0) -> str:
    """Block-style YAML of JSON data (dicts, lists, strings, numbers, booleans, None).

    Written here because the bridge runs inside Blender, whose Python has no YAML library. Every string is written
    as a JSON string (double quotes, JSON escapes), which YAML reads as the same string, so no value can be taken for
    a number, a boolean or a comment (keys that are plain words go bare); ``openjd check`` and PyYAML read the result in the tests.
    """
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        lines = []
        for key, item in value.items():
            key = str(key)
            plain = _PLAIN_KEY.match(key) and key.lower() not in _YAML_WORDS
            head = f"{pad}{key if plain else json.dumps(key)}:"
            if isinstance(item, (dict, list)) and item:
                lines.append(head + "\n" + to_yaml(item, indent + 2))
            else:
                lines.append(f"{head} {to_yaml(item)}")
        return "\n".join(lines)
    if isinstance(value, list):
        if not value:
            return "[]"
        lines = []
        for item in value:
            if isinstance(item, (dict, list)) and item:
                # The first key (or item) goes on the dash's line, the rest below it at the same indent.
                body = to_yaml(item, indent + 2)
                lines.append(f"{pad}- {body[indent + 2:]}")
            else:
                lines.append(f"{pad}- {to_yaml(item)}")
        return "\n".join(lines)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)  # true, false, null: YAML's own words for them
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return json.dumps(str(value), ensure_ascii=True)


def template_format(path: str | os.PathLike) -> str:
    """``"json"`` or ``"yaml"``, by the template file's name; raises for any other name."""
    suffix = Path(path).suffix.lower()
    if suffix not in TEMPLATE_SUFFIXES:
        raise KeyframeWorldsError(f"{path}: a template file is named .yaml, .yml or .json")
    return "json" if suffix == ".json" else "yaml"


def write_template(template: dict, path: str | os.PathLike) -> Path:
    """Write the template as YAML (``.yaml``, ``.yml``) or JSON (``.json``), atomically."""
    path = Path(path)
    if template_format(path) == "json":
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, template)
    else:
        from .atomic import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        text = "# Open Job Description job template written by keyframe-worlds farm openjd\n" + to_yaml(template) + "\n"
        with atomic_write(path, fsync=True) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return path


# --- keyframe-worlds farm ------------------------------------------------------------------


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    farm = subparsers.add_parser("farm", help="render farm tools: Open Job Description templates for job folders")
    farm_sub = farm.add_subparsers(dest="farm_command", required=True, metavar="COMMAND")
    o = farm_sub.add_parser("openjd", help="write an Open Job Description job template: one task per job folder",
                            description="Write an Open Job Description (jobtemplate-2023-09) template that runs each job "
                            "folder with keyframe-worlds run and validates its bundle (what AWS Deadline Cloud runs).")
    o.add_argument("job_dirs", nargs="+", metavar="JOB_DIR", help="self-contained job folders (job.json and its files)")
    o.add_argument("--out", required=True, metavar="TEMPLATE.yaml", help="the template to write (.yaml, .yml or .json)")
    o.add_argument("--name", help="the job's name on the farm (default: from the folders' common parent)")
    o.add_argument("--engine-python", help="default of the EnginePython parameter (default: none, the submitter gives it)")
    o.add_argument("--output-dir", help="default of the OutputDir parameter (default: none, the submitter gives it)")
    o.set_defaults(handler=cmd_openjd)


def cmd_openjd(args: argparse.Namespace) -> int:
    from .paths import check_output

    check_output(args.out, "--out", folder=False, create_parents=True)
    template_format(args.out)
    template = openjd_template(args.job_dirs, Path(args.out).absolute().parent, name=args.name, engine_python=args.engine_python, output_dir=args.output_dir)
    write_template(template, args.out)
    shots = template["steps"][0]["parameterSpace"]["taskParameterDefinitions"][0]["range"]
    print(f"wrote {args.out}: {len(shots)} task(s) ({', '.join(shots)}) in steps {GENERATE_STEP} and {VALIDATE_STEP}")
    return 0
