"""Hostile frames for the execution server's control socket, what it must answer, and a
client that checks every answer.

Shared by ``tests/test_zmq_server.py`` (its original bad-input strategies, the first
section below), ``tests/test_wire_fuzz.py`` and ``benchmarks/bench_fuzz.py``, so that
the test and the benchmark send the same frames and judge the answers the same way.

Theory of operation:

- **Frames.** :data:`HOSTILE_MESSAGES` draws one control message (a list of frames
  after the ROUTER envelope): mostly one frame, built *from the wire models* (every
  request type, :func:`~plateflow.engines.zmq.wire.encode`) and then broken in one
  place: a field anywhere in the tree mutated, missing, added, of the wrong type, or
  replaced by a raw token no JSON encoder writes (a 5,000-digit integer, ``NaN``, a
  lone ``\\ud800`` escape, invalid UTF-8 inside a string, 100,000 levels of nesting);
  or the whole frame re-encoded, truncated, padded, prefixed, oversized. Sizes and
  depths are drawn as numbers and the bytes built from them, so a 1 MiB frame costs
  Hypothesis a few choices, not a million.
- **Nothing valid that acts.** :func:`defang` turns a frame that would be a *valid*
  ``compile``, ``execute``, ``cancel`` or ``shutdown`` into a ping with the same id,
  so "the server acted on it" is unambiguous: every fact event, every changed
  counter is a bug. Valid ``ping``, ``status`` and ``server_info`` stay: they act on
  nothing, and they check the happy path between the hostile ones.
- **The oracle.** :func:`expected_reply` is the server's own decoder,
  :func:`~plateflow.engines.zmq.wire.decode_request`, run in this process, plus the
  envelope rules and libzmq's size cut-off. Because an oracle that *is* the code under
  test cannot catch that code's mistakes, :func:`spec_problems` checks it against an
  independent reading of the promises (:func:`reference_decode`: the standard
  library's ``json`` with the size, UTF-8, ``NaN``, digit, depth and surrogate
  bounds applied by hand): a frame that breaks a bound must never be accepted, and
  the reply's ``id`` must be the frame's ``id`` exactly when the frame is a bounded
  JSON object with a valid string ``id``.
- **The checker.** :class:`FrameFuzzer` sends one message, waits (bounded) for the
  answer the oracle predicts, then pings; a frame libzmq drops is confirmed by the
  DEALER's ``disconnected`` monitor event, not by waiting for silence, and the next
  message goes out on a fresh DEALER. A SUB sees every event: a fact, or a gap in
  the sequence numbers (an event nobody saw), is a problem.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import zmq
from hypothesis import assume
from hypothesis import strategies as st
from pydantic import BaseModel
from zmq.utils.monitor import recv_monitor_message

from plateflow.engines.zmq import rundir
from plateflow.engines.zmq.server import MAXMSGSIZE_MARGIN
from plateflow.engines.zmq.wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    CancelRequest,
    CompileRequest,
    ExecuteRequest,
    FactEvent,
    HeartbeatEvent,
    PingRequest,
    Reply,
    ServerInfoRequest,
    ShutdownRequest,
    StatusRequest,
    WireError,
    WireSubmission,
    decode_event,
    decode_reply,
    decode_request,
    encode,
)
from plateflow.examples.platereader import demo_pipeline
from plateflow.jobs import CompileJob

MAX_BYTES: Final = DEFAULT_MAX_MESSAGE_BYTES
"""The server's limit (it runs with the default): larger frames get an error reply..."""
DROP_ABOVE: Final = DEFAULT_MAX_MESSAGE_BYTES + MAXMSGSIZE_MARGIN
"""...and frames larger than this are dropped by libzmq, which disconnects the sender."""
SPEC_MAX_DEPTH: Final = 200
"""Promised: a value inside more arrays and objects than this is refused (an empty one
counts as a value): ``[`` x 201 ``]`` x 201 is accepted, ``[`` x 201 ``1`` ``]`` x 201
refused. Counted here independently of ``decoding.MAX_DEPTH``."""
SPEC_MAX_INT_DIGITS: Final = 4300
"""Promised: a number whose integer part has more digits is refused."""
BOM: Final = b"\xef\xbb\xbf"
ACTING: Final = frozenset({"compile", "execute", "cancel", "lease", "release", "shutdown"})
"""Request types that change something when valid: the fuzz never sends them valid."""


class Frame(bytes):
    """The bytes of a frame (or of a token in one), as every strategy here returns them.

    A subclass only so that Hypothesis lets go of it: Hypothesis (6.170) records every
    ``bytes`` value an example draws and caches the records of 10,000 examples, which
    for frames of up to 1 MiB is tens of gigabytes (a nightly run was killed by the
    OOM killer at 24 GB); a ``bytes`` subclass can be neither recorded nor weakly
    referenced, so it is not kept.
    """

    __slots__ = ()


# --- the original bad-input strategies of test_zmq_server ---------------------------------

