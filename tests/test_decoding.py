"""The one JSON decoder every boundary uses: every bound pinned, every refusal explained.

The bounds (:data:`MAX_DEPTH`, :data:`MAX_INT_DIGITS`) are pydantic-core's
(jiter's) fixed limits, named in plateflow. These tests pin them exactly, so an
upgrade of pydantic-core that moves one fails here instead of silently changing
what every boundary (control socket, journal, server record, worker reports)
accepts. The properties at the end check that the decoder never lets anything
but :class:`DecodeError` escape, and that its one-pass fast path
(:func:`validate_json`) never accepts what the careful path refuses.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, Field, JsonValue, TypeAdapter, ValidationError

from plateflow.core import decoding
from plateflow.core.decoding import (
    MAX_DEPTH,
    MAX_INT_DIGITS,
    decode_json,
    decode_object,
    first_error,
    try_validate_json,
    valid_text,
    validate_json,
)
from plateflow.errors import DecodeError

LIMIT = 1 << 20
WHAT = "frame 7"
SURROGATE_ESCAPE = "a \\u escape that is not a whole character"


class Doc(BaseModel):
    """A schema with a float and a free-form field: where NaN could slip past one pass."""

    f: float = 0.0
    v: JsonValue = None
    s: str = ""


DOC: TypeAdapter[Doc] = TypeAdapter(Doc)


def refused(data: bytes | bytearray | memoryview | str, *, max_bytes: int = LIMIT) -> str:
    """The reason ``decode_json`` gives for refusing ``data``, after checking the error's form.

    Every refusal is a :class:`DecodeError` whose ``where`` is the caller's
    ``what`` and whose message is ``"<what>: <reason>"``: that is what lets a
    boundary say which document was bad without knowing how it was decoded.
    """
    with pytest.raises(DecodeError) as caught:
        decode_json(data, max_bytes=max_bytes, what=WHAT)
    error = caught.value
    assert error.where == WHAT
    assert str(error) == f"{WHAT}: {error.reason}"
    assert error.reason, "the message says what was wrong"
    return error.reason


def accepted(data: bytes | str, *, max_bytes: int = LIMIT) -> JsonValue:
    return decode_json(data, max_bytes=max_bytes, what=WHAT)


def nested(kind: str, depth: int, innermost: bytes = b"0") -> bytes:
    """``innermost`` inside exactly ``depth`` arrays, objects, or both alternating."""
    opening = [b"[" if kind == "array" or (kind == "mixed" and level % 2 == 0) else b'{"k":'
               for level in range(depth)]  # fmt: skip
    closing = [b"]" if o == b"[" else b"}" for o in reversed(opening)]
    return b"".join(opening) + innermost + b"".join(closing)


def depth_of(value: JsonValue) -> int:
    """How deeply arrays and objects nest in a decoded value (a scalar is 0)."""
    deepest = 0
    stack: list[tuple[JsonValue, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: list[JsonValue] = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level + 1)
        stack.extend((child, level + 1) for child in children)
    return deepest


# --- depth ------------------------------------------------------------------------------------

KINDS = ["array", "object", "mixed"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_nesting_helper_builds_what_it_says(kind: str) -> None:
    """The depth tests below are only as good as the documents they build."""
    for depth in (1, 2, 3, 10):
        assert depth_of(accepted(nested(kind, depth))) == depth


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_container_counts_as_a_value_inside_max_depth(kind: str) -> None:
    """The parser's rule: what it bounds is how many containers a value sits in."""
    assert depth_of(accepted(nested(kind, MAX_DEPTH, b"[]"))) == MAX_DEPTH + 1
    assert "nested deeper than" in refused(nested(kind, MAX_DEPTH + 1, b"[]"))


@pytest.mark.parametrize("kind", KINDS)
def test_nesting_of_exactly_max_depth_is_accepted(kind: str) -> None:
    """MAX_DEPTH levels is a valid document everywhere; a parser that lowers it fails here."""
    assert depth_of(accepted(nested(kind, MAX_DEPTH))) == MAX_DEPTH


