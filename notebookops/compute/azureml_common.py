"""What the `azureml` (v2) and `azureml-v1` backends share: workspace settings, staging of the
source folder, status normalisation and error wording. Imports no Azure SDK.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from notebookops import redact
from notebookops.compute.base import (
    CANCELED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    PermanentBackendError,
    PollPolicy,
    RunSpec,
)
from notebookops.compute.staging import resolve_source, stage_copy

SUBSCRIPTION_SETTING = "AZUREML_SUBSCRIPTION_ID"
RESOURCE_GROUP_SETTING = "AZUREML_RESOURCE_GROUP"
WORKSPACE_SETTING = "AZUREML_WORKSPACE"
COMPUTE_SETTING = "AZUREML_COMPUTE"
ENVIRONMENT_SETTING = "AZUREML_ENVIRONMENT"
WORK_DIR_SETTING = "NOTEBOOKOPS_AZUREML_WORK_DIR"

# Jobs take minutes to get a node and each status read is an ARM call (throttled per
# subscription), so poll gently.
AZUREML_POLL_POLICY = PollPolicy(first_interval_seconds=15, factor=1.5, max_interval_seconds=120)

ROLE_HINT = (
    "grant the app's identity (its managed identity, or the service principal in "
    "AZURE_CLIENT_ID) the 'AzureML Data Scientist' role on the workspace"
)
STORAGE_ROLE_HINT = (
    "grant the app's identity the 'Storage Blob Data Reader' role on the workspace's storage "
    "account (needed when the datastore uses identity-based access)"
)

# The two SDKs report the same service states (reference §8.3). NotResponding and Paused stay
# non-terminal although azure-ai-ml calls them terminal: the service may resume such runs, and
# the orchestrator's deadline bounds the wait.
_STATES = {
    "NotStarted": QUEUED,
    "Starting": QUEUED,
    "Provisioning": QUEUED,
    "Preparing": QUEUED,
    "Queued": QUEUED,
    "Unapproved": QUEUED,
    "Running": RUNNING,
    "Finalizing": RUNNING,
    "CancelRequested": RUNNING,
    "NotResponding": RUNNING,
    "Pausing": RUNNING,
    "Paused": RUNNING,
    "Completed": SUCCEEDED,
    "Failed": FAILED,
    "Canceled": CANCELED,
}
_MESSAGES = {
    "Provisioning": "Azure ML is provisioning compute nodes",
    "Preparing": "Azure ML is preparing the environment image",
    "Queued": "waiting for a node on the compute target",
    "Unapproved": "waiting for approval in the workspace",
    "Finalizing": "the notebook finished; Azure ML is uploading outputs",
    "CancelRequested": "cancel requested; waiting for Azure ML to stop the run",
    "NotResponding": "the run stopped sending heartbeats (Azure ML status NotResponding)",
    "Pausing": "Azure ML is pausing the run",
    "Paused": "the run is paused in Azure ML",
}


def raw_status(value: Any) -> str:
    """The service's status word; azure-ai-ml hands out `JobStatus` enum members for it."""
    value = getattr(value, "value", value)
    return str(value) if value else "Unknown"


def normalise_status(raw: Any) -> tuple[str, str | None]:
    """(contract state, message for people) for an Azure ML status string.

    Unknown strings (v2 `Unknown` included) count as running, as v1's own wait loop does: a
    run must never be reported finished on a word we do not understand.
    """
    raw = raw_status(raw)
    state = _STATES.get(raw)
    if state is None:
        return RUNNING, f"Azure ML reports status {raw!r}; treated as still running"
    return state, _MESSAGES.get(raw)


@dataclass(frozen=True)
class WorkspaceRef:
    subscription_id: str
    resource_group: str
    name: str

    def to_dict(self) -> dict[str, str]:
        return {
            "subscriptionId": self.subscription_id,
            "resourceGroup": self.resource_group,
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, data: Any) -> WorkspaceRef:
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), str) and data.get(k)
            for k in ("subscriptionId", "resourceGroup", "name")
        ):
            raise PermanentBackendError(f"run handle has no valid workspace: {data!r}")
        return cls(data["subscriptionId"], data["resourceGroup"], data["name"])

    def __str__(self) -> str:
        return f"{self.subscription_id}/{self.resource_group}/{self.name}"


