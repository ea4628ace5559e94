"""Fakes for Azure ML.

v2 at the wire: an azure-core HttpTransport that answers as the service does.

The real `MLClient` is built with a fake credential and this transport; every request it
sends (ARM, run history, blob storage) lands here, is recorded, and gets the status code,
headers and JSON/XML body the service would give. Nothing in azure-ai-ml is replaced except
the blob upload of the code snapshot (`BlobStorageClient.upload`), which is recorded: file
names and sizes.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
RESOURCE_GROUP = "rg"
WORKSPACE = "mlw-notebooks"
REGION = "westeurope"
ARM = "https://management.azure.com"
STORAGE_ACCOUNT = "wsstorage123"
ARTIFACT_CONTAINER = "azureml"
BLOB = f"https://{STORAGE_ACCOUNT}.blob.core.windows.net"
HISTORY_HOST = f"{REGION}.api.azureml.ms"
TERMINAL = ("Completed", "Failed", "Canceled", "NotResponding", "Paused")
HAPPY = ["NotStarted", "Queued", "Preparing", "Running", "Finalizing", "Completed"]
FAILING = ["NotStarted", "Queued", "Running", "Failed"]


def notebook_json(error: tuple[str, str] | None = None) -> dict[str, Any]:
    """An executed notebook as papermill writes it, failing in source cell 1 if `error`."""
    cells: list[dict[str, Any]] = [
        {"cell_type": "markdown", "metadata": {}, "source": "# title"},
        {"cell_type": "code", "metadata": {}, "source": "x = 1", "outputs": []},
    ]
    if error:
        cells[1]["outputs"] = [
            {"output_type": "error", "ename": error[0], "evalue": error[1], "traceback": ["tb"]}
        ]
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


class Script:
    """A status script: each read returns the current status, then advances one step."""

    def __init__(self, statuses: list[str]) -> None:
        self.statuses = list(statuses)
        self.position = 0
        self.cancel_requested = False

    @property
    def current(self) -> str:
        return self.statuses[self.position]

    def read(self) -> str:
        status = self.current
        if self.position < len(self.statuses) - 1:
            self.position += 1
        return status

    def cancel(self) -> None:
        if self.current in ("Completed", "Failed", "Canceled"):
            return
        self.cancel_requested = True
        self.statuses = [*self.statuses[: self.position], "CancelRequested", "Canceled"]


@dataclass
class Recorded:
    """One request as it left the SDK, and the status it was answered with."""

    method: str
    url: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    status: int = 0

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def route(self) -> str:
        """`METHOD path` with the workspace prefix shortened to `ws:`."""
        path = self.path.replace(_ws_prefix(), "ws:")
        return f"{self.method} {path}"


def _ws_prefix(ws: str = WORKSPACE) -> str:
    return (
        f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
        f"Microsoft.MachineLearningServices/workspaces/{ws}"
    )


class FakeCredential:
    """An azure-identity-shaped credential: hands out a token, or raises what it is told to."""

    TOKEN = "fake-aad-token-0123456789"

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []
        self.failures: list[Exception] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.scopes.append(scopes)
        if self.failures:
            raise self.failures.pop(0)
        return AccessToken(self.TOKEN, int(time.time()) + 3600)

    def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        from azure.core.credentials import AccessTokenInfo

        token = self.get_token(*scopes)
        return AccessTokenInfo(token.token, token.expires_on)


@dataclass
class FakeJob:
    name: str
    body: dict[str, Any]
    script: list[str]
    position: int = 0
    created: str = ""
    started: str | None = None
    ended: str | None = None
    error: str | None = None
    outputs: dict[str, bytes] = field(default_factory=dict)  # file name -> content

    @property
    def status(self) -> str:
        return self.script[self.position]

    def advance(self) -> None:
        if self.position < len(self.script) - 1:
            self.position += 1
        now = _now()
        if self.status in ("Running", "Finalizing") and self.started is None:
            self.started = now
        if self.status in ("Completed", "Failed", "Canceled"):
            self.started = self.started or (now if self.status != "Canceled" else None)
            self.ended = self.ended or now


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class ServiceAnswer(Exception):
    """Raised inside a route to answer with an error status."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class FakeAzureML:
    """The workspace's services behind one azure-core transport (`.transport`).

    State: registered environments (workspace and registry), code assets by content hash, jobs
    with a status script that moves one step per GET, and each job's output files.
    Misbehaviour on demand: `fail_next(route_regex, status, times, headers)` answers matching
    requests with an error; `lose_response(route_regex)` performs a request and then drops the
    connection, as a proxy that times out after the service committed does.
    """

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.unrouted: list[Recorded] = []
        self.environments: dict[str, dict[str, dict[str, Any]]] = {}  # name -> version -> body
        self.registry_environments: dict[tuple[str, str], dict[str, str]] = {}
        self.curated: set[str] = set()  # AzureML-... names the service resolves itself
        self.sleeps: list[float] = []  # what azure-core's retry policy slept, via transport
        self.codes: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}  # -> hash, body
        self.jobs: dict[str, FakeJob] = {}
        self.next_script: list[str] = list(HAPPY)
        self.on_create: Any = None  # called with each new FakeJob (scripts, outputs)
        self.uploads: list[dict[str, Any]] = []  # one per snapshot: {"files": {name: size}}
        self.blob_read_forbidden = False
        self.identity_based_storage = False
        self._faults: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.transport = _Transport(self)

    # -- test controls -------------------------------------------------------------------

    def register_environment(self, name: str, version: str = "1") -> None:
        body = {
            "id": f"{_ws_prefix()}/environments/{name}/versions/{version}",
            "name": version,
            "type": "Microsoft.MachineLearningServices/workspaces/environments/versions",
            "properties": {
                "image": "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest",
                "condaFile": "dependencies: [python=3.11, pip, {pip: [papermill, ipykernel]}]",
                "osType": "Linux",
                "isAnonymous": False,
                "isArchived": False,
                "tags": {},
                "properties": {},
            },
            "systemData": {"createdAt": _now(), "createdBy": "someone"},
        }
        self.environments.setdefault(name, {})[version] = body

    def fail_next(
        self,
        pattern: str,
        status: int,
        times: int = 1,
        headers: dict | None = None,
        message: str | None = None,
    ) -> None:
        self._faults.append(
            {
                "message": message,
                "pattern": re.compile(pattern),
                "status": status,
                "times": times,
                "headers": headers or {},
                "lose": False,
            }
        )

    def lose_response(self, pattern: str, times: int = 1) -> None:
        self._faults.append(
            {
                "pattern": re.compile(pattern),
                "status": 0,
                "times": times,
                "headers": {},
                "lose": True,
            }
        )

    def routes(self) -> list[str]:
        return [r.route for r in self.requests]

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for r in self.requests if rx.search(r.route))

    # -- dispatch ------------------------------------------------------------------------

    def handle(self, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.requests.append(rec)
            fault = next(
                (f for f in self._faults if f["times"] > 0 and f["pattern"].search(rec.route)),
                None,
            )
            if fault is not None:
                fault["times"] -= 1
                if not fault["lose"]:
                    return _error(
                        fault["status"],
                        "TooManyRequests" if fault["status"] == 429 else "ServiceError",
                        fault["message"] or f"injected {fault['status']}",
                        fault["headers"],
                    )
            for method, rx, func in _ROUTES:
                if method != rec.method:
                    continue
                match = rx.fullmatch(rec.host_path)
                if match:
                    try:
                        answer = func(self, rec, **match.groupdict())
                    except ServiceAnswer as exc:
                        answer = _error(exc.status, exc.code, exc.message, exc.headers)
                    break
            else:
                self.unrouted.append(rec)
                answer = _error(404, "NoRoute", f"the fake has no route {rec.route}")
            if fault is not None and fault["lose"]:
                rec.status = answer[0]  # done by the service; the answer never arrives
                raise _lost()
            return answer


def _lost() -> Exception:
    from azure.core.exceptions import ServiceResponseError

    return ServiceResponseError("Connection aborted: RemoteDisconnected('Remote end closed')")


def _error(status: int, code: str, message: str, headers: dict | None = None):
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (
        status,
        {
            "Content-Type": "application/json",
            "x-ms-request-id": str(uuid.uuid4()),
            **(headers or {}),
        },
        body,
    )


def _ok(payload: Any, status: int = 200, headers: dict | None = None):
    return (
        status,
        {"Content-Type": "application/json; charset=utf-8", **(headers or {})},
        (json.dumps(payload).encode()),
    )


_ROUTES: list[tuple[str, re.Pattern[str], Any]] = []
_WS = (
    r"management\.azure\.com/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
    r"Microsoft\.MachineLearningServices/workspaces/(?P<ws>[^/]+)"
)


def route(method: str, pattern: str):
    def register(func):
        _ROUTES.append((method, re.compile(pattern.replace("{WS}", _WS)), func))
        return func

    return register


class _Transport:
    """azure-core HttpTransport over FakeAzureML (subclassed lazily to keep imports light)."""

    def __new__(cls, service: FakeAzureML):
        from azure.core.pipeline.transport import HttpTransport

        class Transport(HttpTransport):
            def __enter__(self):
                return self

            def __exit__(self, *args):
                pass

            def open(self):
                pass

            def close(self):
                pass

            def send(self, request, **kwargs):
                return _send(service, request)

            def sleep(self, duration):  # azure-core's retry back-off: recorded, not waited
                service.sleeps.append(duration)

        return Transport()


def _recorded(request: Any) -> Recorded:
    """A request as it left the SDK (azure-core's or requests'), its body read as bytes."""
    body = request.body if request.body is not None else b""
    if hasattr(body, "read"):
        body = body.read()
    if isinstance(body, str):
        body = body.encode()
    parts = urlsplit(request.url)
    return Recorded(
        method=request.method,
        url=request.url,
        path=unquote(parts.path),
        query=parse_qs(parts.query),
        headers=dict(request.headers),
        body=bytes(body),
    )


def _requests_response(
    request: Any, status: int, headers: dict[str, str], payload: bytes, reason: str
) -> Any:
    """A `requests.Response` as the wire would have produced it."""
    import requests

    response = requests.Response()
    response.status_code = status
    response._content = payload
    response.raw = io.BytesIO(payload)
    response.headers.update(headers)
    response.url = request.url
    response.reason = reason
    return response


def _send(service: FakeAzureML, request: Any) -> Any:
    from azure.core.pipeline.transport._requests_basic import RequestsTransportResponse

    rec = _recorded(request)
    parts = urlsplit(request.url)
    rec.host_path = parts.netloc + parts.path  # matched raw: %3A stays visible
    status, headers, payload = service.handle(rec)
    rec.status = status
    reason = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content"}.get(status, "Error")
    response = _requests_response(request, status, headers, payload, reason)
    from azure.core.pipeline._tools import is_rest as _is_rest  # as RequestsTransport decides

    if _is_rest(request):
        from azure.core.pipeline.transport._requests_basic import (
            _handle_non_stream_rest_response,
        )
        from azure.core.rest._requests_basic import RestRequestsTransportResponse

        answer = RestRequestsTransportResponse(request=request, internal_response=response)
        _handle_non_stream_rest_response(answer)
        return answer
    return RequestsTransportResponse(request, response)


# -- code assets ---------------------------------------------------------------------------


def _check_scope(sub: str, rg: str, ws: str) -> None:
    if (sub, rg, ws) != (SUBSCRIPTION, RESOURCE_GROUP, WORKSPACE):
        raise ServiceAnswer(
            404,
            "ResourceNotFound",
            f"The Resource 'Microsoft.MachineLearningServices/workspaces/{ws}' under resource "
            f"group '{rg}' was not found.",
        )


@route("GET", "{WS}/codes/(?P<name>[^/]+)/versions")
def _list_code_versions(svc, rec, sub, rg, ws, name):
    _check_scope(sub, rg, ws)
    wanted = (rec.query.get("hash") or [None])[0]
    found = [body for h, body in svc.codes.values() if h == wanted]
    return _ok({"value": found})


@route("POST", "{WS}/codes/(?P<name>[^/]+)/versions/(?P<version>[^/]+)/startPendingUpload")
def _start_pending_upload(svc, rec, sub, rg, ws, name, version):
    _check_scope(sub, rg, ws)
    if (rec.json() or {}).get("pendingUploadType") != "TemporaryBlobReference":
        raise ServiceAnswer(400, "UserError", "pendingUploadType must be TemporaryBlobReference")
    blob = f"{BLOB}/{ARTIFACT_CONTAINER}-{name}"
    return _ok(
        {
            "blobReferenceForConsumption": {
                "blobUri": blob,
                "storageAccountArmId": f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg/providers/"
                f"Microsoft.Storage/storageAccounts/{STORAGE_ACCOUNT}",
                "credential": {
                    "credentialType": "SAS",
                    "sasUri": f"{blob}?sv=2021-10-04&se=2099-01-01&sr=c&sp=rcwl&sig=FAKE",
                },
            },
            "pendingUploadId": str(uuid.uuid4()),
            "pendingUploadType": "TemporaryBlobReference",
        }
    )


@route("PUT", "{WS}/codes/(?P<name>[^/]+)/versions/(?P<version>[^/]+)")
def _put_code_version(svc, rec, sub, rg, ws, name, version):
    _check_scope(sub, rg, ws)
    body = rec.json() or {}
    props = body.get("properties") or {}
    if not str(props.get("codeUri", "")).startswith("https://"):
        raise ServiceAnswer(400, "UserError", f"codeUri must be a blob URL, got {props!r}")
    stored = {
        "id": f"{_ws_prefix()}/codes/{name}/versions/{version}",
        "name": version,
        "type": "Microsoft.MachineLearningServices/workspaces/codes/versions",
        "properties": props,
        "systemData": {"createdAt": _now()},
    }
    content_hash = (props.get("properties") or {}).get("hash_sha256")
    svc.codes[(name, version)] = (str(content_hash), stored)
    return _ok(stored, 201)


@route("GET", "{WS}/codes/(?P<name>[^/]+)/versions/(?P<version>[^/]+)")
def _get_code_version(svc, rec, sub, rg, ws, name, version):
    _check_scope(sub, rg, ws)
    if (name, version) in svc.codes:
        return _ok(svc.codes[(name, version)][1])
    raise ServiceAnswer(404, "UserError", f"Code {name}:{version} not found")


# -- the one replaced SDK method: the code snapshot's blob upload ---------------------------


def record_uploads(service: FakeAzureML, monkeypatch: Any) -> None:
    """Replace `BlobStorageClient.upload` (azure-ai-ml's upload of a local folder to blob
    storage, many PUT Blob calls on worker threads) by a recorder: which files, what sizes,
    after the SDK's own ignore rules (.amlignore / .gitignore). It returns what the real method
    returns, so the SDK goes on to register the code version as after a real upload."""
    import os

    from azure.ai.ml._artifacts._blob_storage_helper import BlobStorageClient
    from azure.ai.ml._utils._asset_utils import generate_asset_id

    def upload(self, source, name, version, ignore_file=None, asset_hash=None, show_progress=True):
        root = Path(source)
        files = {}
        for folder, _, names in os.walk(root):
            for item in names:
                path = Path(folder, item)
                if ignore_file is not None and ignore_file.is_file_excluded(path):
                    continue
                files[path.relative_to(root).as_posix()] = path.stat().st_size
        service.uploads.append(
            {
                "name": name,
                "version": version,
                "hash": asset_hash,
                "files": files,
                "container": self.container,
            }
        )
        asset_id = generate_asset_id(asset_hash, include_directory=True)
        dest = f"{asset_id}/{root.name}"
        return {"remote path": dest, "name": name, "version": version, "indicator file": dest}

    monkeypatch.setattr(BlobStorageClient, "upload", upload)


# -- environments --------------------------------------------------------------------------


def _environment_versions(svc, name: str) -> dict[str, dict[str, Any]]:
    versions = svc.environments.get(unquote(name))
    if not versions:
        raise ServiceAnswer(
            404, "UserError", f"Environment container {unquote(name)!r} does not exist"
        )
    return versions


@route("GET", "{WS}/environments/(?P<name>[^/]+)/versions")
def _list_environment_versions(svc, rec, sub, rg, ws, name):
    _check_scope(sub, rg, ws)
    versions = list(_environment_versions(svc, name).values())
    order = (rec.query.get("$orderBy") or [""])[0]
    if order.startswith("createdtime desc"):
        versions = versions[::-1]
    top = int((rec.query.get("$top") or [len(versions)])[0])
    return _ok({"value": versions[:top]})


@route("GET", "{WS}/environments/(?P<name>[^/]+)/versions/(?P<version>[^/]+)")
def _get_environment_version(svc, rec, sub, rg, ws, name, version):
    _check_scope(sub, rg, ws)
    body = _environment_versions(svc, name).get(unquote(version))
    if body is None:
        raise ServiceAnswer(404, "UserError", f"Environment {unquote(name)}:{version} not found")
    return _ok(body)


# -- jobs ----------------------------------------------------------------------------------

COMPUTES = {"cpu-cluster", "cpu"}


def _job_resource(svc, job: FakeJob) -> dict[str, Any]:
    props = dict(job.body.get("properties") or {})
    props["status"] = job.status
    props["services"] = {
        "Studio": {
            "jobServiceType": "Studio",
            "endpoint": f"https://ml.azure.com/runs/{job.name}?wsid={_ws_prefix()}"
            "&tid=11111111-1111-1111-1111-111111111111",
        },
        "Tracking": {
            "jobServiceType": "Tracking",
            "endpoint": f"azureml://{HISTORY_HOST}/mlflow/v1.0{_ws_prefix()}",
        },
    }
    return {
        "id": f"{_ws_prefix()}/jobs/{job.name}",
        "name": job.name,
        "type": "Microsoft.MachineLearningServices/workspaces/jobs",
        "properties": props,
        "systemData": {
            "createdAt": job.created,
            "createdBy": "notebookops",
            "createdByType": "Application",
        },
    }


def _arm_name(arm_id: str, kind: str) -> str | None:
    match = re.fullmatch(rf"{re.escape(_ws_prefix())}/{kind}/([^/]+)(?:/versions/([^/]+))?", arm_id)
    return match.group(1) if match else None


@route("PUT", "{WS}/jobs/(?P<name>[^/]+)")
def _put_job(svc, rec, sub, rg, ws, name):
    _check_scope(sub, rg, ws)
    body = rec.json() or {}
    props = body.get("properties") or {}
    if name in svc.jobs:
        raise ServiceAnswer(409, "UserError", f"A job with this ID already exists: {name}")
    for key in ("jobType", "command", "environmentId", "computeId", "codeId"):
        if not props.get(key):
            raise ServiceAnswer(400, "UserError", f"properties.{key} is required")
    env_id = props["environmentId"]
    registry = re.fullmatch(
        r"azureml://registries/([^/]+)/environments/([^/]+)/(?:versions/([^/]+)|labels/([^/]+))",
        env_id,
    )
    curated = re.fullmatch(r"azureml:(AzureML-[^:@/]+)(?::[^:@/]+|@latest)", env_id)
    if curated:
        if curated.group(1) not in svc.curated:
            raise ServiceAnswer(400, "UserError", f"Curated environment {env_id} not found")
    elif registry:
        if (registry.group(1), registry.group(2)) not in svc.registry_environments:
            raise ServiceAnswer(400, "UserError", f"Environment {env_id} not found in registry")
    else:
        match = re.fullmatch(
            rf"{re.escape(_ws_prefix())}/environments/([^/]+)/versions/([^/]+)", env_id
        )
        if not match or match.group(2) not in svc.environments.get(match.group(1), {}):
            raise ServiceAnswer(400, "UserError", f"Environment {env_id!r} could not be resolved")
    compute = _arm_name(props["computeId"], "computes")
    if compute not in COMPUTES:
        raise ServiceAnswer(400, "UserError", f"Compute {props['computeId']} not found")
    if not any(b["id"] == props["codeId"] for _, b in svc.codes.values()):
        raise ServiceAnswer(400, "UserError", f"Code {props['codeId']} not found")
    job = svc.jobs[name] = FakeJob(
        name=name, body=body, script=list(svc.next_script), created=_now()
    )
    if svc.on_create is not None:
        svc.on_create(job)
    return _ok(_job_resource(svc, job), 201)


@route("GET", "{WS}/jobs/(?P<name>[^/]+)")
def _get_job(svc, rec, sub, rg, ws, name):
    _check_scope(sub, rg, ws)
    job = svc.jobs.get(name)
    if job is None:
        raise ServiceAnswer(404, "UserError", f"Job {name} not found")
    answer = _ok(_job_resource(svc, job))
    job.advance()
    return answer


@route("POST", "{WS}/jobs/(?P<name>[^/]+)/cancel")
def _cancel_job(svc, rec, sub, rg, ws, name):
    _check_scope(sub, rg, ws)
    job = svc.jobs.get(name)
    if job is None:
        raise ServiceAnswer(404, "UserError", f"Job {name} not found")
    if job.status not in ("Completed", "Failed", "Canceled"):
        job.script = [*job.script[: job.position], "CancelRequested", "Canceled"]
    operation = str(uuid.uuid4())
    location = f"{ARM}{_ws_prefix()}/operationResults/{operation}?api-version=2025-01-01-preview"
    return 202, {"Location": location, "Retry-After": "0", "Content-Length": "0"}, b""


@route("GET", "{WS}/operationResults/(?P<operation>[^/]+)")
def _operation_result(svc, rec, sub, rg, ws, operation):
    _check_scope(sub, rg, ws)
    return 200, {"Content-Length": "0"}, b""


# -- workspace, discovery, run history ----------------------------------------------------

WORKSPACE_ID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


@route("GET", "{WS}")
def _get_workspace(svc, rec, sub, rg, ws):
    _check_scope(sub, rg, ws)
    return _ok(
        {
            "id": _ws_prefix(),
            "name": WORKSPACE,
            "type": "Microsoft.MachineLearningServices/workspaces",
            "location": REGION,
            "kind": "Default",
            "properties": {
                "workspaceId": WORKSPACE_ID,
                "discoveryUrl": f"https://{HISTORY_HOST}/discovery",
                "mlFlowTrackingUri": f"azureml://{HISTORY_HOST}/mlflow/v1.0{_ws_prefix()}",
                "storageAccount": f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg/providers/"
                f"Microsoft.Storage/storageAccounts/{STORAGE_ACCOUNT}",
                "provisioningState": "Succeeded",
            },
        }
    )


@route("GET", re.escape(HISTORY_HOST) + "/discovery")
def _discovery(svc, rec):
    base = f"https://{HISTORY_HOST}"
    return _ok(
        {
            "api": base,
            "catalog": base,
            "experimentation": base,
            "gallery": base,
            "history": base,
            "hyperdrive": base,
            "labeling": base,
            "modelmanagement": base,
            "pipelines": base,
            "studio": "https://ml.azure.com",
        }
    )


_HISTORY = re.escape(HISTORY_HOST) + "/history/v1.0" + _WS.split(r"management\.azure\.com", 1)[1]


@route("GET", _HISTORY + "/runs/(?P<name>[^/]+)")
def _history_run(svc, rec, sub, rg, ws, name):
    _check_scope(sub, rg, ws)
    job = svc.jobs.get(name)
    if job is None:
        raise ServiceAnswer(404, "UserError", f"Run {name} was not found")
    run: dict[str, Any] = {
        "runId": name,
        "runUuid": str(uuid.uuid5(uuid.NAMESPACE_URL, name)),
        "status": job.status,
        "createdUtc": job.created,
        "startTimeUtc": job.started,
        "endTimeUtc": job.ended,
        "experimentId": str(uuid.uuid5(uuid.NAMESPACE_URL, "notebook-ci")),
        "target": "cpu-cluster",
    }
    if job.error:
        run["error"] = {"error": {"code": "UserError", "message": job.error}}
    return _ok(run)


@route("POST", _HISTORY + "/rundata")
def _history_rundata(svc, rec, sub, rg, ws):
    _check_scope(sub, rg, ws)
    name = (rec.json() or {}).get("runId")
    job = svc.jobs.get(name)
    if job is None:
        raise ServiceAnswer(404, "UserError", f"Run {name} was not found")
    # The service does not always report where outputs live (the SDK then searches the
    # default datastore at azureml/<job>/<output>/, which is where uri_folder outputs go).
    return _ok({"runMetadata": {"runId": name, "status": job.status, "outputs": None}})


# -- datastores and blob storage -----------------------------------------------------------

BLOB_CONTAINER = f"azureml-blobstore-{WORKSPACE_ID}"


def _datastore(svc) -> dict[str, Any]:
    credentials = (
        {"credentialsType": "None"}
        if svc.identity_based_storage
        else {"credentialsType": "AccountKey"}
    )
    return {
        "id": f"{_ws_prefix()}/datastores/workspaceblobstore",
        "name": "workspaceblobstore",
        "type": "Microsoft.MachineLearningServices/workspaces/datastores",
        "properties": {
            "datastoreType": "AzureBlob",
            "accountName": STORAGE_ACCOUNT,
            "containerName": BLOB_CONTAINER,
            "endpoint": "core.windows.net",
            "protocol": "https",
            "isDefault": True,
            "credentials": credentials,
            "serviceDataAccessAuthIdentity": "WorkspaceSystemAssignedIdentity",
        },
    }


@route("GET", "{WS}/datastores")
def _list_datastores(svc, rec, sub, rg, ws):
    _check_scope(sub, rg, ws)
    return _ok({"value": [_datastore(svc)]})


@route("GET", "{WS}/datastores/(?P<name>[^/]+)")
def _get_datastore(svc, rec, sub, rg, ws, name):
    _check_scope(sub, rg, ws)
    if name != "workspaceblobstore":
        raise ServiceAnswer(404, "UserError", f"Datastore {name} not found")
    return _ok(_datastore(svc))


@route("POST", "{WS}/datastores/(?P<name>[^/]+)/listSecrets")
def _list_secrets(svc, rec, sub, rg, ws, name):
    _check_scope(sub, rg, ws)
    if svc.identity_based_storage:
        raise ServiceAnswer(400, "UserError", "The datastore has no secrets (identity-based)")
    return _ok({"secretsType": "AccountKey", "key": "ZmFrZS1hY2NvdW50LWtleQ=="})


def _blobs(svc) -> dict[str, bytes]:
    blobs = {}
    for job in svc.jobs.values():
        if job.status in ("Completed", "Failed", "Canceled", "Finalizing"):
            for file, data in job.outputs.items():
                blobs[f"azureml/{job.name}/notebook/{file}"] = data
    return blobs


def _storage_denied(svc) -> Any:
    if not svc.blob_read_forbidden:
        return None
    body = (
        b'<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthorizationPermissionMismatch'
        b"</Code><Message>This request is not authorized to perform this operation using this "
        b"permission.</Message></Error>"
    )
    return (
        403,
        {"Content-Type": "application/xml", "x-ms-error-code": "AuthorizationPermissionMismatch"},
        body,
    )


_BLOB_HOST = re.escape(f"{STORAGE_ACCOUNT}.blob.core.windows.net")


@route("GET", _BLOB_HOST + "/(?P<container>[^/]+)")
def _list_blobs(svc, rec, container):
    denied = _storage_denied(svc)
    if denied:
        return denied
    prefix = (rec.query.get("prefix") or [""])[0]
    delimiter = (rec.query.get("delimiter") or [None])[0]
    names = (
        sorted(n for n in _blobs(svc) if n.startswith(prefix))
        if container == BLOB_CONTAINER
        else []
    )
    items, prefixes = [], set()
    for name in names:
        rest = name[len(prefix) :]
        if delimiter and delimiter in rest:
            prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
            continue
        size = len(_blobs(svc)[name])
        items.append(
            f"<Blob><Name>{name}</Name><Properties><Content-Length>{size}</Content-Length>"
            "<BlobType>BlockBlob</BlobType><Last-Modified>Mon, 01 Jan 2026 10:00:00 GMT"
            "</Last-Modified><Etag>0x8D000000000000</Etag></Properties><Metadata /></Blob>"
        )
    items += [f"<BlobPrefix><Name>{p}</Name></BlobPrefix>" for p in sorted(prefixes)]
    xml = (
        '<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint='
        f'"{BLOB}/" ContainerName="{container}"><Prefix>{prefix}</Prefix><Blobs>'
        + "".join(items)
        + "</Blobs><NextMarker /></EnumerationResults>"
    )
    return 200, {"Content-Type": "application/xml", "x-ms-version": "2025-01-05"}, xml.encode()


def _blob_headers(data: bytes) -> dict[str, str]:
    return {
        "x-ms-blob-type": "BlockBlob",
        "Last-Modified": "Mon, 01 Jan 2026 10:00:00 GMT",
        "ETag": '"0x8D000000000000"',
        "Content-Type": "application/octet-stream",
        "x-ms-version": "2025-01-05",
    }


@route("HEAD", _BLOB_HOST + "/(?P<container>[^/]+)/(?P<blob>.+)")
def _blob_properties(svc, rec, container, blob):
    denied = _storage_denied(svc)
    if denied:
        return denied[0], denied[1], b""
    data = _blobs(svc).get(unquote(blob)) if container == BLOB_CONTAINER else None
    if data is None:
        return 404, {"x-ms-error-code": "BlobNotFound"}, b""
    return 200, {**_blob_headers(data), "Content-Length": str(len(data))}, b""


@route("GET", _BLOB_HOST + "/(?P<container>[^/]+)/(?P<blob>.+)")
def _get_blob(svc, rec, container, blob):
    denied = _storage_denied(svc)
    if denied:
        return denied
    data = _blobs(svc).get(unquote(blob)) if container == BLOB_CONTAINER else None
    if data is None:
        return (
            404,
            {"x-ms-error-code": "BlobNotFound", "Content-Type": "application/xml"},
            (b'<?xml version="1.0" encoding="utf-8"?><Error><Code>BlobNotFound</Code></Error>'),
        )
    return _ranged(rec, data)


def _ranged(rec: Recorded, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """A blob's bytes as GET Blob answers, honouring `x-ms-range`/`Range`."""
    wanted = rec.headers.get("x-ms-range") or rec.headers.get("Range")
    if wanted:
        start, _, end = wanted.split("=", 1)[1].partition("-")
        start, end = int(start), min(int(end or len(data) - 1), len(data) - 1)
        part = data[start : end + 1]
        return (
            206,
            {
                **_blob_headers(data),
                "Content-Length": str(len(part)),
                "Content-Range": f"bytes {start}-{end}/{len(data)}",
            },
            part,
        )
    return 200, {**_blob_headers(data), "Content-Length": str(len(data))}, data


def route_storage_through(service: FakeAzureML, monkeypatch: Any) -> None:
    """azure-ai-ml builds its blob clients itself (no transport argument reaches them), so the
    storage SDK's default transport is pointed at the same fake service: the wire, not a method."""
    import azure.storage.blob._shared.base_client as base_client

    monkeypatch.setattr(base_client, "RequestsTransport", lambda **kwargs: service.transport)


# -- v1 at the service seam ----------------------------------------------------------------
# azureml-core's submit talks to several services (ARM, run history, execution, artifacts,
# snapshots) through msrest clients and its own `requests` sessions, with retries, token
# refreshes and a snapshot upload built on azure-storage-blob; the v1 submit tests replace the
# service boundary `notebookops.compute.azureml_v1.V1Service` (Experiment.submit, Run.get,
# Environment.get) and keep every object the backend builds (NotebookRunConfig,
# RunConfiguration, Environment, CondaDependencies, Workspace, the auth objects) real. Reading,
# cancelling and downloading runs are faked at the wire instead (FakeRunHistory, below).


class FakeRun:
    """Stands in for `azureml.core.Run` (whose constructor needs the service)."""

    def __init__(self, service: FakeV1Service, run_id: str, workspace: Any) -> None:
        self.service = service
        self.id = run_id
        self.workspace = workspace
        self.script = Script(service.next_script)
        self.files: dict[str, bytes] = {}
        self.error_message: str | None = None
        self.tags: dict[str, str] = {}

    def get_tags(self) -> dict[str, str]:
        self.service.calls.append(("get_tags", self.id))
        return dict(self.tags)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.service.calls.append(("set_tags", self.id))
        self.tags.update(tags)

    def get_status(self) -> str:
        self.service.calls.append(("get_status", self.id))
        return self.script.read()

    def get_details(self) -> dict[str, Any]:
        details: dict[str, Any] = {"runId": self.id, "status": self.script.current}
        if self.script.position > 0:
            details["startTimeUtc"] = "2026-01-01T10:00:00.000Z"
        if self.script.current in ("Completed", "Failed", "Canceled"):
            details["endTimeUtc"] = "2026-01-01T10:05:30.000Z"
        if self.error_message:
            details["error"] = {"error": {"code": "UserError", "message": self.error_message}}
        return details

    def get_portal_url(self) -> str:
        return (
            f"https://ml.azure.com/runs/{self.id}?wsid=/subscriptions/{SUBSCRIPTION}"
            f"/resourcegroups/rg/workspaces/{self.workspace.name}"
        )

    def cancel(self) -> None:
        self.service.calls.append(("cancel", self.id))
        self.script.cancel()

    def get_file_names(self) -> list[str]:
        return sorted(self.files)

    def download_file(self, name: str, output_file_path: str | None = None) -> None:
        self.service.calls.append(("download_file", name))
        Path(output_file_path or Path(name).name).write_bytes(self.files[name])


class FakeV1Service:
    """Stands in for `Experiment(ws, name).submit(...)`, `Run.get` and `Environment.get`.
    Records what each submit hands over: the config, its snapshot folder's files, tags."""

    def __init__(self) -> None:
        self.runs: dict[str, FakeRun] = {}
        self.submissions: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str]] = []
        self.environments: dict[str, Any] = {}
        self.next_script: list[str] = HAPPY
        self.lose_next_response = False
        self.submit_error: Exception | None = None

    def get_run(self, workspace: Any, run_id: str) -> FakeRun | None:
        self.calls.append(("get_run", run_id))
        return self.runs.get(run_id)

    def submit(
        self, workspace: Any, experiment: str, config: Any, run_id: str, tags: dict[str, str]
    ) -> FakeRun:
        self.calls.append(("submit", run_id))
        if self.submit_error is not None:
            raise self.submit_error
        env_name = config.run_config.environment.name or ""
        if env_name.lower().startswith(("azureml", "microsoft")):
            from azureml.exceptions import ExperimentExecutionException

            # The service's answer to a definition named with a reserved prefix.
            raise ExperimentExecutionException(
                json.dumps(
                    {
                        "error_details": {
                            "error": {
                                "code": "UserError",
                                "message": "Environment name can not start with the prefix "
                                "AzureML. To alter a curated environment, you must create a "
                                "new environment with a different name.",
                            }
                        },
                        "status_code": 400,
                    }
                )
            )
        if run_id in self.runs:
            from azureml.exceptions import ExperimentExecutionException

            raise ExperimentExecutionException(
                f"Cannot create a run with runId={run_id} As a run with runId={run_id} "
                "already exists in the workspace"
            )
        source = Path(config.source_directory)
        self.submissions.append(
            {
                "workspace": workspace,
                "experiment": experiment,
                "config": config,
                "run_id": run_id,
                "tags": tags,
                "snapshot": {
                    p.relative_to(source).as_posix(): p.read_bytes()
                    for p in sorted(source.rglob("*"))
                    if p.is_file()
                },
                "conda": config.run_config.environment.python.conda_dependencies.serialize_to_string(),
            }
        )
        run = self.runs[run_id] = FakeRun(self, run_id, workspace)
        if self.lose_next_response:
            # The run exists; the answer (and so the SDK's second call, set_tags) never came.
            self.lose_next_response = False
            import requests

            raise requests.ConnectionError("Connection aborted: the response was lost")
        run.set_tags(tags)  # what Experiment.submit does once the run exists
        return run

    def get_environment(
        self, workspace: Any, name: str, version: str | None, label: str | None
    ) -> Any:
        self.calls.append(("get_environment", f"{name}:{version}@{label}"))
        if name not in self.environments:
            from azureml._restclient.exceptions import ServiceException

            raise _service_exception(ServiceException, 404, f"Environment {name} not found")
        return self.environments[name]

    def count(self, operation: str) -> int:
        return sum(1 for op, _ in self.calls if op == operation)


