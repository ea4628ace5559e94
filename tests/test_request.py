"""Message -> RunRequest: what a pipeline author sees for good and bad messages."""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from notebookops.datacontract import DATACONTRACT_PREFIX
from notebookops.request import (
    CALLBACK_PROPERTIES,
    Callback,
    ComputeSpec,
    NotebookEntry,
    RequestError,
    RunRequest,
    inspect_message,
    notebook_parameters,
    parse_request,
    read_callback,
)

TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.c2VjcmV0LXBpcGVsaW5lLXRva2Vu.Zm9vYmFy"
PLAN, JOB, TIMELINE, TASK, PROJECT = (str(uuid.UUID(int=i * 0x1111)) for i in range(1, 6))


def properties(**overrides):
    props = {
        "PlanUrl": "https://dev.azure.com/fabrikam/",
        "ProjectId": PROJECT,
        "HubName": "build",
        "PlanId": PLAN,
        "JobId": JOB,
        "TimelineId": TIMELINE,
        "TaskInstanceName": "Run notebooks",
        "TaskInstanceId": TASK,
        "AuthToken": TOKEN,
    }
    props.update(overrides)
    return {k: v for k, v in props.items() if v is not None}


def body(**overrides):
    message = {
        "repository": {"url": "https://dev.azure.com/org/proj/_git/repo", "ref": "main"},
        "notebooks": ["nb/a.ipynb"],
    }
    message.update(overrides)
    return message


def errors_of(message, **kwargs) -> list[str]:
    with pytest.raises(RequestError) as info:
        parse_request(message, **kwargs)
    return info.value.errors


def datacontract(text: str) -> bytes:
    payload = text.encode()
    assert len(payload) < 0x10000
    return DATACONTRACT_PREFIX + b"\x9b" + len(payload).to_bytes(2, "little") + payload


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("NOTEBOOKOPS_DEFAULT_BACKEND", raising=False)
    monkeypatch.delenv("NOTEBOOKOPS_ALLOW_LOCAL_REPOS", raising=False)


def test_design_example_parses_with_callback_from_properties():
    message = {
        "repository": {
            "url": "https://dev.azure.com/org/proj/_git/repo",
            "ref": "main",
            "commit": None,
        },
        "notebooks": [
            "nb/a.ipynb",
            "nb/smoke/*.ipynb",
            {
                "path": "nb/b.ipynb",
                "parameters": {"alpha": 0.5},
                "timeoutMinutes": 30,
                "allowFailure": False,
            },
        ],
        "parameters": {"env": "ci"},
        "compute": {
            "backend": "azureml",
            "target": "cpu-cluster",
            "environment": "azureml:nb-env@latest",
            "experiment": "notebook-ci",
        },
        "timeoutMinutes": 60,
        "failFast": False,
        "maxParallel": 20,
    }
    request = parse_request(json.dumps(message).encode(), properties=properties())
    assert request.repository_url == "https://dev.azure.com/org/proj/_git/repo"
    assert [e.path for e in request.notebooks] == ["nb/a.ipynb", "nb/smoke/*.ipynb", "nb/b.ipynb"]
    assert request.notebooks[2] == NotebookEntry(
        path="nb/b.ipynb", parameters={"alpha": 0.5}, timeout_minutes=30, allow_failure=False
    )
    assert request.compute == ComputeSpec(
        backend="azureml",
        target="cpu-cluster",
        environment="azureml:nb-env@latest",
        experiment="notebook-ci",
    )
    assert request.callback is not None
    assert request.callback.plan_id == PLAN and request.callback.auth_token == TOKEN
    assert request.callback.task_instance_name == "Run notebooks"
    assert notebook_parameters(request, request.notebooks[2]) == {"env": "ci", "alpha": 0.5}
    assert notebook_parameters(request, request.notebooks[0]) == {"env": "ci"}


def test_defaults_and_no_callback():
    request = parse_request(body())
    assert (request.ref, request.commit, request.timeout_minutes) == ("main", None, 60)
    assert (request.fail_fast, request.max_parallel, request.callback) == (False, 20, None)
    assert request.compute == ComputeSpec(backend="local")


