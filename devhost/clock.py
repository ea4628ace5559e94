"""Clocks for devhost: real time for people, virtual time for tests and benchmarks.

The virtual clock never sleeps: the host moves it to the next timer's fireAt once nothing
else can run, so an orchestration that waits hours of durable timers finishes in
milliseconds while `context.current_utc_datetime` still sees the hours pass.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta


class Clock:
    virtual = False

    def now(self) -> datetime:
        raise NotImplementedError

    def advance_to(self, when: datetime) -> None:  # pragma: no cover - real clock ignores it
        """Only the virtual clock jumps; the real one waits."""


class RealClock(Clock):
    def now(self) -> datetime:
        return datetime.now(UTC)


class VirtualClock(Clock):
    virtual = True

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2024, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance_to(self, when: datetime) -> None:
        with self._lock:
            if when > self._now:
                self._now = when

    def advance(self, delta: timedelta) -> None:
        self.advance_to(self.now() + delta)


def make_clock(spec: str | Clock | None) -> Clock:
    if isinstance(spec, Clock):
        return spec
    if spec in (None, "real"):
        return RealClock()
    if spec == "virtual":
        return VirtualClock()
    raise ValueError(f"clock: expected 'real' or 'virtual', got {spec!r}")
