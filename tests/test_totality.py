"""Totality: every state x every fact kind has exactly one, stated outcome.

Layer 1 of the property tests (STYLE.md habit 8). The expectations are the
fact tables themselves (``PLATE_FACTS``, ``BATCH_FACTS`` in core/tables.py):
for every setup that puts plate p0 (or the batch) in a column, and every fact
kind with the current, a foreign or a not-yet-issued submission id, the test
finds the cell the tables give *without asking the batch*, hands the fact in
under both compile-failure policies (the batch facts under both modes too),
and checks that the journal records the cell's disposition and that p0 ends
where the cell's moves and settlement lead. It also checks the tables
themselves: every key has a cell in every column, and every cell's moves
are rows of PLATE_TABLE from its column. Which cells are reachable at all is
the explorer's job (test_explorer.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest

from helpers import execution, feed, job, make_batch
from plateflow.core import (
    BATCH_CELLS,
    BATCH_COLUMNS,
    PLATE_CELLS,
    PLATE_COLUMNS,
    PLATE_TABLE,
    SETTLED,
    Batch,
    BatchMode,
    BatchResumed,
    BatchStarted,
    BatchState,
    CancelRequested,
    CancelTimedOut,
    Cell,
    CompileAccepted,
    CompileCancelled,
    CompileFailed,
    CompileFailurePolicy,
    CompileRejected,
    CompileSucceeded,
    Disposition,
    EngineLost,
    ExecutionAccepted,
    ExecutionCancelled,
    ExecutionFailed,
    ExecutionProgress,
    ExecutionRejected,
    ExecutionStarted,
    ExecutionSucceeded,
    Fact,
    HostCallbackFailed,
    IdMatch,
    PlateState,
    ReportBatch,
    ReportError,
    ReportPlate,
    Rule,
    SubmissionLost,
    fact_key,
)

# Where plate p0 can be, and the facts (for p0 unless said) that take it there.
# p1 stays unsettled throughout, so the batch never settles under the test.
# "compiled" waits at the barrier (no execution id yet); "submitted" has
# passed it (execution submitted, not yet accepted).
SETUPS: dict[str, Callable[[Batch], list[Fact]]] = {
    "idle": lambda b: [],
    "queued": lambda b: [BatchStarted()],
    "compiling": lambda b: [BatchStarted(), CompileAccepted(plate_id="p0", job_id=job(b, "p0"))],
    "compiled": lambda b: [
        BatchStarted(),
        CompileSucceeded(plate_id="p0", job_id=job(b, "p0"), artifact_id="a0"),
    ],
    "submitted": lambda b: [
        BatchStarted(),
        CompileSucceeded(plate_id="p0", job_id=job(b, "p0"), artifact_id="a0"),
        CompileSucceeded(plate_id="p1", job_id=job(b, "p1"), artifact_id="a1"),
    ],
    "executing": lambda b: [
        *SETUPS["submitted"](b),
        ExecutionAccepted(plate_id="p0", execution_id=execution(b, "p0")),
    ],
    "completed": lambda b: [
        *SETUPS["submitted"](b),
        ExecutionSucceeded(plate_id="p0", execution_id=execution(b, "p0")),
    ],
    "failed": lambda b: [
        *SETUPS["submitted"](b),
        ExecutionFailed(plate_id="p0", execution_id=execution(b, "p0"), error="x"),
    ],
    "cancelled": lambda b: [
        *SETUPS["submitted"](b),
        CancelRequested(plate_id="p0"),
        ExecutionCancelled(plate_id="p0", execution_id=execution(b, "p0")),
    ],
}
COLUMNS = tuple(SETUPS)


def _facts(b: Batch, ids: str) -> dict[str, Fact]:
    """One fact of every kind about p0; ``ids`` is "current" or "stale"."""
    j = job(b, "p0") if ids == "current" else "elsewhere.0.c"
    x = execution(b, "p0") if ids == "current" else "elsewhere.0.x"
    return {
        "CompileAccepted": CompileAccepted(plate_id="p0", job_id=j),
        "CompileSucceeded": CompileSucceeded(plate_id="p0", job_id=j, artifact_id="a0"),
        "CompileFailed": CompileFailed(plate_id="p0", job_id=j, error="e"),
        "CompileRejected": CompileRejected(plate_id="p0", job_id=j, error="e"),
        "CompileCancelled": CompileCancelled(plate_id="p0", job_id=j),
        "ExecutionAccepted": ExecutionAccepted(plate_id="p0", execution_id=x),
        "ExecutionStarted": ExecutionStarted(plate_id="p0", execution_id=x),
        "ExecutionProgress": ExecutionProgress(plate_id="p0", execution_id=x, done=1, total=3),
        "ExecutionSucceeded": ExecutionSucceeded(plate_id="p0", execution_id=x),
        "ExecutionFailed": ExecutionFailed(plate_id="p0", execution_id=x, error="e"),
        "ExecutionRejected": ExecutionRejected(plate_id="p0", execution_id=x, error="e"),
        "ExecutionCancelled": ExecutionCancelled(plate_id="p0", execution_id=x),
        "CancelRequested(plate)": CancelRequested(plate_id="p0"),
        "CancelRequested(batch)": CancelRequested(),
        "CancelTimedOut": CancelTimedOut(plate_id="p0"),
        "EngineLost": EngineLost(),
        "BatchStarted": BatchStarted(),
        "HostCallbackFailed": HostCallbackFailed(callback="emit_status", plate_id="p0", error="e"),
        "BatchResumed": BatchResumed(note="n"),
        "SubmissionLost(compile)": SubmissionLost(plate_id="p0", phase="compile", submission_id=j),
        "SubmissionLost(execute)": SubmissionLost(plate_id="p0", phase="execute", submission_id=x),
        "SubmissionLost(compile, resubmit)": SubmissionLost(
            plate_id="p0", phase="compile", submission_id=j, resubmit=True
        ),
        "SubmissionLost(execute, resubmit)": SubmissionLost(
            plate_id="p0", phase="execute", submission_id=x, resubmit=True
        ),
    }


# Where each setup puts p0, as a column of PLATE_FACTS, and which of its own
# submission ids the batch has issued by then ("submitted" has passed the barrier).
COLUMN: dict[str, PlateState | str] = {
    "idle": PlateState.IDLE,
    "queued": PlateState.QUEUED,
    "compiling": PlateState.COMPILING,
    "compiled": PlateState.COMPILED,
    "submitted": PlateState.COMPILED,
    "executing": PlateState.EXECUTING,
    "completed": SETTLED,
    "failed": SETTLED,
    "cancelled": SETTLED,
}
ISSUED = {
    "idle": (),
    "queued": ("compile",),
    "compiling": ("compile",),
    "compiled": ("compile",),
    "submitted": ("compile", "execute"),
    "executing": ("compile", "execute"),
    "completed": ("compile", "execute"),
    "failed": ("compile", "execute"),
    "cancelled": ("compile", "execute"),
}
_COMPILE_KINDS = {
    "CompileAccepted",
    "CompileSucceeded",
    "CompileFailed",
    "CompileRejected",
    "CompileCancelled",
    "SubmissionLost(compile)",
    "SubmissionLost(compile, resubmit)",
}
# What a rule does to p0 in these setups, where no cancel is pending, nothing
# started and no progress was recorded: p0's state afterwards. A rule missing
# here leaves the state to the cell's moves and settlement.
_RULE_ENDS: dict[tuple[Rule, str | None], PlateState] = {
    (Rule.CANCEL, "idle"): PlateState.CANCELLED,  # nothing at the engine: settles at once
    (Rule.CANCEL, "compiled"): PlateState.CANCELLED,  # waiting at the barrier: nothing to stop
    (Rule.CANCELLED, None): PlateState.CANCELLED,
}
_ROWS = {(r.source, r.event.value): r for r in PLATE_TABLE}
_CONVERGENCE = {(r.source, r.dest) for r in PLATE_TABLE if r.convergence}


def _is_batch_fact(fact: Fact) -> bool:
    return (fact_key(fact), None, BatchState.IDLE) in BATCH_CELLS


def _expected(kind: str, ids: str, state_name: str, fact: Fact) -> tuple[Cell, PlateState | None]:
    """The cell the tables give for this fact in this setup, and p0's state afterwards."""
    column = COLUMN[state_name]
    match = None
    if kind.startswith(("Compile", "Execution", "SubmissionLost")):
        phase = "compile" if kind in _COMPILE_KINDS else "execute"
        if ids == "stale":
            match = IdMatch.OTHER
        else:
            match = IdMatch.CURRENT if phase in ISSUED[state_name] else IdMatch.UNISSUED
    cell = PLATE_CELLS[(fact_key(fact), match, column)]
    if column == SETTLED or cell.disposition is not Disposition.APPLIED:
        return cell, (PlateState.FAILED if cell.disposition is Disposition.REJECTED else None)
    state = PlateState(column)
    for event in cell.moves:
        state = _ROWS[(state, str(event))].dest or state
    if cell.settle is not None:
        state = PlateState(cell.settle[0].value)
    if cell.rule is not None:
        state = _RULE_ENDS.get((cell.rule, state_name), _RULE_ENDS.get((cell.rule, None), state))
    if cell.rule is Rule.LOST:
        resubmit = isinstance(fact, SubmissionLost) and fact.resubmit
        state = PlateState(column) if resubmit else PlateState.FAILED
    return cell, state