def _service_exception(cls: type, code: int, message: str) -> Exception:
    """A ServiceException built by its own constructor from what msrest would hand it."""
    from types import SimpleNamespace

    response = SimpleNamespace(status_code=code, headers={})
    inner = SimpleNamespace(message=message, response=response, error=SimpleNamespace(error=None))
    return cls(inner)


# -- v1 at the wire ------------------------------------------------------------------------
# azureml-core reads runs through msrest clients and `requests` sessions, and downloads
# through azure-storage-blob, whose default transport is `requests` too: every one of those
# requests ends in `requests.adapters.HTTPAdapter.send`, which FakeRunHistory replaces
# (`install`). It answers as the managed-identity endpoint, ARM (cloud metadata, the workspace),
# discovery, run history, the execution service's cancel, the artifact service and blob
# storage do, and records every request.

V1_HOST = f"{REGION}.api.azureml.ms"
V1_WS = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
    f"Microsoft.MachineLearningServices/workspaces/{WORKSPACE}"
)
V1_EXPERIMENT_ID = "11111111-2222-3333-4444-555555555555"
_CLOUDS = [
    {
        "name": "AzureCloud",
        "portal": "https://portal.azure.com",
        "authentication": {
            "loginEndpoint": "https://login.microsoftonline.com",
            "audiences": ["https://management.core.windows.net/", "https://management.azure.com/"],
            "tenant": "common",
            "identityProvider": "AAD",
        },
        "media": "https://rest.media.azure.net",
        "graphAudience": "https://graph.windows.net/",
        "graph": "https://graph.windows.net/",
        "batch": "https://batch.core.windows.net/",
        "resourceManager": "https://management.azure.com/",
        "sqlManagement": "https://management.core.windows.net:8443/",
        "gallery": "https://gallery.azure.com/",
        "suffixes": {
            "storage": "core.windows.net",
            "keyVaultDns": "vault.azure.net",
            "sqlServerHostname": "database.windows.net",
            "acrLoginServer": "azurecr.io",
        },
    }
]


