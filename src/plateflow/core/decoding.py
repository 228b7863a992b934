"""Bytes from outside, decoded in one place, with bounds.

Theory of operation: every boundary of plateflow that turns bytes into values
(the server's control socket, a client's replies and events, the journal
reader, the server record, the local engine's worker reports) decodes them
here, so what "a valid document" means is decided once. A document is
refused, with a :class:`~plateflow.errors.DecodeError` that says what was
wrong and where, when it is:

- larger than the caller's ``max_bytes`` (checked before anything is parsed);
- not strict UTF-8: a byte-order mark, an invalid or overlong sequence, an
  encoded surrogate, or an escape (``\\ud800``) that is half a surrogate pair;
- nested deeper than :data:`MAX_DEPTH` arrays and objects around a value;
- an integer of more than :data:`MAX_INT_DIGITS` digits;
- not JSON as RFC 8259 says: ``NaN``, ``Infinity``, a trailing comma, a
  control character inside a string, anything after the value.

The parser is pydantic-core's (jiter): it is written in Rust, so no input
can exhaust Python's stack, and its depth and digit limits are fixed; the
constants below name them and a test pins them. The common case costs one
pass: :func:`validate_json` lets pydantic parse and validate at once, and
only a document that fails (or might hold ``NaN``) is parsed again here to
say precisely what is wrong with it.

A decoded ``str`` is always valid Unicode text (no lone surrogates), so it
can be encoded again, written to a terminal or put in a reply. A number too
large for a float becomes ``inf`` where free-form JSON is allowed; a field that
must be finite (every float of the wire's messages, a journal record's time)
refuses it.
"""

from __future__ import annotations

import re
from typing import Any, Final, TypeVar

from pydantic import JsonValue, TypeAdapter, ValidationError
from pydantic_core import from_json

from plateflow.errors import DecodeError

__all__ = [
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "decode_json",
    "decode_object",
    "first_error",
    "one_line",
    "try_validate_json",
    "valid_text",
    "validate_json",
]

MAX_DEPTH: Final = 200
"""A value may sit inside at most this many arrays and objects (an empty array or
object counts as a value): the parser's fixed limit, which a test pins."""
MAX_INT_DIGITS: Final = 4300
"""Integers with more digits are refused: the parser's limit, and CPython's for
``int`` to ``str`` conversion, so every decoded integer can be printed again."""

_BOM: Final = b"\xef\xbb\xbf"
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")
_T = TypeVar("_T")


def _explain(message: str) -> str:
    """The parser's message in the words of the bounds above."""
    if message.startswith("recursion limit exceeded"):
        return f"nested deeper than {MAX_DEPTH} levels ({message})"
    if message.startswith("number out of range"):
        return f"a number out of range, e.g. more than {MAX_INT_DIGITS} digits ({message})"
    if "surrogate" in message or "hex escape" in message:
        return f"a \\u escape that is not a whole character ({message})"
    return message


def _as_bytes(data: bytes | bytearray | memoryview | str, what: str) -> bytes:
    if isinstance(data, str):
        try:
            return data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DecodeError(
                what, f"not valid Unicode text: a lone surrogate at character {exc.start}"
            ) from None
    return bytes(data)


def decode_json(
    data: bytes | bytearray | memoryview | str, *, max_bytes: int, what: str = "document"
) -> JsonValue:
    """One JSON document, within every bound above; raise :class:`DecodeError` otherwise.

    ``what`` names the document in the error ("request", "journal.jsonl:3").
    """
    raw = _as_bytes(data, what)
    if len(raw) > max_bytes:
        raise DecodeError(what, f"{len(raw)} bytes exceed the limit of {max_bytes}")
    if raw.startswith(_BOM):
        raise DecodeError(what, "starts with a byte-order mark; it must be UTF-8 without one")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(what, f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        value: JsonValue = from_json(raw, allow_inf_nan=False, cache_strings=False)
    except ValueError as exc:
        raise DecodeError(what, f"not JSON: {_explain(str(exc))}") from None
    return value


def decode_object(
    data: bytes | bytearray | memoryview | str, *, max_bytes: int, what: str = "document"
) -> dict[str, Any]:
    """Like :func:`decode_json`, for a document that must be a JSON object."""
    value = decode_json(data, max_bytes=max_bytes, what=what)
    if not isinstance(value, dict):
        raise DecodeError(what, f"expected a JSON object, got {_json_type(value)}")
    return value


def validate_json(
    adapter: TypeAdapter[_T],
    data: bytes,
    *,
    max_bytes: int,
    what: str = "document",
    context: Any = None,
) -> _T:
    """Parse and validate in one pass; :class:`DecodeError` or ``ValidationError`` otherwise.

    A document that is not bounded, strict JSON raises :class:`DecodeError`;
    one that is, but does not fit the schema, raises pydantic's
    ``ValidationError`` from validating the decoded value (so its first error
    names the field). Use :func:`first_error` to say it in one line.
    """
    if len(data) > max_bytes:
        raise DecodeError(what, f"{len(data)} bytes exceed the limit of {max_bytes}")
    valid = try_validate_json(adapter, data, context=context)
    if valid is not None:
        return valid
    value = decode_json(data, max_bytes=max_bytes, what=what)
    return adapter.validate_python(value, context=context)


def try_validate_json(adapter: TypeAdapter[_T], data: bytes, *, context: Any = None) -> _T | None:
    """The one-pass parse and validation of a valid document; None for any other.

    None means "decode it with :func:`decode_json` to learn why": the document
    is not strict JSON, breaks a bound, does not fit the schema, or might
    hold ``NaN`` or ``Infinity`` (which the one-pass parser would take). The
    caller checks the size first. Only for adapters whose type is never None.
    """
    if b"NaN" in data or b"Infinity" in data:
        return None
    try:
        return adapter.validate_json(data, context=context)
    except ValidationError:
        return None


def first_error(exc: ValidationError) -> str:
    """The first of a ``ValidationError``'s errors in one line: ``where: what``."""
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "message"
    return one_line(f"{where}: {error['msg']}")


def one_line(text: str) -> str:
    """``text`` with every control character (a newline, an escape...) shown as its escape.

    An error message quotes what it was given (a key, a tag); shown as is, a
    newline in it would split the message and an escape sequence would
    reach the terminal.
    """
    return _CONTROL.sub(lambda found: repr(found.group())[1:-1], text)


def valid_text(text: str) -> str:
    """``text`` made valid Unicode: each lone surrogate becomes a visible ``\\udcff`` escape.

    Text that crosses a boundary must be encodable: a message from a step
    that names a file whose name is not UTF-8 holds such surrogates, and
    would otherwise be refused by every decoder that reads it back.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _json_type(value: JsonValue) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"
