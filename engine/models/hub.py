"""The model files on the Hugging Face Hub and on this machine: what ``model download`` fetches, ``model list`` shows.

:data:`HUB_MODELS` is the one table of where every model comes from, the same
repositories the released inference scripts take them from: the three
WorldStereo variants are sub-folders of one release repository, the backbone is
Wan2.1's image-to-video 480P diffusers folder, and a depth model is any
transformers depth repository, named by its id.

Downloads go through ``huggingface_hub.snapshot_download`` with
:data:`DOWNLOAD_PATTERNS` (safetensors weights, JSON configs and index files,
tokenizer files: never a pickle or a sample video), so they resume where they
stopped, show huggingface_hub's progress bars and honour its environment
(``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``,
``HF_ENDPOINT``). Without a folder they land in the hub cache; with one, in a
plain folder laid out as the add-on's model folder (one sub-folder per variant,
the backbone and each depth model under their repository's name). Offline, a
plain folder is filled from the hub cache by hard links (copies across file
systems).

A copy is *complete* when every file its indexes name exists and every
safetensors file's header covers the file exactly: ``model_index.json`` names
the components of a diffusers folder, ``*.safetensors.index.json`` the shards of
a model, a variant folder needs ``config.json`` and ``model.safetensors``.
Whether the keys fit the network is :func:`..weights.check_variant_weights`'s
business (``model check``, ``model list --keys``). No torch here.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ...bridge.errors import KeyframeWorldsError
from .names import CAMERA_VARIANT, MEMORY_DMD_VARIANT, MEMORY_VARIANT, VARIANTS

#: The WorldStereo release: one sub-folder per variant, each with ``config.json`` and ``model.safetensors``.
WORLDSTEREO_REPO = "hanshanxue/WorldStereo"
#: The backbone and its companions (UMT5, CLIP, VAE, scheduler) the variants' ``base_model`` names.
WAN_I2V_REPO = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
#: ``model download`` / ``model list`` name of the backbone folder.
WAN_I2V_NAME = "wan2.1-i2v-14b-480p"

KIND_VARIANT = "variant"
KIND_BACKBONE = "backbone"
KIND_DEPTH = "depth"
KIND_OTHER = "other"

#: What a download fetches, as ``fnmatch`` patterns on repository paths (``*`` crosses folders): weights in
#: safetensors only, configs and weight indexes (JSON), tokenizer files (SentencePiece models, BPE vocabularies).
DOWNLOAD_PATTERNS = ("*.safetensors", "*.json", "*.model", "*vocab.txt", "*merges.txt")

#: Where a copy was found (the ``source`` of a :class:`LocalCopy`).
SOURCE_FOLDER = "model folder"
SOURCE_CACHE = "hf cache"


def plain_folder_name(repo_id: str) -> str:
    """A repository's folder name in a plain model folder: the name part of its id (``Wan2.1-I2V-14B-480P-Diffusers``)."""
    return repo_id.split("/")[-1]


@dataclass(frozen=True)
class HubModel:
    """One downloadable model: ``name`` as ``model download`` takes it, ``repo_id`` on the Hub, ``subfolder`` in
    that repository (the variants share one), ``folder``: its name under a plain model folder."""

    name: str
    repo_id: str
    kind: str
    subfolder: str | None = None
    folder: str = ""
    about: str = ""

    @property
    def allow_patterns(self) -> list[str]:
        if self.subfolder:
            return [f"{self.subfolder}/{p}" for p in DOWNLOAD_PATTERNS]
        return list(DOWNLOAD_PATTERNS)

    def folder_in(self, root: Path) -> Path:
        """The model's folder inside a plain model folder (or a snapshot) ``root``."""
        return root / (self.subfolder or self.folder)