@dataclass
class V1Run:
    """One run as run history keeps it."""

    run_id: str
    script: list[str]
    position: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # artifact path -> content
    error: str | None = None
    started: str | None = None
    ended: str | None = None

    @property
    def status(self) -> str:
        return self.script[self.position]

    def advance(self) -> None:
        if self.position < len(self.script) - 1:
            self.position += 1
        if self.status not in ("NotStarted", "Starting", "Queued", "Preparing", "Provisioning"):
            self.started = self.started or "2026-01-01T10:00:00.000Z"
        if self.status in ("Completed", "Failed", "Canceled"):
            self.ended = self.ended or "2026-01-01T10:05:30.000Z"


class FakeRunHistory:
    """Azure ML v1's services behind `requests` (see above): runs with a status script that
    the test moves on (`V1Run.advance`: the SDK reads a run several times per status), their
    artifacts, and faults on demand."""

    def __init__(self) -> None:
        self.runs: dict[str, V1Run] = {}
        self.requests: list[Recorded] = []
        self.unrouted: list[Recorded] = []
        self.blob_read_forbidden = False
        self._faults: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add_run(self, run_id: str, script: list[str]) -> V1Run:
        run = self.runs[run_id] = V1Run(run_id, list(script))
        run.position = -1
        run.advance()  # times as for the first status
        return run

    def fail_next(self, pattern: str, status: int, times: int = 1, message: str = "") -> None:
        self._faults.append(
            {"pattern": re.compile(pattern), "status": status, "times": times, "message": message}
        )

    def routes(self) -> list[str]:
        return [r.route for r in self.requests]

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for r in self.requests if rx.search(r.route))

    def install(self, monkeypatch: Any, tmp_path: Path) -> None:
        """Route every `requests` call here, and keep azureml-core's discovery cache (a file
        in the home folder by default) in `tmp_path`."""
        import requests.adapters
        from azureml._base_sdk_common import service_discovery

        service = self

        def send(adapter, request, **kwargs):
            return service._send(request)

        monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", send)
        init = service_discovery.CachedServiceDiscovery.__init__
        monkeypatch.setattr(
            service_discovery.CachedServiceDiscovery,
            "__init__",
            lambda self, auth, file_path=str(tmp_path / ".discovery"): init(self, auth, file_path),
        )

    def _send(self, request: Any) -> Any:

        rec = _recorded(request)
        parts = urlsplit(request.url)
        rec.host_path = parts.netloc + unquote(parts.path)
        with self._lock:
            self.requests.append(rec)
            status, headers, payload = self._answer(rec)
        rec.status = status
        response = _requests_response(
            request, status, headers, payload, "OK" if status < 400 else "Error"
        )
        response.request = request
        return response

    def _answer(self, rec: Recorded) -> tuple[int, dict[str, str], bytes]:
        fault = next(
            (f for f in self._faults if f["times"] > 0 and f["pattern"].search(rec.route)), None
        )
        if fault is not None:
            fault["times"] -= 1
            return _v1_error(fault["status"], fault["message"] or f"injected {fault['status']}")
        for method, rx, func in _V1_ROUTES:
            match = rx.fullmatch(rec.host_path) if method == rec.method else None
            if match:
                try:
                    return func(self, rec, **match.groupdict())
                except ServiceAnswer as exc:
                    return _v1_error(exc.status, exc.message, exc.code)
        self.unrouted.append(rec)
        return _v1_error(404, f"the fake has no route {rec.route}")


