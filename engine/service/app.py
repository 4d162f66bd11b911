"""The HTTP API (FastAPI): routes, bearer token, body size limit, and every error as a JSON body.

Routes (all under ``/v1``; every one but ``health`` needs ``Authorization: Bearer <token>``):

    GET  /health                     version, devices, generators, GPU memory, job counts, disk use
    POST /jobs                       submit: multipart (spec + image [+ depth] [+ points] uploads),
                                     or a JSON spec with local paths (loopback clients only)
    GET  /jobs                       every job, oldest first
    GET  /jobs/{id}                  state, stage, progress, frames done, time left, error
    POST /jobs/{id}/cancel           cancel (pending: at once; running: at its next progress check, or its
                                     worker process is ended within seconds)
    POST /jobs/{id}/retry            queue a failed or cancelled job again; it resumes from its checkpoint
    DELETE /jobs/{id}                delete a finished, failed or cancelled job and its folder
    GET  /jobs/{id}/manifest         the result manifest of a completed job
    GET  /jobs/{id}/files/{path}     a file of the result bundle (path relative to the bundle)
    GET  /jobs/{id}/log              the job's log

Every rejected request gets ``{"error": "...", "problems": [{"path", "reason"}, ...]}``
with a 4xx status; ``problems`` is the bridge validator's list for a bad spec.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable
from urllib.parse import unquote

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field, create_model
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ... import __version__
from ...bridge.errors import KeyframeWorldsError, Problem, ValidationError
from ...bridge.jobs import CANCELLING_STAGE, STATUS_FIELD_DOCS, JobState, JobStatus
from ...bridge.panorama import PROJECTIONS
from ...bridge.spec import MANIFEST_FILENAME, validate_job, view_images
from ...bridge.trajectory import safe_text
from .jobs import (
    JOB_ID_PATTERN,
    LOG_FILENAME,
    OUTPUT_DIRNAME,
    DiskFull,
    JobConflict,
    JobManager,
    JobNotFound,
    QueueFull,
    StorageError,
)

API_PREFIX = "/v1"
# What the files route answers every bundle file as (the document says so; clients read the bytes).
BUNDLE_FILE_MEDIA_TYPE = "application/octet-stream"
# Parts a multipart submission may carry.
UPLOAD_FIELDS = ("spec", "image", "depth", "points")


# --- errors ----------------------------------------------------------------------


class ApiError(Exception):
    """A rejected request: HTTP status, message, and optionally the validator's problems."""

    def __init__(self, status: int, error: str, problems: list[Problem] | None = None, headers: dict | None = None):
        super().__init__(error)
        self.status, self.error, self.problems, self.headers = status, error, list(problems or []), headers


class BodyTooLarge(Exception):
    pass


def error_response(status: int, error: str, problems: list[Problem] | None = None, headers: dict | None = None) -> JSONResponse:
    # Every text is made UTF-8-safe here, so no message (echoing a client's bad field name) can turn into a 500.
    body = {"error": safe_text(error), "problems": [{"path": safe_text(p.path), "reason": safe_text(p.reason)} for p in problems or []]}
    return JSONResponse(body, status_code=status, headers=headers)


# --- response models (for the OpenAPI document and for checking what we answer) ----------


class ProblemModel(BaseModel):
    path: str = Field(description="field path in the job spec, e.g. trajectories[0].frames[3].fx")
    reason: str


class ErrorModel(BaseModel):
    error: str
    problems: list[ProblemModel] = Field(default_factory=list)