HUB_MODELS: tuple[HubModel, ...] = (
    HubModel(CAMERA_VARIANT, WORLDSTEREO_REPO, KIND_VARIANT, subfolder=CAMERA_VARIANT,
             about="camera control only, single view"),
    HubModel(MEMORY_VARIANT, WORLDSTEREO_REPO, KIND_VARIANT, subfolder=MEMORY_VARIANT,
             about="global-geometric + spatial-stereo memory; best quality"),
    HubModel(MEMORY_DMD_VARIANT, WORLDSTEREO_REPO, KIND_VARIANT, subfolder=MEMORY_DMD_VARIANT,
             about="memory, DMD-distilled: 4 steps"),
    HubModel(WAN_I2V_NAME, WAN_I2V_REPO, KIND_BACKBONE, folder=plain_folder_name(WAN_I2V_REPO),
             about="Wan2.1 I2V 14B 480P diffusers folder: backbone, UMT5, CLIP, VAE, scheduler"),
)
assert tuple(m.name for m in HUB_MODELS if m.kind == KIND_VARIANT) == VARIANTS


def resolve_names(names: Iterable[str]) -> list[HubModel]:
    """The table entries for ``model download``'s arguments: a name of :data:`HUB_MODELS`, a repository id of
    the table (the release id means all three variants), or any other repository id (a depth model)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    out: list[HubModel] = []
    by_name = {m.name: m for m in HUB_MODELS}
    for name in names:
        if name in by_name:
            picked = [by_name[name]]
        elif any(m.repo_id == name for m in HUB_MODELS):
            picked = [m for m in HUB_MODELS if m.repo_id == name]
        else:
            try:
                validate_repo_id(name)
            except HFValidationError:
                picked = []
            else:
                picked = [HubModel(name, name, KIND_DEPTH, folder=plain_folder_name(name))] if "/" in name else []
            if not picked:
                raise KeyframeWorldsError(
                    f"unknown model {name!r}: give one of {', '.join(by_name)} or a Hugging Face repository id "
                    "(org/name) of a depth model")
        out += [m for m in picked if m not in out]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Completeness


def _safetensors_problem(path: Path) -> str | None:
    """None when ``path`` is a safetensors file whose header covers the file exactly (safetensors' own parser checks
    the data offsets against the file size, so a truncated download is caught without reading the tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            return None
    except Exception as exc:  # safetensors raises several types for a bad or short file
        return f"{path.name} is not a whole safetensors file ({str(exc).splitlines()[0]})"


def _index_problems(folder: Path, reported: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """Problems of the weight indexes and safetensors files in ``folder`` (``reported``: names already said to be
    missing), and whether it has weights at all."""
    problems: list[str] = []
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    named: set[str] = set()
    for index in indexes:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, ValueError, AttributeError) as exc:
            problems.append(f"{index.name} is not a readable index ({exc})")
            continue
        if not isinstance(weight_map, dict) or not weight_map:
            problems.append(f"{index.name} has no weight_map")
            continue
        for shard in sorted(set(weight_map.values())):
            named.add(shard)
            if not (folder / shard).is_file():
                problems.append(f"{shard} (named by {index.name}) is missing")
    present = []
    for weights in sorted(folder.glob("*.safetensors")):
        if not weights.exists():  # a hub snapshot's link whose blob was deleted
            if weights.name not in named and weights.name not in reported:
                problems.append(f"{weights.name} is missing (a link to a deleted file)")
            continue
        present.append(weights)
        problem = _safetensors_problem(weights)
        if problem:
            problems.append(problem)
    return problems, bool(indexes) or bool(present)


def _model_folder_problems(folder: Path, weights_needed: bool) -> list[str]:
    problems, has_weights = _index_problems(folder)
    if weights_needed and not has_weights:
        problems.append("no safetensors weights")
    return problems


def check_copy(folder: Path, kind: str) -> list[str]:
    """What is missing or broken in a model folder of ``kind`` (an empty list: complete). Paths are relative to it."""
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    if kind == KIND_VARIANT:
        absent = tuple(name for name in ("config.json", "model.safetensors")
                       if not (folder / name).is_file() and not (name == "model.safetensors"
                                                                and (folder / "model.safetensors.index.json").is_file()))
        return [f"{name} is missing" for name in absent] + _index_problems(folder, absent)[0]
    index = folder / "model_index.json"
    if index.is_file():
        try:
            components = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return [f"model_index.json is not readable JSON ({exc})"]
        problems = []
        for name, value in sorted(components.items()):
            # diffusers writes [library, class] per component; [null, null] is an absent optional one
            if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
                continue
            sub = folder / name
            if not sub.is_dir():
                problems.append(f"{name}/ (named by model_index.json) is missing")
                continue
            # a model component has config.json; schedulers, processors and tokenizers have their own files
            has_model_config = (sub / "config.json").is_file()
            if not has_model_config and not any(sub.iterdir()):
                problems.append(f"{name}/ is empty")
            problems += [f"{name}/{p}" for p in _model_folder_problems(sub, weights_needed=has_model_config)]
        return problems
    if not (folder / "config.json").is_file():
        return ["config.json is missing"]
    return _model_folder_problems(folder, weights_needed=True)


def model_files_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``, links followed, each file counted once (hub snapshots link to blobs)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".cache"]  # huggingface_hub's download metadata in a plain folder
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:  # a broken link: a missing blob, reported by the completeness check
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