def _v1_error(status: int, message: str, code: str = "UserError"):
    body = {"error": {"code": code, "message": message, "details": []}}
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


_V1_ROUTES: list[tuple[str, re.Pattern[str], Any]] = []


def v1_route(method: str, pattern: str):
    def register(func):
        _V1_ROUTES.append((method, re.compile(pattern), func))
        return func

    return register


@v1_route("GET", r"169\.254\.169\.254/metadata/identity/oauth2/token")
def _imds_token(svc, rec):
    resource = (rec.query.get("resource") or [""])[0]
    expires = int(time.time()) + 3600
    body = {
        "access_token": FakeCredential.TOKEN,
        "expires_on": str(expires),
        "expires_in": "3600",
        "resource": resource,
        "token_type": "Bearer",
    }
    return _ok(body)


@v1_route("GET", r"management\.azure\.com/metadata/endpoints")
def _cloud_metadata(svc, rec):
    return _ok(_CLOUDS)


@v1_route("GET", r"management\.azure\.com" + re.escape(V1_WS))
def _v1_workspace(svc, rec):
    return _ok(
        {
            "id": V1_WS,
            "name": WORKSPACE,
            "location": REGION,
            "type": "Microsoft.MachineLearningServices/workspaces",
            "properties": {
                "workspaceId": WORKSPACE_ID,
                "discoveryUrl": f"https://{V1_HOST}/discovery",
            },
        }
    )