def test_datacontract_and_bom_bodies_parse_the_same():
    text = json.dumps(body(parameters={"name": "naïve"}))
    plain = parse_request(text.encode())
    assert parse_request(datacontract(text)) == plain
    assert parse_request(b"\xef\xbb\xbf" + text.encode()) == plain
    assert parse_request(text) == plain


def test_round_trip_through_to_dict():
    request = parse_request(
        body(
            repository={
                "url": "git@ssh.dev.azure.com:v3/org/proj/repo",
                "commit": "ABCDEF1" * 5 + "ABCDE",
            },
            notebooks=["a.ipynb", {"path": "b.ipynb", "parameters": {"x": [1, {"y": None}]}}],
            compute={
                "backend": "azureml-v1",
                "workspace": {
                    "subscriptionId": PROJECT,
                    "resourceGroup": "rg-ml",
                    "name": "ws-01",
                },
                "sourceDirectory": "notebooks",
            },
            devops={"buildId": "42"},
            failFast=True,
            maxParallel=3,
            timeoutMinutes=12.5,
        ),
        properties=properties(),
    )
    assert request.commit == "abcdef1" * 5 + "abcde"
    assert request.callback is not None and request.callback.build_id == "42"
    as_dict = request.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["devops"]["authToken"] == TOKEN
    assert as_dict["compute"]["sourceDirectory"] == "notebooks"
    assert RunRequest.from_dict(as_dict) == request
    assert request.to_dict(mask_secrets=True)["devops"]["authToken"] == "***"


def test_to_dict_returns_copies_callers_cannot_use_to_mutate_the_request():
    request = parse_request(body(parameters={"xs": [1]}))
    request.to_dict()["parameters"]["xs"].append(2)
    notebook_parameters(request, request.notebooks[0])["xs"].append(3)
    assert request.parameters == {"xs": [1]}


def test_every_error_is_reported_at_once_with_field_and_value():
    errors = errors_of(
        {
            "repository": {"url": "http://example.com/r.git", "ref": "bad ref", "commit": "xyz"},
            "notebooks": ["ok.ipynb", "/abs.ipynb", "C:/x.ipynb", {"path": "a/../../b.ipynb"}],
            "parameters": {"not-an-identifier": 1, "class": 2},
            "compute": {"backend": "gpu", "gpus": 2},
            "timeoutMinutes": 0,
            "maxParallel": 501,
            "failFast": "yes",
            "extra": 1,
        }
    )
    joined = "\n".join(errors)
    for expected in [
        'repository.url: must use https:// (or ssh), not http://, got "http://example.com/r.git"',
        "repository.ref: must be a safe git ref name",
        "repository.commit: must be a full commit id: 40 hex digits (64 for SHA-256)",
        'notebooks[1]: must be relative to the repository root, not absolute, got "/abs.ipynb"',
        "notebooks[2]: must be relative to the repository root, not start with a drive letter",
        'notebooks[3].path: must stay inside the repository (no .. segments), got "a/../../b.ipynb"',
        "parameters.not-an-identifier: parameter names must be valid Python identifiers",
        "parameters.class: parameter names must be valid Python identifiers",
        'compute.backend: must be one of azureml, azureml-v1, local, got "gpu"',
        "compute.gpus: unknown field",
        "timeoutMinutes: must be a positive number of minutes, at most 10080, got 0",
        "maxParallel: must be a whole number from 1 to 500, got 501",
        'failFast: must be true or false, got "yes"',
        "extra: unknown field",
    ]:
        assert expected in joined
    assert len(errors) == 14


@pytest.mark.parametrize(
    ("notebook", "problem"),
    [
        ("nb\\a.ipynb", "must use / as the separator"),
        ("nb/a\x00.ipynb", "must not contain NUL"),
        ("nb/a.py", "must end with .ipynb"),
        ("nb/*", "must end with .ipynb"),
        ("..", "no .. segments"),
        ("-rf.ipynb", "must not start with -"),
        ("", "must be a non-empty path string"),
        (7, "must be a path string or an object with a path"),
    ],
)
def test_bad_notebook_paths(notebook, problem):
    (error,) = errors_of(body(notebooks=[notebook]))
    assert error.startswith("notebooks[0]") and problem in error


