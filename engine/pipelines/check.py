"""Run a WorldStereo pipeline case and compare every intermediate with the reference pipeline's.

A case folder has the layout of the shared pipeline goldens (``fixtures/worldstereo/pipeline/<case>/``):

- ``config.json`` and ``model.safetensors`` (and ``transformer_config.json`` when the weights hold every
  key): a variant folder, read by ``load_worldstereo``;
- ``inputs.safetensors``: the call's tensors (:data:`INPUTS`, :data:`MEMORY_INPUTS`; names starting with
  ``aux.`` are descriptions and are not read). ``noise_latents`` is the initial noise, so no seed is needed;
- ``case.json``: the call's settings (:data:`CASE_FIELDS`); its other fields describe how the case was
  made and are not read;
- ``outputs.safetensors`` (read only with ``--compare``): the reference intermediates.

:func:`run_case` calls :class:`~.worldstereo.WorldStereoPipeline` once on the inputs and returns its
trace (names and shapes: :data:`~.worldstereo.TRACE_KEYS`) plus ``frames_float``, the reference
pipelines' float output. Every ``diag.<setting>.<key>`` that ``case.json``'s ``diag_keys`` names is
``<key>`` of the same call with one setting changed: ``full_vae`` / ``first_frame_only`` the
``latent_cond_mode``, ``guidance_<g>`` the guidance scale ``g``.

:func:`compare_outputs` gives, per key, the largest absolute difference divided by the reference's
largest magnitude; for pictures (:data:`GREY_LEVELS`: decoded video, float and uint8 frames) the largest
difference in 8-bit grey levels instead. Pictures come after the VAE decoder, which amplifies
differences of its input: at the goldens' tiny size, final latents within 1e-6 of the reference's
decode to frames within ~1e-4 (0.02 grey levels), while the same latents decode bit for bit.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...bridge.errors import KeyframeWorldsError

if TYPE_CHECKING:  # torch stays out of import time for the CLI
    import torch

    from .prep import SegmentConditions

CASE_FILE = "case.json"
INPUTS_FILE = "inputs.safetensors"
OUTPUTS_FILE = "outputs.safetensors"
#: Files a case folder must hold (``transformer_config.json`` is optional: without it the backbone's
#: config comes from the Wan folder, as for a released checkpoint).
CASE_FILES = ("config.json", "model.safetensors", INPUTS_FILE, CASE_FILE)
AUX_PREFIX = "aux."
DIAG_PREFIX = "diag."

#: ``case.json`` fields the run reads, and what each must be.
CASE_FIELDS = {
    "model_type": "the variant: worldstereo-camera, worldstereo-memory or worldstereo-memory-dmd",
    "height": "generation height H in pixels (a multiple of 16)",
    "width": "generation width W in pixels (a multiple of 16)",
    "latent_frames": "keyframes F (= latent frames)",
    "steps": "denoising steps (the distilled variant: its config's dmd_steps)",
    "guidance_scale": "classifier-free guidance scale; guided when > 1",
    "latent_cond_mode": "full_vae or first_frame_only",
    "prompt": "the prompt as given (cleaned by the pipeline)",
    "negative_prompt": "the negative prompt as given (used only when guided)",
}
#: Optional fields: ``ref_index`` (checked against the inputs'), ``diag_keys`` (``{name: description}``).
OPTIONAL_CASE_FIELDS = ("ref_index", "diag_keys")

#: Inputs of every variant: name -> shape (F keyframes, H x W pixels, h x w = H/8 x W/8, C latent channels).
INPUTS = {
    "image_uint8": "[H, W, 3] uint8, the conditioning image",
    "render_video": "[1, 3, F, H, W] in [-1, 1]",
    "render_mask": "[1, 1, F, H, W], 1 = hole",
    "camera_embedding": "[1, 6, F, H, W] Pluecker map",
    "extrinsics": "[F, 4, 4] world-to-camera (OpenCV)",
    "intrinsics": "[F, 3, 3] pixels at H x W",
    "noise_latents": "[1, C, F, h, w] float32, the initial noise",
}
#: Inputs of the memory variants only.
MEMORY_INPUTS = {
    "reference_video": "[1, 3, R, H, W] in [-1, 1]",
    "ref_index": "[R] int64, reference k next to keyframe ref_index[k] + 1",
    "camera_qt": "[1, F, 7]",
    "camera_qt_ref": "[1, R, 7]",
}

#: Keys of a call beside the pipeline's trace.
DERIVED_KEYS = ("frames_float",)
#: Picture keys (also as ``diag.<setting>.<key>``) and 8-bit grey levels per unit of their values; any
#: uint8 tensor counts as a picture at 1 level per unit.
GREY_LEVELS = {"decoded_video": 127.5, "frames_float": 255.0, "frames_uint8": 1.0}
_STEP_KEY = re.compile(r"step\d+\.(latents_in|timestep|noise_pred_cond|noise_pred_uncond|noise_pred|latents_out)")
_GUIDANCE_SETTING = re.compile(r"guidance_(\d+)")


class CaseError(KeyframeWorldsError):
    """A case folder, its files or a reference outputs file is missing or not what it should be."""


@dataclass(frozen=True)
class DiagRun:
    """One extra call of a case: ``setting`` (as in ``diag.<setting>.<key>``) changes ``latent_cond_mode``
    or ``guidance_scale``; ``keys`` are the trace names kept from it."""

    setting: str
    keys: tuple[str, ...]
    latent_cond_mode: str | None = None
    guidance_scale: float | None = None


@dataclass(frozen=True)
class PipelineCase:
    """A parsed case folder (see the module docstring); fields as :data:`CASE_FIELDS`."""

    path: Path
    model_type: str
    height: int
    width: int
    latent_frames: int
    steps: int
    guidance_scale: float
    latent_cond_mode: str
    prompt: str
    negative_prompt: str
    ref_index: tuple[int, ...] | None
    diag: tuple[DiagRun, ...]

    @property
    def is_memory(self) -> bool:
        from ..models.worldstereo import CAMERA_VARIANT

        return self.model_type != CAMERA_VARIANT

    def describe(self) -> str:
        extra = f"; extra calls: {', '.join(d.setting for d in self.diag)}" if self.diag else ""
        return (f"{self.path.name} ({self.model_type}, {self.height}x{self.width}, {self.latent_frames} keyframes, "
                f"{self.steps} steps, guidance {self.guidance_scale:g}, {self.latent_cond_mode}{extra})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _trace_key_known(key: str) -> bool:
    from .worldstereo import TRACE_KEYS

    return (key in TRACE_KEYS and not key.startswith("step{")) or key in DERIVED_KEYS or bool(_STEP_KEY.fullmatch(key))


def _diag_runs(names: list[str], where: Path) -> tuple[DiagRun, ...]:
    from .components import LATENT_COND_MODES

    keys: dict[str, list[str]] = {}
    for name in names:
        setting, _, key = name[len(DIAG_PREFIX):].partition(".") if name.startswith(DIAG_PREFIX) else ("", "", "")
        if not setting or not _trace_key_known(key):
            raise CaseError(f"{where}: diag_keys entry {name!r} is not diag.<setting>.<key> with a pipeline key "
                            f"(e.g. diag.full_vae.condition, diag.guidance_1.final_latents)")
        if setting not in LATENT_COND_MODES and not _GUIDANCE_SETTING.fullmatch(setting):
            raise CaseError(f"{where}: diag_keys entry {name!r}: unknown setting {setting!r} (expected "
                            f"{', '.join(LATENT_COND_MODES)} or guidance_<g>)")
        keys.setdefault(setting, []).append(key)
    runs = []
    for setting, kept in keys.items():
        guidance = _GUIDANCE_SETTING.fullmatch(setting)
        runs.append(DiagRun(setting, tuple(kept), latent_cond_mode=None if guidance else setting,
                            guidance_scale=float(guidance.group(1)) if guidance else None))
    return tuple(runs)


def read_case(case_dir: str | Path) -> PipelineCase:
    """Parse ``case.json`` of a case folder after checking that the folder holds :data:`CASE_FILES`."""
    from ..models.worldstereo import VARIANTS
    from .components import LATENT_COND_MODES
    from .prep import SIZE_MULTIPLE

    folder = Path(case_dir).expanduser()
    if not folder.is_dir():
        raise CaseError(f"case folder not found: {folder}")
    missing = [name for name in CASE_FILES if not (folder / name).is_file()]
    if missing:
        raise CaseError(f"case folder {folder} lacks {', '.join(missing)} (a case holds {', '.join(CASE_FILES)})")
    path = folder / CASE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaseError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CaseError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    absent = [name for name in CASE_FIELDS if name not in raw]
    if absent:
        raise CaseError(f"{path} lacks the field(s) {', '.join(absent)}")

    def bad(name: str, expected: str) -> CaseError:
        return CaseError(f"{path}: field {name!r} must be {expected}, got {raw[name]!r}")

    if raw["model_type"] not in VARIANTS:
        raise bad("model_type", "one of " + ", ".join(VARIANTS))
    for name in ("height", "width"):
        if not _is_int(raw[name]) or raw[name] <= 0 or raw[name] % SIZE_MULTIPLE:
            raise bad(name, f"a positive multiple of {SIZE_MULTIPLE}")
    for name in ("latent_frames", "steps"):
        if not _is_int(raw[name]) or raw[name] < 1:
            raise bad(name, "an integer >= 1")
    g = raw["guidance_scale"]
    if not isinstance(g, (int, float)) or isinstance(g, bool) or not math.isfinite(g) or g < 0:
        raise bad("guidance_scale", "a finite number >= 0")
    if raw["latent_cond_mode"] not in LATENT_COND_MODES:
        raise bad("latent_cond_mode", "one of " + ", ".join(LATENT_COND_MODES))
    for name in ("prompt", "negative_prompt"):
        if not isinstance(raw[name], str):
            raise bad(name, "a string")
    ref_index = raw.get("ref_index")
    if ref_index is not None:
        if not isinstance(ref_index, list) or not all(_is_int(i) for i in ref_index):
            raise bad("ref_index", "a list of integers")
        ref_index = tuple(ref_index)
    diag_keys = raw.get("diag_keys") or {}
    if not isinstance(diag_keys, dict):
        raise bad("diag_keys", "an object {key: description}")
    return PipelineCase(path=folder, model_type=raw["model_type"], height=raw["height"], width=raw["width"],
                        latent_frames=raw["latent_frames"], steps=raw["steps"], guidance_scale=float(g),
                        latent_cond_mode=raw["latent_cond_mode"], prompt=raw["prompt"],
                        negative_prompt=raw["negative_prompt"], ref_index=ref_index,
                        diag=_diag_runs(list(diag_keys), path))


def read_safetensors(path: str | Path, what: str) -> dict[str, "torch.Tensor"]:
    """Every tensor of a safetensors file, with one clear error when it is missing or unreadable."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CaseError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # a malformed header raises one of several types
        raise CaseError(f"{what} {path} is not a readable safetensors file: {exc}") from None


