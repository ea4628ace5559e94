"""History timestamps read by notebookops.sdk_timestamps: the instant dateutil gives for the
host's format, dateutil's own answer (or refusal) for anything else, and the SDK really using
it once the orchestrator module is loaded."""

from __future__ import annotations

import importlib
import json
from datetime import UTC, datetime

import pytest
from dateutil.parser import ParserError
from dateutil.parser import parse as dateutil_parse

from notebookops import sdk_timestamps
from notebookops.sdk_timestamps import parse_timestamp

HOST_FORMAT = [
    "2024-01-01T00:00:00Z",
    "2024-01-01T02:58:01.875000Z",  # devhost, and the SDK's own DATETIME_STRING_FORMAT
    "2024-01-01T02:58:01.8750009Z",  # .NET's 7 digits: cut to microseconds, as dateutil does
    "2026-07-15T12:34:56.1Z",
    "2024-12-31T23:59:59.9999999Z",
    "2024-02-29T12:00:00.123Z",
]


@pytest.mark.parametrize("text", HOST_FORMAT)
def test_the_hosts_format_reads_as_the_instant_dateutil_reads(text):
    ours, theirs = parse_timestamp(text), dateutil_parse(text)
    assert ours == theirs
    assert ours.utcoffset() == theirs.utcoffset()
    assert ours.tzinfo is UTC
    assert ours.isoformat() == theirs.astimezone(UTC).isoformat()
    # What the orchestrator writes back (policy.iso, the SDK's timer fireAt) is the same text.
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
    assert ours.strftime(fmt) == theirs.astimezone(UTC).strftime(fmt)


@pytest.mark.parametrize(
    "text",
    [
        "2024-01-01T10:00:00+02:00",
        "2024-01-01T10:00:00",
        "2024-01-01 10:00:00Z",
        "Jan 1 2024",
        "２０２４-01-01T00:00:00Z",  # other scripts' digits: not the host's format, dateutil's call
    ],
)
def test_any_other_text_reads_as_dateutil_reads_it(text):
    assert parse_timestamp(text) == dateutil_parse(text)
    assert parse_timestamp(text).tzinfo == dateutil_parse(text).tzinfo


@pytest.mark.parametrize(
    "text",
    ["2024-02-30T00:00:00Z", "2024-01-01T24:00:00Z", "not a time"],
)
def test_what_dateutil_refuses_is_refused_with_its_words(text):
    with pytest.raises(ParserError) as theirs:
        dateutil_parse(text)
    with pytest.raises(ParserError) as ours:
        parse_timestamp(text)
    assert str(ours.value) == str(theirs.value)


def test_the_sdk_reads_history_timestamps_with_it_once_the_orchestrator_is_loaded():
    from azure.durable_functions.models.DurableOrchestrationContext import (
        DurableOrchestrationContext,
    )

    import notebookops.orchestration  # noqa: F401 - installs on import

    module = importlib.import_module(sdk_timestamps.SDK_MODULE)
    assert module.dt_parse is parse_timestamp
    assert sdk_timestamps.install() is True  # idempotent
    history = [
        {"EventType": 12, "EventId": -1, "IsPlayed": False, "Timestamp": HOST_FORMAT[2]},
        {
            "EventType": 0,
            "EventId": -1,
            "IsPlayed": False,
            "Timestamp": HOST_FORMAT[2],
            "Name": "OrchestratorFunction",
            "Version": "",
            "Input": None,
        },
    ]
    context = DurableOrchestrationContext.from_json(
        json.dumps(
            {
                "history": history,
                "instanceId": "i",
                "isReplaying": False,
                "parentInstanceId": None,
                "input": None,
            }
        )
    )
    assert context.current_utc_datetime == datetime(2024, 1, 1, 2, 58, 1, 875000, tzinfo=UTC)


def test_an_sdk_that_parses_otherwise_is_left_alone(monkeypatch):
    module = importlib.import_module(sdk_timestamps.SDK_MODULE)
    other = lambda text: datetime.fromisoformat(text)  # noqa: E731 - a stand-in parser
    monkeypatch.setattr(module, "dt_parse", other)
    assert sdk_timestamps.install() is False
    assert module.dt_parse is other
