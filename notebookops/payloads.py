"""What the orchestrator and its activities send each other, declared once.

The orchestrator builds and reads plain JSON values (dicts): durable history stores them as
they are, and replay feeds them back unchanged, so an instance started by an older version
goes on with the same values. Each activity reads its input with ``X.from_dict(payload)``
(checked by pydantic, see notebookops.contract) and answers with ``X(...).to_dict()``.

Keys are camelCase on the wire (``instanceId``), snake_case here (``instance_id``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from notebookops.compute.base import PollPolicy, RunError, RunHandle, State
from notebookops.contract import OMIT_NONE, Contract

__all__ = [
    "INVALID",
    "NOT_FOUND",
    "CloneInput",
    "CloneOutput",
    "CloneResult",
    "MonitorInput",
    "MonitorOutput",
    "Observation",
    "Orphan",
    "OrphanOutcome",
    "Refusal",
    "ReportInput",
    "Repository",
    "ResolvedNotebook",
    "StopRun",
    "SubmitInput",
    "SubmitOutput",
    "WatchRun",
]


@dataclass(kw_only=True)
class Reporting(Contract):
    """What an activity that talks to the pipeline gets (orchestration._callback): the callback
    values without the token, the sealed token, the job log's id and the side-call kinds an
    earlier activity saw refused. All absent for a run without callback values."""

    devops: dict[str, Any] | None = None
    auth: str | None = None
    log_id: int | None = None
    disabled: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class Refusal(Contract):
    """A permanent problem, answered as a value so the orchestrator does not retry it."""

    ok: Literal[False] = False
    error: str
    ename: str | None = field(default=None, metadata=OMIT_NONE)


# -- ActivityClone ----------------------------------------------------------------------------


@dataclass(kw_only=True)
class Repository(Contract):
    url: str
    ref: str | None = None
    commit: str | None = None


@dataclass(kw_only=True)
class CloneInput(Reporting):
    instance_id: str
    repository: Repository
    patterns: list[str]


NOT_FOUND = "NotebookNotFound"
INVALID = "InvalidNotebook"


@dataclass(frozen=True, order=True)
class ResolvedNotebook(Contract):
    """One notebook to run, or one that cannot run: `problem` says why, `problem_type` is the
    ename it is reported with (NOT_FOUND or INVALID). Such a notebook fails alone."""

    path: str  # POSIX, relative to the repository root (the pattern, for a glob matching none)
    entry_index: int  # which request entry produced it (first entry wins)
    problem: str | None = field(default=None, metadata=OMIT_NONE)
    problem_type: str | None = field(default=None, metadata=OMIT_NONE)

    def __post_init__(self) -> None:
        kind = (self.problem_type or INVALID) if self.problem is not None else None
        object.__setattr__(self, "problem_type", kind)


@dataclass
class CloneResult(Contract):
    """What repo.resolve_and_checkout found: the commit, its checkout, the notebooks."""

    commit: str
    checkout: str
    notebooks: list[ResolvedNotebook] = field(default_factory=list)


@dataclass(kw_only=True)
class CloneOutput(CloneResult):
    """ActivityClone's answer when the clone worked (else a Refusal)."""

    ok: Literal[True] = True


# -- ActivitySubmit ---------------------------------------------------------------------------


@dataclass(kw_only=True)
class SubmitInput(Reporting):
    instance_id: str
    path: str
    repository: str  # the repository's URL
    commit: str
    checkout: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    timeout_seconds: float | None = None
    compute: dict[str, Any] = field(default_factory=dict)
    strict_parameters: bool = False


@dataclass(kw_only=True)
class SubmitOutput(Contract):
    ok: Literal[True] = True
    handle: RunHandle
    poll_policy: PollPolicy
    warnings: list[str] | None = field(default=None, metadata=OMIT_NONE)
    disabled: dict[str, str] | None = field(default=None, metadata=OMIT_NONE)


# -- ActivityMonitor --------------------------------------------------------------------------


