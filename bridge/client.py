"""HTTP client of the engine service (``keyframe-worlds serve``), with ``requests`` only.

Runs inside Blender's Python: stdlib, numpy and requests. Every failure is a
:class:`~.errors.KeyframeWorldsError`: :class:`EngineUnavailable` when the
engine cannot be reached, :class:`EngineError` for a rejected request (its
``status`` and ``problems``), :class:`~.errors.ValidationError` for a spec the
engine's validator refused (same field paths as ``validate_job`` here).

    client = EngineClient("http://127.0.0.1:8765", token)
    job = client.submit("shot010/job.json")          # uploads the reference files
    status = client.wait(job.id, on_status=print)
    client.download_bundle(job.id, "shot010/result")
"""

from __future__ import annotations

import json
import tempfile
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import requests

from .atomic import atomic_write
from .errors import KeyframeWorldsError, Problem, ValidationError
from .jobs import JobStatus, StatusCallback
from .spec import MANIFEST_FILENAME, read_json, validate_job, validate_manifest

API = "/v1"


class EngineUnavailable(KeyframeWorldsError):
    """The engine did not answer (not started, crashed, wrong port, timed out)."""


class EngineError(KeyframeWorldsError):
    """The engine rejected a request: ``status`` is the HTTP status, ``problems`` any field problems."""

    def __init__(self, status: int, message: str, problems: list[Problem] | None = None):
        self.status = status
        self.problems = list(problems or [])
        super().__init__(message)


@dataclass(frozen=True)
class Health:
    version: str
    device: str
    devices: tuple[str, ...]
    generators: tuple[str, ...]
    gpu_memory: tuple[dict, ...]
    jobs: dict
    workers: tuple[dict, ...] = ()  # one per device: device, pid, state, model, loads, restarts
    disk: dict | None = None  # used_bytes, budget_bytes (None: no budget), free_bytes of the job root

    @classmethod
    def from_json(cls, doc: dict) -> "Health":
        return cls(doc["version"], doc["device"], tuple(doc["devices"]), tuple(doc["generators"]),
                   tuple(doc.get("gpu_memory", ())), dict(doc.get("jobs", {})), tuple(doc.get("workers", ())),
                   doc.get("disk"))