@pytest.mark.parametrize("kind", KINDS)
def test_nesting_of_max_depth_plus_one_is_refused(kind: str) -> None:
    """The constant must be the parser's real limit: one level more is refused."""
    assert refused(nested(kind, MAX_DEPTH + 1)).startswith(
        f"not JSON: nested deeper than {MAX_DEPTH} levels ("
    )


@pytest.mark.parametrize("kind", KINDS)
def test_nesting_beyond_the_limit_is_refused_saying_so(kind: str) -> None:
    """A parser that raises its limit fails here (MAX_DEPTH + 2 is refused today)."""
    reason = refused(nested(kind, MAX_DEPTH + 2))
    assert reason.startswith(f"not JSON: nested deeper than {MAX_DEPTH} levels (")


def test_nesting_far_beyond_the_limit_is_refused_without_exhausting_any_stack() -> None:
    """The parser is not recursive in Python: a million brackets are just refused."""
    assert "nested deeper than" in refused(b"[" * 1_000_000, max_bytes=2_000_000)
    assert "nested deeper than" in refused(b'{"a":' * 200_000, max_bytes=2_000_000)


# --- integers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sign", ["", "-"])
def test_an_integer_of_max_int_digits_is_accepted_and_prints_again(sign: str) -> None:
    """The sign is not a digit; the decoded integer can be turned back into text."""
    text = sign + "9" * MAX_INT_DIGITS
    value = accepted(text.encode())
    assert isinstance(value, int)
    assert value == int(text)
    assert str(value) == text
    assert accepted(f"[{text}]".encode()) == [value]


@pytest.mark.parametrize("sign", ["", "-"])
@pytest.mark.parametrize("digits", ["9" * (MAX_INT_DIGITS + 1), "1" + "0" * MAX_INT_DIGITS])
def test_an_integer_of_one_digit_more_is_refused(sign: str, digits: str) -> None:
    reason = refused((sign + digits).encode())
    assert reason.startswith(f"not JSON: a number out of range, e.g. more than {MAX_INT_DIGITS}")
    assert "digits" in reason
    assert refused(f'{{"n": {sign}{digits}}}'.encode()).startswith("not JSON: a number out")


@pytest.mark.parametrize("tail", [".5", "e5", ".0e-9999"])
def test_the_digit_bound_applies_to_the_integer_part_of_any_number(tail: str) -> None:
    """jiter reads a number's integer part as an integer first, so ``1000…0.5`` is bounded too."""
    assert isinstance(accepted(("9" * MAX_INT_DIGITS + tail).encode()), float)
    reason = refused(("9" * (MAX_INT_DIGITS + 1) + tail).encode())
    assert reason.startswith("not JSON: a number out of range")


def test_max_int_digits_is_cpythons_default_int_to_str_limit() -> None:
    """The docstring promises every decoded integer can be printed again by default."""
    assert sys.int_info.default_max_str_digits == MAX_INT_DIGITS


def test_a_float_too_large_becomes_infinity_where_free_form_json_is_allowed() -> None:
    """Documented: ``1e999`` is a number, not an error, in a ``JsonValue``; typed fields decide."""
    assert accepted(b"1e999") == math.inf
    assert accepted(b"-1e999") == -math.inf
    assert accepted(("1" + "0" * (MAX_INT_DIGITS - 1) + ".5").encode()) == math.inf
    assert accepted(("0." + "0" * 10_000 + "1").encode()) == 0.0  # fraction digits: unbounded

    class Finite(BaseModel):
        x: float = Field(allow_inf_nan=False)

    with pytest.raises(ValidationError):
        validate_json(TypeAdapter(Finite), b'{"x": 1e999}', max_bytes=LIMIT)


# --- size -------------------------------------------------------------------------------------


def test_exactly_max_bytes_is_accepted_and_one_more_refused() -> None:
    document = b'"' + b"a" * 98 + b'"'
    assert len(document) == 100
    assert accepted(document, max_bytes=100) == "a" * 98
    assert refused(document, max_bytes=99) == "100 bytes exceed the limit of 99"


