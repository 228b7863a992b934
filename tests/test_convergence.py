"""The convergence guarantees C2-C5 and the batch flows, scenario by scenario."""

from __future__ import annotations

import pytest

from helpers import execution, feed, job, make_batch
from plateflow import ReentrancyError, UsageError
from plateflow.core import (
    Batch,
    BatchMode,
    BatchStarted,
    BatchState,
    CancelRequested,
    CancelSubmission,
    CancelTimedOut,
    CompileAccepted,
    CompileCancelled,
    CompileFailed,
    CompileFailurePolicy,
    CompileSucceeded,
    Decision,
    EngineLost,
    ExecutionCancelled,
    ExecutionFailed,
    ExecutionProgress,
    ExecutionSucceeded,
    Fact,
    HostCallbackFailed,
    PlateOutcome,
    ProgressRecorded,
    Reason,
    ReportBatch,
    ReportError,
    ReportPlate,
    SubmitCompile,
    SubmitExecution,
)


def compiled_all(batch: Batch) -> list[Fact]:
    return [
        CompileSucceeded(plate_id=p, job_id=job(batch, p), artifact_id=f"art-{p}")
        for p in batch.plate_ids
    ]


def reports(decisions: list[Decision]) -> list[ReportPlate]:
    return [d for d in decisions if isinstance(d, ReportPlate)]


def batch_reports(decisions: list[Decision]) -> list[ReportBatch]:
    return [d for d in decisions if isinstance(d, ReportBatch)]


# --- the seed's flows ----------------------------------------------------------------------------


def test_run_batch_compiles_everything_before_any_execution() -> None:
    batch = make_batch(3)
    out = feed(batch, [BatchStarted()])
    assert [d.plate_id for d in out if isinstance(d, SubmitCompile)] == ["p0", "p1", "p2"]
    assert all(batch.plate_state(p) == "queued" for p in batch.plate_ids)
    facts = compiled_all(batch)
    assert not any(isinstance(d, SubmitExecution) for d in feed(batch, facts[:2]))
    barrier = feed(batch, facts[2:])
    submitted = [d for d in barrier if isinstance(d, SubmitExecution)]
    assert [(d.plate_id, d.artifact_id) for d in submitted] == [
        ("p0", "art-p0"),
        ("p1", "art-p1"),
        ("p2", "art-p2"),
    ]
    assert batch.state is BatchState.EXECUTING
    done = feed(
        batch,
        [
            ExecutionSucceeded(plate_id=p, execution_id=execution(batch, p))
            for p in ["p0", "p1", "p2"]
        ],
    )
    assert [r.outcome for r in reports(done)] == [PlateOutcome.COMPLETED] * 3
    (summary,) = [r.summary for r in batch_reports(done)]
    assert summary.outcome is BatchState.COMPLETED
    assert summary.counts == {PlateOutcome.COMPLETED: 3}
    assert summary.reasons == {Reason.SUCCEEDED: 3}


def test_compile_only_batch_rests_plates_in_compiled() -> None:
    batch = make_batch(2, mode=BatchMode.COMPILE_ONLY)
    out = feed(batch, [BatchStarted(), *compiled_all(batch)])
    assert not any(isinstance(d, SubmitExecution) for d in out)
    assert [(r.plate_id, r.outcome, r.result) for r in reports(out)] == [
        ("p0", PlateOutcome.COMPILED, "art-p0"),
        ("p1", PlateOutcome.COMPILED, "art-p1"),
    ]
    assert [batch.plate_state(p) for p in batch.plate_ids] == ["compiled", "compiled"]
    assert batch.state is BatchState.COMPLETED