def case_conditions(case: PipelineCase, inputs: dict[str, "torch.Tensor"]) -> "SegmentConditions":
    """The pipeline's conditions from a case's inputs (checked against ``case.json``; the pipeline checks
    the video shapes itself)."""
    import torch

    from .prep import SegmentConditions, uint8_to_video

    where = case.path / INPUTS_FILE
    needed = dict(INPUTS, **(MEMORY_INPUTS if case.is_memory else {}))
    missing = [name for name in needed if name not in inputs]
    if missing:
        raise CaseError(f"{where} lacks {', '.join(missing)} (needed by {case.model_type})")
    stray = [name for name in MEMORY_INPUTS if name in inputs and not case.is_memory]
    if stray:
        raise CaseError(f"{where} holds {', '.join(stray)}, but {case.model_type} takes no reference frames")
    f, h, w = case.latent_frames, case.height, case.width
    image = inputs["image_uint8"]
    if image.dtype != torch.uint8 or tuple(image.shape) != (h, w, 3):
        raise CaseError(f"{where}: image_uint8 must be uint8 [{h}, {w}, 3] (case.json height and width), "
                        f"got {str(image.dtype).replace('torch.', '')} {list(image.shape)}")
    for name, shape in (("extrinsics", (f, 4, 4)), ("intrinsics", (f, 3, 3))):
        if tuple(inputs[name].shape) != shape:
            raise CaseError(f"{where}: {name} must be {list(shape)} (case.json latent_frames {f}), "
                            f"got {list(inputs[name].shape)}")
    floats = {name: inputs[name].float() for name in ("render_video", "render_mask", "camera_embedding")}
    cond = SegmentConditions(image=uint8_to_video(image[None], h, w)[:, :, 0], w2c=inputs["extrinsics"].float(),
                             intrinsics=inputs["intrinsics"].float(), **floats)
    if case.is_memory:
        ref_index = inputs["ref_index"]
        if ref_index.dtype not in (torch.int64, torch.int32):
            raise CaseError(f"{where}: ref_index must be an integer tensor, got {ref_index.dtype}")
        if case.ref_index is not None and tuple(ref_index.tolist()) != case.ref_index:
            raise CaseError(f"{case.path / CASE_FILE}: ref_index {list(case.ref_index)} differs from the inputs' "
                            f"{ref_index.tolist()}")
        cond.reference_video = inputs["reference_video"].float()
        cond.ref_index = ref_index.long()
        cond.camera_qt = inputs["camera_qt"].float()
        cond.camera_qt_ref = inputs["camera_qt_ref"].float()
    return cond