@v1_route("GET", re.escape(V1_HOST) + "/discovery")
def _v1_discovery(svc, rec):
    base = f"https://{V1_HOST}"
    names = ("api", "catalog", "experimentation", "gallery", "history", "hyperdrive")
    return _ok(
        {
            **{n: base for n in names},
            "labeling": base,
            "modelmanagement": base,
            "pipelines": base,
            "studio": "https://ml.azure.com",
        }
    )


_V1_HISTORY = re.escape(V1_HOST + "/history/v1.0" + V1_WS)


def _v1_run_dto(svc, run: V1Run) -> dict[str, Any]:
    base = f"https://{V1_HOST}"
    dto: dict[str, Any] = {
        "runId": run.run_id,
        "runUuid": str(uuid.uuid5(uuid.NAMESPACE_URL, run.run_id)),
        "rootRunId": run.run_id,
        "runNumber": 1,
        "dataContainerId": f"dcid.{run.run_id}",
        "experimentId": V1_EXPERIMENT_ID,
        "status": run.status,
        "runType": "azureml.scriptrun",
        "target": "cpu-cluster",
        "createdUtc": "2026-01-01T09:59:00.000Z",
        "startTimeUtc": run.started,
        "endTimeUtc": run.ended,
        "tags": dict(run.tags),
        "properties": {"azureml.runsource": "experiment", "ContentSnapshotId": str(uuid.uuid4())},
        "cancelUri": f"{base}/execution/v1.0{V1_WS}/experiments/notebook-ci/runId/"
        f"{run.run_id}/cancel",
        "completeUri": None,
        "diagnosticsUri": None,
        "hidden": False,
    }
    if run.error:
        dto["error"] = {"error": {"code": "UserError", "message": run.error, "details": []}}
    return dto