class EngineClient:
    """Talks to one engine. ``timeout``: seconds per request (connect and read)."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "EngineClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _request(self, method: str, route: str, timeout: float | None = None, **kwargs) -> requests.Response:
        url = f"{self.base_url}{API}{route}"
        try:
            response = self.session.request(method, url, timeout=timeout or self.timeout, **kwargs)
        except requests.Timeout:
            raise EngineUnavailable(f"the engine at {self.base_url} did not answer {method} {route} within {timeout or self.timeout:g} s") from None
        except requests.ConnectionError as exc:
            raise EngineUnavailable(f"cannot reach the engine at {self.base_url}: {_root_cause(exc)}") from None
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    def _json(self, method: str, route: str, **kwargs) -> Any:
        response = self._request(method, route, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise EngineError(response.status_code, f"the engine answered {method} {route} with something that is not JSON") from None

    # --- the API ---------------------------------------------------------------------------------

    def health(self, timeout: float | None = None) -> Health:
        return Health.from_json(self._json("GET", "/health", timeout=timeout))

    def submit(self, spec: str | os.PathLike | dict, base_dir: str | os.PathLike | None = None, upload: bool = True) -> JobStatus:
        """Submit a job spec (a job.json path, or a spec document with ``base_dir`` for its relative paths).

        ``upload``: send the reference files with the request (works with a
        remote engine); otherwise send absolute paths the local engine reads.
        The spec is validated here first, so a bad one fails before any upload.
        """
        if isinstance(spec, dict):
            doc = json.loads(json.dumps(spec))
            base = Path(base_dir) if base_dir is not None else None
        else:
            path = Path(spec)
            doc = read_json(path, "job spec")
            base = path.parent
        problems = validate_job(doc, base_dir=base, check_files=base is not None)
        if problems:
            raise ValidationError("job spec", problems)
        ref = doc["reference"]
        if not upload:
            for key in ("image", "depth", "points"):
                if ref.get(key) is not None:
                    full = Path(ref[key]) if base is None else base / ref[key]
                    ref[key] = str(full.resolve())
            return JobStatus.from_json(self._json("POST", "/jobs", json=doc))
        if base is None and any(not Path(ref[k]).is_absolute() for k in ("image", "depth", "points") if ref.get(k)):
            raise KeyframeWorldsError("submit: give base_dir for a spec with relative reference paths")
        with ExitStack() as stack:
            files: dict[str, Any] = {}
            for key in ("image", "depth", "points"):
                if ref.get(key) is not None:
                    full = Path(ref[key]) if base is None else base / ref[key]
                    if key == "points" and full.is_dir():
                        # A COLMAP model folder travels as the PLY of its points3D: one file part, the form jobs carry.
                        from .seed import seed_as_ply

                        temporary = Path(stack.enter_context(tempfile.TemporaryDirectory())) / f"{full.name or 'points'}.ply"
                        seed_as_ply(full, temporary)
                        full = temporary
                        ref[key] = full.name
                    files[key] = (full.name, stack.enter_context(open(full, "rb")), "application/octet-stream")
            files = {"spec": (None, json.dumps(doc), "application/json"), **files}
            return JobStatus.from_json(self._json("POST", "/jobs", files=files, timeout=max(self.timeout, 300.0)))

    def jobs(self) -> list[JobStatus]:
        return [JobStatus.from_json(d) for d in self._json("GET", "/jobs")["jobs"]]

    def status(self, job_id: str) -> JobStatus:
        return JobStatus.from_json(self._json("GET", f"/jobs/{_job(job_id)}"))

    def cancel(self, job_id: str) -> JobStatus:
        return JobStatus.from_json(self._json("POST", f"/jobs/{_job(job_id)}/cancel"))

    def retry(self, job_id: str) -> JobStatus:
        """Queue a failed or cancelled job again; it resumes from its last finished segment."""
        return JobStatus.from_json(self._json("POST", f"/jobs/{_job(job_id)}/retry"))

    def delete(self, job_id: str) -> int:
        """Delete a finished, failed or cancelled job and its files on the engine; returns the bytes freed."""
        return int(self._json("DELETE", f"/jobs/{_job(job_id)}").get("freed_bytes", 0))

    def manifest(self, job_id: str) -> dict:
        return self._json("GET", f"/jobs/{_job(job_id)}/manifest")

    def log(self, job_id: str) -> str:
        return self._request("GET", f"/jobs/{_job(job_id)}/log").text

    def file(self, job_id: str, path: str) -> bytes:
        return self._request("GET", f"/jobs/{_job(job_id)}/files/{_bundle_path(path)}").content

    def download(self, job_id: str, path: str, target: str | os.PathLike) -> Path:
        """Stream one bundle file to ``target`` (temporary name, then rename)."""
        target = Path(target)
        response = self._request("GET", f"/jobs/{_job(job_id)}/files/{_bundle_path(path)}", stream=True)
        try:
            with atomic_write(target) as tmp, open(tmp, "wb") as fh:
                for chunk in response.iter_content(1024 * 1024):
                    fh.write(chunk)
        except requests.RequestException as exc:
            raise EngineUnavailable(f"download of {path} from the engine broke off: {_root_cause(exc)}") from None
        finally:
            response.close()
        return target

    def download_bundle(self, job_id: str, target_dir: str | os.PathLike) -> Path:
        """Every file the manifest lists, then the manifest itself (last, as the engine writes it)."""
        target = Path(target_dir)
        manifest = self.manifest(job_id)
        problems = validate_manifest(manifest)
        if problems:
            raise ValidationError("result manifest from the engine", problems)
        for path in sorted(manifest_paths(manifest)):
            self.download(job_id, path, target / path)
        self.download(job_id, MANIFEST_FILENAME, target / MANIFEST_FILENAME)
        return target

    def wait(self, job_id: str, timeout: float | None = None, poll_s: float = 0.5,
             on_status: StatusCallback | None = None) -> JobStatus:
        """Poll until the job has finished (any of completed, failed, cancelled); returns its last status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if on_status is not None:
                on_status(status)
            if status.finished_state:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise KeyframeWorldsError(f"job {job_id} did not finish within {timeout:g} s (it is {status.state}, {status.stage})")
            time.sleep(poll_s)


def manifest_paths(manifest: dict) -> set[str]:
    """Every bundle-relative file a (validated) result manifest names."""
    paths: set[str] = set()
    for traj in manifest.get("trajectories", []):
        paths.update(traj[key] for key in ("video", "source_video") if traj.get(key))
        for f in traj.get("files", []):
            paths.update(v for k, v in f.items() if k != "frame" and v)
    for mesh in manifest.get("meshes", []):
        paths.update((mesh["path"], mesh["texture"]))
    if manifest.get("point_cloud"):
        paths.add(manifest["point_cloud"]["path"])
    return paths


def _job(job_id: str) -> str:
    if not isinstance(job_id, str) or not job_id or "/" in job_id or ".." in job_id:
        raise KeyframeWorldsError(f"not a job id: {job_id!r}")
    return job_id


def _bundle_path(path: str) -> str:
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or "\\" in path:
        raise KeyframeWorldsError(f"not a path inside a result bundle: {path!r}")
    from urllib.parse import quote

    return quote(path, safe="/")


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return str(exc) or type(exc).__name__


def _error_from(response: requests.Response) -> KeyframeWorldsError:
    try:
        body = response.json()
        message = str(body.get("error") or response.reason)
        problems = [Problem(str(p.get("path", "")), str(p.get("reason", ""))) for p in body.get("problems") or []]
    except (ValueError, AttributeError, TypeError):
        message, problems = (response.text[:300] or response.reason or "no message"), []
    if response.status_code == 400 and problems and "spec" in message:
        return ValidationError("job spec (as the engine sees it)", problems)
    return EngineError(response.status_code, f"engine answered {response.status_code}: {message}", problems)
