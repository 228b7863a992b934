"""The batch: one batch machine and one plate machine per plate, driven by facts.

Theory of operation: ``Batch.handle(fact)`` is the only way in. It looks the
fact up in the fact tables of ``core.tables`` (``BATCH_FACTS`` for facts about
the whole batch, ``PLATE_FACTS`` for facts about a plate, by the plate's
column and the relation of the fact's submission id to the plate's) and
applies the cell it finds: the cell says how the fact is journaled, which
moves it takes (each executed and checked by the ``transitions`` machines
built from the move tables), how it settles the plate, and which data rule
(``Rule``) finishes the job. Then the batch computes its own reactions (the
compile barrier, batch convergence) once the plate moves are done, appends one
journal record and returns the decisions. Nothing here touches an engine, a
host, a clock or a thread: the caller injects the clock and carries out the
decisions, which is what lets the property tests push every reachable state
through it.

This module decides nothing by looking at a state: which state a fact may
arrive in, and what it does there, is a table lookup. What is left here are
the rules that depend on data (the progress figures, whether a cancel is
pending, the mode and policy) and the two convergence functions.

Settling a plate or the batch goes through :meth:`Batch._converge` and
:meth:`Batch._converge_batch` only. They are the single convergence path
(C1): they alone take the guarded terminal rows, mark a plate settled exactly
once (C2, write-once terminals) and emit the batch report after the last
plate (C3). Because reports are returned rather than called, and returned
after the journal record is appended, a host always sees committed state (C4).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from pydantic import JsonValue

from plateflow.core.cells import PlateRecord, cell_for, check, note, plate_records, result_of
from plateflow.core.decisions import (
    BatchChanged,
    CancelSubmission,
    Decision,
    PlateChanged,
    ProgressRecorded,
    ReportBatch,
    ReportError,
    ReportPlate,
    SubmitCompile,
    SubmitExecution,
)
from plateflow.core.facts import EngineLost, Fact
from plateflow.core.journal import Change, Journal, JournalHeader, Record
from plateflow.core.machines import TableMachine
from plateflow.core.snapshot import BatchView
from plateflow.core.tables import (
    ABORTING_REASONS,
    BATCH_TABLE,
    PLATE_TABLE,
    SETTLE_BATCH,
    SETTLE_PLATE,
    BatchEvent,
    BatchMode,
    BatchState,
    CompileFailurePolicy,
    Disposition,
    PlateEvent,
    PlateOutcome,
    PlateState,
    Reason,
    Rule,
)
from plateflow.errors import ErrorCode, PlateflowBug, ReentrancyError

__all__ = ["Batch"]

_SUCCESS: Final = frozenset({PlateOutcome.COMPLETED, PlateOutcome.COMPILED})
_FAILED: Final = PlateOutcome.FAILED
_SETTLED_NOTE: Final = {reason: f"settled: {reason.value}" for reason in Reason}
_DROPPED: Final = frozenset({Disposition.IGNORED_STALE, Disposition.IGNORED_DUPLICATE})
_UNKNOWN_PLATE: Final = "fact {kind} names plate {plate_id!r}, which is not in the batch"


class Batch(BatchView):
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
        self._plates = plate_records(batch_id, plate_ids)
        ids = tuple(self._plates)
        self.batch_id = batch_id
        self.mode = BatchMode(mode)
        self.policy = CompileFailurePolicy(policy)
        self._clock = clock
        self._state = BatchState.IDLE
        self._unsettled = len(ids)
        self._awaiting_compile = len(ids)
        self._cancel_requested = False
        self._aborted = False
        self._handling = False
        self._plate_machine = TableMachine("plate", PLATE_TABLE, PlateState, PlateState.IDLE)
        self._batch_machine = TableMachine("batch", BATCH_TABLE, BatchState, BatchState.IDLE)
        self.journal = Journal(
            JournalHeader(batch_id, ids, self.mode, self.policy, context=dict(context or {}))
        )
        # Scratch for the fact being handled; reset by handle().
        self._now = 0.0
        self._stimulus = ""
        self._out: list[Decision] = []
        self._changes: list[Change] = []
        self._batch_rules: dict[Rule, Callable[[Any], str | None]] = {
            Rule.START: self._start,
            Rule.CANCEL_ALL: self._cancel_all,
            Rule.ENGINE_LOST: self._engine_lost,
            Rule.REPORT_CALLBACK: self._report_callback,
        }
        self._plate_rules: dict[Rule, Callable[[PlateRecord, Any], str | None]] = {
            Rule.COMPILED: self._compiled,
            Rule.STARTED: self._started,
            Rule.PROGRESS: self._progress,
            Rule.CANCELLED: self._cancelled,
            Rule.CANCEL: self._cancel,
            Rule.LOST: self._lost,
        }

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
            disposition, detail = self._apply(fact)
            self._react()
            changes = tuple(self._changes)
            self.journal.append(
                Record(len(self.journal), self._now, fact, disposition, detail, changes)
            )
            return tuple(self._out)
        finally:
            # Drop the scratch lists so a barrier's N decisions are not kept alive.
            self._out = []
            self._changes = []
            self._handling = False

    # --- applying a cell ---------------------------------------------------------------

    def _apply(self, fact: Fact) -> tuple[Disposition, str]:
        """Look the fact up and do what its cell says; return how to journal it."""
        found = cell_for(fact, self._state, self._plates)
        if found is None:
            message = note(_UNKNOWN_PLATE, fact, None)
            self._out.append(ReportError(ErrorCode.UNKNOWN_PLATE, message, None, self._stimulus))
            return Disposition.REJECTED, message
        cell, plate = found
        if cell.disposition is None:
            raise PlateflowBug(
                f"{fact.kind} (stimulus {fact.stimulus_id!r}) arrived where the fact table "
                f"says it cannot: {cell.note}"
            )
        detail = note(cell.note, fact, plate)
        if cell.disposition in _DROPPED:
            return cell.disposition, detail
        if cell.disposition is Disposition.REJECTED:
            assert plate is not None  # every rejected cell is a plate's protocol error
            return self._protocol_error(plate, detail)
        if plate is None:  # a fact about the whole batch
            for event in cell.moves:
                self._move_batch(BatchEvent(event))
            if cell.rule is not None:
                detail = self._batch_rules[cell.rule](fact) or detail
            return Disposition.APPLIED, detail
        dropped = None if cell.rule is None else check(cell.rule, plate, fact)
        if dropped is not None:
            if dropped[0] is Disposition.REJECTED:
                return self._protocol_error(plate, dropped[1])
            return dropped
        for event in cell.moves:
            self._move(plate, PlateEvent(event))
        if cell.settle is not None:
            self._converge(plate, *cell.settle, result_of(fact))
        effect = None if cell.rule is None else self._plate_rules.get(cell.rule)
        if effect is not None:
            detail = effect(plate, fact) or detail
        return Disposition.APPLIED, detail

    def _protocol_error(self, plate: PlateRecord, detail: str) -> tuple[Disposition, str]:
        """An impossible fact: report it, fail the plate, journal the fact as rejected."""
        message = detail.removeprefix("engine protocol error: ")
        self._out.append(
            ReportError(ErrorCode.ENGINE_PROTOCOL_ERROR, message, plate.plate_id, self._stimulus)
        )
        self._converge(plate, PlateOutcome.FAILED, Reason.ENGINE_PROTOCOL_ERROR, message)
        return Disposition.REJECTED, detail

    # --- the data rules (see ``Rule``) -----------------------------------------------------

    def _start(self, _fact: Any) -> str | None:
        if any(self._aborts_on(p.reason) for p in self._plates.values() if p.outcome is _FAILED):
            self._abort()  # a plate failed before the start: execute nothing, submit nothing
            return "started, then aborted"
        for plate in self._unsettled_plates():
            self._move(plate, PlateEvent.SELECTED)
            plate.job_id = plate.own_ids["compile"]
            self._out.append(SubmitCompile(plate.plate_id, plate.job_id, self._stimulus))
        return None

    def _cancel_all(self, _fact: Any) -> None:
        self._cancel_requested = True
        for plate in self._unsettled_plates():
            if not plate.cancel_requested:
                self._cancel(plate, None)

    def _engine_lost(self, fact: EngineLost) -> None:
        for plate in self._unsettled_plates():
            self._converge(plate, PlateOutcome.FAILED, Reason.ENGINE_LOST, fact.reason)

    def _report_callback(self, fact: Any) -> None:
        # Reporting a failure of emit_error through emit_error could loop forever.
        if fact.callback != "emit_error":
            message = f"host callback {fact.callback} raised: {fact.error}"
            self._out.append(
                ReportError(ErrorCode.HOST_CALLBACK_FAILED, message, fact.plate_id, self._stimulus)
            )

    def _compiled(self, plate: PlateRecord, fact: Any) -> None:
        plate.artifact_id = fact.artifact_id
        plate.awaiting_compile = False
        self._awaiting_compile -= 1
        if self.mode is BatchMode.COMPILE_ONLY:
            self._converge(plate, PlateOutcome.COMPILED, Reason.SUCCEEDED, fact.artifact_id)
        elif plate.cancel_requested:
            self._converge(plate, PlateOutcome.CANCELLED, Reason.CANCEL_REQUESTED)

    def _started(self, plate: PlateRecord, _fact: Any) -> None:
        plate.started_at = self._now

    def _progress(self, plate: PlateRecord, fact: Any) -> None:
        plate.done = fact.done
        plate.total = fact.total
        self._out.append(
            ProgressRecorded(plate.plate_id, fact.done, fact.total, fact.message, self._stimulus)
        )

    def _cancelled(self, plate: PlateRecord, _fact: Any) -> None:
        reason = Reason.CANCEL_REQUESTED if plate.cancel_requested else Reason.ENGINE_CANCELLED
        self._converge(plate, PlateOutcome.CANCELLED, reason)

    def _cancel(self, plate: PlateRecord, _fact: Any) -> None:
        plate.cancel_requested = True
        if not self._cancel_outstanding(plate):
            self._converge(plate, PlateOutcome.CANCELLED, Reason.CANCEL_REQUESTED)

    def _lost(self, plate: PlateRecord, fact: Any) -> str | None:
        how = "it never started" if fact.never_ran else "it may have run in part"
        if plate.cancel_requested:  # the work is gone: that is the cancel confirmed
            self._converge(plate, PlateOutcome.CANCELLED, Reason.CANCEL_REQUESTED)
            return f"lost in the restart while being cancelled ({how})"
        if not fact.resubmit:
            lost = f"the engine lost {fact.phase} {fact.submission_id!r} in a restart ({how})"
            self._converge(plate, PlateOutcome.FAILED, Reason.LOST_IN_RESTART, lost)
            return f"lost in the restart ({how})"
        pid, sid, stimulus = plate.plate_id, fact.submission_id, self._stimulus
        if fact.phase == "compile":
            self._out.append(SubmitCompile(pid, sid, stimulus))
        else:
            assert plate.artifact_id is not None  # an execution id is issued after compiling
            plate.started_at, plate.done, plate.total = None, 0, 0
            self._out.append(SubmitExecution(pid, sid, plate.artifact_id, stimulus))
        return f"resubmitted after the restart ({how})"

    # --- moving things -------------------------------------------------------------------

    def _unsettled_plates(self) -> list[PlateRecord]:
        return [plate for plate in self._plates.values() if plate.outcome is None]

    def _move(self, plate: PlateRecord, event: PlateEvent) -> None:
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

    def _before_barrier(self) -> bool:
        """Whether the batch can still take the compile barrier (the table says so)."""
        return self._batch_machine.row(self._state, BatchEvent.ALL_COMPILED) is not None

    def _converge(
        self, plate: PlateRecord, outcome: PlateOutcome, reason: Reason, result: JsonValue = None
    ) -> None:
        """The convergence callback: the one place a plate settles (C1, C2)."""
        if plate.outcome is not None:  # the tables send no fact about a settled plate here
            raise PlateflowBug(f"plate {plate.plate_id!r} settled {plate.outcome}, then {outcome}")
        event = SETTLE_PLATE.get(outcome)
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
        if outcome is _FAILED and self._before_barrier() and self._aborts_on(reason):
            self._abort()

    def _aborts_on(self, reason: Reason | None) -> bool:
        """Whether a plate failing for ``reason`` before execution aborts the batch."""
        return (
            reason in ABORTING_REASONS
            and self.mode is BatchMode.RUN
            and self.policy is CompileFailurePolicy.ABORT
            and not self._aborted
        )

    def _abort(self) -> None:
        """A plate failed before execution under the abort policy: execute nothing."""
        self._aborted = True
        for other in self._unsettled_plates():
            if not other.cancel_requested:  # a pending cancel already went to the engine
                self._cancel_outstanding(other)
            self._converge(other, PlateOutcome.CANCELLED, Reason.BATCH_ABORTED)

    def _converge_batch(self) -> None:
        """The batch settles once, after every plate did (C3)."""
        plates = self._plates.values()
        if all(p.outcome in _SUCCESS for p in plates):
            outcome = BatchState.COMPLETED
        elif self._cancel_requested or (
            not any(p.outcome is _FAILED for p in plates)
            and any(p.cancel_requested for p in plates)
        ):
            outcome = BatchState.CANCELLED
        else:
            outcome = BatchState.FAILED
        old = self._state
        self._state = self._batch_machine.converge(
            self.batch_id, old, SETTLE_BATCH[outcome], self._stimulus
        )
        self._changes.append(Change(None, old, self._state, "settled"))
        self._out.append(BatchChanged(old, self._state, self._stimulus))
        self._out.append(ReportBatch(self.summary(), self._stimulus))

    def _react(self) -> None:
        """Batch-level consequences, computed after the fact's own moves."""
        if self.mode is BatchMode.RUN and self._awaiting_compile == 0 and self._before_barrier():
            ready = self._unsettled_plates()
            if ready:
                self._move_batch(BatchEvent.ALL_COMPILED)
                for plate in ready:
                    assert plate.artifact_id is not None, "only compiled plates pass the barrier"
                    plate.execution_id = plate.own_ids["execute"]
                    self._out.append(
                        SubmitExecution(
                            plate.plate_id, plate.execution_id, plate.artifact_id, self._stimulus
                        )
                    )
        if self._unsettled == 0 and not self._state.is_terminal:
            self._converge_batch()

    def _cancel_outstanding(self, plate: PlateRecord) -> bool:
        """Ask the engine to stop the plate's in-flight submission; False if none."""
        flight = plate.in_flight()
        if flight is None:
            return False
        self._out.append(CancelSubmission(plate.plate_id, *flight, self._stimulus))
        return True