JOB = CompileJob(plate_id="p", plate_path="/nonexistent", pipeline=demo_pipeline())
SUBMISSION = WireSubmission(plate_id="p", phase="execute", submission_id="x")
SESSION = "fuzz-session-0000"
VALID: list[BaseModel] = [
    PingRequest(id="a"),
    CompileRequest(id="b", session=SESSION, job_id="j", job=JOB),
    ExecuteRequest(id="c", session=SESSION, execution_id="e", job=JOB, artifact_id="f"),
    StatusRequest(id="d", submissions=(SUBMISSION,)),
    CancelRequest(id="e", submission=SUBMISSION, session=SESSION),
    ServerInfoRequest(id="f"),
    ShutdownRequest(id="g", token="not-the-token"),
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
wrong_values = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.just("")
    | st.text(min_size=600, max_size=700)
    | st.lists(st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)
)


@st.composite
def templates(draw: st.DrawFn) -> dict[str, Any]:
    return dict(json.loads(encode(draw(st.sampled_from(VALID)))))


@st.composite
def wrong_field(draw: st.DrawFn) -> Frame:
    raw = draw(templates())
    key = draw(st.sampled_from(sorted(raw)))
    raw[key] = draw(wrong_values)
    return Frame(json.dumps(raw).encode())


@st.composite
def missing_field(draw: st.DrawFn) -> Frame:
    raw = draw(templates())
    del raw[draw(st.sampled_from(sorted(raw)))]
    return Frame(json.dumps(raw).encode())


@st.composite
def extra_field(draw: st.DrawFn) -> Frame:
    raw = draw(templates())
    raw[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in raw))] = draw(json_values)
    return Frame(json.dumps(raw).encode())


@st.composite
def unknown_type(draw: st.DrawFn) -> Frame:
    raw = draw(templates())
    known = {
        "ping",
        "compile",
        "execute",
        "status",
        "cancel",
        "lease",
        "release",
        "server_info",
        "shutdown",
    }
    raw["type"] = draw(st.text(max_size=12).filter(lambda t: t not in known))
    return Frame(json.dumps(raw).encode())


@st.composite
def wrong_version(draw: st.DrawFn) -> Frame:
    raw = draw(templates())
    raw["v"] = draw(json_values.filter(lambda v: v != PROTOCOL_VERSION))
    return Frame(json.dumps(raw).encode())


@st.composite
def oversized(draw: st.DrawFn) -> Frame:
    size = draw(st.integers(DEFAULT_MAX_MESSAGE_BYTES + 1, DEFAULT_MAX_MESSAGE_BYTES + 4096))
    ping = {"v": PROTOCOL_VERSION, "id": "big", "type": "ping", "pad": " " * size}
    return Frame(json.dumps(ping).encode()[:size])


frames = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=100).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    wrong_field(),
    missing_field(),
    extra_field(),
    unknown_type(),
    wrong_version(),
    oversized(),
)
messages = frames.map(lambda f: [f]) | st.lists(frames, min_size=2, max_size=3)


def expected_error(frames: list[bytes]) -> tuple[str | None, str]:
    """The (id, error) the server must answer with; ``assume`` away any valid request."""
    if len(frames) == 2 and frames[0] == b"":
        frames = frames[1:]
    if len(frames) != 1:
        return None, f"expected one frame per request, got {len(frames)}"
    try:
        decode_request(frames[0])
    except WireError as exc:
        return exc.request_id, str(exc)
    assume(False)  # a valid request is not bad input
    raise AssertionError("unreachable")


# --- valid requests of every type, the material the structure-aware strategies break ------

CONFIGURED_JOB = CompileJob(
    plate_id="p",
    plate_path="/nonexistent",
    pipeline=demo_pipeline(),
    config={"k": 1, "nested": {"list": [1, 2.5, "x", None, True]}},
)
_COMPILE_SUBMISSION = WireSubmission(plate_id="p", phase="compile", submission_id="j")
TEMPLATES: list[BaseModel] = [
    *VALID,
    PingRequest(id="x" * 128),
    PingRequest(id="\U0001f600"),
    CompileRequest(id="b2", session=SESSION, job_id="j2", job=CONFIGURED_JOB),
    ExecuteRequest(
        id="c2", session=SESSION, execution_id="e2", job=CONFIGURED_JOB, artifact_id="f"
    ),
    StatusRequest(id="d0", submissions=()),
    StatusRequest(id="d2", submissions=(SUBMISSION, _COMPILE_SUBMISSION)),
    CancelRequest(id="e2", submission=_COMPILE_SUBMISSION, token="not-the-token"),
]
"""Every request type, several shapes each, built from the models (so they are valid)."""
_TEMPLATE_TREES: Final = [json.loads(encode(t)) for t in TEMPLATES]
_HOLE: Final = "\u2603hole\u2603"
"""Stands for a raw token in a tree until the tree is serialised; then replaced."""
_Path = tuple[str | int, ...]


