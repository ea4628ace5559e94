"""schemas/message.schema.json: generated from notebookops.message, current, and in agreement
with `validate` on every example message and on the property-test corpus.

Agreement means: a message validate accepts, the schema accepts (an editor never flags a good
message); a message the schema refuses, validate refuses; and a message validate refuses but
the schema accepts fails only rules the schema cannot express (SCHEMA_CANNOT_SAY below, the
list the README gives too).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notebookops.message import schema_text
from notebookops.request import inspect_message
from tests.test_hostile_input import _bodies
from tests.test_request import messages as request_messages

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "schemas" / "message.schema.json"
EXAMPLES = ROOT / "examples" / "messages"
SCHEMA = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

# (field path pattern, start of validate's problem): the rules only validate checks.
SCHEMA_CANNOT_SAY = [
    # URL parsing: scheme, host, port, user part, local paths (a setting), percent-encoding.
    (r"repository\.url", "must use https://"),
    (r"repository\.url", "must name a host"),
    (r"repository\.url", "has no host name"),
    (r"repository\.url", "must have a port"),
    (r"repository\.url", "must not have a path that begins with -"),
    (r"repository\.url", "is not a valid URL"),
    (r"repository\.url", "must not embed credentials"),
    (r"repository\.url", "has a user name git could read as an option"),
    (r"repository\.url", "local repositories are allowed only"),
    (r"repository\.url", "file:// URL"),
    (r"repository\.url", "must be an https:// URL"),
    (
        r"repository\.url",
        "must be at most 2048 characters without spaces or control "
        "characters (percent-encoded ones too)",
    ),
    # Python identifiers in full Unicode, nesting depth.
    (r"parameters\..*|notebooks\[\d+\]\.parameters\..*", "parameter names must be valid"),
    (r"parameters\..*|notebooks\[\d+\]\.parameters\..*", "is nested more than"),
    # A JSON Schema "integer" is any number without a fraction: 5.0 too.
    (r"maxParallel", "must be a whole number"),
    # Rules on two fields, where the backend may come from an app setting.
    (r"compute\.environment", "is not an environment reference"),
    (r"compute\.environment", "is a registry reference"),
    (r"compute\.environment", "names label"),
    (r"compute\.python|notebooks\[\d+\]\.python", "applies to the local backend only"),
    # Callback values: which source wins, whether it is complete, keys differing in case,
    # the plan URL's host.
    (r"devops", "callback values are incomplete"),
    (r"devops\..*", "repeats"),
    (r"devops\..*", "must be an http(s) URL"),
]


def _only_beyond_the_schema(errors: list[str]) -> bool:
    for error in errors:
        path, _, problem = error.partition(": ")
        if not any(
            re.fullmatch(field, path) and problem.startswith(start)
            for field, start in SCHEMA_CANNOT_SAY
        ):
            return False
    return True


def check_agreement(data: object) -> None:
    _, _, errors = inspect_message(
        json.dumps(data), default_backend="local", allow_local_repos=False
    )
    schema_errors = [e.message for e in VALIDATOR.iter_errors(data)]
    if not errors:
        assert not schema_errors, (data, schema_errors)
    elif not schema_errors:
        assert _only_beyond_the_schema(errors), (data, errors)


def test_committed_schema_is_generated_from_the_models():
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_text(), (
        "schemas/message.schema.json is stale: run `make schema`"
    )


def test_make_schema_writes_the_same_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "notebookops.message"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == SCHEMA_FILE.read_text(encoding="utf-8")


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize(
    "name", sorted(p.name for p in EXAMPLES.glob("*.json") if "properties" not in p.name)
)
def test_every_example_message_points_at_the_schema_and_both_agree(name):
    path = EXAMPLES / name
    data = json.loads(path.read_text(encoding="utf-8"))
    assert (path.parent / data["$schema"]).resolve() == SCHEMA_FILE
    from notebookops.message_file import inspect_message_file

    _, _, errors = inspect_message_file(path, None)
    schema_errors = list(VALIDATOR.iter_errors(data))
    assert bool(errors) == bool(schema_errors) == (name == "invalid.json"), (errors, schema_errors)


@pytest.mark.slow
def test_check_jsonschema_in_a_pipeline_step_accepts_the_demo_and_refuses_the_invalid_example():
    """The README's pipeline step, as a pipeline runs it (check-jsonschema, ECMAScript regexes)."""
    command = Path(sys.executable).parent / "check-jsonschema"

    def check(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [command, "--schemafile", SCHEMA_FILE, EXAMPLES / name],
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert check("local.json").returncode == 0
    refused = check("invalid.json")
    assert refused.returncode == 1
    assert "'failfast' was unexpected" in refused.stdout
    assert "'gpu' is not one of ['local', 'azureml', 'azureml-v1']" in refused.stdout


def test_the_schema_refuses_what_an_editor_should_flag():
    """Each rule the schema can say, as an editor shows it to a pipeline author."""
    good = {"repository": {"url": "https://h/r"}, "notebooks": ["a.ipynb"]}
    assert not list(VALIDATOR.iter_errors(good))
    for bad in [
        {**good, "failfast": True},
        {**good, "notebooks": ["../x.ipynb"]},
        {**good, "notebooks": ["a.py"]},
        {**good, "notebooks": []},
        {**good, "timeoutMinutes": 0},
        {**good, "maxParallel": 501},
        {**good, "parameters": {"learning-rate": 0.1}},
        {**good, "parameters": {"class": 1}},
        {**good, "repository": {"url": "https://h/r", "ref": "a..b"}},
        {**good, "repository": {"url": "https://h/r", "commit": "abc1234"}},
        {**good, "compute": {"backend": "gpu"}},
        {**good, "compute": {"kernel": "python3", "python": "/venv"}},
        {**good, "compute": {"workspace": {"name": "ws"}}},
        {**good, "devops": {"planId": "not-a-guid"}},
        {**good, "devops": {"colour": "red"}},
        {"notebooks": ["a.ipynb"]},
    ]:
        assert list(VALIDATOR.iter_errors(bad)), bad
        check_agreement(bad)
    # What validate accepts the schema accepts: null as absent, keys of devops in any case,
    # the $schema key itself.
    for fine in [
        {**good, "timeoutMinutes": None, "compute": {"backend": None, "experiment": None}},
        {**good, "devops": {"PLANID": "", "buildId": 7}},
        {**good, "$schema": "../../schemas/message.schema.json"},
    ]:
        assert not list(VALIDATOR.iter_errors(fine)), fine
        check_agreement(fine)


CORPUS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@CORPUS
@given(message=request_messages)
def test_validate_and_the_schema_agree_on_the_request_property_corpus(message):
    check_agreement(message)


@CORPUS
@given(raw=_bodies)
def test_validate_and_the_schema_agree_on_the_hostile_input_corpus(raw):
    try:
        data = json.loads(raw)  # the schema judges JSON: bytes that are not JSON are not its job
    except ValueError:
        return
    check_agreement(data)


@CORPUS
@given(
    valid=st.fixed_dictionaries(
        {
            "repository": st.fixed_dictionaries(
                {"url": st.sampled_from(["https://h/r", "git@h:r.git", "ssh://git@h/r"])},
                optional={
                    "ref": st.sampled_from(["main", "v1.2", "refs/heads/x", None]),
                    "commit": st.sampled_from(["a" * 40, "B" * 64, None]),
                },
            ),
            "notebooks": st.lists(
                st.sampled_from(["a.ipynb", "nb/*.ipynb", "x/**/y.ipynb"])
                | st.fixed_dictionaries(
                    {"path": st.just("b.ipynb")},
                    optional={
                        "parameters": st.dictionaries(
                            st.sampled_from(["alpha", "n", "_x"]), st.integers(), max_size=2
                        ),
                        "timeoutMinutes": st.floats(min_value=0.01, max_value=10080),
                        "allowFailure": st.booleans(),
                        "kernel": st.sampled_from(["python3", "ir"]),
                    },
                ),
                min_size=1,
                max_size=4,
            ),
        },
        optional={
            "compute": st.fixed_dictionaries(
                {"backend": st.sampled_from(["local", "azureml", "azureml-v1"])},
                optional={"target": st.just("cpu"), "experiment": st.just("e-1")},
            ),
            "maxParallel": st.integers(min_value=1, max_value=500),
            "failFast": st.booleans(),
            "strictParameters": st.booleans(),
        },
    )
)
def test_valid_messages_are_accepted_by_both(valid):
    _, _, errors = inspect_message(json.dumps(valid), default_backend="local")
    assert errors == []
    assert not list(VALIDATOR.iter_errors(valid))