@pytest.mark.parametrize(
    ("notebooks", "problem"),
    [
        ([], "must hold 1 to 500 entries, got 0"),
        (["a.ipynb"] * 501, "must hold 1 to 500 entries, got 501"),
        ("a.ipynb", 'must be a list, got a JSON string, got "a.ipynb"'),
        (None, "is required"),
    ],
)
def test_notebook_list_limits(notebooks, problem):
    message = body(notebooks=notebooks)
    if notebooks is None:
        del message["notebooks"]
    (error,) = errors_of(message)
    assert error.startswith("notebooks: ") and problem in error


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("timeoutMinutes", True, "got true"),
        ("timeoutMinutes", 10081, "at most 10080, got 10081"),
        ("timeoutMinutes", -1, "got -1"),
        ("timeoutMinutes", "30", 'got "30"'),
        ("allowFailure", 1, "must be true or false, got 1"),
        ("parameters", [1], "must be an object, got a JSON array"),
    ],
)
def test_bad_entry_fields_name_the_entry(field, value, problem):
    (error,) = errors_of(body(notebooks=["a.ipynb", "b.ipynb", {"path": "c.ipynb", field: value}]))
    assert error.startswith(f"notebooks[2].{field}: ") and problem in error


def test_timeout_limits_accept_the_edges():
    request = parse_request(
        body(timeoutMinutes=10080, notebooks=[{"path": "a.ipynb", "timeoutMinutes": 0.5}])
    )
    assert request.timeout_minutes == 10080 and request.notebooks[0].timeout_minutes == 0.5


def test_nan_infinity_and_duplicate_keys_are_rejected():
    (error,) = errors_of(
        b'{"repository": {"url": "https://h/r"}, "notebooks": ["a.ipynb"], "timeoutMinutes": NaN}'
    )
    assert error.startswith("body: is not valid JSON: NaN")
    (error,) = errors_of(b'{"notebooks": ["a.ipynb"], "notebooks": ["b.ipynb"]}')
    assert 'duplicate key "notebooks"' in error
    (error,) = errors_of(body(parameters={"big": 1e400}))
    assert error.startswith("parameters.big: must be a finite number")


def test_deep_nesting_is_an_error_not_a_crash():
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    (error,) = errors_of(body(parameters={"deep": deep}))
    assert "nested more than 32 levels" in error
    (error,) = errors_of(b'{"parameters": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert error.startswith("body: ")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "body: is empty"),
        (b"[1, 2]", "body: must be a JSON object, got a JSON array"),
        (b"{", "body: is not valid JSON"),
        (b"\xff\xfe", "body: message body is not UTF-8"),
        (b"x" * (256 * 1024 + 1), "more than the 262144-byte limit"),
    ],
)
def test_unreadable_bodies(raw, problem):
    (error,) = errors_of(raw)
    assert problem in error


def test_repository_url_forms(monkeypatch):
    for url in [
        "https://dev.azure.com/org/proj/_git/repo",
        "ssh://git@ssh.dev.azure.com/v3/org/proj/repo",
        "git@github.com:org/repo.git",
        "git@host:/srv/repo.git",
        "https://[2001:db8::1]:8443/r",
        "ssh://git@host.example:2222/r",
    ]:
        assert parse_request(body(repository={"url": url})).repository_url == url
    # Azure DevOps' own clone URL names the organization in the user part: not a credential,
    # and taken out so nothing downstream ever sees a user part.
    org_form = "https://org@dev.azure.com/org/proj/_git/repo"
    assert parse_request(body(repository={"url": org_form})).repository_url == (
        "https://dev.azure.com/org/proj/_git/repo"
    )
    (error,) = errors_of(body(repository={"url": "/srv/repos/x"}))
    assert "local repositories are allowed only when NOTEBOOKOPS_ALLOW_LOCAL_REPOS=1" in error
    (error,) = errors_of(body(repository={"url": "ftp://h/r"}))
    assert error.startswith("repository.url: must be an https:// URL")
    monkeypatch.setenv("NOTEBOOKOPS_ALLOW_LOCAL_REPOS", "1")
    for url in ["/srv/repos/x", "file:///srv/repos/x"]:
        assert parse_request(body(repository={"url": url})).repository_url == url