@v1_route(
    "GET", _V1_HISTORY + "(?:/experimentids/[^/]+|/experiments/[^/]+)?/runs/(?P<run_id>[^/]+)"
)
def _v1_get_run(svc, rec, run_id):
    run = svc.runs.get(run_id)
    if run is None:
        raise ServiceAnswer(404, "UserError", f"Run {run_id} was not found")
    return _ok(_v1_run_dto(svc, run))


@v1_route("GET", _V1_HISTORY + "/experimentids/(?P<experiment_id>[^/]+)")
def _v1_get_experiment(svc, rec, experiment_id):
    if experiment_id != V1_EXPERIMENT_ID:
        raise ServiceAnswer(404, "UserError", f"Experiment {experiment_id} was not found")
    return _ok(
        {
            "experimentId": V1_EXPERIMENT_ID,
            "name": "notebook-ci",
            "createdUtc": "2026-01-01T09:00:00.000Z",
            "archivedTime": None,
            "tags": {},
        }
    )


def _v1_run_definition() -> dict[str, Any]:
    """The run's definition as run history keeps it: the submitted RunConfiguration,
    serialized as azureml-core serializes it for the service."""
    from azureml.core._serialization_utils import _serialize_to_dict
    from azureml.core.runconfig import RunConfiguration

    config = RunConfiguration()
    config.target = "cpu-cluster"
    config.script = "papermill_notebook_run_handler.py"
    return _serialize_to_dict(config)