def test_text_is_measured_in_utf8_bytes() -> None:
    """A ``str`` is bounded by what it costs on the wire, not by its length in characters."""
    document = '"' + "é" * 49 + '"'  # 51 characters, 100 bytes
    assert accepted(document, max_bytes=100) == "é" * 49
    assert refused(document, max_bytes=99) == "100 bytes exceed the limit of 99"


def test_size_is_checked_before_anything_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An oversize document is refused for its size alone, whatever else is wrong with it."""

    def must_not_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an oversize document reached the parser")

    monkeypatch.setattr(decoding, "from_json", must_not_parse)
    for hostile in (b"[" * 1000, b"\xff" * 1000, b"\xef\xbb\xbf" + b" " * 1000, b"9" * 5000):
        assert refused(hostile, max_bytes=999).endswith("bytes exceed the limit of 999")

    class Never:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"validate_json used the adapter ({name}) before the size check")

    never: Any = Never()
    with pytest.raises(DecodeError, match=r"^w: 1001 bytes exceed the limit of 1000$"):
        validate_json(never, b" " * 1001, max_bytes=1000, what="w")


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview, str])
def test_every_input_type_decodes_the_same(kind: type) -> None:
    text = '{"a": [1, 2.5, "é😀", null, true]}'
    data = text if kind is str else kind(text.encode())
    assert accepted(data) == {"a": [1, 2.5, "é😀", None, True]}


# --- encodings --------------------------------------------------------------------------------


def test_a_utf8_byte_order_mark_is_refused() -> None:
    message = "starts with a byte-order mark; it must be UTF-8 without one"
    assert refused(b"\xef\xbb\xbf{}") == message
    assert refused("\ufeff{}") == message


@pytest.mark.parametrize(
    "codec", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
)
def test_utf16_and_utf32_are_refused(codec: str) -> None:
    refused('{"a": 1}'.encode(codec))
    refused("[1]".encode(codec))


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (b"\x80", "invalid start byte"),  # a lone continuation byte
        (b"\xbf", "invalid start byte"),
        (b"\xc0\xaf", "invalid start byte"),  # overlong "/" in two bytes
        (b"\xc1\xbf", "invalid start byte"),
        (b"\xe0\x80\xaf", "invalid continuation byte"),  # overlong in three bytes
        (b"\xf0\x80\x80\xaf", "invalid continuation byte"),  # overlong in four bytes
        (b"\xed\xa0\x80", "invalid continuation byte"),  # U+D800, an encoded surrogate
        (b"\xed\xbf\xbf", "invalid continuation byte"),  # U+DFFF
        (b"\xf4\x90\x80\x80", "invalid continuation byte"),  # U+110000, beyond Unicode
        (b"\xf5\x80\x80\x80", "invalid start byte"),
        (b"\xff", "invalid start byte"),
        (b"\xe2\x82", "invalid continuation byte"),  # a sequence cut short by the quote
    ],
)
def test_invalid_utf8_is_refused_naming_the_byte(bad: bytes, problem: str) -> None:
    """Inside a string (where a lenient parser would keep it) and outside, with the offset."""
    assert refused(b'["ok", "' + bad + b'"]') == f"not UTF-8: {problem} at byte 8"
    assert refused(b"[1, " + bad + b"]") == f"not UTF-8: {problem} at byte 4"


def test_utf8_cut_short_at_the_end_is_refused_naming_the_byte() -> None:
    assert refused(b'"\xe2\x82') == "not UTF-8: unexpected end of data at byte 1"


@pytest.mark.parametrize(
    "escaped",
    [
        rb'"\ud800"',
        rb'"\udc00"',
        rb'"\udfff"',
        rb'"\ud800\u0041"',
        rb'"\ud800\ud800"',
        rb'"\udfff\ud800"',
        rb'"x\ud83d"',
        rb'{"\udc00": 1}',
    ],
)
def test_an_escape_that_is_half_a_surrogate_pair_is_refused(escaped: bytes) -> None:
    """Decoded text must encode again; a lone surrogate would not."""
    assert refused(escaped).startswith(f"not JSON: {SURROGATE_ESCAPE} (")


def test_a_whole_surrogate_pair_is_one_character() -> None:
    assert accepted(rb'"\ud83d\ude00"') == "😀"
    assert len(str(accepted(rb'"\ud83d\ude00"'))) == 1
    assert accepted(rb'"\uDBFF\uDFFF"') == "\U0010ffff"
    assert accepted(rb'"\u00e9\u0000"') == "é\x00"


def test_a_str_with_a_lone_surrogate_is_refused() -> None:
    assert refused('["ab\ud800"]') == "not valid Unicode text: a lone surrogate at character 4"
    assert refused('"\udc80"') == "not valid Unicode text: a lone surrogate at character 1"


# --- RFC 8259 and nothing more ------------------------------------------------------------------


@pytest.mark.parametrize(
    "document",
    [
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"nan",
        b"inf",
        b"-inf",
        b"[1, NaN]",
        b'{"x": Infinity}',
        b'{"x": -Infinity}',
    ],
)
def test_nan_and_infinity_are_refused(document: bytes) -> None:
    assert refused(document).startswith("not JSON: ")


@pytest.mark.parametrize(
    "document",
    [
        b"{} {}",
        b"1 x",
        b"[]]",
        b"{}\x00",
        b"{}\x0c",
        b"1//c",
        b'"a" "b"',
        b"[1] \xc2\xa0",  # a no-break space is not JSON whitespace
    ],
)
def test_anything_after_the_value_is_refused(document: bytes) -> None:
    assert refused(document).startswith("not JSON: trailing characters at line 1")


@pytest.mark.parametrize("document", [b"[1,]", b'{"a": 1,}', b"[1,,2]", b"[,1]"])
def test_trailing_and_stray_commas_are_refused(document: bytes) -> None:
    assert refused(document).startswith("not JSON: ")


@pytest.mark.parametrize("code", range(0x20))
def test_a_raw_control_character_in_a_string_is_refused(code: int) -> None:
    reason = refused(b'["' + bytes([code]) + b'"]')
    assert reason.startswith("not JSON: control character (\\u0000-\\u001F) found while parsing")
    assert accepted(f'["\\u{code:04x}"]'.encode()) == [chr(code)], "escaped, it is fine"


@pytest.mark.parametrize(
    "document",
    [
        b"",
        b"   ",
        b"01",
        b"-01",
        b"1.",
        b".5",
        b"+1",
        b"0x10",
        b"1.e5",
        b"True",
        b"nul",
        b"{'a': 1}",
        b"{1: 2}",
        b"/* c */ 1",
        rb'"\x41"',
        b"\x0c1",
    ],
)
def test_what_rfc_8259_does_not_allow_is_refused(document: bytes) -> None:
    assert refused(document).startswith("not JSON: ")


# --- decode_object, first_error -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "kind"),
    [
        (b"[]", "an array"),
        (b"1", "a number"),
        (b"1.5", "a number"),
        (b'"x"', "a string"),
        (b"null", "null"),
        (b"true", "a boolean"),
    ],
)
def test_decode_object_refuses_anything_but_an_object(document: bytes, kind: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_object(document, max_bytes=LIMIT, what=WHAT)
    assert caught.value.where == WHAT
    assert caught.value.reason == f"expected a JSON object, got {kind}"
    assert decode_object(b'{"a": 1}', max_bytes=LIMIT, what=WHAT) == {"a": 1}


def test_first_error_says_the_first_problem_in_one_line() -> None:
    with pytest.raises(ValidationError) as caught:
        Doc.model_validate({"f": "x", "s": 1})
    assert first_error(caught.value).startswith("f: Input should be a valid number")
    assert "\n" not in first_error(caught.value)
    with pytest.raises(ValidationError) as at_root:
        TypeAdapter(int).validate_python("x")
    assert first_error(at_root.value).startswith("message: Input should be a valid integer")


# --- the fast path ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "document",
    [
        b'{"f": NaN}',
        b'{"f": Infinity}',
        b'{"f": -Infinity}',
        b'{"v": NaN}',
        b'{"v": [1, Infinity]}',
        b'{"v": {"x": -Infinity}}',
        b'{"f": nan}',
        b'{"f": inf}',
    ],
)
def test_nan_and_infinity_are_refused_through_the_fast_path(document: bytes) -> None:
    """pydantic's own parser takes NaN; validate_json must still refuse it as not JSON."""
    assert try_validate_json(DOC, document) is None
    with pytest.raises(DecodeError) as caught:
        validate_json(DOC, document, max_bytes=LIMIT, what=WHAT)
    assert caught.value.where == WHAT
    assert caught.value.reason.startswith("not JSON: ")