def _cases() -> list[tuple[str, str, str]]:
    b = make_batch()
    return [
        (ids, kind, column)
        for ids in ("current", "stale")
        for kind, fact in _facts(b, ids).items()
        for column in COLUMNS
        if not _is_batch_fact(fact)
        if ids == "current" or kind.startswith(("Compile", "Exec", "SubmissionLost"))
    ]


@pytest.mark.parametrize("policy", list(CompileFailurePolicy))
@pytest.mark.parametrize(
    ("ids", "kind", "state_name"), _cases(), ids=[f"{i}-{k}-in-{c}" for i, k, c in _cases()]
)
def test_every_plate_state_and_plate_fact(
    ids: str, kind: str, state_name: str, policy: CompileFailurePolicy
) -> None:
    batch = make_batch(2, policy=policy)
    feed(batch, SETUPS[state_name](batch))
    before = batch.snapshot()
    assert before.plate("p0").state == ("compiled" if state_name == "submitted" else state_name), (
        "setup did not reach the state"
    )
    records_before = len(batch.journal)
    fact = _facts(batch, ids)[kind]
    cell, expected_state = _expected(kind, ids, state_name, fact)
    assert cell.disposition is not None, f"a setup reached a cell that cannot be: {cell}"
    assert batch.lookup(fact) == cell, "the batch looks up the cell the tables give"

    decisions = batch.handle(fact)  # must not raise

    record = batch.journal[-1]
    disposition = cell.disposition
    if cell.rule is Rule.TIME_OUT:
        disposition = Disposition.IGNORED_STALE  # no cancel is pending in any setup
    assert len(batch.journal) == records_before + 1, "every fact is journaled exactly once"
    assert record.disposition is disposition, record.detail
    after = batch.snapshot().plate("p0")
    if disposition is Disposition.APPLIED or cell.disposition is Disposition.REJECTED:
        assert after.state == (expected_state or before.plate("p0").state)
    if disposition in (Disposition.IGNORED_STALE, Disposition.IGNORED_DUPLICATE):
        assert batch.snapshot() == before, "an ignored fact changes nothing"
        assert record.changes == ()
    if disposition is Disposition.REJECTED:
        assert after.reason == "engine_protocol_error"
        assert any(isinstance(d, ReportError) for d in decisions)
    # Every move p0 made is a row of the table; settling uses a convergence row.
    for change in record.changes:
        if change.plate_id != "p0" or change.old == change.new:
            continue
        if change.note.startswith("settled"):
            assert (change.old, change.new) in _CONVERGENCE
        else:
            row = _ROWS[(change.old, change.note)]
            assert row.dest == change.new
            assert not row.convergence
    reports = [d for d in decisions if isinstance(d, ReportPlate) and d.plate_id == "p0"]
    newly_settled = before.plate("p0").outcome is None and after.outcome is not None
    assert len(reports) == (1 if newly_settled else 0), "C2: one report when the plate settles"