def test_abort_policy_executes_nothing_and_cancels_queued_compiles() -> None:
    batch = make_batch(3, policy=CompileFailurePolicy.ABORT)
    feed(batch, [BatchStarted(), compiled_all(batch)[0]])
    out = feed(batch, [CompileFailed(plate_id="p1", job_id=job(batch, "p1"), error="bad step")])
    assert [(r.plate_id, r.outcome, r.reason) for r in reports(out)] == [
        ("p1", PlateOutcome.FAILED, Reason.COMPILE_FAILED),
        ("p0", PlateOutcome.CANCELLED, Reason.BATCH_ABORTED),
        ("p2", PlateOutcome.CANCELLED, Reason.BATCH_ABORTED),
    ]
    # p2's compile is still on the engine: it is cancelled there too.
    assert [d for d in out if isinstance(d, CancelSubmission)] == [
        CancelSubmission("p2", "compile", job(batch, "p2"), out[0].stimulus_id)
    ]
    assert not any(isinstance(d, SubmitExecution) for d in out)
    assert batch.state is BatchState.FAILED
    # A late success for an aborted plate is stale: nothing moves, nothing reported.
    late = feed(batch, [compiled_all(batch)[2]])
    assert late == []


def test_continue_policy_executes_the_plates_that_compiled() -> None:
    batch = make_batch(3, policy=CompileFailurePolicy.CONTINUE)
    facts = compiled_all(batch)
    out = feed(
        batch,
        [
            BatchStarted(),
            facts[0],
            CompileFailed(plate_id="p1", job_id=job(batch, "p1"), error="bad"),
            facts[2],
        ],
    )
    assert [d.plate_id for d in out if isinstance(d, SubmitExecution)] == ["p0", "p2"]
    end = feed(
        batch,
        [ExecutionSucceeded(plate_id=p, execution_id=execution(batch, p)) for p in ("p0", "p2")],
    )
    (summary,) = [r.summary for r in batch_reports(end)]
    assert summary.outcome is BatchState.FAILED
    assert summary.counts == {PlateOutcome.FAILED: 1, PlateOutcome.COMPLETED: 2}


# --- C2: exactly once per plate ------------------------------------------------------------------


def test_c2_plate_is_reported_once_however_often_the_engine_repeats_itself() -> None:
    batch = make_batch(2)
    feed(batch, [BatchStarted(), *compiled_all(batch)])
    x0 = execution(batch, "p0")
    out = feed(
        batch,
        [
            ExecutionSucceeded(plate_id="p0", execution_id=x0),
            ExecutionSucceeded(plate_id="p0", execution_id=x0),
            ExecutionFailed(plate_id="p0", execution_id=x0, error="late"),
            ExecutionCancelled(plate_id="p0", execution_id=x0),
        ],
    )
    assert [(r.plate_id, r.outcome) for r in reports(out)] == [("p0", PlateOutcome.COMPLETED)]
    assert [r.disposition.value for r in batch.journal][-4:] == [
        "applied",
        "ignored_stale",
        "ignored_stale",
        "ignored_stale",
    ]


def test_c2_first_terminal_fact_wins_when_cancel_races_completion() -> None:
    batch = make_batch(1)
    feed(batch, [BatchStarted(), *compiled_all(batch)])
    x0 = execution(batch, "p0")
    cancel = feed(batch, [CancelRequested(plate_id="p0")])
    assert cancel == [CancelSubmission("p0", "execute", x0, cancel[0].stimulus_id)]
    out = feed(
        batch,
        [
            ExecutionSucceeded(plate_id="p0", execution_id=x0),
            ExecutionCancelled(plate_id="p0", execution_id=x0),
        ],
    )
    assert [r.outcome for r in reports(out)] == [PlateOutcome.COMPLETED]
    assert batch.plate_state("p0") == "completed"
    assert batch_reports(out)[0].summary.outcome is BatchState.COMPLETED


# --- C3: exactly once per batch, after every plate -----------------------------------------------


