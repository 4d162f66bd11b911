"""Learned monocular depth, loaded from a local Hugging Face folder through transformers' own classes.

A folder in the Hugging Face layout (``config.json``, ``model.safetensors`` or
a sharded index, ``preprocessor_config.json``) is loaded with
``AutoConfig`` / ``AutoModelForDepthEstimation`` / ``AutoImageProcessor`` and
``local_files_only=True``, so nothing is ever downloaded. Only safetensors are
read: a folder holding only pickle weights is refused with the same message
as the WorldStereo loader (``engine/io/checkpoint_files.py``).

What the network predicts (its *kind*) is read from the folder's config:

==========================  ===============================  ==========================================
``model_type``              kind                             the prediction
==========================  ===============================  ==========================================
``depth_anything``          ``relative-disparity`` or        ``depth_estimation_type`` "relative" (Depth
                            ``metric-depth``                 Anything V1/V2): affine-invariant inverse
                                                             depth; "metric" (V2 Metric): metres.
``dpt``                     ``relative-disparity``           DPT/MiDaS: affine-invariant inverse depth.
``depth_pro``               ``metric-depth``                 metres, made metric with a focal length
                                                             (see below); also a field of view.
``prompt_depth_anything``   ``metric-depth``                 metres, in the units of its prompt depth
                                                             (here: the memory render, in metres);
                                                             ``relative-depth`` when called without one.
``glpn``, ``zoedepth``      ``metric-depth``                 metres.
==========================  ===============================  ==========================================

*relative-disparity* is ``a / z + b`` for unknown ``a > 0`` and ``b`` per image
(scale-and-shift invariant inverse depth); *relative-depth* is ``a z + b``;
*metric-depth* is z-depth in metres (OpenCV camera frame, z forward, along
the optical axis, not ray length). A checkpoint whose config says otherwise
than it was trained (a DPT trained for metres) needs ``kind=``. Alignment to
the memory (:mod:`.depth_alignment`) turns any kind into metres.

Depth Pro predicts a canonical inverse depth and (with its FoV head) a
horizontal field of view; metres follow from a focal length. The focal used,
in order: the camera's own (``intrinsics`` given to :meth:`predict`: a
Blender camera's focal is exact), the model's predicted field of view when
it is physical (between 1 and 179 degrees), else the assumption focal =
image width (a 53 degree horizontal field of view). Transformers'
``post_process_depth_estimation`` does the conversion in every case.
Transformers' Depth Pro image processors need torchvision, which the engine's
extra installs beside its torch (2.14.1 with torchvision 0.29.1); in an
environment set up without it, loading a Depth Pro folder is a one-line error
that says so.

Prompt Depth Anything is prompted by a low-resolution metric depth (a LiDAR's
in the original work). The prompt here is the memory's rendered depth along
the same camera, its holes filled by :class:`~engine.depth.MemoryDepthCompletion`,
because the network normalises the prompt by its own minimum and maximum and
a zero hole would become the scene's near plane. A frame whose render shows
nothing borrows the nearest frame's prompt (neighbouring frames of a
trajectory see a similar depth range); a call in which no frame shows
anything runs unprompted and returns ``relative-depth``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ...bridge.errors import KeyframeWorldsError
from ..io.checkpoint_files import CheckpointError, refuse_pickles
from .depth import DepthEstimate, DepthEstimator, MemoryDepthCompletion
from .render import RenderOutput

RELATIVE_DISPARITY = "relative-disparity"
RELATIVE_DEPTH = "relative-depth"
METRIC_DEPTH = "metric-depth"
KINDS = (RELATIVE_DISPARITY, RELATIVE_DEPTH, METRIC_DEPTH)

#: The kind each transformers depth architecture predicts when its config does not say.
KIND_BY_MODEL_TYPE = {
    "dpt": RELATIVE_DISPARITY,
    "depth_pro": METRIC_DEPTH,
    "prompt_depth_anything": METRIC_DEPTH,
    "glpn": METRIC_DEPTH,
    "zoedepth": METRIC_DEPTH,
}
#: Architectures that take a prompt depth (``prompt_depth`` in the processor and the model).
PROMPTED_MODEL_TYPES = ("prompt_depth_anything",)
#: Depth Pro's focal when neither the camera's nor a physical predicted one is known: focal = width.
ASSUMED_FOV_DEG = math.degrees(2.0 * math.atan(0.5))
#: Predicted fields of view outside this range (degrees) are not physical and are not used.
PHYSICAL_FOV_DEG = (1.0, 179.0)
#: Nearest depth an estimate reports (metres): resampling undershoot can push a metric prediction to 0 or below.
MIN_DEPTH_M = 0.05
#: Confidence :meth:`LearnedDepthEstimator.estimate` gives unaligned metric depth (memory completion's holes: 0.3).
UNALIGNED_CONFIDENCE = 0.3


@dataclass
class DepthPrediction:
    """What a learned depth network predicted for ``T`` frames of ``H x W`` pixels.

    ``values``: (T, H, W) float32 at the frames' own size, in the meaning of
    ``kind`` (see the module docstring); relative predictions may be 0 or
    slightly negative where the network saw no surface (sky) or where the
    resampling back to the frame size undershoots.
    ``kind``: one of :data:`KINDS`.
    ``field_of_view_deg``: (T,) the network's own horizontal field of view
    prediction (Depth Pro with its FoV head), else None.
    ``focal_length_px``: (T,) the focal length the metric depth was computed
    with (Depth Pro), else None.
    ``prompted``: (T,) bool, for prompted networks: the frame's own render was
    its prompt (False: borrowed from a neighbour, or no prompt); else None.
    """

    values: torch.Tensor
    kind: str
    field_of_view_deg: torch.Tensor | None = None
    focal_length_px: torch.Tensor | None = None
    prompted: torch.Tensor | None = None


class DepthPredictor(Protocol):
    """Anything that predicts raw depth for frames: a loaded network, or a synthetic one in tests."""

    def predict(self, rgb: torch.Tensor, rendered: RenderOutput | None = None, *,
                intrinsics: torch.Tensor | None = None) -> DepthPrediction:
        """rgb: (T, H, W, 3) uint8; rendered: the memory along the same cameras (prompted networks);
        intrinsics: (T, 4) ``fx, fy, cx, cy`` in pixels of the frames (Depth Pro's focal)."""


@dataclass(frozen=True)
class LearnedDepthInfo:
    """Where a loaded depth network came from and what it predicts."""

    folder: Path
    model_type: str
    architecture: str  # the transformers model class
    kind: str
    device: str
    dtype: str
    uses_prompt: bool


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the first CUDA device when there is one, else the CPU."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise KeyframeWorldsError(f"unknown device {device!r}: {exc}") from None


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"``: float16 on CUDA (what the depth models' authors run them in), float32 on the CPU
    (half precision is slow there and not supported by every CPU kernel)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise KeyframeWorldsError(f"unknown dtype {dtype!r}; expected auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def detect_kind(config: Any) -> str:
    """The kind of prediction a transformers depth config's network makes (see the module docstring)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "depth_anything":
        estimation = getattr(config, "depth_estimation_type", "relative")
        return METRIC_DEPTH if estimation == "metric" else RELATIVE_DISPARITY
    if model_type in KIND_BY_MODEL_TYPE:
        return KIND_BY_MODEL_TYPE[model_type]
    raise CheckpointError(f"do not know what a {model_type!r} depth model predicts; pass kind= "
                          f"(one of {', '.join(KINDS)})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _depth_model_types() -> tuple[str, ...]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES

    return tuple(MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES)


def read_depth_config(folder: str | os.PathLike) -> Any:
    """The transformers config of a local depth-model folder, after checking the folder.

    Raises :class:`CheckpointError` (one line each) for: a missing folder, no
    ``config.json``, a config transformers cannot read, a model that is not a
    depth estimator, weights in pickle files only, no weights at all.
    """
    import transformers
    from transformers import AutoConfig

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"depth model folder not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"depth model folder {path} has no config.json (expected a Hugging Face model folder)")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{config_file} is not readable JSON: {_first_line(exc)}") from None
    depth_types = _depth_model_types()
    if model_type not in depth_types:
        raise CheckpointError(f"{path} holds a {model_type!r} model, not a depth estimator that transformers "
                              f"{transformers.__version__} loads (model_type one of {', '.join(depth_types)})")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises ValueError, KeyError, TypeError, OSError for bad configs
        raise CheckpointError(f"transformers {transformers.__version__} cannot load the config {config_file}: "
                              f"{_first_line(exc)}") from None
    if not any(path.glob("*.safetensors")):
        refuse_pickles(path, "depth model folder")
        raise CheckpointError(f"no weights in depth model folder {path} (expected model.safetensors)")
    if not (path / "preprocessor_config.json").is_file():
        raise CheckpointError(f"depth model folder {path} has no preprocessor_config.json (the image processor)")
    return config


def load_depth_estimator(folder: str | os.PathLike, *, device: str | torch.device = "auto",
                         dtype: str | torch.dtype = "auto", kind: str | None = None,
                         batch_size: int = 4) -> "LearnedDepthEstimator":
    """Load a learned depth network from a local Hugging Face folder (see the module docstring).

    device: ``"auto"`` (CUDA if present, else the CPU) or a torch device.
    dtype: ``"auto"`` (float16 on CUDA, float32 on the CPU), ``"float32"``,
    ``"float16"``, ``"bfloat16"`` or a torch dtype.
    kind: what the network predicts, when its config does not say it right
    (e.g. a DPT fine-tuned to metres): one of :data:`KINDS`.
    batch_size: frames per forward.
    """
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    if kind is not None and kind not in KINDS:
        raise KeyframeWorldsError(f"unknown depth kind {kind!r}; expected one of {', '.join(KINDS)}")
    if batch_size < 1:
        raise KeyframeWorldsError(f"batch_size must be at least 1, got {batch_size}")
    path = Path(folder).expanduser()
    config = read_depth_config(path)
    kind = kind or detect_kind(config)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        # The slow processors preprocess alike on every machine and, but for Depth Pro's, need no
        # torchvision (an environment set up by hand may lack it).
        processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True, use_fast=False)
    except Exception as exc:
        if isinstance(exc, ImportError) and "torchvision" in str(exc).lower():
            raise CheckpointError(f"the image processor of {path} ({config.model_type}) needs torchvision, which is "
                                  f"not importable here: install the torchvision release built for torch "
                                  f"{torch.__version__}") from None
        raise CheckpointError(f"cannot load the image processor in {path}: {_first_line(exc)}") from None
    # The backbone's weights are in this folder; a config asking for a pretrained backbone would
    # otherwise fetch it by name.
    if getattr(config, "use_pretrained_backbone", False):
        config.use_pretrained_backbone = False
    try:
        model, info = AutoModelForDepthEstimation.from_pretrained(
            str(path), config=config, local_files_only=True, use_safetensors=True, dtype=torch_dtype,
            output_loading_info=True,
        )
    except Exception as exc:  # size mismatches, unreadable safetensors
        raise CheckpointError(f"cannot load the depth model in {path}: {_first_line(exc)}") from None
    # transformers fills missing weights with random ones and only warns; a depth map from random
    # weights looks like a depth map, so refuse instead.
    missing = list(info.get("missing_keys") or [])
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or []]
    if missing or mismatched:
        listed = ", ".join((missing + mismatched)[:10])
        raise CheckpointError(f"the weights in {path} do not cover the {config.model_type} network "
                              f"({len(missing)} missing, {len(mismatched)} mismatched: {listed})")
    model = model.to(device).eval().requires_grad_(False)
    meta = LearnedDepthInfo(
        folder=path, model_type=config.model_type, architecture=type(model).__name__, kind=kind,
        device=str(device), dtype=str(torch_dtype).replace("torch.", ""),
        uses_prompt=config.model_type in PROMPTED_MODEL_TYPES,
    )
    return LearnedDepthEstimator(model, processor, meta, batch_size=batch_size)


def _check_frames(rgb: torch.Tensor) -> tuple[int, int, int]:
    if not isinstance(rgb, torch.Tensor) or rgb.dim() != 4 or rgb.shape[-1] != 3 or rgb.dtype != torch.uint8:
        shape = tuple(rgb.shape) if hasattr(rgb, "shape") else type(rgb).__name__
        raise KeyframeWorldsError(f"depth estimation needs rgb as a (T, H, W, 3) uint8 tensor, got {shape}")
    t, h, w, _ = rgb.shape
    if t == 0:
        raise KeyframeWorldsError("depth estimation got no frames")
    return t, h, w


class LearnedDepthEstimator(DepthEstimator):
    """A transformers depth network with its image processor (make one with :func:`load_depth_estimator`).

    :meth:`predict` gives the raw prediction and its kind, for alignment.
    :meth:`estimate` (the :class:`DepthEstimator` interface) serves metric
    networks only, unaligned, at a low confidence; relative networks need the
    memory to become metres: wrap them in
    :class:`~engine.world.depth_alignment.AlignedLearnedDepth`.
    """

    def __init__(self, model: Any, processor: Any, info: LearnedDepthInfo, batch_size: int = 4):
        self.model = model
        self.processor = processor
        self.info = info
        self.batch_size = batch_size
        self.name = f"learned-{info.model_type}"
        self._completion = MemoryDepthCompletion()
        post = getattr(processor, "post_process_depth_estimation", None)
        self._post_takes_source = post is not None and "source_sizes" in inspect.signature(post).parameters

    @property
    def device(self) -> torch.device:
        return torch.device(self.info.device)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.info.dtype]

    def prompt_depth(self, rgb: torch.Tensor, rendered: RenderOutput) -> tuple[np.ndarray | None, torch.Tensor]:
        """The prompt for each frame, (T, H, W) float32 metres (or None when no frame shows the
        memory), and (T,) bool: the frame's own render made its prompt (see the module docstring)."""
        depth = rendered.depth_z_m.to(torch.float32)
        visible = rendered.mask & torch.isfinite(depth) & (depth > 0)
        own = visible.flatten(1).any(dim=1).cpu()
        if not bool(own.any()):
            return None, own
        dense = self._completion.complete(depth, visible, rgb.to(depth.device)).cpu().numpy().astype(np.float32)
        have = torch.nonzero(own).flatten()
        for t in torch.nonzero(~own).flatten().tolist():
            nearest = int(have[(have - t).abs().argmin()])  # ties go to the earlier frame
            dense[t] = dense[nearest]
        return dense, own

    def _forward(self, frames: list[np.ndarray], prompt: list[np.ndarray] | None, size: tuple[int, int],
                 fov_known: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One batch: predictions at ``size`` (B, H, W), predicted FoV (B,) and focal used (B,)."""
        kwargs: dict[str, Any] = {"images": frames, "return_tensors": "pt"}
        if prompt is not None:
            # Our prompt is in metres; the processor's default assumes millimetres.
            kwargs.update(prompt_depth=prompt, prompt_scale_to_meter=1.0)
        inputs = self.processor(**kwargs)
        inputs = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in inputs.items()}
        with torch.inference_mode():
            outputs = self.model(**inputs)
        batch = len(frames)
        sizes = [size] * batch
        predicted_fov = focal = None
        outputs["predicted_depth"] = outputs.predicted_depth.float()
        if self.info.model_type == "depth_pro":
            raw_fov = outputs.get("field_of_view")
            predicted_fov = raw_fov.float().reshape(batch).cpu() if raw_fov is not None else None
            use = torch.full((batch,), ASSUMED_FOV_DEG)
            if predicted_fov is not None:
                physical = torch.isfinite(predicted_fov) & (predicted_fov > PHYSICAL_FOV_DEG[0]) \
                    & (predicted_fov < PHYSICAL_FOV_DEG[1])
                use = torch.where(physical, predicted_fov, use)
            if fov_known is not None:
                use = fov_known
            outputs["field_of_view"] = use.to(outputs.predicted_depth.device)
        if self._post_takes_source:  # ZoeDepth: the processor's padding is cut away relative to the source size
            results = self.processor.post_process_depth_estimation(outputs, source_sizes=sizes, target_sizes=sizes)
        else:
            results = self.processor.post_process_depth_estimation(outputs, target_sizes=sizes)
        values = torch.stack([r["predicted_depth"].reshape(size).float() for r in results])
        if self.info.model_type == "depth_pro":
            focal = torch.stack([torch.as_tensor(r["focal_length"]).float().reshape(()) for r in results]).cpu()
        return values, predicted_fov, focal

    def predict(self, rgb: torch.Tensor, rendered: RenderOutput | None = None, *,
                intrinsics: torch.Tensor | None = None) -> DepthPrediction:
        """Raw depth for ``rgb`` (T, H, W, 3) uint8 frames, at their own size, on their device.

        rendered: the memory along the same cameras; prompts Prompt Depth
        Anything, ignored by the other networks. intrinsics: (T, 4) ``fx, fy,
        cx, cy`` in pixels of the frames; gives Depth Pro its focal length.
        """
        t, h, w = _check_frames(rgb)
        if intrinsics is not None and tuple(intrinsics.shape) != (t, 4):
            raise KeyframeWorldsError(f"intrinsics must be (T, 4) = ({t}, 4), got {tuple(intrinsics.shape)}")
        if rendered is not None and tuple(rendered.depth_z_m.shape) != (t, h, w):
            raise KeyframeWorldsError(f"the memory render is {tuple(rendered.depth_z_m.shape)}, the frames "
                                      f"({t}, {h}, {w})")
        frames = list(rgb.cpu().numpy())
        prompt, prompted = None, None
        kind = self.info.kind
        if self.info.uses_prompt:
            if rendered is not None:
                prompt, prompted = self.prompt_depth(rgb, rendered)
            else:
                prompted = torch.zeros(t, dtype=torch.bool)
            if prompt is None:
                kind = RELATIVE_DEPTH
        fov_known = None
        if intrinsics is not None:
            fov_known = torch.rad2deg(2.0 * torch.atan(0.5 * w / intrinsics[:, 0].double().cpu())).float()
        values, fovs, focals = [], [], []
        for start in range(0, t, self.batch_size):
            stop = min(start + self.batch_size, t)
            v, fov, focal = self._forward(frames[start:stop], None if prompt is None else list(prompt[start:stop]),
                                          (h, w), None if fov_known is None else fov_known[start:stop])
            values.append(v.to(rgb.device))
            fovs.append(fov)
            focals.append(focal)
        return DepthPrediction(
            values=torch.cat(values),
            kind=kind,
            field_of_view_deg=torch.cat(fovs) if fovs[0] is not None else None,
            focal_length_px=torch.cat(focals) if focals[0] is not None else None,
            prompted=prompted,
        )

    def estimate(self, rgb: torch.Tensor, rendered: RenderOutput | None = None, *, point_confidence: torch.Tensor | None = None,
                 intrinsics: torch.Tensor | None = None) -> DepthEstimate:
        """Unaligned metric depth (T, H, W) in metres, confidence :data:`UNALIGNED_CONFIDENCE`."""
        prediction = self.predict(rgb, rendered, intrinsics=intrinsics)
        if prediction.kind != METRIC_DEPTH:
            raise KeyframeWorldsError(
                f"{self.info.folder} predicts {prediction.kind}, which becomes metres only by alignment to "
                "the memory: use AlignedLearnedDepth(estimator) (engine/world/depth_alignment.py)"
            )
        depth = torch.nan_to_num(prediction.values, nan=MIN_DEPTH_M).clamp_min(MIN_DEPTH_M)
        return DepthEstimate(depth_z_m=depth, confidence=torch.full_like(depth, UNALIGNED_CONFIDENCE))