@pytest.mark.parametrize(
    "document",
    [
        b'\xef\xbb\xbf{"f": 1}',
        b'{"s": "\xff"}',
        b'{"s": "\xed\xa0\x80"}',
        rb'{"s": "\ud800"}',
        rb'{"s": "\udc00"}',
        b'{"v": ' + nested("array", MAX_DEPTH + 2) + b"}",
        b'{"v": ' + b"9" * (MAX_INT_DIGITS + 1) + b"}",
        b'{"f": 1} x',
        b'{"f": 1,}',
        b'{"s": "a\x01"}',
        '{"f": 1}'.encode("utf-16"),
    ],
)
def test_the_fast_path_refuses_what_decode_json_refuses(document: bytes) -> None:
    """The one-pass parse must never be more lenient than the careful one."""
    assert try_validate_json(DOC, document) is None
    with pytest.raises(DecodeError) as fast:
        validate_json(DOC, document, max_bytes=LIMIT, what=WHAT)
    assert fast.value.reason == refused(document)


def test_a_valid_document_that_does_not_fit_the_schema_raises_validation_error() -> None:
    with pytest.raises(ValidationError) as caught:
        validate_json(DOC, b'{"f": "high", "s": "NaN"}', max_bytes=LIMIT)
    assert first_error(caught.value).startswith("f: Input should be a valid number")
    assert validate_json(DOC, b'{"s": "NaN"}', max_bytes=LIMIT) == Doc(s="NaN")


