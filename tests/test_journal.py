"""The journal: every fact recorded, JSON Lines round trip, stories, replay."""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import execution, feed, job, make_batch, ticking_clock
from plateflow import JournalError, JournalWarning, replay
from plateflow.cli import main
from plateflow.core import (
    Batch,
    BatchMode,
    BatchStarted,
    CancelRequested,
    CancelTimedOut,
    CompileAccepted,
    CompileCancelled,
    CompileFailed,
    CompileFailurePolicy,
    CompileSucceeded,
    Disposition,
    EngineLost,
    ExecutionAccepted,
    ExecutionCancelled,
    ExecutionFailed,
    ExecutionProgress,
    ExecutionStarted,
    ExecutionSucceeded,
    Fact,
    HostCallbackFailed,
    Journal,
)
from plateflow.core import journal as journal_module
from plateflow.core.decoding import MAX_DEPTH, MAX_INT_DIGITS


def busy_batch() -> Batch:
    """A batch whose journal has applied, stale, duplicate and rejected records."""
    batch = make_batch(3)
    j = {p: job(batch, p) for p in batch.plate_ids}
    feed(
        batch,
        [
            BatchStarted(),
            CompileAccepted(plate_id="p0", job_id=j["p0"]),
            CompileAccepted(plate_id="p0", job_id=j["p0"]),
            CompileSucceeded(plate_id="p0", job_id=j["p0"], artifact_id="a0"),
            CompileSucceeded(plate_id="p1", job_id="other.1.c", artifact_id="zz"),
            CompileSucceeded(plate_id="p1", job_id=j["p1"], artifact_id="a1"),
            CompileSucceeded(plate_id="p2", job_id=j["p2"], artifact_id="a2"),
            ExecutionStarted(plate_id="p0", execution_id=execution(batch, "p0")),
            ExecutionProgress(plate_id="p0", execution_id=execution(batch, "p0"), done=1, total=2),
            ExecutionSucceeded(
                plate_id="p0", execution_id=execution(batch, "p0"), result={"hits": [3, 7]}
            ),
            CompileAccepted(plate_id="ghost", job_id="b.9.c"),
            CancelRequested(plate_id="p1"),
            EngineLost(reason="server gone"),
        ],
    )
    return batch


def test_every_fact_is_journaled_with_its_disposition() -> None:
    batch = busy_batch()
    assert [r.seq for r in batch.journal] == list(range(13))
    assert [r.disposition for r in batch.journal] == [
        Disposition.APPLIED,
        Disposition.APPLIED,
        Disposition.IGNORED_DUPLICATE,
        Disposition.APPLIED,
        Disposition.IGNORED_STALE,
        Disposition.APPLIED,
        Disposition.APPLIED,
        Disposition.APPLIED,
        Disposition.APPLIED,
        Disposition.APPLIED,
        Disposition.REJECTED,
        Disposition.APPLIED,
        Disposition.APPLIED,
    ]
    times = [r.time for r in batch.journal]
    assert times == sorted(times)
    assert len(set(times)) == len(times)


def test_story_explains_how_a_plate_reached_its_state() -> None:
    batch = busy_batch()
    story = batch.journal.story("p2")
    assert [r.fact.kind for r in story] == [
        "batch_started",
        "compile_succeeded",
        "engine_lost",
    ]
    last = story[-1].changes
    assert [(c.plate_id, c.old, c.new, c.note) for c in last if c.plate_id == "p2"] == [
        ("p2", "compiled", "failed", "settled: engine_lost")
    ]


