"""The journal: every fact recorded, JSON Lines round trip, stories, replay."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import execution, feed, job, make_batch, ticking_clock
from plateflow import JournalError, replay
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
