"""This machine's model folders: what a job folder brought from elsewhere runs with here.

A job folder is self-contained (``job.json``, the reference image and depth, every path relative to the folder),
so it can move to another machine (a render farm worker) and run there with ``keyframe-worlds run``. What it does
not carry are the models: the WorldStereo model folder and the learned depth model come from the machine that runs
it. :func:`apply_machine` fills them into a job document before it is validated, so a spec written elsewhere
needs no absolute model path at all, and a stale one is replaced when the machine says so.

Precedence, highest first (README "Render farms"):

- model folder (one sub-folder per WorldStereo variant, optionally the Wan2.1 I2V diffusers folder):
  ``--model-dir``, which replaces the spec's ``options.checkpoint`` and ``options.wan_dir``; then the spec's own
  ``options.checkpoint``/``wan_dir``; then ``$KEYFRAME_WORLDS_WORLDSTEREO_DIR`` (the generator's own fallback).
- depth model: ``--depth-model``, which replaces the spec's ``geometry.depth_model``; then the spec's own; then
  ``$KEYFRAME_WORLDS_DEPTH_MODEL``; else none.

No torch here: ``run`` resolves and validates before it imports anything heavy.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ...bridge.errors import KeyframeWorldsError
from ...bridge.paths import wan_folder_in
from ..generators.options import CHECKPOINT_ROOT_ENV, DEFAULT_VARIANT

#: This machine's model folder (one folder per WorldStereo variant): the generator's own variable, one name for it.
MODEL_DIR_ENV = CHECKPOINT_ROOT_ENV
#: This machine's learned depth model (a local Hugging Face folder), used by jobs that name none.
DEPTH_MODEL_ENV = "KEYFRAME_WORLDS_DEPTH_MODEL"


@dataclass(frozen=True)
class MachineModels:
    """The model folders of this machine. ``*_forced``: given on the command line, so they replace the spec's."""

    model_dir: Path | None = None
    model_dir_forced: bool = False
    depth_model: Path | None = None
    depth_model_forced: bool = False

    @classmethod
    def configure(cls, model_dir: str | None = None, depth_model: str | None = None,
                  environ: Mapping[str, str] | None = None) -> "MachineModels":
        """From the command line's flags, else the environment; a configured folder that is missing is an error."""
        env = os.environ if environ is None else environ
        found: dict = {}
        for key, flag, variable in (("model_dir", model_dir, MODEL_DIR_ENV), ("depth_model", depth_model, DEPTH_MODEL_ENV)):
            text, source = (flag, f"--{key.replace('_', '-')}") if flag else (env.get(variable) or None, f"${variable}")
            if text is None:
                found[key], found[f"{key}_forced"] = None, False
                continue
            folder = Path(text).expanduser().resolve()
            if not folder.is_dir():
                raise KeyframeWorldsError(f"{source}: folder not found: {folder}")
            found[key], found[f"{key}_forced"] = folder, bool(flag)
        return cls(**found)


def apply_machine(doc: dict, machine: MachineModels) -> tuple[dict, list[str]]:
    """The job document with this machine's model folders filled in, and one line per change made (for the log).

    ``doc`` is not changed; one that is not a job object comes back as it is (the validator names what is wrong).
    """
    if not isinstance(doc, dict):
        return doc, []
    doc, notes = copy.deepcopy(doc), []
    options = doc.get("options")
    if doc.get("generator") == "worldstereo" and isinstance(options, dict) and machine.model_dir is not None:
        variant = options.get("variant") if isinstance(options.get("variant"), str) else DEFAULT_VARIANT
        if machine.model_dir_forced or "checkpoint" not in options:
            options["checkpoint"] = str(machine.model_dir / variant)
            notes.append(f"model folder: {options['checkpoint']}")
        stale = isinstance(options.get("wan_dir"), str) and not Path(options["wan_dir"]).expanduser().is_dir()
        if machine.model_dir_forced or "wan_dir" not in options or stale:
            wan = wan_folder_in(machine.model_dir)
            if wan is not None:
                options["wan_dir"] = str(wan)
                notes.append(f"Wan2.1 folder: {wan}")
            elif stale or machine.model_dir_forced:
                # A folder baked in elsewhere: the variant's base_model (or $KEYFRAME_WORLDS_WAN_I2V_DIR) finds it here.
                options.pop("wan_dir", None)
    geometry = doc.get("geometry") if isinstance(doc.get("geometry"), dict) else None
    named = geometry is not None and geometry.get("depth_model") is not None
    if machine.depth_model is not None and (machine.depth_model_forced or not named):
        if geometry is None:
            if "geometry" in doc:  # not an object: left for the validator to name
                return doc, notes
            geometry = doc["geometry"] = {}
        geometry["depth_model"] = str(machine.depth_model)
        notes.append(f"depth model: {machine.depth_model}")
    return doc, notes