def test_credentials_in_repository_url_are_rejected_without_echoing_them():
    (error,) = errors_of(body(repository={"url": "https://me:hunter2pat@dev.azure.com/o/p/_git/r"}))
    assert "must not embed credentials" in error and "hunter2pat" not in error


SECRET = "s3cr3tPATvalue0123456789"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # A user-only token: the common way to pass an Azure DevOps PAT.
        (f"https://{SECRET}@dev.azure.com/org/proj/_git/repo", "https://***@dev.azure.com/org"),
        (f"https://me:{SECRET}@dev.azure.com/o/p/_git/r", "https://***@dev.azure.com/o/p"),
        # Percent-encoded, in the user part and in the password.
        (f"https://{SECRET[:6]}%3A{SECRET[6:]}@host.example/r", "https://***@host.example/r"),
        (f"https://x:{SECRET[:6]}%40{SECRET[6:]}@host.example/r", "https://***@host.example/r"),
        # A user on dev.azure.com that is not the organization of the path.
        (f"https://{SECRET}@dev.azure.com/org/p/_git/r", "https://***@dev.azure.com/org/p"),
        (f"ssh://git:{SECRET}@host.example/r", "ssh://***@host.example/r"),
        (f"git:{SECRET}@host.example:org/r", "***@host.example:org/r"),
    ],
)
def test_every_credential_form_is_refused_with_the_url_masked(url, shown):
    request, _, errors = inspect_message(json.dumps(body(repository={"url": url})))
    assert request is None
    (error,) = errors
    assert error.startswith("repository.url: must not embed credentials"), error
    assert shown in error
    for form in (SECRET, SECRET[:6], SECRET[6:], quote(SECRET)):
        assert form not in error


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ssh://-oProxyCommand=touch%20x/r", "must name a host of letters, digits, dots"),
        ("https://-host.example/r", "must name a host of letters, digits, dots"),
        ("ssh://host.example:99999/r", "must have a port from 1 to 65535"),
        ("ssh://host.example:0/r", "must have a port from 1 to 65535"),
        ("https://host.example:x/r", "must have a port from 1 to 65535"),
        ("https://host.example/-upload-pack=x", "must not have a path that begins with -"),
        ("git@host.example:-oProxyCommand=x", "must be an https:// URL"),
        ("-oProxy@host.example:r", "user name git could read as an option"),
        ("https://host.example/r%0a", "without spaces or control characters"),
        ("https://host.example/r\x7f", "without spaces or control characters"),
        ("https://[::1/r", "is not a valid URL"),
    ],
)
def test_urls_git_could_read_as_options_are_refused(url, problem):
    (error,) = errors_of(body(repository={"url": url}))
    assert error.startswith("repository.url: ") and problem in error, error


def test_file_urls_must_not_name_a_host(monkeypatch):
    monkeypatch.setenv("NOTEBOOKOPS_ALLOW_LOCAL_REPOS", "1")
    (error,) = errors_of(body(repository={"url": "file://evil.example/srv/r"}))
    assert "file:// URL must not name a host" in error
    assert parse_request(body(repository={"url": "file://localhost/srv/r"}))


@pytest.mark.parametrize("text", ["9" * 400, "1e999", "-1e999", "-0", "-0.0", "0", "1e-400"])
def test_numbers_out_of_range_are_errors_never_overflow(text):
    raw = json.dumps(body())[:-1] + f', "timeoutMinutes": {text}, "maxParallel": {text}}}'
    errors = errors_of(raw.encode())
    assert any(e.startswith("timeoutMinutes: must be a positive number") for e in errors), errors
    assert any(e.startswith("maxParallel: must be a whole number") for e in errors), errors


@pytest.mark.parametrize(
    "ref", ["refs/heads/feature/x", "v1.2.3", "release-2024", "refs/pull/7/merge"]
)
def test_good_refs(ref):
    assert parse_request(body(repository={"url": "https://h/r", "ref": ref})).ref == ref