# ---------------------------------------------------------------------------------------------------------------
# What is on this machine


@dataclass
class LocalCopy:
    """One copy of a model on this machine: ``source`` is :data:`SOURCE_FOLDER` or :data:`SOURCE_CACHE`."""

    source: str
    path: str
    size_bytes: int
    complete: bool
    problems: list[str] = field(default_factory=list)
    revision: str | None = None
    keys: str | None = None  # ``model list --keys``: "ok" or what the key check said


@dataclass
class ModelEntry:
    name: str
    repo_id: str | None
    kind: str
    about: str = ""
    copies: list[LocalCopy] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return any(c.complete for c in self.copies)


def _copy(source: str, folder: Path, kind: str, revision: str | None = None) -> LocalCopy:
    problems = check_copy(folder, kind)
    return LocalCopy(source, str(folder), model_files_bytes(folder), not problems, problems, revision)


def _kind_of_folder(folder: Path) -> str | None:
    """What an unlisted sub-folder of the model folder holds, or None when it is not a model."""
    if (folder / "model_index.json").is_file():
        return KIND_OTHER
    if (folder / "config.json").is_file():
        return KIND_DEPTH if (any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json"))
                              or (folder / "preprocessor_config.json").is_file()) else None
    return None


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub uses here (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else its default)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _cached_revisions(cache_dir: Path) -> tuple[dict[str, list[tuple[str, Path, float]]], list[str]]:
    """repo id -> [(revision, snapshot folder, last modified)] newest first, of every model repo in the cache; and
    the scan's warnings (a repository it could not read, e.g. a link to a deleted blob)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return {}, []
    out: dict[str, list[tuple[str, Path, float]]] = {}
    warnings = [str(w) for w in info.warnings]
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        revs = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        out[repo.repo_id] = [(r.commit_hash, Path(r.snapshot_path), r.last_modified) for r in revs]
    # scan_cache_dir drops a repository with a broken link altogether; it is still there, so list its snapshots
    for repo_dir in sorted(cache_dir.glob("models--*--*")) if cache_dir.is_dir() else []:
        repo_id = repo_dir.name[len("models--"):].replace("--", "/", 1)
        snapshots = repo_dir / "snapshots"
        if repo_id not in out and snapshots.is_dir():
            out[repo_id] = sorted(((p.name, p, p.stat().st_mtime) for p in snapshots.iterdir() if p.is_dir()),
                                  key=lambda r: r[2], reverse=True)
    return out, warnings


def list_local(model_dir: Path | None, cache_dir: Path | None = None) -> tuple[list[ModelEntry], list[str]]:
    """Every model of :data:`HUB_MODELS` (present or not) and every other model found in ``model_dir`` or the hub
    cache, with its copies; and warnings about what could not be read."""
    cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    entries = [ModelEntry(m.name, m.repo_id, m.kind, m.about) for m in HUB_MODELS]
    by_name = {e.name: e for e in entries}
    warnings: list[str] = []
    claimed: set[Path] = set()
    if model_dir is not None:
        if not model_dir.is_dir():
            warnings.append(f"model folder {model_dir} does not exist")
        else:
            for model in HUB_MODELS:
                candidates = [model.folder_in(model_dir)]
                if model.kind == KIND_BACKBONE:  # the add-on's rule: any Wan2.1 diffusers folder under the model folder
                    candidates += sorted(p for p in model_dir.iterdir() if p.is_dir() and "wan2.1" in p.name.lower()
                                         and (p / "model_index.json").is_file() and p not in candidates)
                for folder in candidates:
                    if folder.is_dir():
                        claimed.add(folder)
                        by_name[model.name].copies.append(_copy(SOURCE_FOLDER, folder, model.kind))
            for folder in sorted(p for p in model_dir.iterdir() if p.is_dir() and p not in claimed):
                kind = _kind_of_folder(folder)
                if kind is not None:
                    entries.append(ModelEntry(folder.name, None, kind, copies=[_copy(SOURCE_FOLDER, folder, kind)]))
    revisions, scan_warnings = _cached_revisions(cache_dir)
    warnings += scan_warnings
    for model in HUB_MODELS:
        for revision, snapshot, _ in revisions.get(model.repo_id, []):
            folder = model.folder_in(snapshot) if model.subfolder else snapshot
            if folder.is_dir():
                by_name[model.name].copies.append(_copy(SOURCE_CACHE, folder, model.kind, revision))
    known = {m.repo_id for m in HUB_MODELS}
    for repo_id in sorted(set(revisions) - known):
        entry = ModelEntry(repo_id, repo_id, KIND_OTHER)
        for revision, snapshot, _ in revisions[repo_id]:
            kind = _kind_of_folder(snapshot) or KIND_OTHER
            entry.kind = kind
            entry.copies.append(_copy(SOURCE_CACHE, snapshot, kind, revision))
        entries.append(entry)
    return entries, warnings


def entries_to_json(entries: list[ModelEntry], model_dir: Path | None, cache_dir: Path,
                    warnings: list[str]) -> dict:
    """``model list --json``: what the add-on's preferences parse."""
    return {
        "model_dir": str(model_dir) if model_dir is not None else None,
        "hf_cache": str(cache_dir),
        "models": [dict(name=e.name, repo_id=e.repo_id, kind=e.kind, about=e.about, complete=e.complete,
                        copies=[dict(asdict(c), size=format_bytes(c.size_bytes)) for c in e.copies])
                   for e in entries],
        "warnings": warnings,
    }


