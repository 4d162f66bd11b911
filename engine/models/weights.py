"""Weights of the WorldStereo networks: variant folder + Wan2.1 I2V backbone, safetensors only.

A variant folder holds ``config.json`` (``model_type``, ``base_model``,
``controlnet_cfg``) and ``model.safetensors``. The released files may hold
only the keys that differ from the backbone, so the backbone is loaded first
(``transformer/`` of a Wan2.1 image-to-video diffusers folder), then the
variant's keys on top, and the union must be exactly the network's key set.
A folder that carries its own ``transformer_config.json`` and every key (the
test fixtures) needs no backbone folder.

Where the backbone folder comes from, in order: the ``base_model_dir``
argument; ``ModelPaths.wan_i2v_dir`` (the engine setting); ``base_model`` itself
when it names an existing directory (absolute, or relative to the variant
folder); a folder beside the variant folder named as the repository
(``MODELS/worldstereo-memory`` next to ``MODELS/Wan2.1-I2V-14B-480P-Diffusers``,
as ``model download --dir MODELS`` lays them out); the Hugging Face hub cache,
looked up through ``huggingface_hub`` with ``local_files_only``, when
``base_model`` is a repository id. Nothing is downloaded here
(``keyframe-worlds model download`` does that, ``engine/models/hub.py``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ...bridge.errors import KeyframeWorldsError
from ..io.checkpoint_files import CheckpointError, refuse_pickles

if TYPE_CHECKING:  # torch stays out of import time for the CLI
    import torch

    from .wan_transformer import WanTransformer3DModel, WanTransformerConfig
    from .worldstereo import WorldStereoConfig

VARIANT_CONFIG = "config.json"
VARIANT_WEIGHTS = "model.safetensors"
VARIANT_BACKBONE_CONFIG = "transformer_config.json"
BACKBONE_SUBFOLDER = "transformer"
BACKBONE_WEIGHTS = "diffusion_pytorch_model.safetensors"
BACKBONE_INDEX = "diffusion_pytorch_model.safetensors.index.json"
#: Keys some Wan checkpoints carry that the network has no use for (diffusers ignores them too).
IGNORED_BACKBONE_KEY_PATTERN = re.compile(r"(^|\.)norm_added_q\.")
#: Environment variable for the local Wan2.1 I2V diffusers folder (the engine setting's fallback).
WAN_DIR_ENV = "KEYFRAME_WORLDS_WAN_I2V_DIR"
#: How many keys an error message lists before summarising.
MAX_LISTED_KEYS = 20


class WrongVariantError(CheckpointError):
    """The folder holds another WorldStereo variant than the one asked for or configured."""


class KeyMismatchError(CheckpointError):
    """The weights do not cover the network's parameters exactly; ``missing``/``unexpected``/``mismatched`` list them."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


@dataclass(frozen=True)
class ModelPaths:
    """Where model files live on this machine (the engine settings' model part).

    ``wan_i2v_dir``: a local Wan2.1 image-to-video diffusers folder (with
    ``transformer/``, ``text_encoder/``, ``image_encoder/``, ``vae/``).
    ``hf_cache_dir``: the Hugging Face hub cache to resolve ``base_model`` ids in.
    """

    wan_i2v_dir: Path | None = None
    hf_cache_dir: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ModelPaths":
        env = os.environ if environ is None else environ
        wan = env.get(WAN_DIR_ENV)
        return cls(wan_i2v_dir=Path(wan).expanduser() if wan else None, hf_cache_dir=default_hf_cache_dir(env))


