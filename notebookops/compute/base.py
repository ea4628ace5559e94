"""The compute backend contract: what the orchestrator's activities need from whatever runs a
notebook.

Everything here is SDK-agnostic and travels between durable activities as JSON: each type is
declared once, as a dataclass, and notebookops.contract gives it `to_dict()` (camelCase keys,
like the rest of the app's JSON) and `from_dict()` (checked by pydantic, every problem named).
Backends live in their own modules (`local`, `azureml`, `azureml_v1`) and are found through
`registry`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from notebookops.contract import OMIT_NONE, Contract, camel

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELED = "canceled"
TIMED_OUT = "timedOut"

STATES = frozenset({QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED, TIMED_OUT})
TERMINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELED, TIMED_OUT})


class BackendError(Exception):
    """Base of the errors backends raise on purpose."""


class PermanentBackendError(BackendError):
    """Retrying cannot help (bad configuration, refused or unknown backend, vanished run).

    Any other exception from a backend is treated as transient and retried by the orchestrator.
    """


class RunNotFinishedError(BackendError):
    """Output was asked for before the run reached a terminal state (transient: ask again later)."""


_SLUG_DROP = re.compile(r"[^a-z0-9]+")
_KEY_HASH_CHARS = 20  # 80 bits: collisions between distinct inputs are not a practical concern
_KEY_MAX = 64
_KEY_PREFIX = "nb-"


def run_key(instance_id: str, notebook_path: str) -> str:
    """Deterministic idempotency key for one notebook of one orchestration instance.

    Safe as a folder name and as an Azure ML job name: lowercase letters, digits and `-`, at most
    64 characters, starting with a letter. A readable slug of the notebook path (its tail, where the
    file name is) is followed by a hash of both inputs, so distinct inputs give distinct keys even
    when their slugs agree.
    """
    if not isinstance(instance_id, str) or not instance_id:
        raise ValueError(f"run_key: instance_id must be a non-empty string, got {instance_id!r}")
    if not isinstance(notebook_path, str) or not notebook_path:
        raise ValueError(
            f"run_key: notebook_path must be a non-empty string, got {notebook_path!r}"
        )
    # JSON encoding keeps the pair unambiguous ("a", "b/c") vs ("a/b", "c").
    digest = hashlib.sha256(json.dumps([instance_id, notebook_path]).encode()).hexdigest()
    digest = digest[:_KEY_HASH_CHARS]
    stem = notebook_path[: -len(".ipynb")] if notebook_path.endswith(".ipynb") else notebook_path
    budget = _KEY_MAX - len(_KEY_PREFIX) - 1 - len(digest)
    slug = _SLUG_DROP.sub("-", stem.lower()).strip("-")[-budget:].strip("-")
    return f"{_KEY_PREFIX}{slug}-{digest}" if slug else f"{_KEY_PREFIX}{digest}"


State = Literal["queued", "running", "succeeded", "failed", "canceled", "timedOut"]


@dataclass
class RunSpec(Contract):
    """One notebook to run. Backends copy `checkout` and never write into it."""

    run_key: str
    instance_id: str
    notebook: str  # POSIX path relative to the checkout root
    checkout: str  # absolute path of a local checkout at `commit`
    commit: str
    parameters: dict[str, Any] = field(default_factory=dict)
    # The notebook's own limit, counted from when it starts executing (RunStatus.started_at),
    # never from submission. A backend that can enforce it reports `timedOut` itself, with the
    # cell that was running; the orchestrator stops the run only after a grace period on top.
    timeout_seconds: float | None = None
    compute: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        timeout = self.timeout_seconds
        if isinstance(timeout, bool) or (timeout is not None and not timeout > 0):
            raise ValueError(f"RunSpec: field 'timeoutSeconds' has invalid value {timeout!r}")


@dataclass
class RunHandle(Contract):
    """Where a run lives. `data` is backend-private, enough for a new process to find the run."""

    backend: str
    run_id: str
    portal_url: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunError(Contract):
    """Why a notebook failed. `cell_index` counts all cells of the notebook as committed (0-based,
    markdown and raw cells included, cells inserted by papermill excluded); None when no cell is to
    blame.
    """

    cell_index: int | None
    ename: str
    evalue: str
    traceback: str = ""  # joined lines, ANSI escape codes stripped


@dataclass
class RunStatus(Contract):
    """A normalised snapshot of a run. `raw_status` is the backend's own word for it.

    `state` is `queued` for as long as the notebook does not execute: waiting in a service's
    queue, for a cluster to scale up, an image to build, a local worker slot or its kernel.
    It is `running` once the notebook executes, and then `started_at` says since when.

    - `started_at`: when execution began (ISO 8601, UTC, e.g. `2026-01-31T12:00:05.123Z`);
      None while queued and for a run that never started. Per-notebook deadlines count from
      it, and `durationSeconds` is measured from it. A backend that cannot tell leaves it None
      once running: the orchestrator then counts from the first round that saw `running`.
    - `ended_at`: when the run reached its terminal state (same format), if known.
    """

    state: State
    raw_status: str
    error: RunError | None = None
    started_at: str | None = None
    ended_at: str | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        # Backends build these directly, without from_dict: the same checks either way.
        if self.state not in STATES:
            raise ValueError(f"RunStatus: field 'state' has invalid value {self.state!r}")
        for name in ("started_at", "ended_at"):
            value = getattr(self, name)
            if value is not None and parse_iso(value) is None:
                raise ValueError(
                    f"RunStatus: field {camel(name)!r} has invalid value {value!r} "
                    "(expected an ISO 8601 time with a UTC offset or Z)"
                )

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


def parse_iso(text: str) -> datetime | None:
    """An ISO 8601 time with an offset (`Z` included) as an aware datetime; None when `text` is
    not one. Naive times are refused: mixing them with UTC would shift a deadline by hours."""
    if not isinstance(text, str):
        return None
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return value.astimezone(UTC) if value.tzinfo is not None else None


@dataclass(frozen=True)
class PollPolicy(Contract):
    """How the orchestrator spaces monitor rounds for a backend: a capped geometric backoff.

    A backend that can wait for a state change itself (`wait_for_change`) sets
    `long_poll_seconds`: the orchestrator then asks each monitor round to wait up to that
    long for a change instead of sleeping on a durable timer, so a finished run is seen at
    once rather than at the next poll.

    A backend whose runs announce their end by events (Azure ML through Event Grid, see
    notebookops.run_events) gets `push_interval_seconds` once events are set up: the
    orchestrator then waits for an event or that interval, whichever comes first. Events may be
    lost, late or duplicated, so the interval stays as a safety net and polls stay the truth.
    While events are trusted, each run's safety interval grows from there (x4 per safety poll)
    up to `push_max_interval_seconds` (None: it stays at `push_interval_seconds`); once too
    many ends came without their event, every run is back at the first interval
    (notebookops.policy.after_polls).
    """

    first_interval_seconds: float
    factor: float
    max_interval_seconds: float
    long_poll_seconds: float = 0.0
    push_interval_seconds: float = 0.0
    # None (left out of the JSON, as before this field existed): no growth.
    push_max_interval_seconds: float | None = field(default=None, metadata=OMIT_NONE)
    # With events: poll every run when a continue_as_new generation starts, because an event
    # that arrives in the same batch as the generation's last step is dropped with it. For a
    # backend whose status reads cost nothing (local); others leave it to the safety polls.
    poll_all_each_generation: bool | None = field(default=None, metadata=OMIT_NONE)

    def __post_init__(self) -> None:
        wrong = {
            "first_interval_seconds": self.first_interval_seconds <= 0,
            "factor": self.factor < 1,
            "long_poll_seconds": self.long_poll_seconds < 0,
            "push_interval_seconds": self.push_interval_seconds < 0,
            "push_max_interval_seconds": (self.push_max_interval_seconds or 0) < 0,
            "max_interval_seconds": self.max_interval_seconds < self.first_interval_seconds,
        }
        for name, bad in wrong.items():
            if bad:
                raise ValueError(f"PollPolicy: {name} has invalid value {getattr(self, name)!r}")

    def interval(self, round_number: int) -> float:
        """Seconds to wait before monitor round `round_number` (0-based). Pure, so replay-safe."""
        if round_number < 0:
            raise ValueError(
                f"PollPolicy.interval: round_number has invalid value {round_number!r}"
            )
        value = self.first_interval_seconds
        for _ in range(round_number):
            value *= self.factor
            if value >= self.max_interval_seconds:
                return self.max_interval_seconds
        return min(value, self.max_interval_seconds)


@runtime_checkable
class Backend(Protocol):
    """A place that runs notebooks.

    - `submit` is idempotent on `spec.run_key` (never a second run) and returns without waiting.
    - `cancel` is idempotent and a no-op on a terminal run.
    - `fetch_output` copies the executed notebook to `dest` and returns it, or None when the run
      produced none; it raises RunNotFinishedError before the run is terminal.
    - Permanent failures raise PermanentBackendError; anything else is retried by the caller.

    Optional: `find_run(compute, run_key, notebook) -> RunHandle | None` finds the run a
    submit with that key created. The orchestrator uses it to cancel the run of a submit that
    ran out of retries after an attempt whose answer was lost (the run may exist, with no
    handle); a backend without it leaves such a run alone.
    """

    name: str
    poll_policy: PollPolicy

    def submit(self, spec: RunSpec) -> RunHandle: ...

    def status(self, handle: RunHandle) -> RunStatus: ...

    def cancel(self, handle: RunHandle) -> None: ...

    def fetch_output(self, handle: RunHandle, dest: Path) -> Path | None: ...
