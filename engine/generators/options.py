"""Job options of each generator, checked without loading anything (no torch: ``validate`` stays fast).

:func:`check_options` returns every problem with its field path
(``options.<name>``); the service runs it before a job is queued and
``keyframe-worlds validate`` runs it on a job file. The generators parse their
options through the same functions, so what passes here is what they accept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ...bridge.errors import Problem, ValidationError
from ..models.names import ATTENTION_BACKENDS, CLIP_PIXELS, DEFAULT_ATTENTION_BACKEND, MEMORY_DMD_VARIANT, VARIANTS
from ..models.offload import OFFLOAD_MODES, WEIGHTS_STORAGES

DEFAULT_VARIANT = MEMORY_DMD_VARIANT
#: Folder holding one sub-folder per variant (named as the variant), used when ``checkpoint`` is not given.
CHECKPOINT_ROOT_ENV = "KEYFRAME_WORLDS_WORLDSTEREO_DIR"
DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_SIZE = 2048
RUNNER_OPTIONS = {"reference_depth_m"}  # read by the job runner, not by the generator


@dataclass(frozen=True)
class WorldStereoOptions:
    """The job options of the ``worldstereo`` generator, checked (see :func:`parse_worldstereo_options`)."""

    checkpoint: Path
    variant: str | None = None
    wan_dir: Path | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    offload: str = "none"
    device: str = "auto"
    dtype: str = "auto"
    size: tuple[int, int] | None = None
    keyframes: int = 21
    keyframe_stride: int = 4
    clip_pixels: str | None = None
    attention: str = DEFAULT_ATTENTION_BACKEND
    weights_storage: str = "compute"
    batched_guidance: bool | None = None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_worldstereo_options(options: dict, environ=None, check_paths: bool = True) -> WorldStereoOptions:
    """Check every option and return them typed; raises :class:`ValidationError` with every problem
    (field paths ``options.<name>``).

    Cheap (no model is loaded), so a service can check a job before queueing it. With ``check_paths``
    the checkpoint folder must hold a ``config.json`` and ``wan_dir``, when given, must be a folder.
    """
    env = os.environ if environ is None else environ
    allowed = {f for f in WorldStereoOptions.__dataclass_fields__}
    problems = _unknown(options, allowed, "worldstereo")
    variant = options.get("variant")
    if variant is not None and variant not in VARIANTS:
        problems.append(Problem("options.variant", f"must be one of {', '.join(VARIANTS)}, got {variant!r}"))
    checkpoint = options.get("checkpoint")
    if checkpoint is not None and (not isinstance(checkpoint, str) or not checkpoint):
        problems.append(Problem("options.checkpoint", "must be the path of a WorldStereo variant folder"))
    elif checkpoint is None:
        root = env.get(CHECKPOINT_ROOT_ENV)
        if not root:
            problems.append(Problem("options.checkpoint", f"the WorldStereo variant folder (config.json + model.safetensors) "
                            f"is needed, or set ${CHECKPOINT_ROOT_ENV} to a folder holding one folder per variant"))
        else:
            checkpoint = str(Path(root) / (variant or DEFAULT_VARIANT))
    wan_dir = options.get("wan_dir")
    if wan_dir is not None and (not isinstance(wan_dir, str) or not wan_dir):
        problems.append(Problem("options.wan_dir", "must be the path of a Wan2.1 image-to-video diffusers folder"))
    steps = options.get("steps")
    if steps is not None and (not _is_int(steps) or not 1 <= steps <= 1000):
        problems.append(Problem("options.steps", "must be an integer from 1 to 1000"))
    guidance = options.get("guidance_scale")
    if guidance is not None and (not isinstance(guidance, (int, float)) or isinstance(guidance, bool)
                                 or not 0 <= guidance <= 100):
        problems.append(Problem("options.guidance_scale", "must be a number from 0 to 100 (1 or less: no guidance)"))
    negative = options.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        problems.append(Problem("options.negative_prompt", "must be a string"))
    offload = options.get("offload", "none")
    if offload not in OFFLOAD_MODES:
        problems.append(Problem("options.offload", f"must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}"))
    device = options.get("device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or
                                           (device.startswith("cuda:") and device[5:].isdigit())):
        problems.append(Problem("options.device", f"must be auto, cpu, cuda or cuda:N, got {device!r}"))
    dtype = options.get("dtype", "auto")
    if dtype not in DTYPES:
        problems.append(Problem("options.dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}"))
    size = options.get("size")
    if size is not None:
        if (not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int(v) for v in size)
                or not all(16 <= v <= MAX_SIZE and v % 16 == 0 for v in size)):
            problems.append(Problem("options.size", f"must be [height, width], multiples of 16 from 16 to {MAX_SIZE}, got {size!r}"))
        else:
            size = (int(size[0]), int(size[1]))
    keyframes = options.get("keyframes", 21)
    if not _is_int(keyframes) or not 2 <= keyframes <= 81:
        problems.append(Problem("options.keyframes", "must be an integer from 2 to 81 (the released models use 21)"))
    stride = options.get("keyframe_stride", 4)
    if not _is_int(stride) or not 1 <= stride <= 16:
        problems.append(Problem("options.keyframe_stride", "must be an integer from 1 to 16 (the released models use 4)"))
    clip_pixels = options.get("clip_pixels")
    if clip_pixels is not None and clip_pixels not in CLIP_PIXELS:
        problems.append(Problem("options.clip_pixels", f"must be one of {', '.join(CLIP_PIXELS)} (uint8: as the released "
                        f"inference scripts feed CLIP), got {clip_pixels!r}"))
    attention = options.get("attention", DEFAULT_ATTENTION_BACKEND)
    if attention not in ATTENTION_BACKENDS:
        problems.append(Problem("options.attention", f"must be one of {', '.join(ATTENTION_BACKENDS)} (native: PyTorch's "
                        f"SDPA; the others need a CUDA GPU, and flash/sage their package), got {attention!r}"))
    storage = options.get("weights_storage", "compute")
    if storage not in WEIGHTS_STORAGES:
        problems.append(Problem("options.weights_storage", f"must be one of {', '.join(WEIGHTS_STORAGES)} (float8: the "
                        f"transformer's block weights stored as float8, computed in the dtype), got {storage!r}"))
    batched = options.get("batched_guidance")
    if batched is not None and not isinstance(batched, bool):
        problems.append(Problem("options.batched_guidance", f"must be true, false or absent (absent: batched when it "
                        f"fits), got {batched!r}"))
    if check_paths and not problems:
        folder = Path(checkpoint).expanduser()
        if not (folder / "config.json").is_file():
            problems.append(Problem("options.checkpoint", f"{folder} is not a WorldStereo variant folder (no config.json)"))
        if wan_dir and not Path(wan_dir).expanduser().is_dir():
            problems.append(Problem("options.wan_dir", f"folder not found: {wan_dir}"))
    if problems:
        raise ValidationError("worldstereo options", problems)
    return WorldStereoOptions(checkpoint=Path(checkpoint).expanduser(), variant=variant,
                              wan_dir=Path(wan_dir).expanduser() if wan_dir else None, steps=steps,
                              guidance_scale=None if guidance is None else float(guidance), negative_prompt=negative,
                              offload=offload, device=device, dtype=dtype, size=size, keyframes=keyframes,
                              keyframe_stride=stride, clip_pixels=clip_pixels, attention=attention,
                              weights_storage=storage, batched_guidance=batched)


def _unknown(options: Mapping, allowed: set[str], generator: str) -> list[Problem]:
    """One problem per option the generator (and the runner) does not know."""
    known = ", ".join(sorted(allowed | RUNNER_OPTIONS))
    return [Problem(f"options.{name}", f"unknown option of the {generator} generator; known: {known}")
            for name in sorted(set(options) - allowed - RUNNER_OPTIONS, key=str)]


def _runner_problems(options: Mapping) -> list[Problem]:
    depth = options.get("reference_depth_m")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 < depth < 1e6):
        return [Problem("options.reference_depth_m", "must be a positive number of metres")]
    return []


#: The preview generator's options and their defaults.
PREVIEW_DEFAULTS = {"segment_length": 16, "temporal": True, "depth_sigma": 0.05}


def parse_preview_options(options: Mapping) -> dict:
    """The ``preview`` generator's keyword arguments; raises :class:`ValidationError` with every problem."""
    problems = _unknown(options, set(PREVIEW_DEFAULTS), "preview")
    kwargs = {k: options[k] for k in PREVIEW_DEFAULTS if k in options}
    length = kwargs.get("segment_length", 16)
    if not _is_int(length) or not 1 <= length <= 1024:
        problems.append(Problem("options.segment_length", "must be an integer from 1 to 1024"))
    sigma = kwargs.get("depth_sigma", 0.05)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma <= 10:
        problems.append(Problem("options.depth_sigma", f"must be a positive number of at most 10 (a relative depth spread), got {sigma!r}"))
    if not isinstance(kwargs.get("temporal", True), bool):
        problems.append(Problem("options.temporal", "must be true or false"))
    if problems:
        raise ValidationError("preview options", problems)
    return kwargs


def check_options(generator: str, options: Mapping, environ: Mapping[str, str] | None = None,
                  check_paths: bool = True) -> list[Problem]:
    """Every problem of a job's ``options`` for ``generator`` (empty: fine). Cheap: nothing is loaded.

    An unknown generator gives no problems here (the job spec's validator names it).
    """
    if not isinstance(options, Mapping):
        return [Problem("options", "must be an object")]
    problems = _runner_problems(options)
    try:
        if generator == "preview":
            parse_preview_options(options)
        elif generator == "worldstereo":
            parse_worldstereo_options(options, environ=environ, check_paths=check_paths)
    except ValidationError as exc:
        problems += exc.problems
    return problems