def workspace_for(compute: dict[str, Any]) -> WorkspaceRef:
    """`compute.workspace` when given, else the app settings; each missing value named."""
    given = compute.get("workspace")
    if given is not None:
        if not isinstance(given, dict):
            raise PermanentBackendError(
                f"compute.workspace must be an object with subscriptionId, resourceGroup and "
                f"name, got {given!r}"
            )
        missing = [
            f"compute.workspace.{k}"
            for k in ("subscriptionId", "resourceGroup", "name")
            if not isinstance(given.get(k), str) or not given.get(k).strip()
        ]
        if missing:
            raise PermanentBackendError(f"{', '.join(missing)} must be set, got {given!r}")
        return WorkspaceRef(
            given["subscriptionId"].strip(), given["resourceGroup"].strip(), given["name"].strip()
        )
    values = {
        s: os.environ.get(s, "").strip()
        for s in (SUBSCRIPTION_SETTING, RESOURCE_GROUP_SETTING, WORKSPACE_SETTING)
    }
    missing = [s for s, v in values.items() if not v]
    if missing:
        raise PermanentBackendError(
            f"no Azure ML workspace: set the app setting(s) {', '.join(missing)} "
            "or give compute.workspace {subscriptionId, resourceGroup, name} in the message"
        )
    return WorkspaceRef(*values.values())


def setting_or_compute(compute: dict[str, Any], key: str, setting: str, backend: str) -> str:
    value = compute.get(key)
    if isinstance(value, str) and value.strip():
        return value.strip()
    if value is not None and not isinstance(value, str):
        raise PermanentBackendError(f"compute.{key} must be a string, got {value!r}")
    fallback = os.environ.get(setting, "").strip()
    if fallback:
        return fallback
    raise PermanentBackendError(
        f"compute.{key} is required for backend {backend!r} (or set the app setting {setting})"
    )


def work_dir(explicit: Path | str | None) -> Path:
    """Where submits stage code copies and status/fetch keep downloaded notebooks."""
    base = explicit or os.environ.get(WORK_DIR_SETTING, "").strip()
    return Path(base or Path(tempfile.gettempdir()) / "notebookops-azureml").resolve()


def job_timeout_seconds(spec: RunSpec) -> int | None:
    if spec.timeout_seconds is None:
        return None
    if not spec.timeout_seconds > 0:
        raise PermanentBackendError(
            f"timeout_seconds must be positive, got {spec.timeout_seconds!r}"
        )
    return max(1, math.ceil(spec.timeout_seconds))


def check_parameters(spec: RunSpec) -> None:
    try:
        json.dumps(spec.parameters, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PermanentBackendError(f"parameters must be JSON values: {exc}") from None


def stage_source(spec: RunSpec, dest: Path) -> str:
    """Copy the folder Azure ML uploads (the checkout, or `compute.sourceDirectory` in it)
    without `.git` to `dest`; returns the notebook's POSIX path inside that folder.

    The copy is what the SDKs upload and what azureml-contrib-notebook writes into, so the
    shared read-only checkout is never touched.
    """
    source_root, inner = resolve_source(spec)
    if dest.exists():  # left by a submit that died half-way
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage_copy(source_root, dest)
    return inner


def one_line(text: Any, limit: int = 600) -> str:
    """A service message fit for a pipeline log: one line, bounded, known secrets masked."""
    flat = re.sub(r"\s+", " ", str(text)).strip()
    if len(flat) > limit:
        flat = flat[: limit - 3] + "..."
    return redact.redact_known(flat)


_TRANSIENT_CODES = frozenset({408, 429, 500, 502, 503, 504, 530})
_CODE_IN_TEXT = re.compile(r"(?:status[ _]?code|response code|http)\W{0,4}([1-5]\d\d)\b", re.I)


def transient_status(code: int | None) -> bool:
    return code is not None and code in _TRANSIENT_CODES


_TRANSIENT_WORDS = ("timed out", "timeout", "temporarily", "no response", "connection", "retry")


def transient_text(text: str) -> bool:
    """Words of a failure that trying again can cure (credential endpoints say no more)."""
    lowered = text.lower()
    return any(word in lowered for word in _TRANSIENT_WORDS)


def status_code_from_text(text: str) -> int | None:
    """v1 folds the HTTP status into the exception text (reference §6.1)."""
    match = _CODE_IN_TEXT.search(text)
    return int(match.group(1)) if match else None


def permanent_hint(code: int | None, text: str, *, workspace: WorkspaceRef, what: str) -> str:
    """A message for a refused request that says what to change."""
    lowered = text.lower()
    if code in (401, 403) or "authoriz" in lowered or "authenticat" in lowered:
        fix = ROLE_HINT
    elif "quota" in lowered:
        fix = "raise the compute quota of the subscription or pick another compute.target"
    elif code == 404 or "not found" in lowered or "does not exist" in lowered:
        fix = (
            f"check compute.target, compute.environment and the workspace ({workspace}; "
            f"app settings {SUBSCRIPTION_SETTING}, {RESOURCE_GROUP_SETTING}, {WORKSPACE_SETTING} "
            "or compute.workspace)"
        )
    else:
        fix = "check compute.target, compute.environment and compute.experiment in the message"
    status = f"HTTP {code}: " if code else ""
    return f"Azure ML refused to {what} in workspace {workspace} ({status}{one_line(text)}); {fix}"


def storage_refused(exc: BaseException) -> bool:
    """Blob storage said no to the identity (an identity-based datastore, no data role)."""
    text = str(exc)
    return any(
        word in text
        for word in (
            "AuthorizationPermissionMismatch",
            "AuthorizationFailure",
            "not authorized to perform this operation",
        )
    )


def exists_error(text: str) -> bool:
    """The service's words for a duplicate job name / run id (reference §6.3)."""
    return "already exists" in text.lower()


# -- environment references ----------------------------------------------------------------

CURATED_PREFIX = "AzureML-"  # azure-ai-ml's CURATED_ENV_PREFIX: the service resolves these
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}"
_VERSION = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}"
_REGISTRY = re.compile(
    rf"azureml://registries/(?P<registry>{_NAME})/environments/(?P<name>{_NAME})/"
    rf"(?:versions/(?P<version>{_VERSION})|labels/(?P<label>{_NAME}))"
)
_ARM = re.compile(
    r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.MachineLearningServices/"
    rf"workspaces/[^/]+/environments/(?P<name>{_NAME})/versions/(?P<version>{_VERSION})",
    re.IGNORECASE,
)
_SHORT = re.compile(rf"(?P<name>{_NAME})(?:@(?P<label>{_NAME})|:(?P<version>{_VERSION}))?")