def _paths(tree: Any, prefix: _Path = ()) -> Iterator[_Path]:
    """Every place in a JSON tree that holds a value (the root excluded)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield (*prefix, index)
            yield from _paths(value, (*prefix, index))


def _containers(tree: Any, prefix: _Path = ()) -> Iterator[_Path]:
    """Every object in a JSON tree (the root included): where a key can be added."""
    if isinstance(tree, dict):
        yield prefix
        for key, value in tree.items():
            yield from _containers(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _containers(value, (*prefix, index))


def _at(tree: Any, path: _Path) -> Any:
    for part in path:
        tree = tree[part]
    return tree


_HOTSPOTS: Final[list[_Path]] = [("v",), ("id",), ("type",), ("job", "config", "k")]
"""Where a broken value matters most: the version, the correlation id, the discriminator,
and the free-form ``job.config`` (the one place where any JSON is allowed)."""


@st.composite
def _template_tree(draw: st.DrawFn) -> Any:
    return json.loads(json.dumps(draw(st.sampled_from(_TEMPLATE_TREES))))  # a deep copy


@st.composite
def _path_in(draw: st.DrawFn, tree: Any) -> _Path:
    hot = [p for p in _HOTSPOTS if _has(tree, p)]
    prefer_hot: bool = draw(st.booleans())
    if hot and prefer_hot:
        return draw(st.sampled_from(hot))
    return draw(st.sampled_from(list(_paths(tree))))


def _has(tree: Any, path: _Path) -> bool:
    try:
        _at(tree, path)
    except (KeyError, IndexError, TypeError):
        return False
    return True


@st.composite
def _serialise(draw: st.DrawFn, tree: Any, token: bytes | None = None) -> Frame:
    """``tree`` as one frame, in one of the ways a JSON encoder may write it; ``token``
    (raw bytes, anything) goes where the tree holds :data:`_HOLE`."""
    ascii_only = draw(st.booleans())
    compact = draw(st.booleans())
    text = json.dumps(
        tree, ensure_ascii=ascii_only, separators=(",", ":") if compact else (", ", ": ")
    )
    frame = text.encode("utf-8", "surrogatepass")  # a drawn lone surrogate: invalid UTF-8
    if token is not None:
        frame = frame.replace(json.dumps(_HOLE, ensure_ascii=ascii_only).encode(), token, 1)
    return Frame(frame)


# --- raw tokens no encoder writes ------------------------------------------------------------


@st.composite
def huge_integers(draw: st.DrawFn) -> Frame:
    """Integers beyond the digit limit (and some right at it), in any sign."""
    digits = draw(
        st.sampled_from([SPEC_MAX_INT_DIGITS, SPEC_MAX_INT_DIGITS + 1, 5_000, 10_000])
        | st.integers(SPEC_MAX_INT_DIGITS + 1, 200_000)
    )
    lead = draw(st.sampled_from([b"1", b"5", b"9"]))
    body = draw(st.sampled_from([b"0", b"9", b"1234567890"]))
    number = (lead + body * digits)[:digits]
    return Frame((b"-" if draw(st.booleans()) else b"") + number)


big_numbers = st.sampled_from(
    [
        b"1e400",
        b"-1e400",
        b"1E+400",
        b"1.7976931348623159e308",
        b"1e99999999999999999999",
        b"1e-99999999999999999999",
        b"0." + b"0" * 5_000 + b"1",
        b"1." + b"9" * 5_000,
        b"9" * 300 + b".5",
        b"9" * SPEC_MAX_INT_DIGITS + b".5",
        b"9" * (SPEC_MAX_INT_DIGITS + 1) + b".5",
        b"1" * (SPEC_MAX_INT_DIGITS + 1) + b"e-10",
        b"2.0",
        b"2e0",
        b"-0",
        b"-0.0",
    ]
)
"""Numbers that overflow a float, that are floats where an integer is wanted, that are
long but legal, or whose integer part breaks the digit limit."""
not_json_numbers = st.sampled_from(
    [
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"+Infinity",
        b"-NaN",
        b"nan",
        b"inf",
        b"-inf",
        b"+1",
        b"01",
        b"1.",
        b".5",
        b"0x10",
        b"1e",
        b"--1",
    ]
)
lone_surrogates = st.sampled_from(
    [
        b'"\\ud800"',
        b'"\\udc00"',
        b'"\\udfff"',
        b'"\\uDBFF"',
        b'"x\\ud800"',
        b'"\\ud800x"',
        b'"\\ud800\\ud800"',
        b'"\\udc00\\ud800"',
        b'"\\ud800\\u0041"',
        b'"\\ud800\\\\udc00"',
        b'"\\ud83d"',
    ]
)
"""Escapes that are half a surrogate pair: decoded, they could never be encoded again."""
surrogate_pairs = st.sampled_from(
    [b'"\\ud83d\\ude00"', b'"\\uD834\\uDD1E"', b'"a\\udbff\\udfffb"', b'"\\ud800\\udc00"']
)
"""Whole pairs: valid, one character each."""
_BAD_UTF8: Final = [
    b"\xff",
    b"\xfe",
    b"\x80",
    b"\xc0\x80",
    b"\xc1\xbf",
    b"\xe0\x80\x80",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xe2\x82",
    b"\xf0\x9f\x98",
]


@st.composite
def invalid_utf8_strings(draw: st.DrawFn) -> Frame:
    """A string with bytes that are not UTF-8: stray, overlong, surrogate, cut short."""
    bad = draw(st.sampled_from(_BAD_UTF8))
    return Frame(b'"' + draw(st.sampled_from([b"", b"a", b"id-"])) + bad + b'"')


@st.composite
def control_strings(draw: st.DrawFn) -> Frame:
    """A string with a raw control character, which JSON allows only escaped."""
    char = bytes([draw(st.integers(0, 0x1F))])
    return Frame(b'"' + draw(st.sampled_from([b"", b"a"])) + char + b'b"')


@st.composite
def deep_values(draw: st.DrawFn) -> Frame:
    """Nested arrays and objects, around the depth limit and far beyond it, closed or not."""
    depth = draw(
        st.sampled_from([150, 195, 197, 198, 199, 200, 201, 202, 1_000]) | st.integers(1, 100_000)
    )
    pattern = draw(st.lists(st.sampled_from([b"[", b'{"a":']), min_size=1, max_size=4).map(tuple))
    openers = (pattern * (depth // len(pattern) + 1))[:depth]
    closers = b"".join(b"]" if o == b"[" else b"}" for o in reversed(openers))
    inner = draw(st.sampled_from([b"1", b"[]", b"{}", b'"x"']))
    if draw(st.integers(0, 4)) == 0:  # unclosed, sometimes
        return Frame(b"".join(openers) + inner)
    return Frame(b"".join(openers) + inner + closers)


long_strings = (
    st.integers(1, 200_000) | st.sampled_from([MAX_BYTES - 40, MAX_BYTES - 30, MAX_BYTES])
).map(lambda n: Frame(b'"' + b"s" * n + b'"'))
"""Long strings, up to the whole frame (as a ``type`` tag or a key, the error echoes them)."""
hostile_tokens = st.one_of(
    huge_integers(),
    big_numbers,
    not_json_numbers,
    lone_surrogates,
    surrogate_pairs,
    invalid_utf8_strings(),
    control_strings(),
    deep_values(),
    long_strings,
    st.sampled_from([b"true", b"false", b"null", b"{}", b"[]", b'""', b'"NaN"', b"2"]),
)
"""One raw JSON value (or something in its place that is not one)."""
hostile_keys = st.one_of(
    lone_surrogates,
    surrogate_pairs,
    invalid_utf8_strings(),
    control_strings(),
    long_strings,
    st.sampled_from([b'""', b"1", b"null", b"z", b"'z'", b'"v"', b'"id"', b'"type"']),
)
"""Object keys: strings of every hostile kind, and things that are not strings."""

# --- frames: valid-shaped requests broken in one place ----------------------------------------


@st.composite
def valid_frames(draw: st.DrawFn) -> Frame:
    """A template as it is, serialised in one of several legal ways."""
    return draw(_serialise(draw(_template_tree())))


@st.composite
def mutated_fields(draw: st.DrawFn) -> Frame:
    """One value anywhere in a request replaced, removed, or joined by an extra key."""
    tree = draw(_template_tree())
    action = draw(st.sampled_from(["replace", "remove", "add", "type", "version"]))
    if action == "type":
        tree["type"] = draw(st.text(max_size=12) | st.sampled_from([*sorted(ACTING), "reply"]))
    elif action == "version":
        tree["v"] = draw(wrong_values | json_values | st.sampled_from([1, 3, -2, 2**64]))
    elif action == "add":
        where = _at(tree, draw(st.sampled_from(list(_containers(tree)))))
        where[draw(st.text(max_size=8))] = draw(json_values)
    else:
        path = draw(_path_in(tree))
        parent = _at(tree, path[:-1])
        if action == "remove":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(wrong_values | json_values)
    return draw(_serialise(tree))


@st.composite
def token_frames(draw: st.DrawFn) -> Frame:
    """A raw hostile token in place of one value of a request, or under an extra key."""
    tree = draw(_template_tree())
    if draw(st.integers(0, 3)) == 0:
        where = _at(tree, draw(st.sampled_from(list(_containers(tree)))))
        where[draw(st.sampled_from(["z", "id", "v", "type", "k"]))] = _HOLE
    else:
        path = draw(_path_in(tree))
        _at(tree, path[:-1])[path[-1]] = _HOLE
    return draw(_serialise(tree, draw(hostile_tokens)))


@st.composite
def in_a_ping(draw: st.DrawFn) -> Frame:
    """The simplest request around a hostile token: as its ``v``, its ``id`` or extra."""
    where = draw(st.sampled_from(["v", "id", "type", "extra", "key"]))
    fields = {b'"v"': b"%d" % PROTOCOL_VERSION, b'"id"': b'"h"', b'"type"': b'"ping"'}
    if where == "key":
        fields[draw(hostile_keys)] = b"1"
    else:
        fields[b'"z"' if where == "extra" else b'"%s"' % where.encode()] = draw(hostile_tokens)
    return Frame(b"{" + b",".join(k + b":" + v for k, v in fields.items()) + b"}")


@st.composite
def duplicate_keys(draw: st.DrawFn) -> Frame:
    """A key twice in one object (the last one wins, as for every JSON decoder here)."""
    tree = draw(_template_tree())
    pairs = list(tree.items())
    key = draw(st.sampled_from([k for k, _ in pairs]))
    other = draw(json_values | st.sampled_from([v for _, v in pairs]))
    at = draw(st.integers(0, len(pairs)))
    pairs.insert(at, (key, other))
    body = ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs)
    return Frame(("{" + body + "}").encode("utf-8", "surrogatepass"))


@st.composite
def reencoded(draw: st.DrawFn) -> Frame:
    """A request with a byte-order mark, or in UTF-16 or UTF-32 (with or without one)."""
    frame = draw(valid_frames() | mutated_fields())
    how = draw(
        st.sampled_from(
            ["bom", "bom2", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
        )
    )
    if how == "bom":
        return Frame(BOM + frame)
    if how == "bom2":
        return Frame(BOM + BOM + frame)
    try:
        return Frame(frame.decode("utf-8").encode(how))
    except UnicodeError:
        return Frame(BOM + frame)


@st.composite
def truncated(draw: st.DrawFn) -> Frame:
    frame = draw(valid_frames() | token_frames())
    return Frame(frame[: draw(st.integers(0, max(0, len(frame) - 1)))])


@st.composite
def trailing(draw: st.DrawFn) -> Frame:
    """Something after the value: garbage (refused) or whitespace (allowed)."""
    frame = draw(valid_frames())
    tail = draw(
        st.sampled_from([b"x", b"}", b"]", b",", b"\x00", b"{}", b"[]", b"1", b" \n\t\r"])
        | st.binary(min_size=1, max_size=8)
        | valid_frames()
    )
    return Frame(frame + tail)


@st.composite
def corrupted_bytes(draw: st.DrawFn) -> Frame:
    """Bytes of a request overwritten or inserted: controls, high bytes, cut sequences."""
    frame = bytearray(draw(valid_frames()))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(frame)))
        bad = draw(st.sampled_from(_BAD_UTF8) | st.binary(min_size=1, max_size=2))
        if draw(st.booleans()) and at < len(frame):
            frame[at : at + len(bad)] = bad
        else:
            frame[at:at] = bad
    return Frame(frame)


@st.composite
def deep_frames(draw: st.DrawFn) -> Frame:
    """A whole frame of nesting: ``[`` x N, ``{"a":`` x N, or a mix; N up to 100,000."""
    return draw(deep_values())


@st.composite
def random_text(draw: st.DrawFn) -> Frame:
    """Text, sometimes with surrogates (written as the invalid UTF-8 they would be)."""
    alphabet = st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
    return Frame(draw(st.text(alphabet, max_size=200)).encode("utf-8", "surrogatepass"))


@st.composite
def sized(draw: st.DrawFn, low: int, high: int) -> Frame:
    """A frame of ``low`` to ``high`` bytes: a padded request, whitespace or any bytes."""
    size = draw(st.sampled_from([low, high]) | st.integers(low, high))
    shape = draw(st.sampled_from(["padded", "spaced", "blank", "bytes"]))
    ping = b'{"v":%d,"id":"big","type":"ping"' % PROTOCOL_VERSION
    if shape == "padded":  # a whole ping with an extra field, exactly `size` bytes
        return Frame(ping + b',"pad":"' + b"p" * max(0, size - len(ping) - 10) + b'"}')
    if shape == "spaced":  # a whole, valid ping followed by whitespace
        return Frame(ping + b"}" + b" " * max(0, size - len(ping) - 1))
    if shape == "blank":
        return Frame(b" " * size)
    unit = draw(st.binary(min_size=1, max_size=16))
    return Frame((unit * (size // len(unit) + 1))[:size])


at_the_limit = sized(MAX_BYTES - 64, MAX_BYTES)
"""Just under and at the limit: parsed, and answered as what they are."""
over_the_limit = sized(MAX_BYTES + 1, DROP_ABOVE)
"""Above the limit, up to libzmq's cut-off: refused before parsing, with a reply."""
beyond_the_cutoff = sized(DROP_ABOVE + 1, DROP_ABOVE + 4096)
"""libzmq drops these and disconnects the sender: no reply, ever."""

HOSTILE_FRAMES = st.one_of(
    st.binary(max_size=512),
    random_text(),
    frames,  # the original set: top-level mutations, random JSON, just oversized
    valid_frames(),
    mutated_fields(),
    mutated_fields(),
    token_frames(),
    token_frames(),
    token_frames(),
    in_a_ping(),
    in_a_ping(),
    duplicate_keys(),
    reencoded(),
    truncated(),
    trailing(),
    corrupted_bytes(),
    deep_frames(),
    at_the_limit,
    over_the_limit,
    beyond_the_cutoff,
)
"""One frame, of every kind above (the structure-aware ones weighted up)."""
SMALL_FRAMES = st.one_of(
    st.binary(max_size=64), valid_frames(), mutated_fields(), token_frames(), truncated()
)


@st.composite
def hostile_messages(draw: st.DrawFn) -> list[bytes]:
    """One control message: mostly one hostile frame; else several frames, a REQ
    envelope (empty delimiter, then one frame) or a malformed envelope."""
    kind = draw(st.integers(0, 19))
    if kind < 15:
        message = [draw(HOSTILE_FRAMES)]
    elif kind < 17:
        message = [b"", draw(HOSTILE_FRAMES)]
    elif kind < 19:
        message = draw(st.lists(SMALL_FRAMES | st.just(b""), min_size=2, max_size=4))
    else:
        message = draw(
            st.sampled_from([[b"", b""], [b"", b"", b"{}"]])
            | st.tuples(SMALL_FRAMES, st.just(b"")).map(list)
            | st.tuples(SMALL_FRAMES, beyond_the_cutoff).map(list)
            | st.tuples(over_the_limit, over_the_limit).map(list)
        )
    return defang(message)


HOSTILE_MESSAGES = hostile_messages()


# --- the oracle ------------------------------------------------------------------------------


def _body(frames: list[bytes]) -> tuple[bool, list[bytes]]:
    """(REQ envelope?, the frames the server reads as the request), as the server splits."""
    if len(frames) == 2 and frames[0] == b"":
        return True, frames[1:]
    return False, frames


def defang(frames: list[bytes]) -> list[bytes]:
    """``frames`` with a request that would be acted on turned into a ping of the same id.

    Only a message the server reads as one request can be acted on; in a multipart
    message a valid ``compile`` stays, and must be refused like any other.
    """
    req, body = _body(frames)
    if len(body) != 1 or any(len(f) > DROP_ABOVE for f in frames):
        return frames
    try:
        request = decode_request(body[0])
    except WireError:
        return frames
    if request.type not in ACTING:
        return frames
    ping = encode(PingRequest(id=request.id))
    return [b"", ping] if req else [ping]


@dataclass(frozen=True)
class Expected:
    """What the server must do with one message."""

    dropped: bool = False
    """libzmq drops it and disconnects the sender: no reply."""
    delimiter: bool = False
    """The reply starts with the empty frame of a REQ envelope."""
    ok: bool = False
    id: str | None = None
    error: str = ""
    type: str | None = None
    """For an ``ok`` reply: the request's type (ping, status, server_info)."""

    @property
    def kind(self) -> str:
        """A short name for what happened, for statistics."""
        if self.dropped:
            return "dropped by libzmq"
        if self.ok:
            return f"ok: {self.type}"
        for prefix, name in (
            ("expected one frame", "multipart"),
            ("message of", "over the size limit"),
            ("starts with a byte-order mark", "byte-order mark"),
            ("not UTF-8", "not UTF-8"),
            ("not JSON: nested deeper", "too deep"),
            ("not JSON: a number out of range", "too many digits"),
            ("not JSON: a \\u escape", "lone surrogate"),
            ("not JSON", "not JSON"),
            ("expected a JSON object", "not an object"),
            ("protocol version", "wrong version"),
            ("invalid request", "invalid request"),
        ):
            if self.error.startswith(prefix):
                return name
        return "other error"


def expected_reply(frames: list[bytes]) -> Expected:
    """What the server must answer to ``frames`` (the parts after the ROUTER envelope)."""
    if any(len(frame) > DROP_ABOVE for frame in frames):
        return Expected(dropped=True)
    req, body = _body(frames)
    if len(body) != 1:
        return Expected(delimiter=req, error=f"expected one frame per request, got {len(body)}")
    try:
        request = decode_request(body[0])
    except WireError as exc:
        return Expected(delimiter=req, id=exc.request_id, error=str(exc))
    return Expected(delimiter=req, ok=True, id=request.id, type=request.type)


# --- an independent reading of the promises ----------------------------------------------


class _Refused(ValueError):
    pass


def _refuse(token: str) -> Any:
    raise _Refused(f"{token} is not JSON")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > SPEC_MAX_INT_DIGITS:
        raise _Refused("too many digits")
    return int(text)


def _float(text: str) -> float:
    whole = re.split(r"[.eE]", text.lstrip("-"), maxsplit=1)[0]
    if len(whole) > SPEC_MAX_INT_DIGITS:
        raise _Refused("too many digits")
    return float(text)


_TOKEN: Final = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]|[^\s\[\]{},:"]+')
_HALF_PAIR: Final = re.compile(r"\\u[dD][89a-fA-F]")


def _levels_and_text_ok(text: str) -> bool:
    """Scan the tokens of (syntactically valid) JSON: within the depth limit, and no
    string, key or value, anywhere (duplicates too), with half a surrogate pair."""
    open_containers = 0
    deepest = 0
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in ("]", "}"):
            open_containers -= 1
            continue
        deepest = max(deepest, open_containers)  # a value (or key) at this level
        if token in ("[", "{"):
            open_containers += 1
        elif token.startswith('"') and _HALF_PAIR.search(token):
            try:
                json.loads(token).encode("utf-8")
            except UnicodeEncodeError:
                return False
    return deepest <= SPEC_MAX_DEPTH


REFUSED: Final = object()
"""What :func:`reference_decode` returns for a frame that breaks a promised bound."""


def reference_decode(frame: bytes) -> Any:
    """The frame's JSON value, or :data:`REFUSED` if it breaks a bound the server promises.

    Written without :mod:`plateflow.core.decoding`: the standard library's ``json`` with
    the bounds of the protocol applied by hand (size, no byte-order mark, strict UTF-8,
    no ``NaN``/``Infinity``, integer parts of at most 4,300 digits, 200 levels, no lone
    surrogate escapes, nothing after the value).
    """
    if len(frame) > MAX_BYTES or frame.startswith(BOM):
        return REFUSED
    try:
        text = frame.decode("utf-8")
        value = json.loads(text, parse_constant=_refuse, parse_int=_int, parse_float=_float)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError too
        return REFUSED
    if not _levels_and_text_ok(text):
        return REFUSED
    return value


def reference_id(value: Any) -> str | None:
    """The reply ``id`` the promise names: the object's ``id`` if it is 1-128 characters."""
    if value is REFUSED or not isinstance(value, dict):
        return None
    found = value.get("id")
    return found if isinstance(found, str) and 1 <= len(found) <= 128 else None


def spec_problems(frames: list[bytes], expected: Expected) -> list[str]:
    """Where the oracle (the server's own decoder) disagrees with the promises."""
    _req, body = _body(frames)
    if expected.dropped or len(body) != 1:
        return []
    value = reference_decode(body[0])
    problems = []
    if expected.ok and value is REFUSED:
        problems.append("decode_request accepts a frame that breaks a promised bound")
    if expected.ok and expected.type in ACTING:
        problems.append(f"the fuzz was about to send a valid {expected.type} request")
    if (want := reference_id(value)) != expected.id:
        problems.append(f"the reply id must be {want!r}, the decoder says {expected.id!r}")
    return problems


# --- the client that sends and checks ------------------------------------------------------

TIMEOUT: Final = 20.0
"""The longest any single wait may take before a check fails."""
REPLY_MAX_BYTES: Final = 64 << 20
"""Replies are decoded with the limit plateflow's own client uses (``ZmqEngine``): an
error may quote a long ``type`` tag or key, so it can be a little larger than the frame."""
COUNTERS: Final = ("artifacts", "running", "queued", "remembered")
"""The ``server_info`` counters that anything acted on would change."""


def describe(frames: list[bytes], limit: int = 160) -> str:
    """A message in one line: each frame's size and its start."""
    return "[" + ", ".join(f"{len(f):,} B {f[:limit]!r}" for f in frames) + "]"


class ServerGone(AssertionError):
    """The server process exited: every later check would only time out."""


@dataclass
class FuzzStats:
    messages: int = 0
    """Messages sent (each one request, as the server sees it)."""
    parts: int = 0
    """ZeroMQ frames sent (the parts of multipart messages counted one by one)."""
    bytes: int = 0
    pings: int = 0
    dropped: int = 0
    fresh_sockets: int = 0
    wrong: int = 0
    """Messages with at least one problem."""
    kinds: Counter[str] = field(default_factory=Counter)


class FrameFuzzer:
    """Sends hostile messages to one server and checks each answer; every wait bounded.

    One DEALER (with a monitor that reports its disconnection) and one SUB. ``alive``
    says whether the server process still runs, so that a crash ends a wait at once.
    """

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        record: rundir.ServerRecord,
        *,
        alive: Callable[[], bool] = lambda: True,
        timeout: float = TIMEOUT,
        stats: FuzzStats | None = None,
    ) -> None:
        self._context = context
        self._record = record
        self._alive = alive
        self.timeout = timeout
        self.stats = FuzzStats() if stats is None else stats
        """What was sent and seen; pass one in to count across fuzzers (servers)."""
        self.facts: list[FactEvent] = []
        """Every fact event seen: each one is something the server acted on."""
        self._last_seq: int | None = None
        self._pings = 0
        self._sub = context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(record.events)
        self._dealer, self._monitor = self._connect()

    def _connect(self) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        monitor.setsockopt(zmq.LINGER, 0)
        dealer.connect(self._record.control)
        return dealer, monitor

    def _reconnect(self) -> None:
        self._close_dealer()
        self._dealer, self._monitor = self._connect()
        self.stats.fresh_sockets += 1

    def _close_dealer(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._dealer.disable_monitor()
        self._monitor.close(0)
        self._dealer.close(0)

    def close(self) -> None:
        self._close_dealer()
        self._sub.close(0)

    def _poll(self, sockets: list[zmq.Socket[bytes]], timeout: float) -> set[zmq.Socket[bytes]]:
        """The sockets ready within ``timeout``; raise :class:`ServerGone` if it exited."""
        poller = zmq.Poller()
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready = {s for s, _ in poller.poll(int(max(0.0, min(left, 0.25)) * 1000))}
            if ready or left <= 0:
                return ready
            if not self._alive():
                raise ServerGone("the server process exited")

    # --- the checks ---------------------------------------------------------------------

    def send(self, frames: list[bytes]) -> list[str]:
        """Send one message; check its answer (or its drop), then a ping. The problems."""
        expected = expected_reply(frames)
        problems = [f"oracle: {p}" for p in spec_problems(frames, expected)]
        self._dealer.send_multipart(frames)
        self.stats.messages += 1
        self.stats.parts += len(frames)
        self.stats.bytes += sum(len(f) for f in frames)
        self.stats.kinds[expected.kind] += 1
        if expected.dropped:
            problems += self._dropped()
        else:
            problems += self._reply(expected)
        problems += self._ping()
        if problems:
            self.stats.wrong += 1
            self._reconnect()  # whatever arrives late must not meet the next message
        return [f"{describe(frames)}: {p}" for p in problems]

    def _dropped(self) -> list[str]:
        ready = self._poll([self._monitor, self._dealer], self.timeout)
        problems = []
        if self._dealer in ready:
            problems.append(f"answered a frame above {DROP_ABOVE:,} bytes instead of dropping it")
        elif self._monitor in ready:
            event = recv_monitor_message(self._monitor)
            if event["event"] != zmq.EVENT_DISCONNECTED:
                problems.append(f"unexpected monitor event {event!r}")
        else:
            problems.append(f"no disconnect (nor reply) within {self.timeout:g} s")
        self.stats.dropped += 1
        self._reconnect()
        return problems

    def _reply(self, expected: Expected) -> list[str]:
        if not self._poll([self._dealer], self.timeout):
            return [f"no reply within {self.timeout:g} s (expected {expected})"]
        parts = self._dealer.recv_multipart()
        envelope, frame = parts[:-1], parts[-1]
        problems = []
        if envelope != ([b""] if expected.delimiter else []):
            problems.append(f"reply envelope {envelope!r}")
        try:
            reply = decode_reply(frame, max_bytes=REPLY_MAX_BYTES)
        except WireError as exc:
            return [*problems, f"undecodable reply {frame[:200]!r}: {exc}"]
        problems += self._compare(reply, expected)
        return problems

    def _compare(self, reply: Reply, expected: Expected) -> list[str]:
        got = (reply.ok, reply.id, reply.error if not reply.ok else "")
        want = (expected.ok, expected.id, expected.error)
        if got != want:
            return [f"reply (ok, id, error) = {got!r}, expected {want!r}"]
        if not reply.ok and (reply.result is not None or reply.facts):
            return [f"an error reply with a result or facts: {reply!r:.300}"]
        if reply.ok and reply.facts:
            return [f"facts in the reply to a {expected.type}: {reply.facts!r:.300}"]
        if expected.type == "ping" and reply.result != self._ping_result:
            return [f"ping result {reply.result!r}"]
        if expected.type == "server_info" and (
            not isinstance(reply.result, dict)
            or reply.result.get("server_id") != self._record.server_id
        ):
            return [f"server_info result {reply.result!r:.300}"]
        return []

    @property
    def _ping_result(self) -> dict[str, Any]:
        return {"server_id": self._record.server_id, "protocol": PROTOCOL_VERSION}

    def _ping(self) -> list[str]:
        self._pings += 1
        self.stats.pings += 1
        ping_id = f"fuzz-ping-{self._pings}"
        self._dealer.send(encode(PingRequest(id=ping_id)))
        if not self._poll([self._dealer], self.timeout):
            return [f"no answer to the ping after it within {self.timeout:g} s"]
        parts = self._dealer.recv_multipart()
        try:
            reply = decode_reply(parts[-1], max_bytes=REPLY_MAX_BYTES)
        except WireError as exc:
            return [f"undecodable ping reply {parts!r:.200}: {exc}"]
        problems = []
        if len(parts) != 1 or not reply.ok or reply.id != ping_id:
            problems.append(f"the ping after it got {parts!r:.300}")
        elif reply.result != self._ping_result:
            problems.append(f"ping result {reply.result!r}")
        if self._dealer.poll(0):
            problems.append(f"a further reply: {self._dealer.recv_multipart()!r:.300}")
        if self._monitor.poll(0):
            problems.append("the server dropped the connection")
        return problems

    # --- events and counters -------------------------------------------------------------

    def wait_subscribed(self) -> None:
        """Wait (bounded) for a heartbeat, so that no event after this one is missed."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._poll([self._sub], deadline - time.monotonic()):
                self._event(self._sub.recv())
                if self._last_seq is not None:
                    return
        raise AssertionError("no heartbeat arrived")

    def _event(self, frame: bytes) -> list[str]:
        event = decode_event(frame)
        problems = []
        if event.server_id != self._record.server_id:
            problems.append(f"an event of another server: {event!r:.200}")
        if self._last_seq is not None and event.seq != self._last_seq + 1:
            problems.append(f"event seq {self._last_seq} -> {event.seq}: an event unseen")
        self._last_seq = event.seq
        if isinstance(event, FactEvent):
            self.facts.append(event)
            problems.append(f"a fact was published: {event.fact!r:.300}")
        elif not isinstance(event, HeartbeatEvent):
            problems.append(f"unexpected event {event!r:.200}")
        return problems

    def drain_events(self) -> list[str]:
        """Read every event that has arrived; anything but heartbeats in sequence is wrong."""
        problems = []
        while self._sub.poll(0):
            problems += self._event(self._sub.recv())
        return problems

    def settle_events(self, seq: int) -> list[str]:
        """Read events until the one numbered ``seq`` (bounded): none may be missed."""
        problems = self.drain_events()
        deadline = time.monotonic() + self.timeout
        while self._last_seq is None or self._last_seq < seq:
            left = deadline - time.monotonic()
            if left <= 0 or not self._poll([self._sub], left):
                return [*problems, f"event {seq} never arrived (last seen {self._last_seq})"]
            problems += self._event(self._sub.recv())
        return problems

    def server_info(self) -> dict[str, Any]:
        """``server_info``, on the current DEALER (which then must still be in sync)."""
        self._dealer.send(encode(ServerInfoRequest(id="fuzz-info")))
        if not self._poll([self._dealer], self.timeout):
            raise AssertionError(f"no answer to server_info within {self.timeout:g} s")
        reply = decode_reply(self._dealer.recv_multipart()[-1])
        if not (reply.ok and reply.id == "fuzz-info" and isinstance(reply.result, dict)):
            raise AssertionError(f"server_info answered {reply!r:.300}")
        return reply.result

    def counters(self) -> dict[str, int]:
        info = self.server_info()
        return {name: int(info[name]) for name in COUNTERS} | {"seq": int(info["seq"])}