# --- properties -----------------------------------------------------------------------------------

# Text that is valid Unicode. st.text() does not make lone surrogates by default
# (test_hypothesis_text_has_no_lone_surrogates pins that); saying codec="utf-8"
# keeps these strategies right even if that default changed.
VALID_TEXT = st.text(st.characters(codec="utf-8"), max_size=20)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**MAX_INT_DIGITS) + 1, max_value=10**MAX_INT_DIGITS - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | VALID_TEXT
)
JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(VALID_TEXT, children, max_size=5)
    ),
    max_leaves=20,
)


def typed(value: Any) -> Any:
    """``value`` with every scalar tagged by its type, so 1, 1.0 and True compare unequal."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return (type(value).__name__, value)


@given(st.text(max_size=50))
def test_hypothesis_text_has_no_lone_surrogates(text: str) -> None:
    """The brief's caveat, checked: plain st.text() is encodable text."""
    text.encode("utf-8")


@given(JSON_VALUES, st.booleans())
def test_any_json_value_round_trips_exactly(value: Any, ensure_ascii: bool) -> None:
    """What Python's json writes, the decoder reads back equal, type for type.

    ``ensure_ascii`` writes every non-ASCII character as ``\\u`` escapes
    (astral ones as surrogate pairs), so both spellings of text are covered.
    """
    document = json.dumps(value, allow_nan=False, ensure_ascii=ensure_ascii)
    decoded = decode_json(document.encode("utf-8"), max_bytes=LIMIT)
    assert typed(decoded) == typed(value)
    assert typed(decode_json(document, max_bytes=LIMIT)) == typed(value)


