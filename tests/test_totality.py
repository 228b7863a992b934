"""Totality: every plate state x every fact kind has exactly one, stated outcome.

Layer 1 of the property tests (STYLE.md habit 8). ``EXPECTED`` below is the
whole behaviour of a plate, written out as a literal table: for each fact
kind, what becomes of it (applied / ignored / rejected) and which state the
plate is in afterwards, for each state the plate can be in. The test walks
every cell, and also checks that every move it saw is a row of PLATE_TABLE.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from helpers import execution, feed, job, make_batch
from plateflow.core import (
    PLATE_TABLE,
    Batch,
    BatchResumed,
    BatchStarted,
    CancelRequested,
    CancelTimedOut,
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
    PlateState,
    ReportError,
    ReportPlate,
    SubmissionLost,
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


A = Disposition.APPLIED
S = Disposition.IGNORED_STALE
D = Disposition.IGNORED_DUPLICATE
R = Disposition.REJECTED
_ = None  # the plate keeps the state it had

# Columns: idle, queued, compiling, compiled, submitted, executing, completed, failed, cancelled
# A cell is (disposition, p0's state afterwards or _ for unchanged).
FAIL = (R, "failed")  # an impossible fact: engine protocol error, the plate fails
STALE_T = (S, _)  # any plate fact once the plate settled
# fmt: off
EXPECTED_CURRENT: dict[str, tuple[tuple[Disposition, str | None], ...]] = {
    "CompileAccepted":        (FAIL, (A, "compiling"), (D, _), (D, _), (D, _), (D, _), STALE_T, STALE_T, STALE_T),  # noqa: E501
    "CompileSucceeded":       (FAIL, (A, "compiled"), (A, "compiled"), (D, _), (D, _), (D, _), STALE_T, STALE_T, STALE_T),  # noqa: E501
    "CompileFailed":          (FAIL, (A, "failed"), (A, "failed"), FAIL, FAIL, FAIL, STALE_T, STALE_T, STALE_T),  # noqa: E501
    "CompileRejected":        (FAIL, (A, "failed"), (A, "failed"), FAIL, FAIL, FAIL, STALE_T, STALE_T, STALE_T),  # noqa: E501
    "CompileCancelled":       (FAIL, (A, "cancelled"), (A, "cancelled"), (S, _), (S, _), (S, _), STALE_T, STALE_T, STALE_T),  # noqa: E501
    "ExecutionAccepted":      (FAIL, FAIL, FAIL, FAIL, (A, "executing"), (D, _), STALE_T, STALE_T, STALE_T),  # noqa: E501
    "ExecutionStarted":       (FAIL, FAIL, FAIL, FAIL, (A, "executing"), (A, _), STALE_T, STALE_T, STALE_T),  # noqa: E501
    "ExecutionProgress":      (FAIL, FAIL, FAIL, FAIL, (A, "executing"), (A, _), STALE_T, STALE_T, STALE_T),  # noqa: E501
    "ExecutionSucceeded":     (FAIL, FAIL, FAIL, FAIL, (A, "completed"), (A, "completed"), STALE_T, STALE_T, STALE_T),  # noqa: E501
    "ExecutionFailed":        (FAIL, FAIL, FAIL, FAIL, (A, "failed"), (A, "failed"), STALE_T, STALE_T, STALE_T),  # noqa: E501
    "ExecutionRejected":      (FAIL, FAIL, FAIL, FAIL, (A, "failed"), FAIL, STALE_T, STALE_T, STALE_T),  # noqa: E501
    "ExecutionCancelled":     (FAIL, FAIL, FAIL, FAIL, (A, "cancelled"), (A, "cancelled"), STALE_T, STALE_T, STALE_T),  # noqa: E501
    "CancelRequested(plate)": ((A, "cancelled"), (A, _), (A, _), (A, "cancelled"), (A, _), (A, _), STALE_T, STALE_T, STALE_T),  # noqa: E501
    "CancelRequested(batch)": ((A, "cancelled"), (A, _), (A, _), (A, "cancelled"), (A, _), (A, _), (A, _), (A, _), (A, _)),  # noqa: E501
    "CancelTimedOut":         ((S, _), (S, _), (S, _), (S, _), (S, _), (S, _), STALE_T, STALE_T, STALE_T),  # noqa: E501
    "EngineLost":             ((A, "failed"), (A, "failed"), (A, "failed"), (A, "failed"), (A, "failed"), (A, "failed"), (A, _), (A, _), (A, _)),  # noqa: E501
    "BatchStarted":           ((A, "queued"), (D, _), (D, _), (D, _), (D, _), (D, _), (D, _), (D, _), (D, _)),  # noqa: E501
    "HostCallbackFailed":     ((A, _),) * 9,
    "BatchResumed":           ((A, _),) * 9,
    "SubmissionLost(compile)":           ((S, _), (A, "failed"), (A, "failed"), (S, _), (S, _), (S, _), STALE_T, STALE_T, STALE_T),  # noqa: E501
    "SubmissionLost(execute)":           ((S, _), (S, _), (S, _), (S, _), (A, "failed"), (A, "failed"), STALE_T, STALE_T, STALE_T),  # noqa: E501
    "SubmissionLost(compile, resubmit)": ((S, _), (A, _), (A, _), (S, _), (S, _), (S, _), STALE_T, STALE_T, STALE_T),  # noqa: E501
    "SubmissionLost(execute, resubmit)": ((S, _), (S, _), (S, _), (S, _), (A, _), (A, _), STALE_T, STALE_T, STALE_T),  # noqa: E501
}
# fmt: on

# With ids the plate was never given: a compile fact before any compile was
# submitted, or an execution fact before the barrier, is impossible; an id
# that is merely not the current one is stale.
_COMPILE_KINDS = (
    "CompileAccepted",
    "CompileSucceeded",
    "CompileFailed",
    "CompileRejected",
    "CompileCancelled",
)
_EXECUTION_KINDS = (
    "ExecutionAccepted",
    "ExecutionStarted",
    "ExecutionProgress",
    "ExecutionSucceeded",
    "ExecutionFailed",
    "ExecutionRejected",
    "ExecutionCancelled",
)
# fmt: off
EXPECTED_STALE_IDS: dict[str, tuple[tuple[Disposition, str | None], ...]] = {
    **dict.fromkeys(_COMPILE_KINDS, (FAIL, (S, _), (S, _), (S, _), (S, _), (S, _), STALE_T, STALE_T, STALE_T)),  # noqa: E501
    **dict.fromkeys(_EXECUTION_KINDS, (FAIL, FAIL, FAIL, FAIL, (S, _), (S, _), STALE_T, STALE_T, STALE_T)),  # noqa: E501
}
# fmt: on

_ROWS = {(r.source, r.event.value): r for r in PLATE_TABLE}
_CONVERGENCE = {(r.source, r.dest) for r in PLATE_TABLE if r.convergence}


def _cases() -> list[tuple[str, str, int, tuple[Disposition, str | None]]]:
    cases = []
    for ids, table in (("current", EXPECTED_CURRENT), ("stale", EXPECTED_STALE_IDS)):
        for kind, cells in table.items():
            assert len(cells) == len(COLUMNS), kind
            for column, cell in enumerate(cells):
                cases.append((ids, kind, column, cell))
    return cases


def test_the_expectation_covers_every_fact_kind() -> None:
    b = make_batch()
    assert set(EXPECTED_CURRENT) == set(_facts(b, "current"))
    compile_or_execution = {k for k in _facts(b, "stale") if k.startswith(("Compile", "Exec"))}
    assert set(EXPECTED_STALE_IDS) == compile_or_execution


@pytest.mark.parametrize(
    ("ids", "kind", "column", "cell"),
    _cases(),
    ids=[f"{i}-{k}-in-{COLUMNS[c]}" for i, k, c, _cell in _cases()],
)
def test_every_state_and_fact(
    ids: str, kind: str, column: int, cell: tuple[Disposition, str | None]
) -> None:
    batch = make_batch(2, policy=CompileFailurePolicy.CONTINUE)
    state_name = COLUMNS[column]
    feed(batch, SETUPS[state_name](batch))
    before = batch.snapshot()
    assert before.plate("p0").state == ("compiled" if state_name == "submitted" else state_name), (
        "setup did not reach the state"
    )
    records_before = len(batch.journal)

    decisions = batch.handle(_facts(batch, ids)[kind])  # must not raise

    disposition, expected_state = cell
    record = batch.journal[-1]
    assert len(batch.journal) == records_before + 1, "every fact is journaled exactly once"
    assert record.disposition is disposition, record.detail
    after = batch.snapshot().plate("p0")
    assert after.state == (expected_state or before.plate("p0").state)
    if disposition in (Disposition.IGNORED_STALE, Disposition.IGNORED_DUPLICATE):
        assert batch.snapshot() == before, "an ignored fact changes nothing"
        assert record.changes == ()
    if cell is FAIL:
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