def test_json_lines_round_trip_and_replay_reproduce_the_live_states(tmp_path: Path) -> None:
    batch = busy_batch()
    path = tmp_path / "batch.jsonl"
    batch.journal.save(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["type"] == "header"
    assert len(lines) == 1 + len(batch.journal)
    loaded = Journal.load(path)
    assert loaded.records == batch.journal.records
    assert loaded.header == batch.journal.header
    assert replay(loaded).snapshot() == batch.snapshot()


def test_replay_until_reproduces_an_intermediate_state() -> None:
    batch = busy_batch()
    partial = replay(batch.journal, until=4)
    assert partial.plate_state("p0") == "compiled"
    assert partial.plate_state("p1") == "queued"
    assert len(partial.journal) == 4


def test_replay_refuses_a_journal_that_does_not_match_the_machines() -> None:
    batch = busy_batch()
    text = io.StringIO()
    batch.journal.write(text)
    lines = text.getvalue().splitlines()
    record = json.loads(lines[3])  # the duplicate CompileAccepted
    record["disposition"] = "applied"
    lines[3] = json.dumps(record)
    edited = Journal.read(io.StringIO("\n".join(lines)))
    with pytest.raises(JournalError, match=r"record 2 .*replayed as ignored_duplicate"):
        replay(edited)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty journal"),
        ("not json\n", "demo.jsonl:1: not JSON"),
        ("[1, 2]\n", "demo.jsonl:1: expected a JSON object"),
        ('{"type": "record"}\n', "demo.jsonl:1: the first line must be the journal header"),
        (
            '{"type": "header", "format": 99, "batch_id": "b", "plate_ids": [], '
            '"mode": "run", "policy": "abort"}\n',
            "journal format 99 is not supported",
        ),
        (
            '{"type": "header", "format": 1, "batch_id": "b", "plate_ids": ["p"], '
            '"mode": "sometimes", "policy": "abort"}\n',
            "demo.jsonl:1: 'sometimes' is not a valid BatchMode",
        ),
        (
            '{"type": "header", "format": 1, "batch_id": "b", "plate_ids": ["p"], '
            '"mode": "run", "policy": "abort"}\n'
            '{"type": "record", "seq": 0, "time": 1.0, "disposition": "applied", '
            '"detail": "", "changes": [], "fact": {"kind": "compile_accepted", '
            '"stimulus_id": "s1", "plate_id": "p"}}\n',
            "demo.jsonl:2: invalid fact at compile_accepted.job_id: Field required",
        ),
        (
            '{"type": "header", "format": 1, "batch_id": "b", "plate_ids": ["p"], '
            '"mode": "run", "policy": "abort"}\n'
            '{"type": "record", "seq": "zero", "time": 1.0, "disposition": "applied", '
            '"detail": "", "changes": [], "fact": {"kind": "batch_started", '
            '"stimulus_id": "s1"}}\n',
            "demo.jsonl:2: field 'seq' has the wrong type",
        ),
        (
            '{"type": "header", "format": 1, "batch_id": "b", "plate_ids": ["p"], '
            '"mode": "run", "policy": "abort"}\n'
            '{"type": "record", "seq": 0, "time": 1.0, "disposition": "applied", '
            '"detail": "", "changes": [["p", "idle", "nowhere", ""]], '
            '"fact": {"kind": "batch_started", "stimulus_id": "s1"}}\n',
            "demo.jsonl:2: 'nowhere' is not a PlateState",
        ),
    ],
)
def test_bad_journal_files_name_the_line_and_what_is_wrong(content: str, message: str) -> None:
    with pytest.raises(JournalError, match=message):
        Journal.read(io.StringIO(content), source="demo.jsonl")


# --- any fact sequence survives the file round trip and replays to the same states ---------


