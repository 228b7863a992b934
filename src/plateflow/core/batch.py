"""The batch: one batch machine and one plate machine per plate, driven by facts.

Theory of operation: ``Batch.handle(fact)`` is the only way in. It classifies
the fact (applied, stale, duplicate, impossible), moves the plates the tables
allow, then computes the batch's own reactions (the compile barrier, batch
convergence) once the plate moves are done, appends one journal record and
returns the decisions. Nothing here touches an engine, a host, a clock or a
thread: the caller injects the clock and carries out the decisions, which is
what lets the property tests push tens of thousands of orderings through it.

Settling a plate or the batch goes through :meth:`Batch._converge` and
:meth:`Batch._converge_batch` only. They are the single convergence path
(C1): they alone take the guarded terminal rows, mark a plate settled exactly
once (C2, write-once terminals) and emit the batch report after the last
plate (C3). Because reports are returned rather than called, and returned
after the journal record is appended, a host always sees committed state (C4).

Classification of an engine fact about a plate, in order:

1. the plate is not in the batch: rejected (``unknown_plate``), no plate moves;
2. the plate already settled: ignored as stale (first terminal fact wins);
3. the fact names a submission the batch never issued for that plate (a
   compile fact for a plate with no compile job, an execution fact before the
   execution was submitted): impossible, so an engine protocol error;
4. the fact's submission id is not the plate's current one: ignored as stale;
5. the plate already passed the move the fact reports: ignored as duplicate;
6. otherwise the move is applied, together with any earlier move the fact
   implies (a compile success that overtook its acceptance on the way).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal

from pydantic import JsonValue

from plateflow.core.decisions import (
    BatchChanged,
    BatchSummary,
    CancelSubmission,
    Decision,
    PlateChanged,
    PlateSettlement,
    ProgressRecorded,
    ReportBatch,
    ReportError,
    ReportPlate,
    SettledPlate,
    SubmitCompile,
    SubmitExecution,
)
from plateflow.core.facts import (
    BatchResumed,
    BatchStarted,
    CancelRequested,
    CancelTimedOut,
    CompileAccepted,
    CompileCancelled,
    CompileFailed,
    CompileRejected,
    CompileSucceeded,
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
    SubmissionLost,
)
from plateflow.core.journal import Change, Disposition, Journal, JournalHeader, Record
from plateflow.core.machines import TableMachine
from plateflow.core.snapshot import BatchSnapshot, PlateSnapshot
from plateflow.core.tables import (
    BATCH_TABLE,
    PLATE_TABLE,
    BatchEvent,
    BatchMode,
    BatchState,
    CompileFailurePolicy,
    PlateEvent,
    PlateOutcome,
    PlateState,
    Reason,
)
from plateflow.errors import ErrorCode, PlateflowBug, ReentrancyError, UsageError

__all__ = ["Batch"]

_P = PlateState

_PLATE_EVENT_FOR: Final = {
    PlateOutcome.COMPLETED: PlateEvent.CONVERGE_COMPLETED,
    PlateOutcome.FAILED: PlateEvent.CONVERGE_FAILED,
    PlateOutcome.CANCELLED: PlateEvent.CONVERGE_CANCELLED,
}
_BATCH_EVENT_FOR: Final = {
    BatchState.COMPLETED: BatchEvent.CONVERGE_COMPLETED,
    BatchState.FAILED: BatchEvent.CONVERGE_FAILED,
    BatchState.CANCELLED: BatchEvent.CONVERGE_CANCELLED,
}
_ABORTING_REASONS: Final = frozenset(
    {Reason.COMPILE_FAILED, Reason.COMPILE_REJECTED, Reason.ENGINE_PROTOCOL_ERROR}
)
_SUCCESS: Final = frozenset({PlateOutcome.COMPLETED, PlateOutcome.COMPILED})
_SETTLED_NOTE: Final = {reason: f"settled: {reason.value}" for reason in Reason}


class _Dropped(Exception):
    """Internal signal: the fact is dropped (stale, duplicate, unknown plate); nothing moved."""

    def __init__(self, disposition: Disposition, detail: str) -> None:
        self.disposition = disposition
        self.detail = detail


class _Plate:
    """One plate's record in one batch. Its state changes only through the machines."""

    __slots__ = (
        "artifact_id",
        "awaiting_compile",
        "cancel_requested",
        "done",
        "execution_id",
        "index",
        "job_id",
        "outcome",
        "plate_id",
        "reason",
        "result",
        "started_at",
        "state",
        "total",
    )

    def __init__(self, plate_id: str, index: int) -> None:
        self.plate_id = plate_id
        self.index = index
        self.state = PlateState.IDLE
        self.job_id: str | None = None
        self.artifact_id: str | None = None
        self.execution_id: str | None = None
        self.started_at: float | None = None
        self.done = 0
        self.total = 0
        self.cancel_requested = False
        self.awaiting_compile = True
        self.outcome: PlateOutcome | None = None
        self.reason: Reason | None = None
        self.result: JsonValue = None


