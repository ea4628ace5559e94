"""Durable state in one SQLite file (WAL): instances, history, queued messages, pending activities.

Every state change of an orchestration is one transaction, so killing the process at any
instant leaves either the state before an episode or the state after it. A queued activity
stays in `work` until its result is committed together with the completion message, which
gives the host's at-least-once guarantee and never re-runs a recorded activity.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 4  # 2: version; 3: a child's parent execution and task; 4: its retry state
APPLICATION_ID = 0x44564853  # "DVHS": marks the file as ours before we trust its tables

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    execution_id TEXT NOT NULL,
    runtime_status TEXT NOT NULL,
    input TEXT,
    output TEXT,
    custom_status TEXT,
    created_time REAL NOT NULL,
    last_updated_time REAL NOT NULL,
    parent_instance_id TEXT,
    generation INTEGER NOT NULL DEFAULT 0,
    next_id INTEGER NOT NULL DEFAULT 0,
    scheduled TEXT NOT NULL DEFAULT '[]',
    version TEXT,
    parent_execution_id TEXT,
    parent_task_id INTEGER,
    parent_retry TEXT
);
CREATE TABLE IF NOT EXISTS history (
    instance_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hidden INTEGER NOT NULL DEFAULT 0,
    event TEXT NOT NULL,
    PRIMARY KEY (instance_id, seq)
);
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT NOT NULL,
    execution_id TEXT,
    visible_at REAL NOT NULL,
    kind TEXT NOT NULL,
    event TEXT NOT NULL,
    meta TEXT
);
CREATE INDEX IF NOT EXISTS inbox_visible ON inbox (visible_at);
CREATE INDEX IF NOT EXISTS inbox_instance ON inbox (instance_id);
CREATE TABLE IF NOT EXISTS work (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT NOT NULL,
    execution_id TEXT NOT NULL,
    name TEXT NOT NULL,
    input TEXT,
    task_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 1,
    retry TEXT
);
"""


class StateError(Exception):
    """The state file cannot be used; it is left exactly as it was."""


@dataclass
class Instance:
    instance_id: str
    name: str
    execution_id: str
    runtime_status: str
    input: str | None
    output: str | None
    custom_status: str | None
    created_time: float
    last_updated_time: float
    parent_instance_id: str | None
    generation: int
    next_id: int
    scheduled: list[list[Any]]
    version: str | None = None
    parent_execution_id: str | None = None
    parent_task_id: int | None = None
    parent_retry: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Instance:
        data = dict(row)
        data["scheduled"] = json.loads(data["scheduled"])
        return cls(**data)


@dataclass
class InboxRow:
    id: int
    instance_id: str
    execution_id: str | None
    visible_at: float
    kind: str
    event: dict[str, Any]
    meta: dict[str, Any] | None


@dataclass
class WorkRow:
    id: int
    instance_id: str
    execution_id: str
    name: str
    input: str | None
    task_id: int
    attempt: int
    retry: dict[str, Any] | None


class Store:
    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / "devhost.sqlite3"
        self._lock = threading.RLock()
        existed = self.path.exists() and self.path.stat().st_size > 0
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._check_or_create(existed)
        except sqlite3.DatabaseError as exc:
            raise StateError(
                f"{self.path}: not a usable devhost state file ({exc}); it was left untouched. "
                "Move it away or point --state at another folder."
            ) from exc

    def _check_or_create(self, existed: bool) -> None:
        db = self._db
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        if existed:
            if app_id != APPLICATION_ID:
                raise StateError(
                    f"{self.path}: this SQLite file was not written by devhost (application_id "
                    f"{app_id}); it was left untouched"
                )
            row = db.execute("SELECT value FROM meta WHERE key='format'").fetchone()
            version = int(row[0]) if row else 0
            if version > FORMAT_VERSION:
                raise StateError(
                    f"{self.path}: state format {version} is newer than this devhost understands "
                    f"({FORMAT_VERSION}); upgrade devhost or use another --state folder"
                )
            if version < 1:
                raise StateError(f"{self.path}: state format missing; the file was left untouched")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StateError(
                    f"{self.path}: corrupt state file ({check}); it was left untouched"
                )
            if version < FORMAT_VERSION:
                self._upgrade(version)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        if not existed:
            with self.transaction():
                db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('format', ?)",
                    (str(FORMAT_VERSION),),
                )

    def _upgrade(self, version: int) -> None:
        """Bring an older state file up to this format in one transaction; its instances go on."""
        with self.transaction() as db:
            if version < 2:
                db.execute("ALTER TABLE instances ADD COLUMN version TEXT")
            if version < 3:
                db.execute("ALTER TABLE instances ADD COLUMN parent_execution_id TEXT")
                db.execute("ALTER TABLE instances ADD COLUMN parent_task_id INTEGER")
            if version < 4:
                db.execute("ALTER TABLE instances ADD COLUMN parent_retry TEXT")
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('format', ?)",
                (str(FORMAT_VERSION),),
            )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- queries -----------------------------------------------------------------------

    def get_instance(self, instance_id: str) -> Instance | None:
        with self.read() as db:
            row = db.execute(
                "SELECT * FROM instances WHERE instance_id=?", (instance_id,)
            ).fetchone()
        return Instance.from_row(row) if row else None

    def list_instances(self) -> list[Instance]:
        with self.read() as db:
            rows = db.execute("SELECT * FROM instances ORDER BY created_time").fetchall()
        return [Instance.from_row(r) for r in rows]

    def history(self, instance_id: str) -> list[dict[str, Any]]:
        with self.read() as db:
            rows = db.execute(
                "SELECT event FROM history WHERE instance_id=? ORDER BY seq", (instance_id,)
            ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def ready_inbox(self, now: float) -> dict[str, list[InboxRow]]:
        with self.read() as db:
            rows = db.execute(
                "SELECT * FROM inbox WHERE visible_at <= ? ORDER BY visible_at, id", (now,)
            ).fetchall()
        grouped: dict[str, list[InboxRow]] = {}
        for r in rows:
            grouped.setdefault(r["instance_id"], []).append(_inbox_row(r))
        return grouped

    def next_visible_at(self) -> float | None:
        with self.read() as db:
            row = db.execute("SELECT MIN(visible_at) FROM inbox").fetchone()
        return row[0]

    def work_after(self, last_id: int) -> list[WorkRow]:
        with self.read() as db:
            rows = db.execute("SELECT * FROM work WHERE id > ? ORDER BY id", (last_id,)).fetchall()
        return [
            WorkRow(
                id=r["id"],
                instance_id=r["instance_id"],
                execution_id=r["execution_id"],
                name=r["name"],
                input=r["input"],
                task_id=r["task_id"],
                attempt=r["attempt"],
                retry=json.loads(r["retry"]) if r["retry"] else None,
            )
            for r in rows
        ]

    def max_timestamp(self) -> float | None:
        with self.read() as db:
            row = db.execute(
                "SELECT MAX(m) FROM (SELECT MAX(last_updated_time) AS m FROM instances "
                "UNION ALL SELECT MAX(visible_at) FROM inbox WHERE kind != 'timer' "
                "AND kind != 'retry_timer')"
            ).fetchone()
        return row[0]


def _inbox_row(r: sqlite3.Row) -> InboxRow:
    return InboxRow(
        id=r["id"],
        instance_id=r["instance_id"],
        execution_id=r["execution_id"],
        visible_at=r["visible_at"],
        kind=r["kind"],
        event=json.loads(r["event"]),
        meta=json.loads(r["meta"]) if r["meta"] else None,
    )
