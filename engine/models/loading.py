"""Loading WorldStereo checkpoints: variant folder + Wan2.1 I2V backbone, safetensors only.

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
folder); the Hugging Face cache (``models--org--name/snapshots/<rev>/``) when
``base_model`` is a repository id. Nothing is downloaded here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ...bridge.errors import KeyframeWorldsError

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
#: Pickle-based weight files: never opened (unpickling can run arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: Keys some Wan checkpoints carry that the network has no use for (diffusers ignores them too).
IGNORED_BACKBONE_KEY_PATTERN = re.compile(r"(^|\.)norm_added_q\.")
#: Environment variable for the local Wan2.1 I2V diffusers folder (the engine setting's fallback).
WAN_DIR_ENV = "KEYFRAME_WORLDS_WAN_I2V_DIR"
#: How many keys an error message lists before summarising.
MAX_LISTED_KEYS = 20


class CheckpointError(KeyframeWorldsError):
    """A checkpoint folder or file is missing, unreadable or not what it should be."""


class WrongVariantError(CheckpointError):
    """The folder holds another WorldStereo variant than the one asked for or configured."""


class KeyMismatchError(CheckpointError):
    """The weights do not cover the network's parameters exactly; ``missing``/``unexpected``/``mismatched`` list them."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


class InsufficientGPUMemoryError(KeyframeWorldsError):
    """The GPU has too little free memory for the requested offload mode."""


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
    """The hub cache the Hugging Face tools use: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (``$XDG_CACHE_HOME`` respected)."""
    env = os.environ if environ is None else environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    cache = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return cache / "huggingface" / "hub"


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_hf_cache(repo_id: str, cache_dir: Path) -> Path | None:
    """The snapshot folder of model ``repo_id`` in a hub cache, or None.

    Layout: ``<cache>/models--<org>--<name>/snapshots/<revision>/``, with
    ``refs/main`` naming the revision. Without a usable ``refs/main`` the most
    recently modified snapshot that has ``transformer/config.json`` is taken.
    """
    if not _REPO_ID.match(repo_id):
        return None
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        revision = ref.read_text(encoding="utf-8").strip()
        candidate = snapshots / revision
        if revision and (candidate / BACKBONE_SUBFOLDER / "config.json").is_file():
            return candidate
    usable = [p for p in snapshots.iterdir() if (p / BACKBONE_SUBFOLDER / "config.json").is_file()]
    if not usable:
        return None
    return max(usable, key=lambda p: p.stat().st_mtime)


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


def _refuse_pickles(folder: Path, what: str) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise CheckpointError(
            f"{what} {folder} holds only pickle weight files ({', '.join(pickles)}); they are not loaded because "
            "unpickling can run arbitrary code. Convert them to safetensors (or download the safetensors release)."
        )


