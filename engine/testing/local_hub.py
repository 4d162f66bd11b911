"""A Hugging Face Hub on loopback, serving folders of this machine, so downloads are tested without the network.

It answers the requests ``huggingface_hub`` makes for ``snapshot_download``
and ``hf_hub_download`` (repository info with file sizes, ``HEAD``/``GET`` of
``/<repo>/resolve/<revision>/<path>`` with ``Range``), so pointing
``HF_ENDPOINT`` at it lets huggingface_hub itself build a hub cache in its own
layout (``models--org--name/blobs``, ``snapshots/<commit>/``, ``refs/main``) or
fill a plain folder. Only what those two functions need is served; anything
else is a 404 with the Hub's ``X-Error-Code``.

    with LocalHub({"org/name": folder}) as hub:
        env["HF_ENDPOINT"] = hub.url
        ...
    hub.requests   # (method, path, Range header or None) of every request, for tests

``drop_once``: repository paths whose first full ``GET`` is cut after half the
bytes (the connection closes), as a dropped connection would, so a test can
check that the next run resumes with a ``Range`` request.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class LocalHub:
    def __init__(self, repos: dict[str, Path], drop_once: tuple[str, ...] = ()):
        self.repos = {repo_id: Path(folder) for repo_id, folder in repos.items()}
        self.drop_once = set(drop_once)
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- what is served -------------------------------------------------------------------------------------------

    def files(self, repo_id: str) -> dict[str, Path]:
        root = self.repos[repo_id]
        return {str(p.relative_to(root)).replace("\\", "/"): p for p in sorted(root.rglob("*")) if p.is_file()}

    def commit(self, repo_id: str) -> str:
        """The repository's one revision: 40 hex digits from its file names and contents."""
        digest = hashlib.sha1()
        for name, path in self.files(repo_id).items():
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()

    @staticmethod
    def etag(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def info(self, repo_id: str, with_sizes: bool) -> dict:
        siblings = []
        for name, path in self.files(repo_id).items():
            entry: dict = {"rfilename": name}
            if with_sizes:
                size = path.stat().st_size
                entry.update(size=size, blobId=hashlib.sha1(path.read_bytes()).hexdigest(),
                             lfs={"sha256": self.etag(path), "size": size, "pointerSize": 134})
            siblings.append(entry)
        return {"id": repo_id, "modelId": repo_id, "sha": self.commit(repo_id), "private": False,
                "siblings": siblings}

    # -- server ---------------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start the hub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "LocalHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # tests read hub.requests instead
                pass

            def do_GET(self):
                hub._answer(self, body=True)

            def do_HEAD(self):
                hub._answer(self, body=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _not_found(self, handler: BaseHTTPRequestHandler, code: str) -> None:
        handler.send_response(404)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", f"{code}: not on this local hub")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def _repo_and_rest(self, parts: list[str]) -> tuple[str | None, list[str]]:
        if len(parts) >= 2 and f"{parts[0]}/{parts[1]}" in self.repos:
            return f"{parts[0]}/{parts[1]}", parts[2:]
        return None, parts

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        split = urlsplit(handler.path)
        path = unquote(split.path)
        with self._lock:
            self.requests.append((handler.command, path, handler.headers.get("Range")))
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "models"]:
            repo_id, rest = self._repo_and_rest(parts[2:])
            if repo_id is None:
                return self._not_found(handler, "RepoNotFound")
            if rest and (rest[0] != "revision" or len(rest) != 2):
                return self._not_found(handler, "EntryNotFound")
            data = json.dumps(self.info(repo_id, with_sizes="blobs=True" in split.query
                                        or "blobs=true" in split.query)).encode()
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            if body:
                handler.wfile.write(data)
            return
        repo_id, rest = self._repo_and_rest(parts)
        if repo_id is None:
            return self._not_found(handler, "RepoNotFound")
        if len(rest) < 3 or rest[0] != "resolve":
            return self._not_found(handler, "EntryNotFound")
        name = "/".join(rest[2:])
        source = self.files(repo_id).get(name)
        if source is None:
            return self._not_found(handler, "EntryNotFound")
        data = source.read_bytes()
        start = 0
        ranged = handler.headers.get("Range")
        if ranged and ranged.startswith("bytes=") and ranged[6:].split("-")[0].isdigit():
            start = int(ranged[6:].split("-")[0])
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", self.commit(repo_id))
        handler.send_header("ETag", f'"{self.etag(source)}"')
        handler.send_header("X-Linked-Etag", f'"{self.etag(source)}"')
        handler.send_header("X-Linked-Size", str(len(data)))
        handler.send_header("Accept-Ranges", "bytes")
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.send_header("Content-Length", str(len(data) - start))
        handler.end_headers()
        if not body:
            return
        with self._lock:
            drop = not start and name in self.drop_once
            self.drop_once.discard(name)
        if drop:
            handler.wfile.write(data[: len(data) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            return
        handler.wfile.write(data[start:])


def write_tiny_release_repos(root: str | Path, variants: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Tiny copies of the released repositories, laid out as on the Hub: the WorldStereo release (one folder per
    variant with ``config.json`` and a ``model.safetensors`` of the keys that differ from the backbone, plus files
    a download must skip) and the Wan2.1 I2V diffusers folder (``model_index.json``, the companions, the
    transformer's backbone keys in two shards with their index). Returns repo id -> folder."""
    from safetensors.torch import load_file, save_file

    from ..models.hub import WAN_I2V_REPO, WORLDSTEREO_REPO
    from ..models.names import VARIANTS
    from .tiny_models import write_tiny_variant, write_tiny_wan_folder

    root = Path(root)
    release = root / "release"
    backbone: dict = {}  # key -> tensor
    for i, variant in enumerate(variants or VARIANTS):
        folder = write_tiny_variant(release / variant, variant, seed=100 + i)
        weights = load_file(str(folder / "model.safetensors"))
        own = {k: v for k, v in weights.items() if k.startswith(("controlnet.", "camera_embedding.",
                                                                  "ref_index_embedding."))}
        backbone.update({k: v for k, v in weights.items() if k not in own})  # the same tiny backbone shapes
        save_file(own, str(folder / "model.safetensors"))
        (folder / "transformer_config.json").unlink()
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config["base_model"] = WAN_I2V_REPO
        (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        (folder / "training_state.pt").write_bytes(b"not fetched: a pickle")
    (release / "README.md").write_text("# tiny release\n", encoding="utf-8")
    (release / "assets").mkdir()
    (release / "assets" / "demo.mp4").write_bytes(b"not fetched: a sample video")

    wan = write_tiny_wan_folder(root / "wan")
    keys = sorted(backbone)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: backbone[k].contiguous() for k in part}, str(wan / "transformer" / name))
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (wan / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index),
                                                                                         encoding="utf-8")
    components = {"_class_name": "WanImageToVideoPipeline", "_diffusers_version": "0.36.0",
                  "image_encoder": ["transformers", "CLIPVisionModel"],
                  "image_processor": ["transformers", "CLIPImageProcessor"],
                  "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                  "text_encoder": ["transformers", "UMT5EncoderModel"],
                  "tokenizer": ["transformers", "T5TokenizerFast"],
                  "transformer": ["diffusers", "WanTransformer3DModel"],
                  "transformer_2": [None, None],
                  "vae": ["diffusers", "AutoencoderKLWan"]}
    (wan / "model_index.json").write_text(json.dumps(components, indent=1), encoding="utf-8")
    (wan / "examples").mkdir()
    (wan / "examples" / "i2v_input.JPG").write_bytes(b"not fetched: an example image")
    return {WORLDSTEREO_REPO: release, WAN_I2V_REPO: wan}