@given(st.floats(allow_nan=False, allow_infinity=False), JSON_VALUES, VALID_TEXT)
def test_the_fast_path_and_the_careful_path_agree_on_valid_documents(
    f: float, v: Any, s: str
) -> None:
    document = json.dumps({"f": f, "v": v, "s": s}, allow_nan=False).encode()
    fast = try_validate_json(DOC, document)
    careful = DOC.validate_python(decode_json(document, max_bytes=LIMIT))
    if fast is None:  # documented: one pass only for what cannot hold NaN or Infinity
        assert b"NaN" in document or b"Infinity" in document
    else:
        assert fast == careful
        assert typed(fast.v) == typed(v)
    assert typed(careful.v) == typed(v)
    assert validate_json(DOC, document, max_bytes=LIMIT) == careful


def _damaged(document: bytes, data: st.DataObject) -> bytes:
    """``document`` with a few bytes replaced, inserted or deleted."""
    out = bytearray(document)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(out)))
        action = data.draw(st.sampled_from(["replace", "insert", "delete"]))
        if action == "insert" or at == len(out):
            out[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif action == "replace":
            out[at] = data.draw(st.integers(0, 255))
        else:
            del out[at]
    return bytes(out)


OUTCOMES = ("ok", "decode", "schema")


def _outcome(call: Any) -> tuple[str, Any]:
    """What a call did: ("ok", value), ("decode", message) or ("schema", first error)."""
    try:
        return ("ok", call())
    except DecodeError as exc:
        return ("decode", str(exc))
    except ValidationError as exc:
        return ("schema", first_error(exc))


@given(JSON_VALUES, st.data())
def test_the_fast_path_never_accepts_what_the_careful_path_refuses(
    v: Any, data: st.DataObject
) -> None:
    """Damaged documents: whenever one pass accepts, decode + validate gives the same value."""
    document = _damaged(json.dumps({"f": 1.5, "v": v, "s": "x"}).encode(), data)
    fast = try_validate_json(DOC, document)
    careful = _outcome(lambda: DOC.validate_python(decode_json(document, max_bytes=LIMIT)))
    if fast is not None:
        assert careful == ("ok", fast)
    assert _outcome(lambda: validate_json(DOC, document, max_bytes=LIMIT)) == careful


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    """Whatever arrives, the boundary gets a value or a DecodeError, never another exception."""
    kind, detail = _outcome(lambda: decode_json(data, max_bytes=LIMIT, what=WHAT))
    assert kind in ("ok", "decode")
    if kind == "decode":
        assert detail.startswith(f"{WHAT}: ")
        assert len(detail) > len(f"{WHAT}: "), "the message says what was wrong"
    assert _outcome(lambda: validate_json(DOC, data, max_bytes=LIMIT))[0] in OUTCOMES


@given(st.text(st.characters(codec=None), max_size=40))
def test_any_text_decodes_or_raises_decode_error(text: str) -> None:
    """Including text with lone surrogates, which st.characters(codec=None) makes."""
    kind, detail = _outcome(lambda: decode_object(text, max_bytes=LIMIT, what=WHAT))
    assert kind in ("ok", "decode")
    assert kind == "ok" or detail.startswith(f"{WHAT}: ")


# --- valid_text -----------------------------------------------------------------------------------


@given(VALID_TEXT)
def test_valid_text_leaves_valid_text_alone(text: str) -> None:
    """Identity, not a copy: the hot path costs one encode and nothing else."""
    assert valid_text(text) is text


@given(st.text(st.characters(codec=None, categories=["Cs"]) | st.characters(), min_size=1))
def test_valid_text_makes_lone_surrogates_visible_escapes(text: str) -> None:
    """Each surrogate becomes its ``\\udxxx`` escape; everything else is kept as it was."""
    made = valid_text(text)
    made.encode("utf-8")
    expected = "".join(
        f"\\u{ord(char):04x}" if 0xD800 <= ord(char) <= 0xDFFF else char for char in text
    )
    assert made == expected
    assert decode_json(json.dumps(made), max_bytes=LIMIT) == made, "a decoder reads it back"