def test_the_tables_cover_every_kind_id_relation_and_column() -> None:
    """Every fact key has a cell in every column and, for submissions, every id relation."""
    b = make_batch()
    keys = {fact_key(f) for ids in ("current", "stale") for f in _facts(b, ids).values()}
    assert keys == {k for k, _i, _c in PLATE_CELLS} | {k for k, _i, _c in BATCH_CELLS}
    for key in keys:
        if (key, None, BatchState.IDLE) in BATCH_CELLS:
            assert all((key, None, c) in BATCH_CELLS for c in BATCH_COLUMNS), key
            continue
        relations = [None] if (key, None, PlateState.IDLE) in PLATE_CELLS else list(IdMatch)
        for match in relations:
            assert all((key, match, c) in PLATE_CELLS for c in PLATE_COLUMNS), (key, match)


@pytest.mark.parametrize(("key", "ids", "column"), list(PLATE_CELLS))
def test_every_plate_cell_is_a_legal_path_through_the_move_table(
    key: str, ids: IdMatch | None, column: PlateState | str
) -> None:
    """A cell's moves are rows of PLATE_TABLE from its column; it settles by a convergence row."""
    cell = PLATE_CELLS[(key, ids, column)]
    if cell.disposition is not Disposition.APPLIED:
        assert not cell.moves
        assert cell.rule is None
        assert (cell.settle is not None) == (cell.disposition is Disposition.REJECTED)
        return
    assert column != SETTLED, "nothing about a settled plate applies"
    state = PlateState(column)
    for event in cell.moves:
        row = _ROWS.get((state, str(event)))
        assert row is not None, f"{key}: no row {event} from {state}"
        assert not row.convergence
        state = row.dest or state
    if cell.settle is not None:
        outcome, _reason = cell.settle
        assert (state, PlateState(outcome.value)) in _CONVERGENCE, f"{key}: settle from {state}"