@pytest.mark.parametrize(
    "ref", ["a b", "a..b", "-x", "a~1", "x.lock", "a/", "@{u}", "a\tb", ".hidden", "a:b"]
)
def test_unsafe_refs(ref):
    (error,) = errors_of(body(repository={"url": "https://h/r", "ref": ref}))
    assert error.startswith("repository.ref: must be a safe git ref name")


def test_commit_lengths():
    for commit in ["a" * 40, "b" * 64]:
        assert (
            parse_request(body(repository={"url": "https://h/r", "commit": commit})).commit
            == commit
        )
    for commit in ["abc1234", "abc123", "a" * 41, "g" * 40]:
        assert errors_of(body(repository={"url": "https://h/r", "commit": commit}))


def test_backend_default_from_argument_then_environment(monkeypatch):
    assert parse_request(body(), default_backend="azureml").compute.backend == "azureml"
    monkeypatch.setenv("NOTEBOOKOPS_DEFAULT_BACKEND", "azureml-v1")
    assert parse_request(body()).compute.backend == "azureml-v1"
    assert parse_request(body(compute={"backend": "local"})).compute.backend == "local"
    monkeypatch.setenv("NOTEBOOKOPS_DEFAULT_BACKEND", "quantum")
    (error,) = errors_of(body())
    assert error == (
        "compute.backend (default from NOTEBOOKOPS_DEFAULT_BACKEND): must be one of azureml, "
        'azureml-v1, local, got "quantum"'
    )


def test_workspace_fields_are_checked():
    errors = errors_of(
        body(compute={"backend": "azureml", "workspace": {"subscriptionId": "nope", "name": "w"}})
    )
    assert any(
        e.startswith('compute.workspace.subscriptionId: must be a subscription GUID, got "nope"')
        for e in errors
    )
    assert "compute.workspace.resourceGroup: is required" in errors
    assert any(e.startswith("compute.workspace.name: must be a workspace name") for e in errors)


def test_long_values_are_shortened_in_errors():
    (error,) = errors_of(body(notebooks=["x" * 5000]))
    assert len(error) < 300 and error.endswith("…")


# --- callback ----------------------------------------------------------------------------------


def test_callback_precedence_properties_then_body_then_headers():
    other = str(uuid.uuid4())
    devops = {
        "planUrl": "https://dev.azure.com/other/",
        "projectId": other,
        "hubName": "release",
        "planId": other,
        "jobId": other,
        "timelineId": other,
        "taskInstanceId": other,
        "authToken": "body-token-value",
        "buildId": "7",
    }
    headers = {
        "planurl": "https://h/",
        "PROJECTID": other,
        "HubName": "checks",
        "PlanId": other,
        "JobId": other,
        "TimelineId": other,
        "TaskInstanceId": other,
        "AuthToken": "header-token",
    }

    from_props = read_callback(properties(), {"devops": devops}, headers)
    assert from_props is not None
    assert (
        from_props.plan_id == PLAN and from_props.auth_token == TOKEN and from_props.build_id == "7"
    )

    from_body = read_callback({"Diagnostic-Id": "x"}, {"devops": devops}, headers)
    assert from_body is not None and from_body.plan_id == other and from_body.hub_name == "release"

    from_headers = read_callback(None, {}, headers)
    assert from_headers is not None and from_headers.hub_name == "checks"
    assert from_headers.task_instance_name is None

    assert read_callback(None, {"devops": {"buildId": "7"}}, {"Content-Type": "x"}) is None
    assert read_callback(None, None, None) is None


def test_callback_round_trip_and_guid_case_normalised():
    callback = read_callback(properties(PlanId=PLAN.upper(), BuildId=99), None, None)
    assert callback is not None and callback.plan_id == PLAN and callback.build_id == "99"
    assert callback.to_dict()["planId"] == PLAN
    assert Callback.from_dict(callback.to_dict()) == callback


def test_partial_callback_names_missing_fields():
    with pytest.raises(RequestError) as info:
        read_callback(properties(JobId=None, AuthToken=None, TimelineId=""), None, None)
    assert info.value.errors == [
        "properties: callback values are incomplete (the pipeline cannot be called back), "
        "missing JobId, TimelineId, AuthToken"
    ]