def default_hf_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The hub cache the Hugging Face tools use.

    For this process (``environ`` None) it is ``huggingface_hub.constants.HF_HUB_CACHE``, so whatever
    huggingface_hub resolves (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``,
    ``$XDG_CACHE_HOME`` respected) is used here too. For another environment (an engine setting handed over as
    a mapping) the same rule is applied to that mapping, since huggingface_hub reads only its own process's.
    """
    if environ is None:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    env = environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    cache = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return cache / "huggingface" / "hub"


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return "/" in name


def resolve_hf_cache(repo_id: str, cache_dir: Path, required: str = f"{BACKBONE_SUBFOLDER}/config.json") -> Path | None:
    """The snapshot folder of model ``repo_id`` in the hub ``cache_dir`` that holds ``required``, or None.

    Through huggingface_hub, without a request: the revision ``refs/main`` names
    (``snapshot_download(local_files_only=True)``); when that has no ``required`` file (or there is no ref),
    the most recently modified revision ``scan_cache_dir`` finds that has it.
    """
    from huggingface_hub import scan_cache_dir, snapshot_download
    from huggingface_hub.errors import CacheNotFound, LocalEntryNotFoundError

    if not _is_repo_id(repo_id):
        return None
    try:
        snapshot = Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
        if (snapshot / required).is_file():
            return snapshot
    except (LocalEntryNotFoundError, OSError):
        pass
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return None
    revisions = [r for repo in info.repos if repo.repo_id == repo_id and repo.repo_type == "model"
                 for r in repo.revisions if (Path(r.snapshot_path) / required).is_file()]
    if not revisions:
        return None
    return Path(max(revisions, key=lambda r: r.last_modified).snapshot_path)


@dataclass(frozen=True)
class VariantFolder:
    """A parsed variant folder."""

    path: Path
    config: "WorldStereoConfig"
    weights: Path
    backbone_config: "WanTransformerConfig | None"  # from transformer_config.json, if the folder has one


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what} {path} is not readable JSON: {exc}") from None


def read_variant_folder(path: str | os.PathLike, expect_variant: str | None = None) -> VariantFolder:
    """Parse ``config.json`` (+ ``transformer_config.json``) of a variant folder and find its weights."""
    from .wan_transformer import WanTransformerConfig
    from .names import VARIANTS
    from .worldstereo import WorldStereoConfig

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if expect_variant is not None and expect_variant not in VARIANTS:
        raise WrongVariantError(f"unknown variant {expect_variant!r}; expected one of {', '.join(VARIANTS)}")
    raw = _read_json(folder / VARIANT_CONFIG, "variant config")
    fallback = folder.name if folder.name in VARIANTS else None
    config = WorldStereoConfig.from_dict(raw, source=str(folder / VARIANT_CONFIG), fallback_model_type=fallback)
    if expect_variant is not None and config.model_type != expect_variant:
        raise WrongVariantError(
            f"{folder} holds {config.model_type!r} (config.json model_type), but {expect_variant!r} was asked for"
        )
    weights = folder / VARIANT_WEIGHTS
    if not weights.is_file():
        refuse_pickles(folder, "checkpoint folder")
        raise CheckpointError(f"weights not found: {weights} (a WorldStereo variant folder holds "
                              f"{VARIANT_CONFIG} and {VARIANT_WEIGHTS})")
    backbone_config = None
    if (folder / VARIANT_BACKBONE_CONFIG).is_file():
        backbone_config = WanTransformerConfig.from_dict(
            _read_json(folder / VARIANT_BACKBONE_CONFIG, "backbone config"), source=str(folder / VARIANT_BACKBONE_CONFIG)
        )
    return VariantFolder(path=folder, config=config, weights=weights, backbone_config=backbone_config)


def resolve_base_model(variant: VariantFolder, base_model_dir: str | os.PathLike | None = None,
                       paths: ModelPaths | None = None) -> Path:
    """The Wan2.1 I2V diffusers folder for ``variant`` (see the module docstring for the order)."""
    tried = []
    candidates: list[tuple[str, Path | None]] = []
    if base_model_dir is not None:
        candidates.append(("given base model folder", Path(base_model_dir).expanduser()))
    if paths is not None and paths.wan_i2v_dir is not None:
        candidates.append(("engine setting wan_i2v_dir", paths.wan_i2v_dir))
    name = variant.config.base_model
    as_path = Path(name).expanduser()
    candidates.append((f"base_model {name!r} as a folder",
                       as_path if as_path.is_absolute() else variant.path / as_path))
    if _is_repo_id(name):
        from .hub import plain_folder_name

        sibling = variant.path.parent / plain_folder_name(name)
        candidates.append((f"the folder beside {variant.path.name} named as {name}", sibling))
    for label, candidate in candidates:
        if candidate is not None and (candidate / BACKBONE_SUBFOLDER / "config.json").is_file():
            return candidate
        tried.append(f"{label}: {candidate} has no {BACKBONE_SUBFOLDER}/config.json")
        if base_model_dir is not None and label == "given base model folder":
            # an explicit folder that is wrong is an error, not something to fall through
            raise CheckpointError(f"{candidate} is not a Wan2.1 diffusers folder (no {BACKBONE_SUBFOLDER}/config.json)")
    cache = (paths.hf_cache_dir if paths is not None and paths.hf_cache_dir is not None
             else default_hf_cache_dir())
    if _is_repo_id(name):
        snapshot = resolve_hf_cache(name, cache)
        if snapshot is not None:
            return snapshot
        tried.append(f"Hugging Face cache {cache}: no snapshot of {name} with {BACKBONE_SUBFOLDER}/config.json")
    raise CheckpointError(
        f"cannot find the backbone {name!r} for {variant.path}. Tried:\n  - " + "\n  - ".join(tried)
        + f"\nDownload it (`keyframe-worlds model download {name}`, with --dir beside the variant folders) or "
        f"set the engine's Wan2.1 image-to-video folder (or ${WAN_DIR_ENV}) to a local copy."
    )


def backbone_weight_files(base_dir: Path) -> list[Path]:
    """The safetensors files of ``<base>/transformer/`` (single file or sharded with an index)."""
    folder = base_dir / BACKBONE_SUBFOLDER
    single = folder / BACKBONE_WEIGHTS
    if single.is_file():
        return [single]
    index = folder / BACKBONE_INDEX
    if index.is_file():
        data = _read_json(index, "backbone weight index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = sorted({folder / name for name in weight_map.values()})
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"backbone shards listed in {index} are missing: {', '.join(absent)}")
        return files
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    refuse_pickles(folder, "backbone folder")
    raise CheckpointError(f"no backbone weights in {folder} (expected {BACKBONE_WEIGHTS} or {BACKBONE_INDEX})")


@dataclass(frozen=True)
class TensorRef:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def index_safetensors(files: Iterable[Path]) -> dict[str, TensorRef]:
    """Key -> (file, shape, dtype) from the headers only; no tensor data is read."""
    from safetensors import safe_open

    out: dict[str, TensorRef] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    out[key] = TensorRef(Path(path), tuple(piece.get_shape()), piece.get_dtype())
        except Exception as exc:  # safetensors raises several types for a bad header
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    return out


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f", ... ({len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else "")


def check_variant_keys(config: "WorldStereoConfig", variant_keys: Iterable[str], where: Path) -> None:
    """Catch a folder whose weights belong to another variant than its config says."""
    keys = set(variant_keys)
    has_pose_mlp = any(k.startswith("camera_embedding.") for k in keys)
    has_control = any(k.startswith("controlnet.") for k in keys)
    if not config.is_memory and has_pose_mlp:
        raise WrongVariantError(
            f"{where} holds a memory variant's weights (camera_embedding.* keys) but its config.json says "
            f"{config.model_type!r}"
        )
    if config.is_memory and config.memory.main_camera_embedding and has_control and not has_pose_mlp:
        raise WrongVariantError(
            f"{where} holds no camera_embedding.* keys, as in 'worldstereo-camera' weights, but its config.json "
            f"says {config.model_type!r}"
        )


def check_key_set(expected: Mapping[str, tuple[int, ...]], available: Mapping[str, TensorRef], what: str) -> None:
    """Raise :class:`KeyMismatchError` unless ``available`` covers ``expected`` exactly, with equal shapes."""
    missing = sorted(k for k in expected if k not in available)
    unexpected = sorted(k for k in available if k not in expected)
    mismatched = sorted(f"{k} (file {list(available[k].shape)}, network {list(expected[k])})"
                        for k in expected if k in available and tuple(available[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
    raise KeyMismatchError(f"{what} do not match the network:\n  " + "\n  ".join(parts),
                           missing, unexpected, mismatched)


def cast_for_inference(model: "WanTransformer3DModel", dtype: "torch.dtype") -> "WanTransformer3DModel":
    """Cast parameters to ``dtype`` except those diffusers keeps in float32 in the backbone (time
    embedder, modulation tables, block norms), which stay float32. Works on the meta device."""
    import torch

    model.to(dtype)
    if dtype != torch.float32:
        patterns = model.keep_in_fp32_patterns
        for name, module in model.named_modules():
            for pname, param in list(module._parameters.items()):
                full = f"{name}.{pname}" if name else pname
                # the control branch is not diffusers code: its adaLN "norm1/norm2" carry large
                # linears, which would cost 1.3 GB in float32 at full size for no accuracy gain
                if param is not None and not full.startswith("controlnet.") \
                        and any(p in full.split(".") for p in patterns):
                    module._parameters[pname] = torch.nn.Parameter(param.float(), requires_grad=False)
    return model


def parameter_bytes(model: "WanTransformer3DModel") -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@dataclass
class LoadReport:
    """What went into a loaded model (kept on it as ``model.load_report``)."""

    variant: str
    variant_dir: Path
    base_model_dir: Path | None
    keys_from_backbone: int
    keys_from_variant: int
    ignored_backbone_keys: list[str] = field(default_factory=list)
    dtype: str = "float32"
    device: str = "cpu"


@dataclass
class WeightPlan:
    """Which file every key of a variant's network comes from; the network itself on the meta device."""

    variant: VariantFolder
    model: "WanTransformer3DModel"
    available: dict[str, TensorRef]
    base_dir: Path | None
    keys_from_backbone: int
    keys_from_variant: int
    ignored_backbone_keys: list[str]


