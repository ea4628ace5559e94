"""Turn a Service Bus message body into the JSON bytes the pipeline author wrote.

PublishToAzureServiceBus sends the body wrapped in .NET DataContract binary XML (MC-NBFX) by
default, and the Functions host may lossy-decode those bytes to UTF-8 on the way to a Python
worker. The decoding rules (cases a, b, c) follow reference/devops-protocol.md §1.4.
"""

from __future__ import annotations

import codecs
import json

__all__ = ["DATACONTRACT_PREFIX", "decode_body"]

# ShortElement "string" + ShortXmlnsAttribute with the Serialization namespace: every
# DataContract-serialized string starts with these 61 bytes.
DATACONTRACT_PREFIX = b"@\x06string\x083http://schemas.microsoft.com/2003/10/Serialization/"

_END_ELEMENT = 0x01
# record type (low bit cleared) -> (width of the little-endian length field, payload codec)
_TEXT_RECORDS: dict[int, tuple[int, str]] = {
    0x98: (1, "utf-8"),
    0x9A: (2, "utf-8"),
    0x9C: (4, "utf-8"),
    0xB6: (1, "utf-16-le"),
    0xB8: (2, "utf-16-le"),
    0xBA: (4, "utf-16-le"),
}
_FIXED_TEXT_RECORDS: dict[int, str] = {0x80: "0", 0x82: "1", 0xA8: ""}

# A mangled header is one record byte plus at most four length bytes; even if each became a
# three-byte U+FFFD the JSON must start within this many characters of the prefix.
_MANGLED_HEADER_CHARS = 16
_TRAILER_CHARS = " \t\r\n\x01"


class _NotBinaryXml(Exception):
    """The bytes after the prefix are not intact NBFX text records (reason in args[0])."""


def decode_body(raw: bytes) -> bytes:
    """Return the UTF-8 text of a Service Bus body, unwrapping DataContract binary XML.

    Raises ValueError when the body is neither intact binary XML, a binary-XML body whose
    header was mangled by a lossy UTF-8 decode but still holds a complete JSON value, nor
    valid UTF-8.
    """
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise ValueError(f"message body must be bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if raw.startswith(DATACONTRACT_PREFIX):
        try:
            text = _parse_records(raw, len(DATACONTRACT_PREFIX))
        except _NotBinaryXml as not_intact:
            recovered = _recover_mangled(raw[len(DATACONTRACT_PREFIX) :])
            if recovered is None:
                raise ValueError(
                    "message body starts with the DataContract binary XML prefix but "
                    f"{not_intact.args[0]}, and no complete JSON value follows the "
                    "(possibly mangled) record header; set useDataContractSerializer: false "
                    "in the PublishToAzureServiceBus task to send plain JSON"
                ) from None
            return recovered.encode("utf-8")
        return _strip_bom(text).encode("utf-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"message body is not UTF-8 (invalid byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}) and not DataContract binary XML"
        ) from None
    return _strip_bom(text).encode("utf-8")


def _strip_bom(text: str) -> str:
    return text[1:] if text.startswith("\ufeff") else text


def _parse_records(data: bytes, pos: int) -> str:
    parts: list[str] = []
    while pos < len(data):
        record = data[pos]
        pos += 1
        if record == _END_ELEMENT:
            break
        ends_element = bool(record & 1)
        kind = record & ~1
        if kind in _FIXED_TEXT_RECORDS:
            parts.append(_FIXED_TEXT_RECORDS[kind])
        elif kind in _TEXT_RECORDS:
            width, codec = _TEXT_RECORDS[kind]
            if pos + width > len(data):
                raise _NotBinaryXml(f"the length field at offset {pos} is truncated")
            length = int.from_bytes(data[pos : pos + width], "little")
            pos += width
            if pos + length > len(data):
                raise _NotBinaryXml(
                    f"the text record at offset {pos - width - 1} announces {length} bytes "
                    f"but only {len(data) - pos} remain"
                )
            try:
                parts.append(codecs.decode(data[pos : pos + length], codec))
            except UnicodeDecodeError:
                raise _NotBinaryXml(
                    f"the text record at offset {pos - width - 1} is not valid {codec}"
                ) from None
            pos += length
        else:
            raise _NotBinaryXml(f"byte 0x{record:02x} at offset {pos - 1} is not a text record")
        if ends_element:
            break
    if pos != len(data):
        raise _NotBinaryXml(f"{len(data) - pos} unexpected bytes follow the end of the element")
    return "".join(parts)


def _recover_mangled(after_prefix: bytes) -> str | None:
    text = after_prefix.decode("utf-8", errors="replace")
    decoder = json.JSONDecoder()
    for start, char in enumerate(text[:_MANGLED_HEADER_CHARS]):
        if char not in "{[":
            continue
        try:
            _, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            continue
        if text[end:].strip(_TRAILER_CHARS) == "":
            return text[start:end]
    return None