def test_invalid_callback_values_name_the_property():
    with pytest.raises(RequestError) as info:
        read_callback(
            properties(PlanId="$(System.PlanId)", PlanUrl="ftp://x", HubName="a/b"), None, None
        )
    assert info.value.errors == [
        'properties.PlanUrl: must be an http(s) URL such as https://dev.azure.com/org/, got "ftp://x"',
        'properties.HubName: must be a hub name such as build or release, got "a/b"',
        'properties.PlanId: must be a GUID (an unexpanded pipeline variable?), got "$(System.PlanId)"',
    ]


def test_unknown_devops_keys_and_callback_at_top_level_get_a_hint():
    errors = errors_of(body(devops={"planID": PLAN, "colour": "red"}, JobId=JOB))
    assert any(e.startswith("devops.colour: unknown field") for e in errors)
    assert any(
        'JobId: unknown field (callback values go in the "devops" object' in e for e in errors
    )


def test_inspect_message_returns_callback_even_when_body_is_bad():
    request, callback, errors = inspect_message(b"not json", properties=properties())
    assert request is None and errors and errors[0].startswith("body: is not valid JSON")
    assert callback is not None and callback.job_id == JOB

    devops = {k[0].lower() + k[1:]: v for k, v in properties().items()}
    request, callback, errors = inspect_message(json.dumps({"devops": devops}))
    assert request is None and callback is not None and callback.auth_token == TOKEN
    assert errors == [
        "repository: is required",
        "notebooks: is required: a list of notebook paths or glob patterns",
    ]

    request, callback, errors = inspect_message(json.dumps(body()).encode())
    assert request is not None and callback is None and errors == []


# --- secrets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [TOKEN, "bad token with spaces", "tok\x00en", "short"],
)
def test_token_never_shows_in_repr_or_errors(token):
    basic = base64.b64encode(f":{token}".encode()).decode()
    bad = body(
        repository={"url": f"https://h/{token}", "ref": token},
        notebooks=[token, {"path": f"{token}.ipynb", "parameters": {token: token}}],
        compute={"backend": token},
        devops={"authToken": token, "planUrl": token},
        parameters={"x": f"Basic {basic}"},
    )
    for props in (None, properties(AuthToken=token)):
        _, callback, errors = inspect_message(json.dumps(bad), properties=props)
        text = "\n".join(errors) + repr(callback) + str(RequestError(errors))
        assert errors and token not in text and basic not in text
    good = parse_request(body(), properties=properties())
    assert TOKEN not in repr(good) and TOKEN not in str(good.callback)
    assert "auth_token='***'" in repr(good.callback)


def test_token_of_wrong_type_is_not_echoed():
    with pytest.raises(RequestError) as info:
        read_callback(properties(AuthToken=123456789), None, None)
    assert "123456789" not in str(info.value)
    assert info.value.errors == [
        "properties.AuthToken: must be a token string without spaces (value not shown)"
    ]


def test_request_error_pickles_with_its_errors():
    error = RequestError(["a: x", "b: y"])
    clone = pickle.loads(pickle.dumps(error))  # noqa: S301 -- our own bytes, as multiprocessing does
    assert clone.errors == ["a: x", "b: y"] and str(clone) == "a: x; b: y"


# --- properties: nothing but RequestError, whatever arrives ------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=15,
)
field_names = st.sampled_from(
    [
        "repository",
        "notebooks",
        "parameters",
        "compute",
        "timeoutMinutes",
        "failFast",
        "maxParallel",
        "devops",
        "url",
        "path",
        "backend",
        "planId",
        "authToken",
    ]
)
messages = st.dictionaries(field_names, json_values, max_size=8)
property_maps = st.none() | st.dictionaries(
    st.sampled_from([*CALLBACK_PROPERTIES, "BuildId"]),
    json_values | st.uuids().map(str),
    max_size=9,
)