def _status_model() -> type[BaseModel]:
    """The OpenAPI schema of a job status, generated from the one definition, ``bridge.jobs.JobStatus``."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(JobStatus)
    columns: dict[str, Any] = {}
    for f in dataclasses.fields(JobStatus):
        kind = str if f.name == "state" else hints[f.name]  # the state travels as its word
        extra = {"ge": 0.0, "le": 1.0} if f.name == "progress" else {}
        default = ... if f.default is dataclasses.MISSING else (f.default.value if f.name == "state" else f.default)
        columns[f.name] = (kind, Field(default=default, description=STATUS_FIELD_DOCS[f.name], **extra))
    return create_model("JobStatusModel", **columns)


JobStatusModel = _status_model()


class JobListModel(BaseModel):
    jobs: list[JobStatusModel]


class GpuMemoryModel(BaseModel):
    device: str
    name: str
    free_bytes: int
    total_bytes: int


class WorkerModel(BaseModel):
    device: str
    pid: int | None = Field(description="the worker process; null while it is down")
    state: str = Field(description="starting, idle, busy or dead")
    model: str | None = Field(description="the warm model it keeps loaded between jobs, if any")
    loads: int = Field(description="models it has loaded with weights since it started")
    restarts: int = Field(description="times it was restarted after dying or being ended")


class DiskModel(BaseModel):
    used_bytes: int = Field(description="what the job root holds")
    budget_bytes: int | None = Field(description="the most it may hold (serve --disk-budget-gb); null: no budget")
    free_bytes: int = Field(description="space left on the device holding it")


class DeletedModel(BaseModel):
    id: str
    deleted: bool
    freed_bytes: int = Field(description="the bytes its folder took")


class HealthModel(BaseModel):
    status: str
    version: str
    device: str = Field(description="the device of the first worker")
    devices: list[str]
    generators: list[str]
    gpu_memory: list[GpuMemoryModel]
    queue_size: int
    jobs: dict[str, int]
    workers: list[WorkerModel] = Field(description="one worker process per device")
    disk: DiskModel


def job_spec_schema() -> dict:
    """The JSON schema of a job spec v1 as the server accepts it: what ``bridge.spec.validate_job`` requires.

    The validator stays the authority (it also checks what a schema cannot: rigid matrices, frame order,
    files); a test checks that this schema requires exactly the fields the validator requires.
    """
    from ...bridge.spec import GENERATORS, JOB_VERSION, MAX_TRAJECTORIES
    from ...bridge.trajectory import MAX_FRAMES, MAX_SIZE_PX, MIN_SIZE_PX

    number = {"type": "number"}
    side = {"type": "integer", "minimum": MIN_SIZE_PX, "maximum": MAX_SIZE_PX}
    frame = {"type": "object", "additionalProperties": False, "required": ["frame", "c2w_opencv", "fx", "fy", "cx", "cy"],
             "properties": {"frame": {"type": "integer"},
                            "c2w_opencv": {"type": "array", "minItems": 4, "maxItems": 4,
                                           "items": {"type": "array", "minItems": 4, "maxItems": 4, "items": number},
                                           "description": "camera-to-world, OpenCV axes (x right, y down, z forward), metres"},
                            "fx": {"type": "number", "exclusiveMinimum": 0}, "fy": {"type": "number", "exclusiveMinimum": 0},
                            "cx": number, "cy": number,
                            "distortion": {"type": ["object", "null"]}, "image": {"type": ["string", "null"]}}}
    trajectory = {"type": "object", "additionalProperties": False, "required": ["name", "width", "height", "frames"],
                  "properties": {"name": {"type": "string", "minLength": 1}, "fps": {"type": "number", "exclusiveMinimum": 0},
                                 "width": side, "height": side,
                                 "frames": {"type": "array", "minItems": 1, "maxItems": MAX_FRAMES, "items": frame}}}
    return {
        "type": "object", "additionalProperties": False, "title": "JobSpec",
        "description": "job spec v1 (bridge/spec.py); every text must be valid UTF-8",
        "required": ["version", "name", "generator", "reference", "trajectories"],
        "properties": {
            "version": {"type": "integer", "enum": [JOB_VERSION]},
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
            "generator": {"type": "string", "enum": list(GENERATORS)},
            "prompt": {"type": "string"},
            "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
            "reference": {"type": "object", "additionalProperties": False, "required": ["image"],
                          "properties": {"image": {"type": "string", "description": "the reference image's path"},
                                         "depth": {"type": "string", "description": "its z-depth in metres (.npy or .exr)"},
                                         "trajectory": {"type": "string"}, "frame": {"type": "integer"},
                                         "projection": {"type": "string", "enum": list(PROJECTIONS),
                                                        "description": "equirectangular: a 2:1 panorama around the reference camera"},
                                         "views": {"type": "string", "description": "a trajectory file or folder (a pano_bank) "
                                                   "whose frames' images are more reference views (local paths only)"},
                                         "points": {"type": "string", "description": "a point cloud seeding the memory "
                                                    "(.ply, or a COLMAP model folder), in the trajectories' world frame"}}},
            "trajectories": {"type": "array", "minItems": 1, "maxItems": MAX_TRAJECTORIES, "items": trajectory},
            "output": {"type": "object", "additionalProperties": False,
                       "properties": {"mesh_every": {"type": "integer", "minimum": 1, "maximum": 100_000},
                                      "keyframe_every": {"type": "integer", "minimum": 1, "maximum": 100_000,
                                                         "deprecated": True},
                                      "mesh_stride": {"type": "integer", "minimum": 1, "maximum": 256},
                                      "point_budget": {"type": "integer", "minimum": 1000, "maximum": 200_000_000}}},
            "geometry": {"type": "object", "additionalProperties": False,
                         "properties": {"depth_model": {"type": ["string", "null"]}, "device": {"type": "string"},
                                        "flow": {"type": "string", "enum": ["dis", "raft", "none"]},
                                        "point_maps": {"type": "boolean"}}},
            "execution": {"type": "object", "additionalProperties": False,
                          "properties": {"split_trajectories": {
                                             "type": "boolean", "description": "run each trajectory on a free worker "
                                             "from the reference's memory and fuse them (opt-in; README: Render farms)"},
                                         "trajectories": {"type": ["array", "null"], "minItems": 1,
                                                          "items": {"type": "string"}}}},
            "options": {"type": "object", "description": "the generator's own settings, checked before queueing"},
        },
    }


def _document_what_the_server_does(doc: dict) -> dict:
    """Make the generated OpenAPI document say what the server answers.

    FastAPI documents a 422 with its own body for every route with parameters; this server answers a
    malformed request with 400 and an ErrorModel. Error bodies are JSON even on routes whose success is
    plain text (the log).
    """
    error_ref = {"$ref": "#/components/schemas/ErrorModel"}
    for path_item in doc.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.get("responses", {})
            # Only a body can fail FastAPI's own checks here (path parameters are plain strings, checked by the routes).
            if responses.pop("422", None) is not None and "requestBody" in operation and "400" not in responses:
                responses["400"] = {"description": "the request is malformed", "content": {"application/json": {"schema": error_ref}}}
            for code, response in responses.items():
                if code.startswith(("4", "5")):
                    response["content"] = {"application/json": {"schema": error_ref}}
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return doc


# --- the app -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AppSettings:
    """token: the bearer token; max_body_bytes: request body limit; generators: the ones this engine can run;
    gpu_memory: what health reports; check_options: the generators' own option checks."""

    token: str
    max_body_bytes: int = 512 * 1024 * 1024
    generators: tuple[str, ...] = ("preview",)
    gpu_memory: Callable[[], list[dict]] = lambda: []
    # The generator's own check of the job's options before queueing: (generator, options) -> problems.
    check_options: Callable[[str, dict], list[Problem]] = lambda generator, options: []
    # The only folders local-path submissions may read from (serve --allow-path), as real paths; none: no local paths.
    allowed_paths: tuple[Path, ...] = ()
    # This machine's models (serve --model-dir, --depth-model, their variables; run.machine.MachineModels), filled
    # into every submitted spec as `run` fills them, before the generator's checks. None: nothing filled.
    machine: Any = None


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413, by Content-Length up front and by counting while streaming."""

    # Up to this size an oversized body is read and dropped before answering, so the client
    # (still sending) reliably receives the 413 instead of a reset connection.
    DRAIN_LIMIT = 64 * 1024 * 1024

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await error_response(400, "Content-Length is not a number")(scope, receive, send)
            if declared > self.max_bytes:
                if declared <= self.DRAIN_LIMIT:
                    more = True
                    while more:
                        message = await receive()
                        more = message.get("more_body", False) and message["type"] == "http.request"
                return await error_response(413, self._message(declared))(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        return await self.app(scope, limited_receive, send)

    def _message(self, size: int | None = None) -> str:
        got = f" ({size} bytes)" if size is not None else ""
        return f"request body too large{got}: the limit is {self.max_bytes} bytes (serve --max-body-mb)"


class EncodedSlashMiddleware:
    """Route on the path's segments as sent: an encoded slash (``%2F``) stays inside its segment.

    The server decodes the path before routing, so a job id ``a%2Fcancel`` would reach the cancel route (405
    for GET), ``a%2F`` a redirect, ``a%2Fb%2Fc`` no route at all (404 before the token is checked). Keeping
    the slash encoded makes such an id what it is, an unknown job, on the route the client addressed.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        raw = scope.get("raw_path") if scope["type"] == "http" else None
        if raw and b"%2f" in raw.lower():
            segments = raw.decode("latin-1").split("/")
            scope = {**scope, "path": "/".join(unquote(segment).replace("/", "%2F") for segment in segments)}
        return await self.app(scope, receive, send)