def _any_fact(n_plates: int) -> st.SearchStrategy[Fact]:
    plate = st.sampled_from([f"p{i}" for i in range(n_plates)] + ["ghost"])
    job_id = st.sampled_from([f"b.{i}.c" for i in range(n_plates)] + ["old.0.c"])
    execution_id = st.sampled_from([f"b.{i}.x" for i in range(n_plates)] + ["old.0.x"])
    text = st.text(max_size=12)
    return st.one_of(
        st.builds(BatchStarted),
        st.builds(CancelRequested, plate_id=st.none() | plate),
        st.builds(CancelTimedOut, plate_id=plate),
        st.builds(EngineLost, reason=text),
        st.builds(
            HostCallbackFailed, callback=st.sampled_from(["emit_status", "emit_error"]), error=text
        ),
        st.builds(CompileAccepted, plate_id=plate, job_id=job_id),
        st.builds(CompileSucceeded, plate_id=plate, job_id=job_id, artifact_id=st.just("a")),
        st.builds(CompileFailed, plate_id=plate, job_id=job_id, error=text),
        st.builds(CompileCancelled, plate_id=plate, job_id=job_id),
        st.builds(ExecutionAccepted, plate_id=plate, execution_id=execution_id),
        st.builds(
            ExecutionProgress,
            plate_id=plate,
            execution_id=execution_id,
            done=st.integers(0, 4),
            total=st.just(4),
        ),
        st.builds(
            ExecutionSucceeded,
            plate_id=plate,
            execution_id=execution_id,
            result=st.dictionaries(st.text(max_size=3), st.integers() | text, max_size=2),
        ),
        st.builds(ExecutionFailed, plate_id=plate, execution_id=execution_id, error=text),
        st.builds(ExecutionCancelled, plate_id=plate, execution_id=execution_id),
    )


@given(
    n_plates=st.integers(1, 3),
    mode=st.sampled_from(BatchMode),
    policy=st.sampled_from(CompileFailurePolicy),
    data=st.data(),
)
def test_any_fact_sequence_round_trips_through_json_lines_and_replays(
    n_plates: int, mode: BatchMode, policy: CompileFailurePolicy, data: st.DataObject
) -> None:
    batch = Batch(
        "b", [f"p{i}" for i in range(n_plates)], mode=mode, policy=policy, clock=ticking_clock()
    )
    facts = data.draw(st.lists(_any_fact(n_plates), max_size=25))
    feed(batch, facts)
    assert len(batch.journal) == len(facts)
    text = io.StringIO()
    batch.journal.write(text)
    loaded = Journal.read(io.StringIO(text.getvalue()))
    assert loaded.records == batch.journal.records
    assert replay(loaded).snapshot() == batch.snapshot()


# --- every damaged journal file loads or is refused naming its line ----------------------------
#
# A journal on disk is outside input: it may be cut short by a crash, damaged, or written
# by something hostile. Journal.load must either return a journal or raise JournalError
# whose message starts with ``<path>:<line>:``, and a damaged line must never cost the
# records before it (they load, or the error names a later line).


class Saved(NamedTuple):
    journal: Journal
    data: bytes
    folder: Path

    def __repr__(self) -> str:  # Hypothesis prints it with every failing example
        return f"Saved({len(self.journal)} records in {self.folder})"