def format_bytes(n: int | float) -> str:
    """Binary units: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------------------
# Download


@dataclass(frozen=True)
class Progress:
    """One progress report of a download: files and bytes done (``*_total`` None when not known, e.g. offline)."""

    name: str
    files_done: int
    files_total: int | None
    bytes_done: int
    bytes_total: int | None


    def describe(self) -> str:
        files = f"{self.files_done} of {self.files_total} files" if self.files_total is not None \
            else f"{self.files_done} files"
        total = f" of {format_bytes(self.bytes_total)}" if self.bytes_total is not None else ""
        return f"{files}, {format_bytes(self.bytes_done)}{total}"


ProgressCallback = Callable[[Progress], None]


def _first_line(exc: BaseException) -> str:
    """The gist of a huggingface_hub / requests error in one line (requests wraps urllib3's reason in a tuple)."""
    arg = exc.args[0] if exc.args else exc
    if isinstance(arg, tuple) and arg:
        arg = arg[0]
    text = str(arg).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hub_error_line(model: HubModel, exc: Exception) -> str:
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
    from requests.exceptions import RequestException

    first = _first_line(exc)
    where = f"{model.repo_id}" + (f" ({model.subfolder})" if model.subfolder else "")
    if isinstance(exc, GatedRepoError):
        return (f"cannot download {where}: the repository is gated; accept its terms on huggingface.co and set "
                f"HF_TOKEN to a token of that account")
    if isinstance(exc, RepositoryNotFoundError):
        return f"cannot download {where}: no such repository on the Hub (or it is private: set HF_TOKEN)"
    if isinstance(exc, RevisionNotFoundError):
        return f"cannot download {where}: the Hub has no such revision"
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return (f"cannot download {where}: HF_HUB_OFFLINE is set and the hub cache {hub_cache_dir()} has no copy")
    if isinstance(exc, (RequestException, HfHubHTTPError)):
        return f"cannot download {where}: the Hub cannot be reached ({first}) and the hub cache {hub_cache_dir()} has no copy"
    return f"cannot download {where}: {first}"


def _files_on_hub(model: HubModel, revision: str | None) -> tuple[list[str], int | None]:
    """The repository files a download fetches and their total size (one metadata request)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    info = HfApi().model_info(model.repo_id, revision=revision, files_metadata=True)
    siblings = list(filter_repo_objects(info.siblings or [], allow_patterns=model.allow_patterns,
                                        key=lambda s: s.rfilename))
    sizes = [s.size for s in siblings]
    return [s.rfilename for s in siblings], (sum(sizes) if all(s is not None for s in sizes) else None)


class _Watcher:
    """Reports progress every ``period_s`` from the bytes under ``folders`` (partial downloads included) while
    huggingface_hub downloads, and the files it finished (counted by :meth:`file_done`)."""

    def __init__(self, name: str, folders: list[Path], files_total: int | None, bytes_total: int | None,
                 callback: ProgressCallback, period_s: float = 0.5):
        self.name, self.folders, self.callback, self.period_s = name, folders, callback, period_s
        self.files_total, self.bytes_total = files_total, bytes_total
        self.files_done = 0
        self._start = self._bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _bytes(self) -> int:
        total = 0
        for folder in self.folders:
            for root, _, files in os.walk(folder):
                for name in files:
                    path = os.path.join(root, name)
                    if not os.path.islink(path):  # hub snapshots link to blobs: count the blobs once
                        try:
                            total += os.path.getsize(path)
                        except OSError:
                            pass
        return total

    def bytes_so_far(self) -> int:
        """Bytes written since the start (what an earlier, interrupted run left is not counted)."""
        done = max(0, self._bytes() - self._start)
        return min(done, self.bytes_total) if self.bytes_total is not None else done

    def report(self) -> None:
        self.callback(Progress(self.name, self.files_done, self.files_total, self.bytes_so_far(), self.bytes_total))

    def file_done(self, n: int = 1) -> None:
        self.files_done += n

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.report()

    def __enter__(self) -> "_Watcher":
        self.report()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _counting_tqdm(watcher: _Watcher):
    """A tqdm class for snapshot_download's files bar that counts finished files into ``watcher``, silently."""
    from tqdm.auto import tqdm

    class CountingTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            watcher.file_done(n or 0)
            return super().update(n)

    return CountingTqdm


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source``'s data (a snapshot's file is a link to its blob), else a copy."""
    real = source.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        if target.stat().st_size == real.stat().st_size:
            return
        target.unlink()
    partial = target.with_name(target.name + ".incomplete")
    try:
        os.link(real, partial)
    except OSError:  # another file system, or links not allowed: copy
        shutil.copyfile(real, partial)
    os.replace(partial, target)


def _snapshot_files(snapshot: Path, model: HubModel) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    files = sorted(str(p.relative_to(snapshot)).replace(os.sep, "/") for p in snapshot.rglob("*")
                   if p.is_file() or p.is_symlink())
    return list(filter_repo_objects(files, allow_patterns=model.allow_patterns))


def download(model: HubModel, dest_dir: Path | None = None, *, revision: str | None = None,
             offline: bool | None = None, progress: ProgressCallback | None = None,
             max_workers: int = 8) -> Path:
    """Fetch ``model`` (only :data:`DOWNLOAD_PATTERNS`) and return its folder; raises KeyframeWorldsError.

    ``dest_dir`` None: into the hub cache (the returned folder is inside its snapshot). Otherwise into the plain
    folder ``model.folder_in(dest_dir)``. ``offline`` (default: ``HF_HUB_OFFLINE``): the hub cache only, no request.
    ``progress``: called about twice a second with a :class:`Progress`; without it huggingface_hub's own bars show.
    A copy that is not complete afterwards (see :func:`check_copy`) is an error naming what is missing.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from requests.exceptions import RequestException

    offline = constants.HF_HUB_OFFLINE if offline is None else offline
    local_dir = None if dest_dir is None else (dest_dir if model.subfolder else dest_dir / model.folder)
    cache_dir = hub_cache_dir()
    storage = cache_dir / ("models--" + model.repo_id.replace("/", "--"))
    hub_failure: Exception | None = None
    folder: Path | None = None
    if not offline:
        try:
            files, bytes_total = _files_on_hub(model, revision)
        except HfHubHTTPError as exc:  # before RequestException, which it derives from
            status = exc.response.status_code if exc.response is not None else None
            if status is None or status < 500:
                raise KeyframeWorldsError(_hub_error_line(model, exc)) from None
            hub_failure = exc  # the Hub is down: as without a connection
        except (RequestException, OfflineModeIsEnabled) as exc:
            hub_failure = exc  # no connection: the hub cache may still have it, as huggingface_hub itself does
        else:
            folder = _fetch(model, local_dir, storage, revision, files, bytes_total, progress, max_workers)
    from_hub = folder is not None
    if folder is None:
        folder = _from_cache(model, local_dir, revision, progress, hub_failure)
    problems = check_copy(folder, model.kind)
    if problems:
        listed = "; ".join(problems[:5]) + (f" ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        if from_hub:
            raise KeyframeWorldsError(f"{folder} is incomplete after the download: {listed}. Run the download again "
                                      "to resume it.")
        raise KeyframeWorldsError(f"the hub cache's copy of {model.name} is incomplete ({listed}) and the Hub was not "
                                  f"asked (offline{' or unreachable' if hub_failure is not None else ''})")
    return folder


def _fetch(model: HubModel, local_dir: Path | None, storage: Path, revision: str | None, files: list[str],
           bytes_total: int | None, progress: ProgressCallback | None, max_workers: int) -> Path:
    """snapshot_download of ``files`` (the Hub answered): into the cache, or into ``local_dir``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError
    from requests.exceptions import RequestException

    where = model.repo_id + (f"/{model.subfolder}" if model.subfolder else "")
    if not files:
        raise KeyframeWorldsError(f"{where} has no safetensors or config files to fetch (the engine loads "
                                  "safetensors only)")
    watched = local_dir if local_dir is not None else storage
    try:
        watched.mkdir(parents=True, exist_ok=True)
        watcher = _Watcher(model.name, [watched], len(files), bytes_total, progress or (lambda p: None))
        with watcher if progress is not None else nullcontext():
            path = snapshot_download(model.repo_id, revision=revision, local_dir=local_dir,
                                     allow_patterns=model.allow_patterns, max_workers=max_workers,
                                     tqdm_class=_counting_tqdm(watcher) if progress is not None else None)
        if progress is not None:  # every file is there now, also those a previous run had fetched
            done = bytes_total if bytes_total is not None else watcher.bytes_so_far()
            progress(Progress(model.name, len(files), len(files), done, bytes_total))
    except (RequestException, HfHubHTTPError) as exc:
        raise KeyframeWorldsError(f"the download of {where} was interrupted ({_first_line(exc)}); run the same command "
                                  "again to resume it") from None
    except OSError as exc:
        from ...bridge.paths import describe_os_error

        raise KeyframeWorldsError(f"cannot download {where}: {describe_os_error(exc)}") from None
    return model.folder_in(Path(path)) if model.subfolder else Path(path)


def _from_cache(model: HubModel, local_dir: Path | None, revision: str | None,
                progress: ProgressCallback | None, hub_failure: Exception | None) -> Path:
    """The model from the hub cache without a request; into ``local_dir`` by links when one is given."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(model.repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError as exc:
        raise KeyframeWorldsError(_hub_error_line(model, hub_failure or exc)) from None
    if model.subfolder and not model.folder_in(snapshot).is_dir():
        raise KeyframeWorldsError(_hub_error_line(model, hub_failure or LocalEntryNotFoundError(model.subfolder)))
    if local_dir is None:
        return model.folder_in(snapshot) if model.subfolder else snapshot
    files = _snapshot_files(snapshot, model)
    sizes = [(snapshot / f).stat().st_size if (snapshot / f).exists() else 0 for f in files]
    done = 0
    for i, (name, size) in enumerate(zip(files, sizes)):
        if not (snapshot / name).exists():
            continue  # a link to a deleted blob: the completeness check names it
        _link_or_copy(snapshot / name, local_dir / name)
        done += size
        if progress is not None:
            progress(Progress(model.name, i + 1, len(files), done, sum(sizes)))
    return model.folder_in(local_dir) if model.subfolder else local_dir