def frames_float(decoded_video: "torch.Tensor") -> "torch.Tensor":
    """The reference pipelines' float output ``[F, 3, H, W]`` in [0, 1] from ``decoded_video`` ``[1, 3, F, H, W]``
    in [-1, 1]: ``(x / 2 + 0.5).clamp(0, 1)``, frames first."""
    return (decoded_video[0] / 2 + 0.5).clamp(0, 1).permute(1, 0, 2, 3).contiguous()


def run_case(case: PipelineCase, wan_dir: str | Path, device: "str | torch.device" = "cpu",
             dtype: "torch.dtype | None" = None, batched_guidance: bool | None = None,
             attention: str = "native") -> dict[str, "torch.Tensor"]:
    """Load the case's variant and the companions of ``wan_dir`` (a Wan2.1 I2V diffusers folder), run the
    case and its ``diag`` calls, and return every output by name (on the CPU; floating point as float32,
    integers and uint8 frames as they are). ``dtype`` defaults to float32, the goldens' precision;
    ``batched_guidance`` and ``attention`` as the pipeline takes them (the reference pipelines call the
    transformer twice per guided step; the batched call must match them within the same tolerance)."""
    import torch

    from .worldstereo import WorldStereoPipeline

    inputs = read_safetensors(case.path / INPUTS_FILE, "inputs file")
    cond = case_conditions(case, inputs)
    wan_dir = Path(wan_dir).expanduser()
    if not wan_dir.is_dir():
        raise CaseError(f"Wan2.1 image-to-video folder not found: {wan_dir}")
    pipe = WorldStereoPipeline.from_pretrained(case.path, wan_dir, device=device, dtype=dtype or torch.float32,
                                               expect_variant=case.model_type, companions_dir=wan_dir,
                                               batched_guidance=batched_guidance, attention=attention)

    def call(latent_cond_mode: str, guidance_scale: float) -> dict[str, torch.Tensor]:
        traced: dict[str, torch.Tensor] = {}

        def keep(name: str, value: torch.Tensor) -> None:
            # a copy: the pipeline may reuse its tensors after handing them over
            value = value.detach().to("cpu", copy=True)
            traced[name] = (value.float() if value.is_floating_point() else value).contiguous()

        pipe(cond, prompt=case.prompt, negative_prompt=case.negative_prompt, steps=case.steps,
             guidance_scale=guidance_scale, latents=inputs["noise_latents"], latent_cond_mode=latent_cond_mode,
             trace=keep)
        traced["frames_float"] = frames_float(traced["decoded_video"])
        return traced

    outputs = call(case.latent_cond_mode, case.guidance_scale)
    for run in case.diag:
        traced = call(run.latent_cond_mode or case.latent_cond_mode,
                      case.guidance_scale if run.guidance_scale is None else run.guidance_scale)
        for key in run.keys:
            if key not in traced:
                raise CaseError(f"{case.path / CASE_FILE}: diag_keys names {DIAG_PREFIX}{run.setting}.{key}, but "
                                f"that call has no {key!r}")
            outputs[f"{DIAG_PREFIX}{run.setting}.{key}"] = traced[key]
    return outputs


