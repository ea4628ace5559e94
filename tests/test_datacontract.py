"""decode_body against bytes built by hand from the MC-NBFX layout in devops-protocol.md §1.4."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from notebookops.datacontract import DATACONTRACT_PREFIX, decode_body

PREFIX = (
    b"\x40"  # ShortElement
    + b"\x06string"  # name, length-prefixed
    + b"\x08"  # ShortXmlnsAttribute
    + b"\x33http://schemas.microsoft.com/2003/10/Serialization/"  # 51-byte namespace
)
REPLACEMENT = "\ufffd".encode()  # what a lossy UTF-8 hop leaves for each invalid byte

_RECORD = {(1, False): 0x98, (2, False): 0x9A, (4, False): 0x9C}
_RECORD |= {(1, True): 0xB6, (2, True): 0xB8, (4, True): 0xBA}


def text_record(text: str, *, width: int = 1, utf16: bool = False, ends: bool = False) -> bytes:
    payload = text.encode("utf-16-le" if utf16 else "utf-8")
    record = _RECORD[(width, utf16)] | (1 if ends else 0)
    return bytes([record]) + len(payload).to_bytes(width, "little") + payload


def wrap(*records: bytes, end_byte: bool = False) -> bytes:
    return PREFIX + b"".join(records) + (b"\x01" if end_byte else b"")


def lossy_utf8_hop(data: bytes) -> bytes:
    """What the Functions host does to a binary body it treats as a string."""
    return data.decode("utf-8", errors="replace").encode("utf-8")


def test_prefix_is_the_documented_61_bytes():
    assert len(PREFIX) == 61
    assert DATACONTRACT_PREFIX == PREFIX


def test_chars8_with_end_bit():
    body = '{"a":1}'
    assert decode_body(wrap(text_record(body, ends=True))) == body.encode()


def test_length_byte_equal_to_open_brace_is_read_as_a_length():
    body = json.dumps({"k": "x" * 114})
    assert len(body) == 123
    raw = wrap(text_record(body, ends=True))
    assert raw[61:64] == b"\x99{{"
    assert decode_body(raw) == body.encode()


def test_chars16_with_flushed_separate_end_element():
    body = json.dumps({"notebooks": ["nb/a.ipynb"], "pad": "y" * 540})
    raw = wrap(text_record(body, width=2), end_byte=True)
    assert raw[61] == 0x9A
    assert decode_body(raw) == body.encode()


def test_chars32_without_any_end_element():
    body = '{"big": "' + "z" * 70000 + '"}'
    raw = wrap(text_record(body, width=4))
    assert raw[61] == 0x9C and raw[62:66] == len(body).to_bytes(4, "little")
    assert decode_body(raw) == body.encode()


@pytest.mark.parametrize("width", [1, 2, 4])
def test_utf16_records_decode_to_utf8(width):
    body = '{"name": "数据科学ノート"}'
    raw = wrap(text_record(body, width=width, utf16=True, ends=True))
    assert decode_body(raw) == body.encode("utf-8")


def test_several_records_and_fixed_text_records_concatenate():
    raw = wrap(
        text_record('{"n": '),
        bytes([0x82]),  # OneText
        bytes([0x80]),  # ZeroText
        bytes([0xA8]),  # EmptyText
        text_record("}", ends=True),
    )
    assert decode_body(raw) == b'{"n": 10}'


def test_empty_string_body():
    assert decode_body(wrap(bytes([0xA9]))) == b""


@pytest.mark.parametrize("width", [1, 2, 4])
def test_header_mangled_by_lossy_hop_is_recovered(width):
    body = json.dumps({"notebooks": ["nb/ü.ipynb"], "pad": "q" * 200})
    raw = wrap(text_record(body, width=width), end_byte=True)
    mangled = lossy_utf8_hop(raw)
    assert mangled != raw and REPLACEMENT in mangled[61:70]
    assert decode_body(mangled) == body.encode()


def test_mangled_header_whose_length_byte_is_open_brace_tries_the_next_brace():
    body = json.dumps({"k": "x" * 114})
    mangled = lossy_utf8_hop(wrap(text_record(body, ends=True)))
    assert mangled[61:66] == REPLACEMENT + b"{{"
    assert decode_body(mangled) == body.encode()


def test_mangled_header_with_json_array():
    body = "[1, 2, 3]"
    assert decode_body(lossy_utf8_hop(wrap(text_record(body, ends=True)))) == body.encode()


def test_mangled_non_json_text_is_an_error():
    mangled = lossy_utf8_hop(wrap(text_record("plain words, not json", ends=True)))
    with pytest.raises(ValueError, match="useDataContractSerializer: false"):
        decode_body(mangled)


def test_truncated_record_without_json_is_an_error_saying_why():
    raw = wrap(bytes([0x99, 50]) + b"only ten b")
    with pytest.raises(ValueError, match="announces 50 bytes but only 10 remain"):
        decode_body(raw)


def test_unknown_record_byte_is_an_error():
    with pytest.raises(ValueError, match=r"byte 0x42 at offset 61 is not a text record"):
        decode_body(wrap(b"\x42abc"))


def test_trailing_bytes_after_end_element_are_not_intact_xml():
    with pytest.raises(ValueError, match="unexpected bytes"):
        decode_body(wrap(text_record("abc", ends=True), b"junk"))


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_plain_utf8_with_or_without_bom(bom):
    body = '{"notebooks": ["ü.ipynb"]}'.encode()
    assert decode_body(bom + body) == body


def test_plain_invalid_utf8_names_the_byte_and_offset():
    with pytest.raises(ValueError, match=r"invalid byte 0xff at offset 3"):
        decode_body(b'{"a\xff": 1}')


def test_non_bytes_is_a_clear_error():
    with pytest.raises(ValueError, match="must be bytes, got str"):
        decode_body("{}")  # type: ignore[arg-type]


def _writer(text: str, utf16: bool, end: str) -> bytes:
    """The .NET writer's choices: the smallest length width that fits the byte count."""
    size = len(text.encode("utf-16-le" if utf16 else "utf-8"))
    width = 1 if size < 0x100 else 2 if size < 0x10000 else 4
    record = text_record(text, width=width, utf16=utf16, ends=end == "bit")
    return wrap(record, end_byte=end == "byte")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@settings(max_examples=80, deadline=None)
@given(text=st.text(max_size=400), utf16=st.booleans(), end=st.sampled_from(["bit", "byte", ""]))
def test_any_text_round_trips_through_intact_binary_xml(text, utf16, end):
    # A leading byte-order mark is dropped, as it is from plain bodies: JSON parsers refuse it.
    assert decode_body(_writer(text, utf16, end)) == text.removeprefix("\ufeff").encode("utf-8")


@settings(max_examples=80, deadline=None)
@given(value=json_values, end=st.sampled_from(["bit", "byte", ""]), pad=st.integers(0, 300))
def test_any_json_survives_a_lossy_hop(value, end, pad):
    text = json.dumps({"pad": "p" * pad, "v": value}, ensure_ascii=False)
    decoded = decode_body(lossy_utf8_hop(_writer(text, False, end)))
    assert json.loads(decoded) == json.loads(text)