def read_variant_folder(path: str | os.PathLike, expect_variant: str | None = None) -> VariantFolder:
    """Parse ``config.json`` (+ ``transformer_config.json``) of a variant folder and find its weights."""
    from .wan_transformer import WanTransformerConfig
    from .worldstereo import VARIANTS, WorldStereoConfig

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
        _refuse_pickles(folder, "checkpoint folder")
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
    for label, candidate in candidates:
        if candidate is not None and (candidate / BACKBONE_SUBFOLDER / "config.json").is_file():
            return candidate
        tried.append(f"{label}: {candidate} has no {BACKBONE_SUBFOLDER}/config.json")
        if base_model_dir is not None and label == "given base model folder":
            # an explicit folder that is wrong is an error, not something to fall through
            raise CheckpointError(f"{candidate} is not a Wan2.1 diffusers folder (no {BACKBONE_SUBFOLDER}/config.json)")
    cache = (paths.hf_cache_dir if paths is not None and paths.hf_cache_dir is not None
             else default_hf_cache_dir())
    if _REPO_ID.match(name):
        snapshot = resolve_hf_cache(name, cache)
        if snapshot is not None:
            return snapshot
        tried.append(f"Hugging Face cache {cache}: no snapshot of {name} with {BACKBONE_SUBFOLDER}/config.json")
    raise CheckpointError(
        f"cannot find the backbone {name!r} for {variant.path}. Tried:\n  - " + "\n  - ".join(tried)
        + f"\nDownload it (e.g. `huggingface-cli download {name}` when online) or set the engine's Wan2.1 "
        f"image-to-video folder (or ${WAN_DIR_ENV}) to a local copy."
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
    _refuse_pickles(folder, "backbone folder")
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

    from .worldstereo import build_worldstereo

    if offload not in OFFLOAD_MODES:
        raise KeyframeWorldsError(f"unknown offload mode {offload!r}; expected one of {', '.join(OFFLOAD_MODES)}")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
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
        keys_from_backbone=from_backbone, keys_from_variant=len(variant_index), ignored_backbone_keys=ignored,
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


class BlockStreamer:
    """Streams the transformer's blocks to ``device`` one ahead of use (``offload="sequential"``).

    The blocks' weights live in CPU memory (page-locked on CUDA, so copies run
    asynchronously). Just before block ``i`` runs, its weights are on the device
    (the compute waits for their copy only) and the copy of block ``i + 1``
    (wrapping to block 0 for the next forward) starts on a separate stream, so
    the transfer overlaps block ``i``'s compute: at most two blocks are on the
    device at a time. After block ``i`` the device copy is dropped, not copied
    back: the CPU weights are unchanged, so leaving costs nothing.
    Everything that is not a block (embeddings, control branch, head) stays
    resident. :meth:`release` drops what is still on the device.
    """

    def __init__(self, model: "WanTransformer3DModel", device: "torch.device"):
        import torch

        self.device = torch.device(device)
        self.blocks = [block for child in model.children() if isinstance(child, torch.nn.ModuleList) for block in child]
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        in_blocks = {id(t) for block in self.blocks for t in (*block.parameters(), *block.buffers())}
        for child in model.children():
            if not isinstance(child, torch.nn.ModuleList):
                child.to(self.device)
        for t in (*model.parameters(recurse=False), *model.buffers(recurse=False)):  # e.g. the head's scale_shift_table
            if id(t) not in in_blocks:
                t.data = t.data.to(self.device)
        # per block: its tensors (parameters and buffers) and their CPU data
        self._tensors = [list(block.parameters()) + list(block.buffers()) for block in self.blocks]
        pin = self._cuda
        for tensors in self._tensors:
            for t in tensors:
                t.data = t.data.to("cpu")
                if pin:
                    try:
                        t.data = t.data.pin_memory()
                    except RuntimeError:  # the system refused more page-locked memory: copy from pageable memory
                        pin = False
        self._host = [[t.data for t in tensors] for tensors in self._tensors]
        self._in_flight: dict[int, object] = {}  # block index -> copy-done event (None off CUDA)
        self.max_on_device = 0  # most blocks on the device at once (a check of the two-block bound)
        self._hooks = []
        for i, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(lambda module, args, i=i: self._before(i)))
            self._hooks.append(block.register_forward_hook(lambda module, args, output, i=i: self._after(i)))

    def _start_copy(self, i: int) -> None:
        import torch

        if i in self._in_flight:
            return
        if self._cuda:
            # the copy stream must not overwrite memory the compute stream is still reading
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                for t, host in zip(self._tensors[i], self._host[i]):
                    t.data = host.to(self.device, non_blocking=True, copy=True)
                event = torch.cuda.Event()
                event.record(self._copy_stream)
        else:
            for t, host in zip(self._tensors[i], self._host[i]):
                t.data = host.to(self.device, copy=True)  # a copy even on the CPU, so the streaming is observable
            event = None
        self._in_flight[i] = event
        self.max_on_device = max(self.max_on_device, len(self._in_flight))

    def _before(self, i: int) -> None:
        import torch

        self._start_copy(i)
        if self._cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(self._in_flight[i])
            for t in self._tensors[i]:
                t.data.record_stream(compute)  # allocated on the copy stream, used here: free only after use
        self._start_copy((i + 1) % len(self.blocks))

    def _after(self, i: int) -> None:
        for t, host in zip(self._tensors[i], self._host[i]):
            t.data = host
        self._in_flight.pop(i, None)

    def release(self) -> None:
        """Drop every block's device copy (after the denoising loop: the memory goes to the VAE)."""
        for i in list(self._in_flight):
            self._after(i)

    def remove(self) -> None:
        """Undo the hooks; the blocks stay in (page-locked) CPU memory."""
        self.release()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def enable_sequential_offload(model: "WanTransformer3DModel", device: "torch.device") -> BlockStreamer:
    """Stream ``model``'s blocks to ``device`` (see :class:`BlockStreamer`); the streamer is also kept
    as ``model.block_streamer``."""
    streamer = BlockStreamer(model, device)
    model.block_streamer = streamer
    return streamer


# -- GPU memory ---------------------------------------------------------------------------------

#: Offload modes, from fastest to leanest: everything resident; one model (transformer, text
#: encoder, image encoder, VAE) on the GPU at a time; the transformer's blocks streamed one by one.
OFFLOAD_MODES = ("none", "model", "sequential")