# Where the batch can be, and the facts that take it there (two plates).
BATCH_SETUPS: dict[str, Callable[[Batch], list[Fact]]] = {
    "idle": lambda b: [],
    "compiling": lambda b: [BatchStarted()],
    "executing": lambda b: SETUPS["submitted"](b),
    "cancelling": lambda b: [BatchStarted(), CancelRequested()],
    "settled": lambda b: [BatchStarted(), EngineLost()],
}
BATCH_FACT = {
    "batch_started": BatchStarted,
    "cancel_requested[batch]": CancelRequested,
    "engine_lost": EngineLost,
    "host_callback_failed": partial(HostCallbackFailed, callback="emit_status", error="e"),
    "batch_resumed": partial(BatchResumed, note="n"),
}


@pytest.mark.parametrize("policy", list(CompileFailurePolicy))
@pytest.mark.parametrize("mode", list(BatchMode))
@pytest.mark.parametrize("column", list(BATCH_SETUPS))
@pytest.mark.parametrize("kind", list(BATCH_FACT))
def test_every_batch_state_and_batch_fact(
    kind: str, column: str, mode: BatchMode, policy: CompileFailurePolicy
) -> None:
    if column == "executing" and mode is BatchMode.COMPILE_ONLY:
        column = "compiling"  # a compile-only batch never passes the barrier
    batch = make_batch(2, mode=mode, policy=policy)
    feed(batch, BATCH_SETUPS[column](batch))
    where = SETTLED if batch.state.is_terminal else batch.state
    assert where == column, "the setup did not reach the column"
    cell = BATCH_CELLS[(kind, None, where)]
    fact = BATCH_FACT[kind]()
    assert batch.lookup(fact) == cell
    before = batch.snapshot()

    decisions = batch.handle(fact)

    record = batch.journal[-1]
    assert record.disposition is cell.disposition, record.detail
    if cell.disposition is not Disposition.APPLIED:
        assert batch.snapshot() == before
        assert record.changes == ()
    batch_moves = [c.note for c in record.changes if c.plate_id is None]
    assert batch_moves[: len(cell.moves)] == [str(e) for e in cell.moves]
    if cell.rule is Rule.ENGINE_LOST:  # failed, unless the host had asked to cancel it all
        cancelled = column == "cancelling"
        assert batch.state is (BatchState.CANCELLED if cancelled else BatchState.FAILED)
        assert [type(d) for d in decisions].count(ReportBatch) == 1
    if cell.rule is Rule.CANCEL_ALL:
        assert batch.snapshot().cancel_requested


def test_unknown_plate_is_rejected_and_changes_nothing() -> None:
    batch = make_batch(2)
    feed(batch, SETUPS["compiling"](batch))
    before = batch.snapshot()
    decisions = batch.handle(CompileAccepted(plate_id="nope", job_id="b.9.c"))
    assert batch.journal[-1].disposition is Disposition.REJECTED
    assert batch.snapshot() == before
    (error,) = decisions
    assert isinstance(error, ReportError)
    assert error.code == "unknown_plate"
    assert "nope" in error.message


@pytest.mark.parametrize("state", list(PlateState))
def test_terminal_states_have_no_way_out(state: PlateState) -> None:
    outgoing = [r for r in PLATE_TABLE if r.source is state]
    assert (outgoing == []) == state.is_terminal