@dataclass(frozen=True)
class KeyComparison:
    """One key of :func:`compare_outputs`. ``max_abs`` and ``scale`` (the reference's largest magnitude)
    are in the key's own units; ``error`` is ``max_abs / scale`` (``"relative"``; ``max_abs`` itself where
    the reference is all zeros) or, for pictures, ``max_abs`` in 8-bit grey levels (``"grey levels"``);
    ``inf`` when the key is missing or the shapes differ (``note`` says which)."""

    key: str
    shape: tuple[int, ...]
    max_abs: float
    scale: float
    error: float
    tolerance: float
    unit: str
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance  # False for NaN too


def _base_key(key: str) -> str:
    """``diag.<setting>.<key>`` -> ``<key>``; other keys as they are."""
    return key[len(DIAG_PREFIX):].partition(".")[2] if key.startswith(DIAG_PREFIX) else key


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def compare_outputs(ours: dict[str, "torch.Tensor"], reference: dict[str, "torch.Tensor"], tolerance: float = 1e-5,
                    frame_tolerance: float = 1.0, reference_name: str = "the reference") -> list[KeyComparison]:
    """Compare every key of ``reference`` with ``ours`` (in float64), in natural key order: relative error
    against ``tolerance``, pictures in grey levels against ``frame_tolerance``.

    A key ``ours`` has and ``reference`` lacks is an error (:class:`CaseError`): the comparison would
    silently skip it. A key only ``reference`` has is a failed row ("not produced by this run").
    """
    import torch

    lacking = sorted(set(ours) - set(reference), key=_natural)
    if lacking:
        raise CaseError(f"{reference_name} lacks {len(lacking)} key(s) this run produces: {', '.join(lacking)}")
    rows = []
    for key in sorted(reference, key=_natural):
        expected = reference[key]
        levels = 1.0 if expected.dtype == torch.uint8 else GREY_LEVELS.get(_base_key(key))
        frames = levels is not None
        unit, tol = ("grey levels", frame_tolerance) if frames else ("relative", tolerance)
        shape = tuple(expected.shape)
        if key not in ours:
            rows.append(KeyComparison(key, shape, math.inf, math.nan, math.inf, tol, unit, "not produced by this run"))
            continue
        got = ours[key]
        if tuple(got.shape) != shape:
            rows.append(KeyComparison(key, shape, math.inf, math.nan, math.inf, tol, unit,
                                      f"shape {list(got.shape)}, reference {list(shape)}"))
            continue
        ref64 = expected.to(torch.float64)
        diff = (got.to(torch.float64) - ref64).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        if diff.isnan().any():
            max_abs = math.nan
        scale = float(ref64.abs().max()) if ref64.numel() else 0.0
        error = max_abs * levels if frames else max_abs / scale if scale else max_abs
        rows.append(KeyComparison(key, shape, max_abs, scale, error, tol, unit))
    return rows


def format_comparison(rows: list[KeyComparison]) -> list[str]:
    """The comparison as a table, one line per key (a header line first)."""
    width = max([len(r.key) for r in rows] + [3])
    lines = [f"{'key':<{width}}  {'shape':<20} {'max|diff|':>10} {'scale':>10} {'error':>10} {'tolerance':>9}  verdict"]
    for r in rows:
        verdict = "ok" if r.ok else "MISMATCH"
        unit = " grey levels" if r.unit == "grey levels" else ""
        note = f" ({r.note})" if r.note else ""
        lines.append(f"{r.key:<{width}}  {str(list(r.shape)).replace(' ', ''):<20} {r.max_abs:>10.3e} "
                     f"{r.scale:>10.3e} {r.error:>10.3e} {r.tolerance:>9.1e}  {verdict}{unit}{note}")
    return lines