def test_c3_batch_is_reported_once_and_after_every_plate() -> None:
    batch = make_batch(3)
    everything = feed(
        batch,
        [
            BatchStarted(),
            *compiled_all(batch),
            *(
                ExecutionSucceeded(plate_id=p, execution_id=execution(batch, p))
                for p in ("p0", "p1")
            ),
            ExecutionFailed(plate_id="p2", execution_id=execution(batch, "p2"), error="x"),
            EngineLost(),
            CancelRequested(),
        ],
    )
    positions = [i for i, d in enumerate(everything) if isinstance(d, ReportBatch)]
    assert len(positions) == 1
    last_plate = max(i for i, d in enumerate(everything) if isinstance(d, ReportPlate))
    assert positions[0] > last_plate


# --- C4: after commit ----------------------------------------------------------------------------


def test_c4_reports_come_back_after_the_change_is_committed_and_journaled() -> None:
    batch = make_batch(1)
    feed(batch, [BatchStarted(), *compiled_all(batch)])
    out = batch.handle(
        ExecutionFailed(plate_id="p0", execution_id=execution(batch, "p0"), error="x")
    )
    report = next(d for d in out if isinstance(d, ReportPlate))
    # By the time the caller holds the report, state and journal already show it.
    assert batch.plate_state("p0") == "failed"
    record = batch.journal[-1]
    assert record.fact.stimulus_id == report.stimulus_id
    assert any(c.plate_id == "p0" and c.new == "failed" for c in record.changes)


def test_c4_handle_is_not_reentrant() -> None:
    calls: list[str] = []
    holder: list[Batch] = []

    def clock() -> float:
        # A clock that calls back into the batch: the only hook the core runs mid-handle.
        if holder and not calls:
            calls.append("re-entered")
            holder[0].handle(EngineLost())
        return 0.0

    batch = Batch("b", ["p0"], clock=clock)
    holder.append(batch)
    with pytest.raises(ReentrancyError, match="handle"):
        batch.handle(BatchStarted())


# --- C5: host faults are contained ---------------------------------------------------------------


def test_c5_host_callback_failure_is_journaled_reported_and_nothing_stops() -> None:
    batch = make_batch(2)
    feed(batch, [BatchStarted(), *compiled_all(batch)])
    first = feed(batch, [ExecutionSucceeded(plate_id="p0", execution_id=execution(batch, "p0"))])
    assert reports(first)
    # The driver's on_plate_completed raised for p0; it hands that in as a fact.
    out = feed(
        batch,
        [HostCallbackFailed(callback="on_plate_completed", plate_id="p0", error="KeyError: 'x'")],
    )
    assert out == [
        ReportError(
            "host_callback_failed",
            "host callback on_plate_completed raised: KeyError: 'x'",
            "p0",
            out[0].stimulus_id,
        )
    ]
    assert batch.journal[-1].detail == "host callback on_plate_completed failed"
    end = feed(batch, [ExecutionSucceeded(plate_id="p1", execution_id=execution(batch, "p1"))])
    assert batch_reports(end)[0].summary.outcome is BatchState.COMPLETED


def test_c5_a_failing_emit_error_is_journaled_but_not_reported_again() -> None:
    batch = make_batch(1)
    assert batch.handle(HostCallbackFailed(callback="emit_error", error="boom")) == ()
    assert batch.journal[-1].fact.kind == "host_callback_failed"


# --- cancellation, engine loss, protocol errors --------------------------------------------------


def test_cancel_batch_settles_unsubmitted_plates_at_once_and_waits_for_the_rest() -> None:
    batch = make_batch(3, policy=CompileFailurePolicy.CONTINUE)
    facts = compiled_all(batch)
    feed(batch, [BatchStarted(), facts[0], facts[1]])
    out = feed(batch, [CancelRequested()])
    assert batch.state is BatchState.CANCELLING
    # p0/p1 wait at the barrier with nothing in flight; p2's compile is on the engine.
    assert [(r.plate_id, r.reason) for r in reports(out)] == [
        ("p0", Reason.CANCEL_REQUESTED),
        ("p1", Reason.CANCEL_REQUESTED),
    ]
    assert [d.submission_id for d in out if isinstance(d, CancelSubmission)] == [job(batch, "p2")]
    end = feed(batch, [CompileCancelled(plate_id="p2", job_id=job(batch, "p2"))])
    assert [r.plate_id for r in reports(end)] == ["p2"]
    assert batch_reports(end)[0].summary.outcome is BatchState.CANCELLED