def is_loopback_client(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def create_app(manager: JobManager, settings: AppSettings) -> FastAPI:
    app = FastAPI(
        title="Keyframe Worlds engine",
        version=__version__,
        description="Jobs that generate a world along keyframed cameras. Every route but /v1/health needs "
        "'Authorization: Bearer <token>' (the token the engine was started with).",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind the token like every route but health
    )
    app.state.manager = manager
    app.state.settings = settings
    limiter = BodyLimitMiddleware(None, settings.max_body_bytes)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(EncodedSlashMiddleware)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.error, exc.problems, exc.headers)

    # The manager's refusals mean the same on every route (submit words a shutdown as 503 itself).
    for error_type, status in ((JobNotFound, 404), (JobConflict, 409), (QueueFull, 429), (StorageError, 500)):
        def _job_error(request: Request, exc: Exception, status: int = status):
            headers = {"Retry-After": "5"} if status == 429 else None
            return error_response(status, str(exc), headers=headers)

        app.add_exception_handler(error_type, _job_error)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge):
        return error_response(413, limiter._message())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the first route on the path only (POST for /v1/jobs,
            # which also answers GET); RFC 9110 wants every method the resource supports.
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(app, request.scope))}
        return error_response(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, exc: RequestValidationError):
        problems = [Problem(".".join(str(p) for p in e.get("loc", ())), str(e.get("msg", ""))) for e in exc.errors()]
        return error_response(400, "request is invalid", problems)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    def require_token(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.token.encode()):
            reason = "missing bearer token" if not header else "wrong token"
            raise ApiError(401, f"{reason}: send 'Authorization: Bearer <token>' with the engine's token",
                           headers={"WWW-Authenticate": "Bearer"})

    def job_id_checked(job_id: str) -> str:
        if not JOB_ID_PATTERN.match(job_id):
            raise ApiError(404, f"no job {job_id[:80]!r}")
        return job_id

    def status_of(job_id: str) -> dict:
        try:
            status = manager.get(job_id)
        except JobNotFound as exc:
            raise ApiError(404, str(exc)) from None
        return status.to_json()

    # --- health ---------------------------------------------------------------------------

    @app.get(f"{API_PREFIX}/health", response_model=HealthModel, tags=["engine"], summary="Engine health (no token needed)")
    def health() -> dict:
        return {
            "status": "ok",
            "version": __version__,
            "device": manager.devices[0],
            "devices": list(manager.devices),
            "generators": list(settings.generators),
            "gpu_memory": settings.gpu_memory(),
            "queue_size": manager.queue_size,
            "jobs": manager.counts(),
            "workers": manager.worker_info(),
            "disk": manager.disk(),
        }

    api = APIRouter(prefix=API_PREFIX, dependencies=[Depends(require_token)],
                    responses={401: {"model": ErrorModel, "description": "missing or wrong token"}})

    # --- submit -----------------------------------------------------------------------------

    submit_doc = {
        "parameters": [{"name": "base_dir", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "JSON submissions only: the folder the spec's relative reference paths are resolved against"}],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "additionalProperties": False,  # any other part is refused (400)
                        "required": ["spec", "image"],
                        "properties": {
                            "spec": {"type": "string", "contentMediaType": "application/json", "contentSchema": job_spec_schema(),
                                     "description": "the job spec v1 as JSON text (bridge/spec.py); its reference paths "
                                                    "name the uploaded files"},
                            "image": {"type": "string", "format": "binary", "description": "the reference image"},
                            "depth": {"type": "string", "format": "binary", "description": "its z-depth (.npy or .exr), when the spec names one"},
                            "points": {"type": "string", "format": "binary",
                                       "description": "the memory's seed (.ply), when the spec names reference.points"},
                        },
                    }
                },
                "application/json": {
                    "schema": {**job_spec_schema(), "description": "the job spec v1 with local reference paths (loopback clients only)"}
                },
            },
        },
    }

    @api.post("/jobs", status_code=201, response_model=JobStatusModel, tags=["jobs"], summary="Submit a job",
              openapi_extra=submit_doc,
              responses={400: {"model": ErrorModel, "description": "invalid spec: every problem with its field path"},
                         403: {"model": ErrorModel, "description": "local paths from another machine, or outside the folders given to serve --allow-path"},
                         413: {"model": ErrorModel, "description": "request body too large"},
                         415: {"model": ErrorModel, "description": "neither multipart/form-data nor application/json"},
                         429: {"model": ErrorModel, "description": "the queue is full"},
                         500: {"model": ErrorModel, "description": "the engine cannot write its job root (read-only, permissions)"},
                         507: {"model": ErrorModel, "description": "no space left for the job's folder"}})
    async def submit(request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            doc, inputs, notes = await _json_submission(request)
        elif content_type == "multipart/form-data":
            doc, inputs, notes = await _multipart_submission(request, settings.max_body_bytes)
        else:
            raise ApiError(415, f"unsupported content type {content_type!r}: send multipart/form-data (spec, image, depth, points) "
                                "or application/json (a spec with local paths)")
        if doc["generator"] not in settings.generators:
            raise ApiError(400, "job spec is invalid (1 problem(s))",
                           [Problem("generator", f"generator {doc['generator']!r} is not available in this engine; "
                                                 f"available: {', '.join(settings.generators)}")])
        problems = await run_in_threadpool(settings.check_options, doc["generator"], doc.get("options", {}))
        if problems:
            raise ApiError(400, f"job spec is invalid ({len(problems)} problem(s))", problems)
        try:
            status = await run_in_threadpool(manager.submit, doc, inputs, tuple(notes))
        except ValidationError as exc:
            raise ApiError(400, f"{exc.what} is invalid ({len(exc.problems)} problem(s))", exc.problems) from None
        except QueueFull as exc:
            raise ApiError(429, str(exc), headers={"Retry-After": "5"}) from None
        except DiskFull as exc:
            raise ApiError(507, str(exc)) from None
        except StorageError as exc:
            raise ApiError(500, str(exc)) from None
        except JobConflict as exc:
            raise ApiError(503, str(exc)) from None
        except KeyframeWorldsError as exc:
            raise ApiError(400, str(exc)) from None
        return JSONResponse(manager.get(status.id).to_json(), status_code=201, headers={"Location": f"{API_PREFIX}/jobs/{status.id}"})

    def _with_machine(doc: Any) -> tuple[Any, list[str]]:
        """The submitted document with this machine's models filled in (``run.machine.apply_machine``), before it is
        checked, as `run` does; and the lines saying what was filled."""
        if settings.machine is None:
            return doc, []
        from ..run.machine import apply_machine

        return apply_machine(doc, settings.machine)

    async def _json_submission(request: Request) -> tuple[dict, dict, list[str]]:
        if not is_loopback_client(request):
            raise ApiError(403, "a spec with local paths is accepted from this machine only; upload the files (multipart) instead")
        doc, notes = _with_machine(parse_json(await request.body(), "request body"))
        base_dir = request.query_params.get("base_dir")
        if base_dir is not None and not Path(base_dir).is_absolute():
            raise ApiError(400, "request is invalid", [Problem("base_dir", f"must be an absolute folder, got {base_dir!r}")])
        check_spec(doc, base_dir=None, check_files=False)
        for key in ("image", "depth", "points"):
            value = doc["reference"].get(key)
            if value is not None and not Path(value).is_absolute() and base_dir is None:
                raise ApiError(400, "job spec is invalid (1 problem(s))",
                               [Problem(f"reference.{key}", "is relative: give an absolute path, or base_dir in the query")])
        base = Path(base_dir or "/")
        # Before the files are looked at, so nothing (not even whether a file exists) is told outside the allowed folders.
        readable = {key: allowed_file(base / doc["reference"][key], f"reference.{key}", settings.allowed_paths)
                    for key in ("image", "depth", "points") if doc["reference"].get(key)}
        views = doc["reference"].get("views")
        if isinstance(views, str):
            doc["reference"]["views"] = str(allowed_file(base / views, "reference.views", settings.allowed_paths))
        model = (doc.get("geometry") or {}).get("depth_model")
        machine_model = settings.machine is not None and model is not None and model == str(settings.machine.depth_model)
        if isinstance(model, str) and Path(model).is_absolute() and not machine_model:  # this machine's own is no request's
            allowed_file(Path(model), "geometry.depth_model", settings.allowed_paths)
        check_spec(doc, base_dir=base, check_files=True)
        inputs = {key: copier(path) for key, path in readable.items()}
        if isinstance(views, str):
            # Copied into the job like the other reference files (the job folder is then whole, and a views folder
            # changed after the submission changes nothing): every image a view names must be readable here too.
            images = [(traj, i, allowed_file(path, "reference.views", settings.allowed_paths))
                      for traj, i, path in view_images(doc["reference"]["views"])]
            inputs["views"] = views_copier(images)
            doc["reference"]["views"] = VIEWS_FILENAME
        if "points" in readable and readable["points"].is_dir():
            # A COLMAP model folder is copied as the PLY of its points3D, the one form a job folder carries.
            inputs["points"] = seed_copier(readable["points"])
            doc["reference"]["points"] = f"{readable['points'].name or 'points'}.ply"
        return doc, inputs, notes

    async def _multipart_submission(request: Request, limit: int) -> tuple[dict, dict, list[str]]:
        try:
            form = await request.form(max_files=4, max_fields=8, max_part_size=limit)
        except BodyTooLarge:
            raise
        except Exception as exc:  # malformed multipart in any of the parser's ways
            raise ApiError(400, f"malformed multipart body: {getattr(exc, 'detail', None) or exc}") from None
        unknown = sorted(set(form.keys()) - set(UPLOAD_FIELDS))
        if unknown:
            raise ApiError(400, "request is invalid", [Problem(k, f"unknown part; expected {', '.join(UPLOAD_FIELDS)}") for k in unknown])
        for key in form.keys():
            if len(form.getlist(key)) > 1:
                raise ApiError(400, "request is invalid", [Problem(key, "given more than once")])
        raw = form.get("spec")
        if raw is None:
            raise ApiError(400, "request is invalid", [Problem("spec", "is required: the job spec as JSON")])
        if not isinstance(raw, str):
            raw = await raw.read()
        doc, notes = _with_machine(parse_json(raw, "spec part"))
        check_spec(doc, base_dir=None, check_files=False)
        inputs = {}
        if doc["reference"].get("views") is not None:
            raise ApiError(400, "request is invalid", [Problem("reference.views", "cannot be uploaded (a folder of views): "
                                                       "submit the spec with local paths from this machine instead")])
        for key in ("image", "depth", "points"):
            named = doc["reference"].get(key)
            part = form.get(key)
            if named is not None and part is None:
                raise ApiError(400, "request is invalid", [Problem(key, f"the spec names reference.{key} {named!r} but no '{key}' file was uploaded")])
            if named is None and part is not None:
                raise ApiError(400, "request is invalid", [Problem(key, f"a '{key}' file was uploaded but the spec names no reference.{key}")])
            if part is None:
                continue
            if isinstance(part, str):
                raise ApiError(400, "request is invalid", [Problem(key, "must be a file upload, not a text field")])
            inputs[key] = upload_writer(part.file)
        return doc, inputs, notes

    # --- read and cancel ---------------------------------------------------------------

    @api.get("/jobs", response_model=JobListModel, tags=["jobs"], summary="Every job, oldest first")
    async def list_jobs() -> dict:  # in-memory reads under a short lock: no thread hop
        return {"jobs": [status.to_json() for status in manager.list()]}

    not_found = {404: {"model": ErrorModel, "description": "no such job"}}

    @api.get("/jobs/{job_id}", response_model=JobStatusModel, tags=["jobs"], summary="A job's state", responses=not_found)
    async def get_job(job_id: str) -> JSONResponse:
        # A Response skips re-validating the model: this route is what clients poll.
        return JSONResponse(status_of(job_id_checked(job_id)))

    @api.post("/jobs/{job_id}/cancel", response_model=JobStatusModel, tags=["jobs"], summary="Cancel a job",
              responses={**not_found, 409: {"model": ErrorModel, "description": "the job has already finished"}})
    def cancel_job(job_id: str) -> dict:
        status = manager.cancel(job_id_checked(job_id))
        if status.state is JobState.RUNNING:
            # It stops at its next progress check; until then it is still running, and the reply says it is stopping.
            status = status.copy(stage=CANCELLING_STAGE)
        return status.to_json()

    @api.delete("/jobs/{job_id}", response_model=DeletedModel, tags=["jobs"], summary="Delete a finished, failed or cancelled job",
                description="Its folder (inputs, log, result bundle, checkpoint) is removed; the space is free at once.",
                responses={**not_found, 409: {"model": ErrorModel, "description": "the job is pending or running: cancel it first"},
                           500: {"model": ErrorModel, "description": "the engine cannot remove its folder"}})
    def delete_job(job_id: str) -> dict:
        freed = manager.delete(job_id_checked(job_id))
        return {"id": job_id, "deleted": True, "freed_bytes": freed}

    @api.post("/jobs/{job_id}/retry", response_model=JobStatusModel, tags=["jobs"], summary="Queue a failed or cancelled job again",
              description="It resumes from its last finished segment (the job's checkpoint).",
              responses={**not_found, 409: {"model": ErrorModel, "description": "the job is not failed or cancelled"},
                         429: {"model": ErrorModel, "description": "the queue is full"}})
    def retry_job(job_id: str) -> dict:
        manager.retry(job_id_checked(job_id))
        return status_of(job_id)

    @api.get("/jobs/{job_id}/manifest", tags=["jobs"], summary="The result manifest of a completed job",
             responses={200: {"description": "result manifest v1 (bridge/spec.py)", "content": {"application/json": {"schema": {"type": "object"}}}},
                        **not_found, 409: {"model": ErrorModel, "description": "the job has not completed"}})
    def get_manifest(job_id: str) -> JSONResponse:
        status = status_of(job_id_checked(job_id))
        if status["state"] != JobState.COMPLETED:
            raise ApiError(409, f"job {job_id} is {status['state']}; its manifest exists once it has completed")
        path = manager.folder(job_id) / OUTPUT_DIRNAME / MANIFEST_FILENAME
        try:
            return JSONResponse(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ApiError(404, f"job {job_id} has no readable manifest: {exc}") from None

    @api.get("/jobs/{job_id}/files/{file_path:path}", tags=["jobs"], summary="A file of the result bundle",
             responses={200: {"description": "the file", "content": {BUNDLE_FILE_MEDIA_TYPE: {}}},
                        400: {"model": ErrorModel, "description": "the path leaves the job's folder"}, **not_found})
    def get_file(job_id: str, file_path: str) -> FileResponse:
        job_id_checked(job_id)
        root = (manager.folder(job_id) / OUTPUT_DIRNAME).resolve()
        target = bundle_file(root, file_path)
        # One type for every file, as documented: a type guessed from the name would come from the machine's
        # mime tables (.exr is image/aces on one machine, unknown on the next) and would be undocumented.
        return FileResponse(target, media_type=BUNDLE_FILE_MEDIA_TYPE)

    @api.get("/jobs/{job_id}/log", response_class=PlainTextResponse, tags=["jobs"], summary="The job's log", responses=not_found)
    def get_log(job_id: str) -> PlainTextResponse:
        job_id_checked(job_id)
        path = manager.folder(job_id) / LOG_FILENAME
        try:
            return PlainTextResponse(path.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            return PlainTextResponse("")

    generated_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _document_what_the_server_does(generated_openapi())
        return app.openapi_schema

    app.openapi = openapi

    @api.get("/openapi.json", include_in_schema=False)
    def openapi_document() -> JSONResponse:
        return JSONResponse(app.openapi())

    app.include_router(api)
    return app


# --- helpers ------------------------------------------------------------------------------


def allowed_methods(app: FastAPI, scope: dict) -> list[str]:
    """Every method some route of ``app`` answers on the path of ``scope``, sorted.

    Each method is tried against the routes, since included routers do not list their routes' methods.
    """
    from starlette.routing import Match

    return [method for method in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
            if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in app.router.routes)]


def parse_json(raw: bytes | str, what: str) -> Any:
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, f"{what} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"{what} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"{what} is not acceptable JSON: {type(exc).__name__}: {str(exc)[:200]}") from None


def check_spec(doc: Any, base_dir, check_files: bool) -> None:
    """The bridge validator decides; a spec with problems is answered 400 with all of them."""
    problems = validate_job(doc, base_dir=base_dir, check_files=check_files)
    if problems:
        raise ApiError(400, f"job spec is invalid ({len(problems)} problem(s))", problems)


def allowed_file(path: Path, field: str, allowed: tuple[Path, ...]) -> Path:
    """``path`` with every symlink resolved, if that lies inside one of the ``allowed`` folders; else a 403.

    The resolved path is what is copied later, so a symlink swapped in after this check is not followed
    (the copy opens it with O_NOFOLLOW).
    """
    if not allowed:
        raise ApiError(403, "this engine reads no local paths (it was started without --allow-path): upload the files "
                            "(multipart) instead", [Problem(field, "local paths are not allowed")])
    real = Path(os.path.realpath(path))
    if any(real.is_relative_to(root) for root in allowed):
        return real
    lexical = Path(os.path.abspath(path))
    why = ("is a symlink that leaves the allowed folders" if any(lexical.is_relative_to(root) for root in allowed)
           else "is outside the folders this engine may read")
    raise ApiError(403, f"{field} {why} (serve --allow-path): upload the file instead",
                   [Problem(field, f"{why}: {', '.join(str(r) for r in allowed)}")])


def copier(source: Path) -> Callable[[Path], None]:
    """Copy ``source`` (a resolved path) to the job; the copy is never readable by more users than the source."""
    def write(target: Path) -> None:
        src = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            mode = stat.S_IMODE(os.fstat(src).st_mode) & 0o666
            dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            try:
                os.fchmod(dst, mode)  # O_CREAT's mode is narrowed by the umask only; this also caps it at the source's
                with open(src, "rb", closefd=False) as fin, open(dst, "wb", closefd=False) as fout:
                    shutil.copyfileobj(fin, fout, 1024 * 1024)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    return write


#: What a copied ``reference.views`` is called in the spec before the job renames it (its suffix is kept).
VIEWS_FILENAME = "views.json"


def views_copier(views: list[tuple]) -> Callable[[Path], None]:
    """Write ``reference.views`` into the job: the cameras as a keyframe-worlds trajectory file at the target (lossless:
    lenses and all), each view's image (``(camera, frame index, resolved path)``, as ``bridge.spec.view_images``
    gives them) copied beside it as ``<target stem>/<camera number>/<frame:06d><suffix>``, the names the file holds."""
    def write(target: Path) -> None:
        from dataclasses import replace

        from ...bridge.formats import write_trajectories

        cameras: dict[str, Any] = {}
        names: dict[str, dict[int, str]] = {}
        for traj, i, source in views:
            number = list(cameras).index(traj.name) if traj.name in cameras else len(cameras)
            cameras.setdefault(traj.name, traj)
            name = f"{target.stem}/{number}/{int(traj.frames[i]):06d}{source.suffix.lower()}"
            (target.parent / name).parent.mkdir(parents=True, exist_ok=True)
            copier(source)(target.parent / name)
            names.setdefault(traj.name, {})[i] = name
        write_trajectories([replace(t, images=tuple(names[n].get(i) for i in range(len(t.frames))))
                            for n, t in cameras.items()], target, "keyframe-worlds")

    return write


def seed_copier(folder: Path) -> Callable[[Path], None]:
    """Write the points3D of the COLMAP model in ``folder`` (a resolved path) to the job as PLY."""
    def write(target: Path) -> None:
        from ...bridge.seed import seed_as_ply

        seed_as_ply(folder, target)

    return write


def upload_writer(stream) -> Callable[[Path], None]:
    def write(target: Path) -> None:
        stream.seek(0)
        with open(target, "wb") as fh:
            shutil.copyfileobj(stream, fh, 1024 * 1024)

    return write


def bundle_file(root: Path, relative: str) -> Path:
    """The file ``relative`` inside the bundle folder ``root``; refuses any path that leaves it."""
    pure = PurePosixPath(relative)
    if (not relative or "\\" in relative or "\x00" in relative or pure.is_absolute() or ".." in pure.parts
            or (len(relative) > 1 and relative[1] == ":")):
        raise ApiError(400, f"path {relative[:200]!r} is not a relative path inside the job's folder")
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise ApiError(400, f"path {relative[:200]!r} leaves the job's folder")
    if not target.is_file() or (target.name.startswith(".") and ".tmp-" in target.name):
        raise ApiError(404, f"no file {relative[:200]!r} in the job's result bundle")
    return target
