"""The TaskCompleted delivery rule (notebookops.devops.delivery) as pure decisions over time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from notebookops.devops import delivery

START = datetime(2026, 5, 1, 10, 0, tzinfo=UTC)


def fresh(finished_after: timedelta = timedelta(minutes=3)) -> dict:
    return delivery.new_delivery(
        "failed", "2026-05-01T10:00:00.000000Z", 60, START + finished_after
    )


def down(error: str = "TaskCompleted: HTTP 503", retry_after: float | None = None) -> dict:
    return {"outcome": "unavailable", "error": error, "retryAfter": retry_after, "record": None}


def test_back_off_doubles_from_seconds_to_a_cap_of_minutes() -> None:
    record = fresh()
    now = START + timedelta(minutes=3)
    gaps = []
    for _ in range(9):
        delivery.apply(record, down(), now)
        wake = delivery.next_attempt_at(record)
        gaps.append((wake - now).total_seconds())
        now = wake
    assert gaps == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert not record["done"] and record["attempts"] == 9


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    record = fresh()
    now = START
    delivery.apply(record, down(retry_after=30), now)
    assert delivery.next_attempt_at(record) == now + timedelta(seconds=30)
    delivery.apply(record, down(retry_after=3600), now)
    assert delivery.next_attempt_at(record) == now + timedelta(minutes=5)


def test_the_horizon_is_an_hour_after_the_later_of_deadline_and_end() -> None:
    assert fresh()["horizon"] == "2026-05-01T12:00:00.000000Z"  # deadline 11:00 + 1 h
    late = fresh(finished_after=timedelta(minutes=90))  # ran past its deadline
    assert late["horizon"] == "2026-05-01T12:30:00.000000Z"


def test_at_the_horizon_it_gives_up_with_one_readable_line() -> None:
    record = fresh()
    horizon = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    delivery.apply(record, down(), horizon - timedelta(seconds=2))
    assert delivery.next_attempt_at(record) == horizon  # never past it
    delivery.apply(record, down("TaskCompleted: no answer\n  (details)"), horizon)
    assert record["done"] and not record["delivered"]
    assert record["lastError"].startswith("TaskCompleted: no answer (details); gave up after 2")
    assert "\n" not in record["lastError"]
    assert delivery.view(record) == {
        "delivered": False,
        "attempts": 2,
        "lastError": record["lastError"],
    }


def test_accepted_is_delivered_and_clears_the_last_error() -> None:
    record = fresh()
    delivery.apply(record, down(), START)
    delivery.apply(record, {"outcome": "accepted"}, START + timedelta(seconds=5))
    assert delivery.view(record) == {"delivered": True, "attempts": 2, "lastError": None}


def test_a_4xx_stops_and_the_record_tells_whether_an_earlier_attempt_landed() -> None:
    lost = fresh()
    delivery.apply(lost, down("TaskCompleted: ReadTimeout"), START)
    delivery.apply(
        lost,
        {
            "outcome": "rejected",
            "error": "TaskCompleted: Azure DevOps answered HTTP 409",
            "record": {"state": "completed", "result": "failed"},
        },
        START + timedelta(seconds=5),
    )
    assert lost["done"] and lost["delivered"]
    assert "an earlier attempt landed" in lost["lastError"]

    gone = fresh()
    delivery.apply(
        gone,
        {"outcome": "rejected", "error": "TaskCompleted: HTTP 404", "record": None},
        START,
    )
    assert gone["done"] and not gone["delivered"] and "no longer waits" in gone["lastError"]


def test_a_finished_task_record_during_an_outage_means_gone() -> None:
    record = fresh()
    delivery.apply(
        record,
        {**down(), "record": {"state": "completed", "result": "canceled"}},
        START,
    )
    assert record["done"] and not record["delivered"]
    assert "finished (canceled)" in record["lastError"]
    waiting = fresh()
    delivery.apply(waiting, {**down(), "record": {"state": "inProgress"}}, START)
    assert not waiting["done"]


def test_authentication_failures_stop_after_three() -> None:
    record = fresh()
    now = START
    for _ in range(delivery.AUTH_ATTEMPTS):
        assert not record["done"]
        delivery.apply(
            record, {"outcome": "auth", "error": "TaskCompleted: authentication failed"}, now
        )
        now += timedelta(minutes=1)
    assert record["done"] and record["attempts"] == 3
    assert record["lastError"].endswith("gave up after 3 authentication failures")