def test_cancel_before_start_cancels_everything() -> None:
    batch = make_batch(2)
    out = feed(batch, [CancelRequested(), BatchStarted()])
    assert [r.outcome for r in reports(out)] == [PlateOutcome.CANCELLED] * 2
    assert batch.state is BatchState.CANCELLED
    assert batch.journal[-1].disposition.value == "ignored_stale"


def test_unconfirmed_cancel_settles_after_the_timeout_fact() -> None:
    batch = make_batch(1)
    feed(batch, [BatchStarted(), CompileAccepted(plate_id="p0", job_id=job(batch, "p0"))])
    feed(batch, [CancelRequested(plate_id="p0")])
    out = feed(batch, [CancelTimedOut(plate_id="p0")])
    assert [(r.outcome, r.reason) for r in reports(out)] == [
        (PlateOutcome.CANCELLED, Reason.CANCEL_UNCONFIRMED)
    ]


def test_engine_lost_fails_every_unsettled_plate_not_cancels() -> None:
    batch = make_batch(3)
    feed(batch, [BatchStarted(), *compiled_all(batch)])
    feed(batch, [ExecutionSucceeded(plate_id="p0", execution_id=execution(batch, "p0"))])
    out = feed(batch, [EngineLost(reason="heartbeat missed for 3.0 s")])
    assert [(r.plate_id, r.outcome, r.reason) for r in reports(out)] == [
        ("p1", PlateOutcome.FAILED, Reason.ENGINE_LOST),
        ("p2", PlateOutcome.FAILED, Reason.ENGINE_LOST),
    ]
    assert reports(out)[0].result == "heartbeat missed for 3.0 s"
    assert batch.state is BatchState.FAILED


def test_impossible_fact_is_a_protocol_error_not_a_crash() -> None:
    batch = make_batch(2, policy=CompileFailurePolicy.CONTINUE)
    feed(batch, [BatchStarted()])
    out = feed(batch, [ExecutionSucceeded(plate_id="p0", execution_id=execution(batch, "p0"))])
    errors = [d for d in out if isinstance(d, ReportError)]
    assert [e.code for e in errors] == ["engine_protocol_error"]
    assert "no execution was submitted" in errors[0].message
    assert [(r.plate_id, r.reason) for r in reports(out)] == [("p0", Reason.ENGINE_PROTOCOL_ERROR)]
    assert batch.journal[-1].disposition.value == "rejected"
    assert batch.plate_state("p1") == "queued", "other plates are untouched"


def test_progress_is_monotone_and_never_moves_the_state() -> None:
    batch = make_batch(1)
    feed(batch, [BatchStarted(), *compiled_all(batch)])
    x0 = execution(batch, "p0")
    out = feed(
        batch,
        [
            ExecutionProgress(plate_id="p0", execution_id=x0, done=2, total=4),
            ExecutionProgress(plate_id="p0", execution_id=x0, done=1, total=4),
            ExecutionProgress(plate_id="p0", execution_id=x0, done=3, total=4),
        ],
    )
    assert [(d.done, d.total) for d in out if isinstance(d, ProgressRecorded)] == [(2, 4), (3, 4)]
    assert batch.journal[-2].detail.startswith("stale: progress 1 is behind 2")
    assert batch.plate_state("p0") == "executing"