class Raw(str):
    """JSON text written into a line as it is (a number no Python value dumps to)."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """A real journal (applied, stale, duplicate, rejected records) saved to a file once."""
    folder = tmp_path_factory.mktemp("journal")
    journal = busy_batch().journal
    journal.save(folder / "saved.jsonl")
    return Saved(journal, (folder / "saved.jsonl").read_bytes(), folder)


def _load(folder: Path, data: bytes) -> tuple[Path, Journal | JournalError]:
    """Write ``data`` as a journal file and load it; the journal or the JournalError.

    A journal loaded with a torn last line comes with exactly one JournalWarning naming
    that line, and one loaded whole with none."""
    path = folder / "damaged.jsonl"
    path.write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            journal = Journal.load(path)
        except JournalError as exc:
            assert caught == []
            return path, exc
    if journal.torn is None:
        assert caught == []
    else:
        (warning,) = caught
        assert warning.category is JournalWarning
        assert str(warning.message).startswith(f"{path}:{journal.torn.line}: dropped the last")
    return path, journal


def _line_named(error: JournalError, path: Path) -> int:
    """The line number the error names (0 for an empty journal), checking its form."""
    message = str(error)
    if message == f"{path}: empty journal (no header line)":
        return 0
    match = re.match(rf"{re.escape(str(path))}:(\d+): \S", message)
    assert match is not None, f"a journal error names its file and line: {message!r}"
    return int(match.group(1))


@given(cut=st.integers(min_value=0))
def test_a_journal_cut_short_anywhere_keeps_every_whole_record(saved: Saved, cut: int) -> None:
    """A crash mid-write leaves a prefix: it loads as exactly its whole records, the torn
    last line dropped and described; only a file without a whole header is refused."""
    kept = saved.data[: cut % (len(saved.data) + 1)]
    whole_lines = kept.count(b"\n")
    path, outcome = _load(saved.folder, kept)
    if whole_lines == 0:
        assert isinstance(outcome, JournalError)
        assert _line_named(outcome, path) == (1 if kept else 0)
        return
    assert isinstance(outcome, Journal), outcome
    assert outcome.header == saved.journal.header
    # A cut just before a newline leaves a whole record without it: that one is kept.
    assert len(outcome) in (whole_lines - 1, whole_lines)
    assert outcome.records == saved.journal.records[: len(outcome)]
    intact = kept.endswith(b"\n") or len(outcome) == whole_lines
    if intact:
        assert outcome.torn is None
    else:
        assert outcome.torn is not None
        assert outcome.torn.line == whole_lines + 1
        assert outcome.torn.offset == kept.rindex(b"\n") + 1


def _damage(data: bytes, draw: st.DataObject) -> tuple[bytes, int]:
    """``data`` with bytes replaced, inserted or deleted; and the first offset touched."""
    out = bytearray(data)
    first = len(out)
    for _ in range(draw.draw(st.integers(1, 4), label="damages")):
        at = draw.draw(st.integers(0, len(out)), label="at")
        action = draw.draw(st.sampled_from(["replace", "insert", "delete"]), label="action")
        first = min(first, at)
        if action == "insert" or at == len(out):
            out[at:at] = draw.draw(
                st.binary(min_size=1, max_size=6)
                | st.sampled_from(
                    [b"\n", b"\xef\xbb\xbf", b"\xed\xa0\x80", b"\\ud800", b"9" * 5000]
                ),
                label="inserted",
            )
        elif action == "replace":
            out[at] = draw.draw(st.integers(0, 255), label="byte")
        else:
            del out[at : at + draw.draw(st.integers(1, 40), label="deleted")]
    return bytes(out), first


@given(data=st.data())
def test_a_damaged_journal_loads_or_names_a_damaged_line(saved: Saved, data: st.DataObject) -> None:
    """Random byte damage: never another exception, and the undamaged lines are never blamed."""
    damaged, first = _damage(saved.data, data)
    intact_lines = saved.data[:first].count(b"\n")
    path, outcome = _load(saved.folder, damaged)
    if isinstance(outcome, JournalError):
        line = _line_named(outcome, path)
        assert intact_lines < line <= damaged.count(b"\n") + 1
        return
    if intact_lines >= 1:
        assert outcome.header == saved.journal.header
    kept = max(0, intact_lines - 1)
    assert outcome.records[:kept] == saved.journal.records[:kept]


_HOSTILE_LINES = [
    b"9" * 5000,
    b"-" + b"9" * 5000,
    b"[" * 100_000,
    b'{"a":' * 50_000,
    rb'"\ud800"',
    rb'{"type": "record", "detail": "\udc00"}',
    b'{"type": "record", "detail": "\xed\xa0\x80"}',
    b'{"type": "record", "detail": "\xc0\xaf"}',
    b'{"type": "record", "detail": "\xff"}',
    b'{"type": "record", "detail": "a\x00b"}',
    b'{"type": "record"}\x00',
    b'{"type": "header", "format": NaN}',
    b"NaN",
    b"null",
    b"[]",
    b'"header"',
    b"{}",
    b"{",
    b"\x1f",
]
"""Lines that are wrong wherever they stand in a journal, header or record."""


@given(data=st.data())
def test_a_hostile_line_is_refused_naming_exactly_its_line(
    saved: Saved, data: st.DataObject
) -> None:
    lines = saved.data.splitlines(keepends=True)
    at = data.draw(st.integers(0, len(lines)), label="at")
    hostile = data.draw(
        st.sampled_from(_HOSTILE_LINES)
        | st.sampled_from([b"\xef\xbb\xbf" + line.rstrip(b"\n") for line in lines]),
        label="hostile",
    )
    replace = data.draw(st.booleans(), label="replace") and at < len(lines)
    spliced = [*lines[:at], hostile + b"\n", *lines[at + replace :]]
    path, outcome = _load(saved.folder, b"".join(spliced))
    assert isinstance(outcome, JournalError)
    assert _line_named(outcome, path) == at + 1
    assert "\n" not in str(outcome)


_MISSING = object()
_WRONG_HEADER: dict[str, list[Any]] = {
    "type": ["record", 1, None, _MISSING],
    "format": ["1", 1.0, True, None, [], 2, 0, Raw("9" * 5000), _MISSING],
    "batch_id": [1, None, [], {}, True, _MISSING],
    "plate_ids": ["p0", [1], [None], {}, None, _MISSING],
    "mode": [1, None, "sometimes", [], _MISSING],
    "policy": [1, None, "maybe", {}, _MISSING],
}
_WRONG_RECORD: dict[str, list[Any]] = {
    "type": ["header", 1, None, _MISSING],
    "seq": ["0", 1.5, True, None, [], {}, Raw("9" * 5000), Raw("-" + "9" * 5000), _MISSING],
    "time": [
        "1",
        True,
        None,
        [],
        {},
        Raw("1e999"),
        Raw("-1e999"),
        Raw("1" + "0" * 400),
        Raw("NaN"),
        _MISSING,
    ],
    "disposition": [1, None, "applyed", [], _MISSING],
    "detail": [
        1,
        None,
        [],
        {},
        True,
        _MISSING,
        Raw(r'"\ud800"'),
        Raw(r'"a\udc00"'),
        b'"\xed\xa0\x80"',
        b'"\xc0\xaf"',
        b'"\xff"',
        b'"a\x00"',
        b'"\x1f"',
    ],
    "fact": ["x", [], 1, None, {}, {"kind": "batch_started", "stimulus_id": 5}, _MISSING],
    "changes": [
        "x",
        {},
        None,
        [[1, 2]],
        [["p0", "idle"]],
        [[1, "idle", "queued", ""]],
        [["p0", "bogus", "queued", ""]],
        [[None, "idle", "bogus", ""]],
        _MISSING,
    ],
}
"""For each field, values it must refuse (or leave out, _MISSING).