class Batch:
    """One batch of plates and everything that happened to it.

    ``clock`` returns the time recorded in the journal (seconds, any epoch);
    the core never reads a clock of its own. Submission ids are derived from
    ``batch_id``, so a replay of the journal issues the very same ids.
    """

    def __init__(
        self,
        batch_id: str,
        plate_ids: Iterable[str],
        *,
        mode: BatchMode = BatchMode.RUN,
        policy: CompileFailurePolicy = CompileFailurePolicy.ABORT,
        clock: Callable[[], float],
        context: Mapping[str, JsonValue] | None = None,
    ) -> None:
        ids = tuple(plate_ids)
        if not batch_id:
            raise UsageError("batch_id must be a non-empty string")
        if not ids:
            raise UsageError("a batch needs at least one plate; none were selected")
        bad = [p for p in ids if not isinstance(p, str) or not p]
        if bad:
            raise UsageError(f"plate ids must be non-empty strings; got {bad[:3]!r}")
        dupes = sorted(p for p, n in Counter(ids).items() if n > 1)
        if dupes:
            raise UsageError(f"plate ids must be unique in a batch; repeated: {dupes[:5]!r}")
        self.batch_id = batch_id
        self.mode = BatchMode(mode)
        self.policy = CompileFailurePolicy(policy)
        self._clock = clock
        self._plates = {pid: _Plate(pid, i) for i, pid in enumerate(ids)}
        self._state = BatchState.IDLE
        self._unsettled = len(ids)
        self._awaiting_compile = len(ids)
        self._cancel_requested = False
        self._aborted = False
        self._handling = False
        self._plate_machine: TableMachine[PlateState, PlateEvent] = TableMachine(
            "plate", PLATE_TABLE, PlateState, PlateState.IDLE
        )
        self._batch_machine: TableMachine[BatchState, BatchEvent] = TableMachine(
            "batch", BATCH_TABLE, BatchState, BatchState.IDLE
        )
        self.journal = Journal(
            JournalHeader(batch_id, ids, self.mode, self.policy, context=dict(context or {}))
        )
        # Scratch for the fact being handled; reset by handle().
        self._now = 0.0
        self._stimulus = ""
        self._disposition = Disposition.APPLIED
        self._out: list[Decision] = []
        self._changes: list[Change] = []
        self._handlers: dict[type[Any], Callable[[Any], str]] = {
            BatchStarted: self._on_batch_started,
            CancelRequested: self._on_cancel_requested,
            CancelTimedOut: self._on_cancel_timed_out,
            HostCallbackFailed: self._on_host_callback_failed,
            BatchResumed: self._on_batch_resumed,
            SubmissionLost: self._on_submission_lost,
            EngineLost: self._on_engine_lost,
            CompileAccepted: self._on_compile_accepted,
            CompileSucceeded: self._on_compile_succeeded,
            CompileFailed: self._on_compile_failed,
            CompileRejected: self._on_compile_failed,
            CompileCancelled: self._on_compile_cancelled,
            ExecutionAccepted: self._on_execution_accepted,
            ExecutionStarted: self._on_execution_started,
            ExecutionProgress: self._on_execution_progress,
            ExecutionSucceeded: self._on_execution_succeeded,
            ExecutionFailed: self._on_execution_failed,
            ExecutionRejected: self._on_execution_rejected,
            ExecutionCancelled: self._on_execution_cancelled,
        }

    # --- public surface ---------------------------------------------------------------

    @property
    def state(self) -> BatchState:
        return self._state

    @property
    def plate_ids(self) -> tuple[str, ...]:
        return self.journal.header.plate_ids

    @property
    def settled(self) -> bool:
        """True once the batch reached a terminal state (every plate settled)."""
        return self._state.is_terminal

    def plate_state(self, plate_id: str) -> PlateState:
        return self._plates[plate_id].state

    def handle(self, fact: Fact) -> tuple[Decision, ...]:
        """Apply one fact; return what must be done now, in order.

        Never raises for anything an engine or host can send; raises only
        ``PlateflowBug`` subclasses, which mean plateflow itself is wrong.
        """
        if self._handling:
            raise ReentrancyError(
                f"batch {self.batch_id!r}: handle() called while handling another fact; "
                "carry out the returned decisions first, then hand in the next fact"
            )
        self._handling = True
        try:
            self._now = self._clock()
            self._stimulus = fact.stimulus_id
            self._out = []
            self._changes = []
            handler = self._handlers.get(type(fact))
            if handler is None:
                raise PlateflowBug(f"no handler for fact type {type(fact).__name__}")
            self._disposition = Disposition.APPLIED
            try:
                detail = handler(fact)
                disposition = self._disposition
            except _Dropped as dropped:
                disposition, detail = dropped.disposition, dropped.detail
            self._react()
            self.journal.append(
                Record(
                    len(self.journal),
                    self._now,
                    fact,
                    disposition,
                    detail,
                    tuple(self._changes),
                )
            )
            return tuple(self._out)
        finally:
            # Drop the scratch lists so a barrier's N decisions are not kept alive.
            self._out = []
            self._changes = []
            self._handling = False

    def snapshot(self) -> BatchSnapshot:
        """Every plate's state and bookkeeping, as an immutable comparable value."""
        return BatchSnapshot(
            batch_id=self.batch_id,
            state=self._state,
            cancel_requested=self._cancel_requested,
            plates=tuple(
                PlateSnapshot(
                    plate_id=p.plate_id,
                    state=p.state,
                    outcome=p.outcome,
                    reason=p.reason,
                    job_id=p.job_id,
                    artifact_id=p.artifact_id,
                    execution_id=p.execution_id,
                    started_at=p.started_at,
                    done=p.done,
                    total=p.total,
                    cancel_requested=p.cancel_requested,
                )
                for p in self._plates.values()
            ),
        )

    def summary(self) -> BatchSummary:
        """The batch's summary so far: every plate settled until now, counted."""
        settlements = tuple(
            PlateSettlement(p.plate_id, p.outcome, p.reason)
            for p in self._plates.values()
            if p.outcome is not None and p.reason is not None
        )
        return BatchSummary(
            batch_id=self.batch_id,
            mode=self.mode,
            outcome=self._state,
            plates=settlements,
            counts=dict(Counter(s.outcome for s in settlements)),
            reasons=dict(Counter(s.reason for s in settlements)),
        )

    def settled_plates(self) -> tuple[SettledPlate, ...]:
        """Every plate settled so far, with its result, in plate order.

        What a resuming service tells its host about the plates that settled
        before the restart.
        """
        return tuple(
            SettledPlate(plate.plate_id, plate.outcome, plate.reason, plate.result)
            for plate in self._plates.values()
            if plate.outcome is not None and plate.reason is not None
        )

    def outstanding(self) -> tuple[tuple[str, Literal["compile", "execute"], str], ...]:
        """``(plate id, phase, submission id)`` of every unsettled plate's current submission.

        What a resuming service asks the engine about; plates waiting at the
        compile barrier (compiled, execution not yet submitted) have none.
        """
        found: list[tuple[str, Literal["compile", "execute"], str]] = []
        for plate in self._plates.values():
            if plate.outcome is not None:
                continue
            if plate.state in (_P.QUEUED, _P.COMPILING) and plate.job_id is not None:
                found.append((plate.plate_id, "compile", plate.job_id))
            elif plate.state in (_P.COMPILED, _P.EXECUTING) and plate.execution_id is not None:
                found.append((plate.plate_id, "execute", plate.execution_id))
        return tuple(found)

    def statistics(self) -> dict[str, Any]:
        """Counts for logs and dashboards: plates per state, records per disposition."""
        per_state = Counter(p.state.value for p in self._plates.values())
        per_disposition = Counter(r.disposition.value for r in self.journal)
        return {
            "batch_id": self.batch_id,
            "state": self._state.value,
            "plates": len(self._plates),
            "unsettled": self._unsettled,
            "plates_per_state": dict(per_state),
            "facts": len(self.journal),
            "facts_per_disposition": dict(per_disposition),
        }

    def __repr__(self) -> str:
        return (
            f"<Batch {self.batch_id!r} {self._state.value} mode={self.mode.value} "
            f"plates={len(self._plates)} unsettled={self._unsettled}>"
        )

    # --- moving things -------------------------------------------------------------------

    def _move(self, plate: _Plate, event: PlateEvent) -> None:
        old = plate.state
        new = self._plate_machine.fire(plate.plate_id, old, event, self._stimulus)
        if new is not old:
            plate.state = new
            self._changes.append(Change(plate.plate_id, old, new, event.value))
            self._out.append(PlateChanged(plate.plate_id, old, new, self._stimulus))

    def _move_batch(self, event: BatchEvent) -> None:
        old = self._state
        self._state = self._batch_machine.fire(self.batch_id, old, event, self._stimulus)
        self._changes.append(Change(None, old, self._state, event.value))
        self._out.append(BatchChanged(old, self._state, self._stimulus))

    def _converge(
        self, plate: _Plate, outcome: PlateOutcome, reason: Reason, result: JsonValue = None
    ) -> None:
        """The convergence callback: the one place a plate settles (C1, C2)."""
        if plate.outcome is not None:
            raise PlateflowBug(
                f"plate {plate.plate_id!r} settled twice ({plate.outcome} then {outcome}); "
                "callers must check before converging"
            )
        event = _PLATE_EVENT_FOR.get(outcome)
        old = plate.state
        if event is not None:
            plate.state = self._plate_machine.converge(plate.plate_id, old, event, self._stimulus)
            self._out.append(PlateChanged(plate.plate_id, old, plate.state, self._stimulus))
        self._changes.append(Change(plate.plate_id, old, plate.state, _SETTLED_NOTE[reason]))
        plate.outcome = outcome
        plate.reason = reason
        plate.result = result
        self._unsettled -= 1
        if plate.awaiting_compile:
            plate.awaiting_compile = False
            self._awaiting_compile -= 1
        self._out.append(ReportPlate(plate.plate_id, outcome, reason, result, self._stimulus))
        failed_before_execution = self._state is BatchState.COMPILING
        if outcome is PlateOutcome.FAILED and failed_before_execution and self._aborts_on(reason):
            self._abort()

    def _aborts_on(self, reason: Reason | None) -> bool:
        """Whether a plate failing for ``reason`` before execution aborts the batch."""
        return (
            reason in _ABORTING_REASONS
            and self.mode is BatchMode.RUN
            and self.policy is CompileFailurePolicy.ABORT
            and not self._aborted
        )

    def _failed_before_start(self) -> Reason | None:
        for plate in self._plates.values():
            if plate.outcome is PlateOutcome.FAILED and plate.reason in _ABORTING_REASONS:
                return plate.reason
        return None

    def _abort(self) -> None:
        """A plate failed before execution under the abort policy: execute nothing."""
        self._aborted = True
        for other in self._plates.values():
            if other.outcome is not None:
                continue
            if not other.cancel_requested:  # a pending cancel already went to the engine
                self._cancel_outstanding(other)
            self._converge(other, PlateOutcome.CANCELLED, Reason.BATCH_ABORTED)

    def _converge_batch(self) -> None:
        """The batch settles once, after every plate did (C3)."""
        plates = self._plates.values()
        if all(p.outcome in _SUCCESS for p in plates):
            outcome = BatchState.COMPLETED
        elif self._cancel_requested or (
            not any(p.outcome is PlateOutcome.FAILED for p in plates)
            and any(p.cancel_requested for p in plates)
        ):
            outcome = BatchState.CANCELLED
        else:
            outcome = BatchState.FAILED
        old = self._state
        self._state = self._batch_machine.converge(
            self.batch_id, old, _BATCH_EVENT_FOR[outcome], self._stimulus
        )
        self._changes.append(Change(None, old, self._state, "settled"))
        self._out.append(BatchChanged(old, self._state, self._stimulus))
        summary = self.summary()
        self._out.append(ReportBatch(summary, self._stimulus))

    def _react(self) -> None:
        """Batch-level consequences, computed after the fact's own moves."""
        if (
            self._state is BatchState.COMPILING
            and self.mode is BatchMode.RUN
            and self._awaiting_compile == 0
        ):
            ready = [p for p in self._plates.values() if p.outcome is None]
            if ready:
                self._move_batch(BatchEvent.ALL_COMPILED)
                for plate in ready:
                    if plate.artifact_id is None:  # pragma: no cover - barrier invariant
                        raise PlateflowBug(
                            f"plate {plate.plate_id!r} passed the barrier uncompiled"
                        )
                    plate.execution_id = f"{self.batch_id}.{plate.index}.x"
                    self._out.append(
                        SubmitExecution(
                            plate.plate_id, plate.execution_id, plate.artifact_id, self._stimulus
                        )
                    )
        if self._unsettled == 0 and not self._state.is_terminal:
            self._converge_batch()

    def _cancel_outstanding(self, plate: _Plate) -> bool:
        """Ask the engine to stop the plate's in-flight submission; False if none."""
        if plate.state in (_P.QUEUED, _P.COMPILING) and plate.job_id is not None:
            self._out.append(
                CancelSubmission(plate.plate_id, "compile", plate.job_id, self._stimulus)
            )
            return True
        if plate.state in (_P.COMPILED, _P.EXECUTING) and plate.execution_id is not None:
            self._out.append(
                CancelSubmission(plate.plate_id, "execute", plate.execution_id, self._stimulus)
            )
            return True
        return False

    def _cancel_plate(self, plate: _Plate) -> None:
        plate.cancel_requested = True
        if not self._cancel_outstanding(plate):
            self._converge(plate, PlateOutcome.CANCELLED, Reason.CANCEL_REQUESTED)

    def _protocol_error(self, plate: _Plate, message: str) -> str:
        """An impossible fact: report it, fail the plate, journal the fact as rejected."""
        self._disposition = Disposition.REJECTED
        self._out.append(
            ReportError(ErrorCode.ENGINE_PROTOCOL_ERROR, message, plate.plate_id, self._stimulus)
        )
        self._converge(plate, PlateOutcome.FAILED, Reason.ENGINE_PROTOCOL_ERROR, message)
        return f"engine protocol error: {message}"

    # --- classification ----------------------------------------------------------------

    def _plate(self, fact: Any) -> _Plate:
        plate = self._plates.get(fact.plate_id)
        if plate is None:
            message = f"fact {fact.kind} names plate {fact.plate_id!r}, which is not in the batch"
            self._out.append(ReportError(ErrorCode.UNKNOWN_PLATE, message, None, self._stimulus))
            raise _Dropped(Disposition.REJECTED, message)
        if plate.outcome is not None:
            raise _Dropped(
                Disposition.IGNORED_STALE, f"stale: plate already settled {plate.outcome.value}"
            )
        return plate

    def _compile_plate(self, fact: Any) -> _Plate | str:
        """Steps 1-4 for a compile fact; a str return is a protocol error's detail."""
        plate = self._plate(fact)
        if plate.job_id is None:
            return self._protocol_error(
                plate, f"{fact.kind} for job {fact.job_id!r}, but no compile was submitted"
            )
        if fact.job_id != plate.job_id:
            raise _Dropped(Disposition.IGNORED_STALE, f"stale: job {fact.job_id!r} is not current")
        return plate

    def _execution_plate(self, fact: Any) -> _Plate | str:
        """Steps 1-4 for an execution fact; a str return is a protocol error's detail."""
        plate = self._plate(fact)
        if plate.execution_id is None:
            return self._protocol_error(
                plate,
                f"{fact.kind} for execution {fact.execution_id!r}, but no execution was submitted",
            )
        if fact.execution_id != plate.execution_id:
            raise _Dropped(
                Disposition.IGNORED_STALE, f"stale: execution {fact.execution_id!r} is not current"
            )
        return plate

    @staticmethod
    def _duplicate(what: str) -> _Dropped:
        return _Dropped(Disposition.IGNORED_DUPLICATE, f"duplicate: {what}")

    # --- host commands ---------------------------------------------------------------------

    def _on_batch_started(self, fact: BatchStarted) -> str:
        if self._state.is_terminal:
            raise _Dropped(Disposition.IGNORED_STALE, "stale: the batch already settled")
        if self._state is not BatchState.IDLE:
            raise self._duplicate("the batch already started")
        self._move_batch(BatchEvent.START)
        if self._aborts_on(self._failed_before_start()):
            self._abort()  # a plate failed before the start: execute nothing, submit nothing
            return "started, then aborted"
        prefix = self.batch_id
        for plate in self._plates.values():
            if plate.outcome is not None:
                continue  # settled before the start (an engine protocol error, a cancel)
            self._move(plate, PlateEvent.SELECTED)
            plate.job_id = f"{prefix}.{plate.index}.c"
            self._out.append(SubmitCompile(plate.plate_id, plate.job_id, self._stimulus))
        return "started"

    def _on_cancel_requested(self, fact: CancelRequested) -> str:
        if fact.plate_id is None:
            if self._state.is_terminal:
                raise _Dropped(Disposition.IGNORED_STALE, "stale: the batch already settled")
            if self._cancel_requested:
                raise self._duplicate("batch cancel already requested")
            self._cancel_requested = True
            self._move_batch(BatchEvent.CANCEL)
            for plate in self._plates.values():
                if plate.outcome is None and not plate.cancel_requested:
                    self._cancel_plate(plate)
            return "batch cancel requested"
        plate = self._plate(fact)
        if plate.cancel_requested:
            raise self._duplicate("plate cancel already requested")
        self._cancel_plate(plate)
        return "plate cancel requested"

    def _on_cancel_timed_out(self, fact: CancelTimedOut) -> str:
        plate = self._plate(fact)
        if not plate.cancel_requested:
            raise _Dropped(Disposition.IGNORED_STALE, "stale: no cancel is pending for the plate")
        self._converge(plate, PlateOutcome.CANCELLED, Reason.CANCEL_UNCONFIRMED)
        return "cancel unconfirmed"

    def _on_host_callback_failed(self, fact: HostCallbackFailed) -> str:
        # Reporting a failure of emit_error through emit_error could loop forever.
        if fact.callback != "emit_error":
            message = f"host callback {fact.callback} raised: {fact.error}"
            self._out.append(
                ReportError(ErrorCode.HOST_CALLBACK_FAILED, message, fact.plate_id, self._stimulus)
            )
        return f"host callback {fact.callback} failed"

    def _on_batch_resumed(self, fact: BatchResumed) -> str:
        return f"resumed{': ' + fact.note if fact.note else ''}"

    def _on_submission_lost(self, fact: SubmissionLost) -> str:
        plate = self._plate(fact)
        if fact.phase == "compile":
            current = plate.job_id == fact.submission_id and plate.state in (
                _P.QUEUED,
                _P.COMPILING,
            )
        else:
            current = plate.execution_id == fact.submission_id and plate.state in (
                _P.COMPILED,
                _P.EXECUTING,
            )
        if not current:
            raise _Dropped(
                Disposition.IGNORED_STALE,
                f"stale: {fact.phase} {fact.submission_id!r} is not the plate's current submission",
            )
        how = "it never started" if fact.never_ran else "it may have run in part"
        if plate.cancel_requested:  # the work is gone: that is the cancel confirmed
            self._converge(plate, PlateOutcome.CANCELLED, Reason.CANCEL_REQUESTED)
            return f"lost in the restart while being cancelled ({how})"
        if not fact.resubmit:
            message = (
                f"the engine lost {fact.phase} {fact.submission_id!r} in a restart of the host "
                f"({how})"
            )
            self._converge(plate, PlateOutcome.FAILED, Reason.LOST_IN_RESTART, message)
            return f"lost in the restart ({how})"
        if fact.phase == "compile":
            self._out.append(SubmitCompile(plate.plate_id, fact.submission_id, self._stimulus))
        else:
            assert plate.artifact_id is not None  # an execution id is issued after compiling
            plate.started_at = None
            plate.done = plate.total = 0
            self._out.append(
                SubmitExecution(
                    plate.plate_id, fact.submission_id, plate.artifact_id, self._stimulus
                )
            )
        return f"resubmitted after the restart ({how})"

    def _on_engine_lost(self, fact: EngineLost) -> str:
        if self._state.is_terminal:
            raise _Dropped(Disposition.IGNORED_STALE, "stale: the batch already settled")
        for plate in self._plates.values():
            if plate.outcome is None:
                self._converge(plate, PlateOutcome.FAILED, Reason.ENGINE_LOST, fact.reason)
        return f"engine lost: {fact.reason}"

    # --- engine facts: compile ---------------------------------------------------------------

    def _on_compile_accepted(self, fact: CompileAccepted) -> str:
        plate = self._compile_plate(fact)
        if isinstance(plate, str):
            return plate
        if plate.state is not _P.QUEUED:
            raise self._duplicate("compile already accepted")
        self._move(plate, PlateEvent.COMPILE_ACCEPTED)
        return "compile accepted"

    def _on_compile_succeeded(self, fact: CompileSucceeded) -> str:
        plate = self._compile_plate(fact)
        if isinstance(plate, str):
            return plate
        if plate.state is _P.QUEUED:
            self._move(plate, PlateEvent.COMPILE_ACCEPTED)  # implied: overtook its acceptance
        if plate.state is not _P.COMPILING:
            raise self._duplicate("compile already succeeded")
        self._move(plate, PlateEvent.COMPILE_SUCCEEDED)
        plate.artifact_id = fact.artifact_id
        plate.awaiting_compile = False
        self._awaiting_compile -= 1
        if self.mode is BatchMode.COMPILE_ONLY:
            self._converge(plate, PlateOutcome.COMPILED, Reason.SUCCEEDED, fact.artifact_id)
        elif plate.cancel_requested:
            self._converge(plate, PlateOutcome.CANCELLED, Reason.CANCEL_REQUESTED)
        return "compile succeeded"

    def _on_compile_failed(self, fact: CompileFailed | CompileRejected) -> str:
        plate = self._compile_plate(fact)
        if isinstance(plate, str):
            return plate
        if plate.state not in (_P.QUEUED, _P.COMPILING):
            return self._protocol_error(
                plate, f"{fact.kind} for job {fact.job_id!r} after the compile succeeded"
            )
        reason = (
            Reason.COMPILE_REJECTED if fact.kind == "compile_rejected" else Reason.COMPILE_FAILED
        )
        self._converge(plate, PlateOutcome.FAILED, reason, fact.error)
        return reason.value

    def _on_compile_cancelled(self, fact: CompileCancelled) -> str:
        plate = self._compile_plate(fact)
        if isinstance(plate, str):
            return plate
        if plate.state not in (_P.QUEUED, _P.COMPILING):
            raise _Dropped(Disposition.IGNORED_STALE, "stale: the compile already succeeded")
        reason = Reason.CANCEL_REQUESTED if plate.cancel_requested else Reason.ENGINE_CANCELLED
        self._converge(plate, PlateOutcome.CANCELLED, reason)
        return "compile cancelled"

    # --- engine facts: execution -------------------------------------------------------------

    def _accept_implied(self, plate: _Plate) -> None:
        if plate.state is _P.COMPILED:  # the fact overtook the execution's acceptance
            self._move(plate, PlateEvent.EXECUTION_ACCEPTED)

    def _on_execution_accepted(self, fact: ExecutionAccepted) -> str:
        plate = self._execution_plate(fact)
        if isinstance(plate, str):
            return plate
        if plate.state is not _P.COMPILED:
            raise self._duplicate("execution already accepted")
        self._move(plate, PlateEvent.EXECUTION_ACCEPTED)
        return "execution accepted"

    def _on_execution_started(self, fact: ExecutionStarted) -> str:
        plate = self._execution_plate(fact)
        if isinstance(plate, str):
            return plate
        if plate.started_at is not None:
            raise self._duplicate("execution already started")
        self._accept_implied(plate)
        self._move(plate, PlateEvent.EXECUTION_STARTED)
        plate.started_at = self._now
        return "execution started"

    def _on_execution_progress(self, fact: ExecutionProgress) -> str:
        plate = self._execution_plate(fact)
        if isinstance(plate, str):
            return plate
        if fact.done > fact.total:
            return self._protocol_error(
                plate, f"progress {fact.done}/{fact.total} reports more done than total"
            )
        if plate.total and (fact.done, fact.total) == (plate.done, plate.total):
            raise self._duplicate(f"progress {fact.done}/{fact.total} already recorded")
        if fact.done < plate.done:
            raise _Dropped(
                Disposition.IGNORED_STALE,
                f"stale: progress {fact.done} is behind {plate.done} already recorded",
            )
        self._accept_implied(plate)
        self._move(plate, PlateEvent.PROGRESS)
        plate.done = fact.done
        plate.total = fact.total
        self._out.append(
            ProgressRecorded(plate.plate_id, fact.done, fact.total, fact.message, self._stimulus)
        )
        return "progress"

    def _on_execution_succeeded(self, fact: ExecutionSucceeded) -> str:
        plate = self._execution_plate(fact)
        if isinstance(plate, str):
            return plate
        self._accept_implied(plate)
        self._converge(plate, PlateOutcome.COMPLETED, Reason.SUCCEEDED, dict(fact.result))
        return "execution succeeded"

    def _on_execution_failed(self, fact: ExecutionFailed) -> str:
        plate = self._execution_plate(fact)
        if isinstance(plate, str):
            return plate
        result: JsonValue = {"error": fact.error, "exit_code": fact.exit_code}
        self._converge(plate, PlateOutcome.FAILED, Reason.EXECUTION_FAILED, result)
        return "execution failed"

    def _on_execution_rejected(self, fact: ExecutionRejected) -> str:
        plate = self._execution_plate(fact)
        if isinstance(plate, str):
            return plate
        if plate.state is not _P.COMPILED:
            return self._protocol_error(
                plate, f"execution {fact.execution_id!r} rejected after it was accepted"
            )
        self._converge(plate, PlateOutcome.FAILED, Reason.EXECUTION_REJECTED, fact.error)
        return "execution rejected"

    def _on_execution_cancelled(self, fact: ExecutionCancelled) -> str:
        plate = self._execution_plate(fact)
        if isinstance(plate, str):
            return plate
        reason = Reason.CANCEL_REQUESTED if plate.cancel_requested else Reason.ENGINE_CANCELLED
        self._converge(plate, PlateOutcome.CANCELLED, reason)
        return "execution cancelled"