#: Parameter counts of the Wan2.1 I2V companions, used when no backbone folder is at hand:
#: UMT5-XXL encoder, CLIP ViT-H/14 vision tower, Wan VAE.
DEFAULT_AUX_PARAMS = {"text_encoder": 5_680_000_000, "image_encoder": 632_000_000, "vae": 127_000_000}
#: CUDA context, cuBLAS workspaces and allocator slack.
GPU_OVERHEAD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes the generator needs on the GPU, by part. Deliberately on the high side."""

    transformer_bytes: int
    largest_block_bytes: int
    resident_bytes: int  # everything of the transformer but its blocks (embeddings, head, control branch)
    aux_bytes: Mapping[str, int]
    activation_bytes: int

    def required(self, offload: str) -> int:
        if offload == "none":
            return self.transformer_bytes + sum(self.aux_bytes.values()) + self.activation_bytes + GPU_OVERHEAD_BYTES
        if offload == "model":
            return max(self.transformer_bytes + self.activation_bytes,
                       max(self.aux_bytes.values(), default=0)) + GPU_OVERHEAD_BYTES
        if offload == "sequential":
            # the non-block parts stay resident; two blocks in flight (one computing, one arriving);
            # the companions visit one at a time as with "model"
            return max(self.resident_bytes + 2 * self.largest_block_bytes + self.activation_bytes,
                       max(self.aux_bytes.values(), default=0)) + GPU_OVERHEAD_BYTES
        raise KeyframeWorldsError(f"unknown offload mode {offload!r}; expected one of {', '.join(OFFLOAD_MODES)}")


def _safetensors_param_count(folder: Path) -> int | None:
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = 0
    for ref in index_safetensors(files).values():
        count = 1
        for size in ref.shape:
            count *= size
        total += count
    return total


def estimate_memory(model: "WanTransformer3DModel", frames: int = 21, height: int = 480, width: int = 768,
                    num_refs: int = 8, base_dir: Path | None = None, aux_bytes_per_param: int = 2) -> MemoryEstimate:
    """GPU memory for one denoising forward of ``model`` (which may live on the meta device) at
    ``frames`` latent frames of ``height x width`` pixels with ``num_refs`` reference frames.

    Weights: the model's parameters at their dtypes; companions (text and image
    encoders, VAE) from ``base_dir``'s safetensors headers when given, else the
    Wan2.1 I2V sizes, at ``aux_bytes_per_param``. Activations: per token the
    residual stream, its float32 normalised copy, q/k/v and attention output, the
    MLP hidden layer twice, for target plus reference tokens; the control
    branch's residuals (one per control layer) and the pixel-resolution inputs.
    """
    config = model.config
    transformer_bytes = parameter_bytes(model)
    block_bytes = [parameter_bytes(b) for b in model.blocks]
    largest_block = max(block_bytes, default=0)
    aux = {}
    for name, default in DEFAULT_AUX_PARAMS.items():
        counted = _safetensors_param_count(base_dir / name) if base_dir is not None else None
        aux[name] = (counted if counted is not None else default) * aux_bytes_per_param
    act_size = 2 if any(p.dtype in (_bf16(), _fp16()) for p in model.parameters()) else 4
    p_t, p_h, p_w = config.patch_size
    latent_h, latent_w = height // 8, width // 8
    tokens_per_frame = (latent_h // p_h) * (latent_w // p_w)
    tokens = (frames // p_t) * tokens_per_frame
    ref_tokens = num_refs * tokens_per_frame if hasattr(model, "camera_embedding") else 0
    dim, ffn = config.inner_dim, config.ffn_dim
    per_token = dim * (6 * act_size + 2 * 4) + 2 * ffn * act_size
    activations = (tokens + ref_tokens) * per_token
    control = getattr(model, "controlnet", None)
    if control is not None:
        cfg = control.config
        activations += cfg.num_layers * tokens * dim * act_size  # residuals kept until their block
        activations += tokens * (cfg.dim * 6 + cfg.ffn_dim * 2) * act_size
        activations += 7 * frames * height * width * 4  # mask + Pluecker rays, float32
    return MemoryEstimate(transformer_bytes, largest_block, transformer_bytes - sum(block_bytes), aux,
                          int(activations))


def _bf16():
    import torch
    return torch.bfloat16


def _fp16():
    import torch
    return torch.float16


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def check_gpu_memory(estimate: MemoryEstimate, free_bytes: int, offload: str = "none", what: str = "the model") -> None:
    """Raise :class:`InsufficientGPUMemoryError` if ``offload`` needs more than ``free_bytes``,
    naming the fastest offload mode that would fit (or the smallest need, if none does)."""
    need = estimate.required(offload)
    if need <= free_bytes:
        return
    fitting = [m for m in OFFLOAD_MODES if estimate.required(m) <= free_bytes]
    # only suggest leaner modes than the one requested
    fitting = [m for m in fitting if OFFLOAD_MODES.index(m) > OFFLOAD_MODES.index(offload)]
    message = (f"not enough GPU memory for {what} with offload {offload!r}: it needs about {_gib(need)}, "
               f"{_gib(free_bytes)} is free.")
    if fitting:
        mode = fitting[0]
        message += f" Offload {mode!r} needs about {_gib(estimate.required(mode))} and would fit: set offload to {mode!r}."
    else:
        lean = OFFLOAD_MODES[-1]
        message += (f" Even offload {lean!r} needs about {_gib(estimate.required(lean))}; free GPU memory "
                    "(close other programs) or use a larger GPU.")
    raise InsufficientGPUMemoryError(message)