@settings(max_examples=150, deadline=None)
@given(
    raw=st.binary(max_size=300)
    | st.builds(lambda b: DATACONTRACT_PREFIX + b, st.binary(max_size=40))
)
def test_arbitrary_bytes_only_ever_raise_request_error(raw):
    try:
        parse_request(raw)
    except RequestError as exc:
        assert exc.errors
    request, _, errors = inspect_message(raw)
    assert (request is None) == bool(errors)


@settings(max_examples=200, deadline=None)
@given(message=messages | json_values, props=property_maps, headers=property_maps)
def test_arbitrary_json_only_ever_raises_request_error(message, props, headers):
    try:
        request = parse_request(json.dumps(message), properties=props, headers=headers)
    except RequestError as exc:
        assert exc.errors and all(isinstance(e, str) for e in exc.errors)
    else:
        assert RunRequest.from_dict(request.to_dict()) == request
    request, _, errors = inspect_message(message, properties=props, headers=headers)
    assert (request is None) == bool(errors)


def test_keys_with_line_breaks_keep_each_error_on_one_line():
    errors = errors_of(body(**{"evil\nkey": 1}, parameters={"a\rb": 1}))
    assert len(errors) == 2 and all("\n" not in e and "\r" not in e for e in errors)
    assert errors[0].startswith('"evil\\nkey": unknown field')


def test_mapping_bodies_are_size_limited_too():
    (error,) = errors_of(body(parameters={"blob": "x" * (256 * 1024)}))
    assert error.startswith("body: is ") and "262144-byte limit" in error


def test_repr_masks_secret_looking_parameters():
    request = parse_request(
        body(
            parameters={"db_password": "pw-123456", "env": "ci"},
            notebooks=[{"path": "a.ipynb", "parameters": {"API_KEY": "k-987654"}}],
        )
    )
    text = repr(request)
    assert "pw-123456" not in text and "k-987654" not in text
    assert "'env': 'ci'" in text and "'db_password': '***'" in text
    assert request.parameters["db_password"] == "pw-123456"  # the value itself is intact


def test_strict_parameters_is_a_boolean_and_round_trips():
    request = parse_request(body(strictParameters=True))
    assert request.strict_parameters is True
    assert request.to_dict()["strictParameters"] is True
    assert RunRequest.from_dict(request.to_dict()).strict_parameters is True
    assert "strictParameters" not in parse_request(body()).to_dict()
    (error,) = errors_of(body(strictParameters="yes"))
    assert error == 'strictParameters: must be true or false, got "yes"'


def test_rules_on_two_fields_are_reported_with_the_field_errors():
    """The backend's rules run on the raw message, so they join every other problem at once."""
    errors = errors_of(
        body(
            compute={"backend": "azureml", "environment": "no such form!", "python": "/venv"},
            notebooks=[{"path": "a.ipynb", "python": "/venv2", "timeoutMinutes": 0}],
            timeoutMinutes=-1,
        )
    )
    assert [e.split(":")[0] for e in errors] == [
        "notebooks[0].timeoutMinutes",
        "timeoutMinutes",
        "compute.environment",
        "compute.python",
        "notebooks[0].python",
    ], errors
    assert "applies to the local backend only; on azureml" in errors[3]


def test_null_means_absent_and_the_schema_key_is_allowed():
    request = parse_request(
        body(
            **{"$schema": "../../schemas/message.schema.json"},
            timeoutMinutes=None,
            compute={"backend": None, "experiment": None},
            repository={"url": "https://h/r", "ref": None},
        )
    )
    assert (request.timeout_minutes, request.compute.experiment, request.ref) == (
        60,
        "notebook-ci",
        "main",
    )
    assert "$schema" not in request.to_dict()
    # An unknown key is reported even when its value is null.
    (error,) = errors_of(body(compute={"gpus": None}))
    assert error.startswith("compute.gpus: unknown field")


def test_kernel_with_python_is_reported_beside_a_bad_path_of_the_same_entry():
    errors = errors_of(
        body(notebooks=[{"path": "/abs.ipynb", "kernel": "python3", "python": "/venv"}])
    )
    assert [e.split(":")[0] for e in errors] == ["notebooks[0].path", "notebooks[0].python"]
    assert "cannot be combined with kernel" in errors[1]