@v1_route(
    "GET",
    _V1_HISTORY + "(?:/experimentids/[^/]+|/experiments/[^/]+)?/runs/(?P<run_id>[^/]+)/details",
)
def _v1_run_details(svc, rec, run_id):
    run = svc.runs.get(run_id)
    if run is None:
        raise ServiceAnswer(404, "UserError", f"Run {run_id} was not found")
    dto = _v1_run_dto(svc, run)
    details = {
        k: dto.get(k)
        for k in ("runId", "runUuid", "status", "target", "startTimeUtc", "endTimeUtc", "tags")
    }
    details.update(
        properties=dto["properties"],
        inputDatasets=[],
        outputDatasets=[],
        runDefinition=_v1_run_definition(),
        logFiles={},
        services={},
        warnings=[],
        revision=3,
    )
    if dto.get("error"):
        details["error"] = dto["error"]
    return _ok(details)


_V1_ARTIFACTS = re.escape(V1_HOST + "/artifact/v2.0" + V1_WS) + "/artifacts"


def _v1_container_run(svc, origin: str, container: str) -> V1Run:
    run = svc.runs.get(container.removeprefix("dcid.")) if origin == "ExperimentRun" else None
    if run is None:
        raise ServiceAnswer(404, "UserError", f"Container {origin}/{container} was not found")
    return run