ENVIRONMENT_FORMS = {
    "azureml": (
        "'name@latest', 'name:version' (either with or without the 'azureml:' prefix, a bare "
        "'name' meaning name@latest), a curated 'AzureML-...' name in the same forms, the "
        "environment's full ARM id (/subscriptions/.../environments/name/versions/v), or a "
        "registry reference azureml://registries/<registry>/environments/<name>/versions/<v> "
        "or .../labels/latest"
    ),
    "azureml-v1": (
        "'name', 'name:version' or 'name@label' (with or without the 'azureml:' prefix), a "
        "curated 'AzureML-...' name, or the environment's full ARM id"
    ),
}


@dataclass(frozen=True)
class EnvironmentRef:
    """One environment reference, whatever form the user wrote it in."""

    kind: str  # "workspace", "curated", "arm" or "registry"
    name: str
    version: str | None = None
    label: str | None = None
    text: str = ""  # the ARM id or registry reference, verbatim

    def for_v2(self) -> str:
        """The string azure-ai-ml resolves: it strips `azureml:` only for curated names and
        ARM ids, so a workspace environment goes without it (`name@latest`, `name:3`)."""
        if self.kind in ("arm", "registry"):
            return self.text
        prefix = "azureml:" if self.kind == "curated" else ""
        if self.version:
            return f"{prefix}{self.name}:{self.version}"
        return f"{prefix}{self.name}@{self.label or 'latest'}"


def parse_environment_ref(value: Any, backend: str) -> EnvironmentRef:
    """Parse `compute.environment` for `backend`; ValueError names the value and the forms."""
    forms = ENVIRONMENT_FORMS.get(backend, ENVIRONMENT_FORMS["azureml"])
    problem = f"is not an environment reference Azure ML can resolve; use {forms}"
    if not isinstance(value, str) or not value.strip():
        raise ValueError(problem)
    text = value.strip()
    registry = _REGISTRY.fullmatch(text)
    if registry:
        if backend != "azureml":
            raise ValueError(f"is a registry reference, which SDK v1 cannot use; use {forms}")
        label = registry.group("label")
        if label is not None and label != "latest":
            raise ValueError(f"names label {label!r}; azure-ai-ml resolves only 'latest'")
        return EnvironmentRef(
            "registry", registry.group("name"), registry.group("version"), label, text
        )
    arm = _ARM.fullmatch(text.removeprefix("azureml:"))
    if arm:
        return EnvironmentRef(
            "arm", arm.group("name"), arm.group("version"), None, text.removeprefix("azureml:")
        )
    short = _SHORT.fullmatch(text.removeprefix("azureml:"))
    if not short:
        raise ValueError(problem)
    name, version, label = short.group("name", "version", "label")
    if label is not None and label != "latest" and backend == "azureml":
        raise ValueError(
            f"names label {label!r}; azure-ai-ml resolves only '@latest' for environments, so "
            "use 'name@latest' or 'name:version'"
        )
    kind = "curated" if name.startswith(CURATED_PREFIX) else "workspace"
    return EnvironmentRef(kind, name, version, None if label == "latest" else label)