# --- batch outcome rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ends", "expected"),
    [
        (("ok", "ok"), BatchState.COMPLETED),
        (("ok", "fail"), BatchState.FAILED),
        (("ok", "cancel"), BatchState.CANCELLED),
        (("fail", "cancel"), BatchState.FAILED),
    ],
)
def test_batch_outcome_rule(ends: tuple[str, str], expected: BatchState) -> None:
    batch = make_batch(2)
    feed(batch, [BatchStarted(), *compiled_all(batch)])
    out: list[Decision] = []
    for plate, end in zip(("p0", "p1"), ends, strict=True):
        x = execution(batch, plate)
        if end == "ok":
            out += feed(batch, [ExecutionSucceeded(plate_id=plate, execution_id=x)])
        elif end == "fail":
            out += feed(batch, [ExecutionFailed(plate_id=plate, execution_id=x, error="e")])
        else:
            out += feed(
                batch,
                [
                    CancelRequested(plate_id=plate),
                    ExecutionCancelled(plate_id=plate, execution_id=x),
                ],
            )
    assert batch_reports(out)[0].summary.outcome is expected


# --- construction errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plates", "message"),
    [
        ([], "at least one plate"),
        (["a", "b", "a"], "repeated: \\['a'\\]"),
        (["a", ""], "non-empty strings"),
    ],
)
def test_bad_batches_are_refused_with_a_clear_message(plates: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        Batch("b", plates, clock=lambda: 0.0)


def test_repr_and_statistics_show_the_state() -> None:
    batch = make_batch(2)
    feed(batch, [BatchStarted()])
    assert repr(batch) == "<Batch 'b' compiling mode=run plates=2 unsettled=2>"
    stats = batch.statistics()
    assert stats["plates_per_state"] == {"queued": 2}
    assert stats["facts_per_disposition"] == {"applied": 1}


# --- pinned regressions (found by the property tests) ---------------------------------------


@pytest.mark.parametrize("policy", list(CompileFailurePolicy))
def test_regression_protocol_error_before_start_then_start(policy: CompileFailurePolicy) -> None:
    """Found by the journal round-trip property: BatchStarted after a plate had
    already failed tried to select the failed plate (InvalidTransition)."""
    batch = make_batch(2, policy=policy)
    feed(batch, [CompileAccepted(plate_id="p0", job_id="b.0.c")])
    assert batch.plate_state("p0") == "failed"
    out = feed(batch, [BatchStarted()])
    if policy is CompileFailurePolicy.ABORT:
        assert not any(isinstance(d, SubmitCompile) for d in out), "abort: submit nothing"
        assert [(r.plate_id, r.reason) for r in reports(out)] == [("p1", Reason.BATCH_ABORTED)]
        assert batch.state is BatchState.FAILED
    else:
        assert [d.plate_id for d in out if isinstance(d, SubmitCompile)] == ["p1"]
        assert batch.plate_state("p1") == "queued"


def test_regression_the_same_progress_record_twice_reaches_the_host_once() -> None:
    """Found by the stateful test: a re-sent record was applied and reported again."""
    batch = make_batch(1)
    feed(batch, [BatchStarted(), *compiled_all(batch)])
    x0 = execution(batch, "p0")
    out = feed(
        batch,
        [
            ExecutionProgress(plate_id="p0", execution_id=x0, done=2, total=4),
            ExecutionProgress(plate_id="p0", execution_id=x0, done=2, total=4),
        ],
    )
    assert len([d for d in out if isinstance(d, ProgressRecorded)]) == 1
    assert batch.journal[-1].disposition.value == "ignored_duplicate"


def test_regression_abort_does_not_cancel_a_submission_twice() -> None:
    """Found by the stateful test: abort re-sent a cancel to a plate whose cancel was pending."""
    batch = make_batch(2)
    feed(batch, [BatchStarted(), CancelRequested(plate_id="p1")])
    out = feed(batch, [CompileFailed(plate_id="p0", job_id=job(batch, "p0"), error="bad")])
    assert [d for d in out if isinstance(d, CancelSubmission)] == []
    assert [(r.plate_id, r.reason) for r in reports(out)] == [
        ("p0", Reason.COMPILE_FAILED),
        ("p1", Reason.BATCH_ABORTED),
    ]