def plan_weights(variant_dir: str | os.PathLike, base_model_dir: str | os.PathLike | None = None,
                 paths: ModelPaths | None = None, expect_variant: str | None = None) -> WeightPlan:
    """Read a variant folder (and its backbone when the variant lacks keys) and check the key set: safetensors
    headers only, the network on the meta device, so it costs no memory and no tensor reads. Raises
    :class:`CheckpointError` (or a subclass) naming what does not fit."""
    import torch

    from .worldstereo import build_worldstereo

    variant = read_variant_folder(variant_dir, expect_variant)
    variant_index = index_safetensors([variant.weights])
    check_variant_keys(variant.config, variant_index, variant.weights)

    # 1. Backbone config: the folder's own, else the backbone folder's.
    base_dir: Path | None = None
    backbone_config = variant.backbone_config
    if backbone_config is None or base_model_dir is not None:
        base_dir = resolve_base_model(variant, base_model_dir, paths)
        from .wan_transformer import WanTransformerConfig

        path = base_dir / BACKBONE_SUBFOLDER / "config.json"
        base_config = WanTransformerConfig.from_dict(_read_json(path, "backbone config"), source=str(path))
        if backbone_config is not None and backbone_config != base_config:
            differing = sorted(k for k, v in backbone_config.to_dict().items() if base_config.to_dict()[k] != v)
            raise CheckpointError(f"{variant.path / VARIANT_BACKBONE_CONFIG} and {path} describe different "
                                  f"backbones (differing: {', '.join(differing)})")
        backbone_config = base_config

    # 2. The network on the meta device: its key set, no memory.
    with torch.device("meta"):
        model = build_worldstereo(variant.config, backbone_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # 3. Backbone keys first (only if the variant does not hold every key), the variant's on top.
    available: dict[str, TensorRef] = {}
    ignored: list[str] = []
    if any(k not in variant_index for k in expected) and base_dir is None:
        base_dir = resolve_base_model(variant, None, paths)
    if base_dir is not None and any(k not in variant_index for k in expected):
        for key, ref in index_safetensors(backbone_weight_files(base_dir)).items():
            if IGNORED_BACKBONE_KEY_PATTERN.search(key):
                ignored.append(key)
            else:
                available[key] = ref
    from_backbone = sum(1 for k in available if k not in variant_index)
    available.update(variant_index)
    check_key_set(expected, available, f"the weights of {variant.path}"
                  + (f" with the backbone {base_dir}" if base_dir is not None else ""))

    return WeightPlan(variant, model, available, base_dir, from_backbone, len(variant_index), ignored)


def check_variant_weights(variant_dir: str | os.PathLike, base_model_dir: str | os.PathLike | None = None,
                          paths: ModelPaths | None = None, expect_variant: str | None = None) -> str:
    """The key check of ``model check`` without loading: one line on what the weights hold; raises
    :class:`CheckpointError` when they do not fit the network."""
    plan = plan_weights(variant_dir, base_model_dir, paths, expect_variant)
    line = f"{plan.variant.config.model_type}: {plan.keys_from_variant} keys from {plan.variant.path}"
    if plan.keys_from_backbone:
        line += f", {plan.keys_from_backbone} from the backbone {plan.base_dir}"
    return line + ", every key of the network present with its shape"


def load_worldstereo(variant_dir: str | os.PathLike, base_model_dir: str | os.PathLike | None = None, *,
                     device: "str | torch.device" = "cpu", dtype: "torch.dtype | None" = None,
                     paths: ModelPaths | None = None, expect_variant: str | None = None,
                     offload: str = "none", free_memory_bytes: int | None = None) -> "WanTransformer3DModel":
    """Load a WorldStereo variant ready for inference (eval mode, no gradients).

    ``dtype`` defaults to bfloat16 on CUDA and float32 elsewhere. On CUDA the
    free memory (``free_memory_bytes``, or what the device reports) is checked
    against :func:`estimate_memory` for ``offload`` before anything is moved
    there (on any device when ``free_memory_bytes`` is given); with ``offload="sequential"`` the weights stay in CPU memory and each
    block visits the GPU only for its forward.
    """
    import torch

    # The budget and the offload modes build on this module's key index, so they are imported here.
    from .budget import check_gpu_memory, estimate_memory
    from .offload import OFFLOAD_MODES, enable_sequential_offload

    if offload not in OFFLOAD_MODES:
        raise KeyframeWorldsError(f"unknown offload mode {offload!r}; expected one of {', '.join(OFFLOAD_MODES)}")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    plan = plan_weights(variant_dir, base_model_dir, paths, expect_variant)
    variant, model, available, base_dir = plan.variant, plan.model, plan.available, plan.base_dir

    # 4. Memory check, then materialise in the final dtypes and copy tensor by tensor.
    cast_for_inference(model, dtype)
    if device.type == "cuda" or free_memory_bytes is not None:
        if free_memory_bytes is None:
            free_memory_bytes = torch.cuda.mem_get_info(device)[0]
        check_gpu_memory(estimate_memory(model, base_dir=base_dir), free_memory_bytes, offload,
                         what=variant.config.model_type)
    home = torch.device("cpu") if offload == "sequential" else device
    model.to_empty(device=home)
    _copy_weights(model, available)
    model.eval().requires_grad_(False)
    if offload == "sequential" and device.type != "cpu":
        enable_sequential_offload(model, device)
    model.load_report = LoadReport(
        variant=variant.config.model_type, variant_dir=variant.path, base_model_dir=base_dir,
        keys_from_backbone=plan.keys_from_backbone, keys_from_variant=plan.keys_from_variant,
        ignored_backbone_keys=plan.ignored_backbone_keys,
        dtype=str(dtype).replace("torch.", ""), device=str(device),
    )
    return model


def _copy_weights(model: "WanTransformer3DModel", available: Mapping[str, TensorRef]) -> None:
    import torch
    from safetensors import safe_open

    targets = model.state_dict(keep_vars=True)
    by_file: dict[Path, list[str]] = {}
    for key in targets:
        by_file.setdefault(available[key].file, []).append(key)
    with torch.no_grad():
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in keys:
                    target = targets[key]
                    target.copy_(handle.get_tensor(key).to(dtype=target.dtype))