Raw text and bytes are written into the line as they are: numbers no Python
value dumps to, escapes and bytes that are not valid text. They sit in an
otherwise valid line, so only the decoder's bounds can refuse them.
"""


def _with_field(line: bytes, field: str, value: Any) -> bytes:
    """``line`` with one field replaced by ``value`` (as it is, if Raw or bytes) or removed."""
    raw = json.loads(line)
    parts = []
    for key, current in raw.items():
        if key != field:
            parts.append(f"{json.dumps(key)}: {json.dumps(current)}".encode())
        elif value is not _MISSING:
            if isinstance(value, bytes):
                text = value
            else:
                text = (value if isinstance(value, Raw) else json.dumps(value)).encode()
            parts.append(json.dumps(key).encode() + b": " + text)
    return b"{" + b", ".join(parts) + b"}"


@given(data=st.data())
def test_a_field_of_the_wrong_type_is_refused_naming_its_line(
    saved: Saved, data: st.DataObject
) -> None:
    """Every field of the header and of a record, each with values it must not accept."""
    lines = saved.data.splitlines(keepends=True)
    at = data.draw(st.integers(0, len(lines) - 1), label="line")
    wrong = _WRONG_HEADER if at == 0 else _WRONG_RECORD
    field = data.draw(st.sampled_from(sorted(wrong)), label="field")
    value = data.draw(st.sampled_from(wrong[field]), label="value")
    lines[at] = _with_field(lines[at], field, value) + b"\n"
    path, outcome = _load(saved.folder, b"".join(lines))
    assert isinstance(outcome, JournalError), (field, value)
    assert _line_named(outcome, path) == at + 1
    assert "\n" not in str(outcome)


def test_the_wrong_type_values_are_refused_for_the_reason_given(saved: Saved) -> None:
    """A spot check that the table above tests what it says (not an earlier, unrelated error)."""
    lines = saved.data.splitlines(keepends=True)
    cases = [
        (0, "format", True, "field 'format' has the wrong type (bool)"),
        (0, "plate_ids", [1], "field 'plate_ids' must be a list of strings"),
        (0, "batch_id", _MISSING, "missing field 'batch_id'"),
        (1, "seq", 1.5, "field 'seq' has the wrong type (float)"),
        (1, "time", Raw("1e999"), "field 'time' is not a finite number"),
        (1, "time", Raw("1" + "0" * 400), "OverflowError: int too large to convert to float"),
        (1, "time", Raw("NaN"), "not JSON: "),
        (1, "seq", "0", "field 'seq' has the wrong type (str)"),
        (1, "changes", [["p0", "idle"]], "each change must be [plate_id, old, new, note]"),
        (2, "fact", {"kind": "batch_started", "stimulus_id": 5}, "invalid fact at batch_started"),
    ]
    for at, field, value, reason in cases:
        edited = [*lines]
        edited[at] = _with_field(lines[at], field, value) + b"\n"
        path, outcome = _load(saved.folder, b"".join(edited))
        assert isinstance(outcome, JournalError)
        assert str(outcome).startswith(f"{path}:{at + 1}: {reason}"), str(outcome)


def test_the_decoders_bounds_hold_inside_an_otherwise_valid_record(saved: Saved) -> None:
    """Nesting and digits at the limit load; one step beyond is refused naming the line.

    A fact's ``result`` is free-form JSON, so only the decoder's depth bound can
    refuse it; ``seq`` is any integer, so only the digit bound can.
    """
    lines = saved.data.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if b'"result": {"hits": [3, 7]}' in line)

    def with_result(levels: int) -> bytes:
        deep = b'{"k": ' * (levels - 1) + b"{}" + b"}" * (levels - 1)  # result is an object
        return lines[at].replace(b'{"hits": [3, 7]}', deep)

    # the record is level 1 and its fact level 2: the result may nest MAX_DEPTH - 2 deeper
    edited = [*lines[:at], with_result(MAX_DEPTH - 2), *lines[at + 1 :]]
    path, outcome = _load(saved.folder, b"".join(edited))
    assert isinstance(outcome, Journal), outcome
    edited = [*lines[:at], with_result(MAX_DEPTH), *lines[at + 1 :]]
    path, outcome = _load(saved.folder, b"".join(edited))
    assert isinstance(outcome, JournalError)
    assert str(outcome).startswith(f"{path}:{at + 1}: not JSON: nested deeper than {MAX_DEPTH}")

    edited = [*lines[:at], _with_field(lines[at], "seq", Raw("9" * MAX_INT_DIGITS)) + b"\n"]
    path, outcome = _load(saved.folder, b"".join(edited))
    assert isinstance(outcome, Journal), outcome
    assert outcome.records[-1].seq == int("9" * MAX_INT_DIGITS)
    edited[-1] = _with_field(lines[at], "seq", Raw("9" * (MAX_INT_DIGITS + 1))) + b"\n"
    path, outcome = _load(saved.folder, b"".join(edited))
    assert isinstance(outcome, JournalError)
    assert str(outcome).startswith(f"{path}:{at + 1}: not JSON: a number out of range")


def test_a_line_longer_than_max_line_bytes_is_refused_naming_it(
    saved: Saved, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The line bound counts the newline; a longer line is refused before it is decoded."""
    lines = saved.data.splitlines(keepends=True)
    longest = max(len(line) for line in lines)
    path = tmp_path / "long.jsonl"
    path.write_bytes(saved.data)
    monkeypatch.setattr(journal_module, "MAX_LINE_BYTES", longest)
    assert Journal.load(path).records == saved.journal.records
    monkeypatch.setattr(journal_module, "MAX_LINE_BYTES", longest - 1)
    first_long = next(i for i, line in enumerate(lines) if len(line) == longest) + 1
    with pytest.raises(JournalError) as caught:
        Journal.load(path)
    assert str(caught.value) == f"{path}:{first_long}: a line longer than {longest - 1} bytes"
    monkeypatch.setattr(journal_module, "MAX_LINE_BYTES", longest)
    for hostile in (b" " * (10 * longest), b"[" * (10 * longest), b"\xff" * (10 * longest)):
        path.write_bytes(b"".join([*lines[:3], hostile + b"\n", *lines[3:]]))
        with pytest.raises(JournalError) as caught:
            Journal.load(path)
        assert str(caught.value) == f"{path}:4: a line longer than {longest} bytes"


