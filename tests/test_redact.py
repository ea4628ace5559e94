"""Redaction: the secret, in any of its wire forms, never reaches text a person can read."""

from __future__ import annotations

import base64
import io
import json
import logging
import uuid
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from notebookops import redact as redact_module
from notebookops.redact import (
    MASK,
    RedactingFilter,
    forget_secret,
    install_log_redaction,
    redact,
    redact_mapping,
    register_secret,
)


@pytest.fixture
def secret():
    """A registered, unique token; unregistered and the log factory restored afterwards."""
    value = f"eyJ0eXAi.{uuid.uuid4().hex}/+={uuid.uuid4().hex[:6]}"
    factory = logging.getLogRecordFactory()
    assert register_secret(value)
    yield value
    forget_secret(value)
    logging.setLogRecordFactory(factory)


@pytest.fixture
def log_stream():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"notebookops.test.{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def basic_auth(token: str) -> str:
    return base64.b64encode(f":{token}".encode()).decode()


def test_explicit_secret_in_every_wire_form_is_masked():
    token = "tok/en+with=odd&chars"
    text = (
        f"plain {token} | Authorization: Basic {basic_auth(token)} | "
        f"url https://x/?t={quote(token, safe='')} | json {json.dumps({'t': token})}"
    )
    out = redact(text, [token])
    assert token not in out
    assert basic_auth(token) not in out
    assert quote(token, safe="") not in out
    assert out.count(MASK) == 4
    assert out.startswith("plain *** | Authorization: Basic *** | url https://x/?t=***")


def test_longer_secret_containing_a_shorter_one_is_masked_whole():
    assert redact("a-secret-b and a-secret", ["a-secret", "a-secret-b"]) == "*** and ***"


def test_short_secret_is_masked_when_given_but_not_registered():
    assert redact("pin=abc", ["abc"]) == "pin=***"
    assert register_secret("abc") is False
    assert redact("abc stays abc") == "abc stays abc"


def test_empty_and_blank_secrets_do_not_mangle_text():
    assert redact("a b c", ["", "  ", None]) == "a b c"


def test_registered_secret_is_masked_without_being_passed(secret):
    assert redact(f"token={secret}") == "token=***"
    forget_secret(secret)
    assert redact(f"token={secret}") == f"token={secret}"


def test_log_records_are_scrubbed_in_message_args_and_traceback(secret, log_stream):
    logger, stream = log_stream
    install_log_redaction()
    logger.info("calling back with %s and header Basic %s", secret, basic_auth(secret))
    logger.warning({"AuthToken": secret})
    try:
        raise RuntimeError(f"callback failed for token {secret}")
    except RuntimeError:
        logger.exception("callback error")
    text = stream.getvalue()
    assert secret not in text
    assert basic_auth(secret) not in text
    assert "calling back with *** and header Basic ***" in text
    assert "RuntimeError: callback failed for token ***" in text


def test_secret_registered_after_install_and_handler_added_later_are_covered(log_stream):
    factory = logging.getLogRecordFactory()
    try:
        install_log_redaction()
        logger, stream = log_stream
        late = f"late-{uuid.uuid4().hex}"
        register_secret(late)
        logger.error("token %r", late)
        forget_secret(late)
        assert late not in stream.getvalue()
        assert "token '***'" in stream.getvalue()
    finally:
        logging.setLogRecordFactory(factory)


def test_install_is_idempotent(secret):
    install_log_redaction()
    first = logging.getLogRecordFactory()
    install_log_redaction()
    assert logging.getLogRecordFactory() is first
    record = first("n", logging.INFO, __file__, 1, "x %s", (secret,), None)
    assert record.getMessage() == "x ***"


def test_records_without_secrets_keep_their_args(secret, log_stream):
    install_log_redaction()
    record = logging.getLogRecordFactory()("n", logging.INFO, __file__, 1, "n=%d", (5,), None)
    assert record.args == (5,)
    assert record.getMessage() == "n=5"


def test_unformattable_record_does_not_leak_through_logging_error_report(secret):
    record = logging.LogRecord("n", logging.INFO, __file__, 1, "%s %s", (secret,), None)
    RedactingFilter().filter(record)
    assert secret not in str(record.msg) + repr(record.args)


def test_redact_mapping_masks_secret_keys_recursively(secret):
    payload = {
        "devops": {"authToken": "abc", "planId": "p"},
        "headers": [{"Authorization": "Bearer x"}, {"AuthToken": None}],
        "env": {"AZURE_STORAGE_KEY": "k", "PartitionKey": "pk", "password": "pw"},
        "note": f"saw {secret}",
        "tuple": ("token", 1),
    }
    masked = redact_mapping(payload)
    assert masked == {
        "devops": {"authToken": MASK, "planId": "p"},
        "headers": [{"Authorization": MASK}, {"AuthToken": None}],
        "env": {"AZURE_STORAGE_KEY": MASK, "PartitionKey": "pk", "password": MASK},
        "note": "saw ***",
        "tuple": ("token", 1),
    }
    assert payload["devops"]["authToken"] == "abc"  # the input is not modified


def test_registry_is_bounded():
    tokens = [f"bounded-{i}-{uuid.uuid4().hex}" for i in range(redact_module.MAX_REGISTERED + 5)]
    try:
        for token in tokens:
            register_secret(token)
        assert redact_module.registered_secret_count() <= redact_module.MAX_REGISTERED
        assert redact(tokens[-1]) == MASK
        assert redact(tokens[0]) == tokens[0]
    finally:
        for token in tokens:
            forget_secret(token)


@settings(max_examples=60, deadline=None)
@given(
    token=st.text(min_size=1, max_size=40).filter(lambda s: s.strip() and s not in MASK),
    before=st.text(max_size=30),
    after=st.text(max_size=30),
)
def test_no_form_of_an_explicit_secret_survives(token, before, after):
    text = f"{before}{token}{after} Basic {basic_auth(token)} q={quote(token, safe='')}"
    out = redact(text, [token])
    assert basic_auth(token) not in out
    assert quote(token, safe="") not in out
    assert f"{before}{token}{after}" not in out