def _v1_artifact(origin: str, container: str, path: str) -> dict[str, Any]:
    return {
        "artifactId": f"{origin}/{container}/{path}",
        "origin": origin,
        "container": container,
        "path": path,
        "createdTime": "2026-01-01T10:05:00.000Z",
    }


def _v1_content_info(origin: str, container: str, path: str) -> dict[str, Any]:
    sas = "sv=2019-02-02&sr=b&sig=c2lnbmF0dXJl&se=2026-01-02T00%3A00%3A00Z&sp=r"
    uri = f"{BLOB}/{ARTIFACT_CONTAINER}/{origin}/{container}/{path}?{sas}"
    return {"contentUri": uri, "origin": origin, "container": container, "path": path}


@v1_route("GET", _V1_ARTIFACTS + "/(?P<origin>[^/]+)/(?P<container>[^/]+)")
def _v1_list_artifacts(svc, rec, origin, container):
    run = _v1_container_run(svc, origin, container)
    items = [_v1_artifact(origin, container, p) for p in sorted(run.files)]
    return _ok({"value": items, "continuationToken": None, "nextLink": None})


@v1_route(
    "GET", _V1_ARTIFACTS + "/prefix/contentinfo/(?P<origin>[^/]+)/(?P<container>[^/]+)/(?P<path>.*)"
)
def _v1_content_by_prefix(svc, rec, origin, container, path):
    run = _v1_container_run(svc, origin, container)
    items = [
        _v1_content_info(origin, container, p) for p in sorted(run.files) if p.startswith(path)
    ]
    return _ok({"value": items, "continuationToken": None, "nextLink": None})


@v1_route("GET", _V1_ARTIFACTS + "/contentinfo/(?P<origin>[^/]+)/(?P<container>[^/]+)/(?P<path>.+)")
def _v1_content_information(svc, rec, origin, container, path):
    run = _v1_container_run(svc, origin, container)
    if path not in run.files:
        raise ServiceAnswer(404, "UserError", f"Artifact {path} was not found")
    return _ok(_v1_content_info(origin, container, path))


@v1_route(
    "GET",
    _BLOB_HOST + "/" + ARTIFACT_CONTAINER + "/ExperimentRun/(?P<container>[^/]+)/(?P<path>.+)",
)
def _v1_get_blob(svc, rec, container, path):
    denied = _storage_denied(svc)
    if denied:
        return denied
    run = svc.runs.get(container.removeprefix("dcid."))
    data = run.files.get(path) if run else None
    if data is None:
        return (
            404,
            {"x-ms-error-code": "BlobNotFound", "Content-Type": "application/xml"},
            b'<?xml version="1.0" encoding="utf-8"?><Error><Code>BlobNotFound</Code></Error>',
        )
    return _ranged(rec, data)


@v1_route(
    "POST",
    re.escape(V1_HOST + "/execution/v1.0" + V1_WS)
    + "/experiments/[^/]+/runId/(?P<run_id>[^/]+)/cancel",
)
def _v1_cancel(svc, rec, run_id):
    run = svc.runs.get(run_id)
    if run is None:
        raise ServiceAnswer(404, "UserError", f"Run {run_id} was not found")
    if run.status not in ("Completed", "Failed", "Canceled"):
        run.script = [*run.script[: run.position], "CancelRequested", "Canceled"]
    return _ok({"runId": run_id, "status": run.status})


@v1_route("GET", _V1_HISTORY + "/experiments/[^/]+/runs/(?P<run_id>[^/]+)/metricsingest/wait")
def _v1_metrics_ingest_wait(svc, rec, run_id):
    return 200, {"Content-Length": "0"}, b""