def test_a_text_stream_with_a_lone_surrogate_is_refused_naming_the_line(saved: Saved) -> None:
    """Journal.read also takes text; a ``str`` line that cannot be encoded is refused."""
    text = saved.data.decode("utf-8").splitlines(keepends=True)
    text.insert(2, '{"type": "record", "detail": "\ud800"}\n')
    with pytest.raises(JournalError) as caught:
        Journal.read(io.StringIO("".join(text)), source="text.jsonl")
    assert str(caught.value).startswith("text.jsonl:3: not valid Unicode text: a lone surrogate")


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (b"9" * 5000, 3),
        (b"[" * 100_000, 3),
        (rb'"\ud800"', 3),
        (b"\xef\xbb\xbf{}", 3),
        (b'{"detail": "\xed\xa0\x80"}', 3),
        (None, 3),  # a record whose time is 1e999
        (None, 1),  # a header whose mode is a number
    ],
    ids=["digits", "brackets", "surrogate", "bom", "not-utf8", "infinite-time", "header-type"],
)
def test_journal_show_of_a_hostile_file_exits_2_with_one_line(
    saved: Saved,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes | None,
    line: int,
) -> None:
    lines = saved.data.splitlines(keepends=True)
    if content is None and line == 1:
        lines[0] = _with_field(lines[0], "mode", 7) + b"\n"
    elif content is None:
        lines[2] = _with_field(lines[2], "time", Raw("1e999")) + b"\n"
    else:
        lines.insert(line - 1, content + b"\n")
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b"".join(lines))
    assert main(["journal", "show", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"plateflow: error: {path}:{line}: ")
    assert len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.endswith("\n")


@pytest.mark.parametrize(
    "fact",
    [
        {"kind": "batch_started", "stimulus_id": "s1", "a\nb": 1},
        {"kind": "no\nsuch", "stimulus_id": "s1"},
    ],
    ids=["key", "kind"],
)
def test_journal_show_keeps_to_one_line_whatever_the_fact_says(
    saved: Saved, tmp_path: Path, capsys: pytest.CaptureFixture[str], fact: dict[str, Any]
) -> None:
    lines = saved.data.splitlines(keepends=True)
    lines[2] = _with_field(lines[2], "fact", fact) + b"\n"
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b"".join(lines))
    assert main(["journal", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"plateflow: error: {path}:3: invalid fact")
    assert len(err.splitlines()) == 1, err