@dataclass(kw_only=True)
class WatchRun(Contract):
    path: str
    handle: RunHandle
    # The state the orchestrator last saw: a long poll returns at once when it has changed.
    seen: State | None = field(default=None, metadata=OMIT_NONE)


@dataclass(kw_only=True)
class StopRun(WatchRun):
    """Cancel this run; the orchestrator decided why (a deadline, failFast, a gone pipeline)."""

    state: State
    message: str


@dataclass(kw_only=True)
class Orphan(Contract):
    """A run a submit may have created before its answer was lost: to cancel by its run key
    (policy.orphans); ``compute`` says where to look for it."""

    path: str
    compute: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class OrphanOutcome(Contract):
    path: str
    outcome: Literal["canceled", "absent", "finished", "unsupported", "error"]
    run_id: str | None = None
    error: str | None = field(default=None, metadata=OMIT_NONE)


@dataclass(kw_only=True)
class MonitorInput(Reporting):
    instance_id: str
    runs: list[WatchRun] = field(default_factory=list)
    cancel: list[StopRun] = field(default_factory=list)
    orphans: list[Orphan] = field(default_factory=list)
    checkout: str | None = None  # where the committed notebooks are, to number cells against
    check_pipeline: bool = False
    wait_seconds: float = 0.0


@dataclass(kw_only=True)
class SlowCell(Contract):
    cell_index: int
    seconds: float


@dataclass(kw_only=True)
class Observation(Contract):
    """One run as this round saw it. ``state`` None: its status could not be read."""

    path: str
    state: State | None
    message: str | None = None
    error: RunError | None = None
    started_at: str | None = None  # execution start: the notebook's deadline counts from it
    duration_seconds: float | None = field(default=None, metadata=OMIT_NONE)
    output_notebook: str | None = field(default=None, metadata=OMIT_NONE)
    running_cell: int | None = field(default=None, metadata=OMIT_NONE)  # where a canceled run was
    stopped: bool | None = field(
        default=None, metadata=OMIT_NONE
    )  # canceled by this round, for StopRun's reason
    output_html: str | None = field(default=None, metadata=OMIT_NONE)
    execution_seconds: float | None = field(default=None, metadata=OMIT_NONE)
    slowest_cells: list[SlowCell] | None = field(default=None, metadata=OMIT_NONE)


@dataclass(kw_only=True)
class MonitorOutput(Contract):
    runs: list[Observation]
    orphans: list[OrphanOutcome] | None = field(default=None, metadata=OMIT_NONE)
    pipeline: Literal["waiting", "gone", "unknown"] | None = field(default=None, metadata=OMIT_NONE)
    disabled: dict[str, str] | None = field(default=None, metadata=OMIT_NONE)


# -- ActivityReport ---------------------------------------------------------------------------


@dataclass(kw_only=True)
class ReportInput(Reporting):
    """``started``: ``lines``; ``publish``: ``summary``; ``deliver``: ``result``, ``attempt``."""

    phase: Literal["started", "publish", "deliver"]
    lines: list[str] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    result: str | None = None
    attempt: int | None = None
    status_url: str | None = None  # the status page to link from the summary tab

    def __post_init__(self) -> None:
        needs = {"publish": "summary", "deliver": "result"}.get(self.phase)
        if needs and getattr(self, needs) is None:
            raise ValueError(f"ReportInput: phase {self.phase!r} needs field {needs!r}")


@dataclass(kw_only=True)
class Started(Contract):
    log_id: int | None
    disabled: dict[str, str] | None = field(default=None, metadata=OMIT_NONE)


@dataclass(kw_only=True)
class Published(Contract):
    published: bool
    disabled: dict[str, str] | None = field(default=None, metadata=OMIT_NONE)


@dataclass(kw_only=True)
class Delivery(Contract):
    """One TaskCompleted attempt (devops.plan.try_task_completed) for devops.delivery.apply;
    ``record``: the task's timeline record, read when the attempt did not land."""

    outcome: Literal["accepted", "unavailable", "auth", "rejected"]
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    record: dict[str, Any] | None = field(default=None, metadata=OMIT_NONE)