def environment_for(compute: dict[str, Any], backend: str) -> EnvironmentRef | None:
    """`compute.environment`, else the AZUREML_ENVIRONMENT setting, parsed; None when neither
    is set. A bad reference is a permanent error naming where it came from."""
    value = compute.get("environment")
    where = "compute.environment"
    if value is None or (isinstance(value, str) and not value.strip()):
        value = os.environ.get(ENVIRONMENT_SETTING, "").strip() or None
        where = f"the app setting {ENVIRONMENT_SETTING}"
    if value is None:
        return None
    try:
        return parse_environment_ref(value, backend)
    except ValueError as exc:
        raise PermanentBackendError(f"{where} {value!r} {exc}") from None


# -- the uploaded snapshot -----------------------------------------------------------------

SNAPSHOT_MAX_FILES = 2000  # Azure ML's v1 snapshot limits (reference §1.2)
SNAPSHOT_MAX_BYTES = 300 * 1024 * 1024
IGNORE_FILES = (".amlignore", ".gitignore")  # the SDKs read the first one found, at the root


def apply_ignore_files(root: Path, keep: list[str]) -> tuple[int, int]:
    """Delete from the staged folder `root` what its `.amlignore` (else `.gitignore`) excludes,
    as both SDKs would at upload, except the POSIX paths in `keep` (the notebook, the entry
    script), which no pattern may remove. Then write an empty `.amlignore`, so the SDK uploads
    exactly what is left. Returns (files, bytes) of the snapshot."""
    import pathspec

    rules = next((root / n for n in IGNORE_FILES if (root / n).is_file()), None)
    spec = (
        pathspec.GitIgnoreSpec.from_lines(
            rules.read_text(encoding="utf-8", errors="replace").splitlines()
        )
        if rules
        else None
    )
    kept = set(keep)
    for folder, dirs, names in os.walk(root, topdown=True):
        base = Path(folder).relative_to(root)
        for name in names:
            rel = (base / name).as_posix()
            if spec is not None and rel not in kept and spec.match_file(rel):
                (Path(folder) / name).unlink()
        for name in list(dirs):
            rel = (base / name).as_posix()
            if (
                spec is not None
                and spec.match_file(rel + "/")
                and not any(k.startswith(rel + "/") for k in kept)
            ):
                shutil.rmtree(Path(folder) / name)
                dirs.remove(name)
    (root / ".amlignore").unlink(missing_ok=True)  # may be a hard link into the checkout
    (root / ".amlignore").write_text(_APPLIED + "\n")
    return snapshot_size(root)


def shared_upload_folder(spec: RunSpec, root: Path, extra_files: dict[str, Path]) -> str:
    """The one folder uploaded for `spec`'s (commit, sourceDirectory) (staging.shared_snapshot:
    built once, hard links where possible), with the ignore rules applied once under a lock,
    keeping `extra_files` and every notebook: the folder serves every notebook of the commit,
    so a pattern may not remove one of them. Returns (folder, notebook path inside it)."""
    from notebookops.compute.staging import shared_snapshot

    snapshot = shared_snapshot(spec, root, extra_files=extra_files)
    marker = snapshot.path / ".amlignore"
    if not (marker.is_file() and marker.read_text().startswith(_APPLIED)):
        with folder_lock(snapshot.path):
            if not (marker.is_file() and marker.read_text().startswith(_APPLIED)):
                notebooks = [
                    p.relative_to(snapshot.path).as_posix() for p in snapshot.path.rglob("*.ipynb")
                ]
                apply_ignore_files(snapshot.path, keep=[*extra_files, *notebooks])
    return str(snapshot.path), snapshot.notebook


_APPLIED = "# applied by notebookops before upload"


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock beside `folder`, across threads and processes of this host."""
    import fcntl

    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def snapshot_size(root: Path) -> tuple[int, int]:
    files = size = 0
    for folder, _, names in os.walk(root):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(folder, name)).st_size
    return files, size


def check_snapshot_limits(files: int, size: int, spec: RunSpec) -> None:
    """v1 refuses snapshots over 2,000 files or 300 MB: say so before submitting, with what
    to change."""
    if files <= SNAPSHOT_MAX_FILES and size <= SNAPSHOT_MAX_BYTES:
        return
    folder = spec.compute.get("sourceDirectory") or "the whole checkout"
    raise PermanentBackendError(
        f"the code snapshot of {folder!r} for {spec.notebook!r} holds {files:,} files and "
        f"{size / 1024 / 1024:,.1f} MB after .amlignore/.gitignore, over Azure ML's limit of "
        f"{SNAPSHOT_MAX_FILES:,} files and {SNAPSHOT_MAX_BYTES // 1024 // 1024} MB; set "
        "compute.sourceDirectory to the folder the notebooks need, or list what to leave out "
        "in an .amlignore file at its root"
    )
