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

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    CompileFailed,
    CompileRejected,
    EngineLost,
    ExecutionFailed,
    ExecutionRejected,
    ExecutionSucceeded,
    Fact,
)
from plateflow.core.journal import Change, Journal, JournalHeader, Record
from plateflow.core.machines import TableMachine
from plateflow.core.snapshot import BatchSnapshot, PlateSnapshot
from plateflow.core.tables import (
    BATCH_COLUMNS,
    BATCH_FACTS,
    BATCH_TABLE,
    IN_FLIGHT,
    PLATE_COLUMNS,
    PLATE_FACTS,
    PLATE_TABLE,
    SETTLED,
    BatchEvent,
    BatchMode,
    BatchState,
    Cell,
    CompileFailurePolicy,
    Disposition,
    FactRow,
    IdMatch,
    PlateEvent,
    PlateOutcome,
    PlateState,
    Reason,
    Rule,
)
from plateflow.errors import ErrorCode, PlateflowBug, ReentrancyError, UsageError

__all__ = ["Batch", "fact_key"]

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
_DROPPED: Final = frozenset({Disposition.IGNORED_STALE, Disposition.IGNORED_DUPLICATE})
_PHASE_WORD: Final = {"compile": "compile", "execute": "execution"}
_UNKNOWN_PLATE: Final = "fact {kind} names plate {plate_id!r}, which is not in the batch"


def _index(rows: Iterable[FactRow], columns: tuple[Any, ...]) -> dict[tuple[Any, ...], Cell]:
    """The cells of a fact table by (kind, ids, column); every key at most once."""
    cells: dict[tuple[Any, ...], Cell] = {}
    for row in rows:
        if len(row.cells) != len(columns):
            raise PlateflowBug(f"fact table row {row.kinds}/{row.ids} has the wrong width")
        for kind in row.kinds:
            for column, cell in zip(columns, row.cells, strict=True):
                if (kind, row.ids, column) in cells:
                    raise PlateflowBug(f"fact table: two cells for {kind}/{row.ids}/{column}")
                cells[(kind, row.ids, column)] = cell
    return cells


_PLATE_CELLS: Final = _index(PLATE_FACTS, PLATE_COLUMNS)
_BATCH_CELLS: Final = _index(BATCH_FACTS, BATCH_COLUMNS)
_BATCH_KINDS: Final = frozenset(kind for row in BATCH_FACTS for kind in row.kinds)


def fact_key(fact: Fact) -> str:
    """The fact's line in the fact tables: its kind, refined where the kind has two lines."""
    if fact.kind == "cancel_requested":
        return "cancel_requested[batch]" if fact.plate_id is None else "cancel_requested[plate]"
    if fact.kind == "submission_lost":
        return f"submission_lost[{fact.phase}]"
    return fact.kind


def _submission(fact: Any) -> tuple[str, Literal["compile", "execute"]] | None:
    """The submission id a plate fact names, with its phase; None for host commands."""
    if fact.kind == "submission_lost":
        return fact.submission_id, fact.phase
    job_id = getattr(fact, "job_id", None)
    if job_id is not None:
        return job_id, "compile"
    execution_id = getattr(fact, "execution_id", None)
    return None if execution_id is None else (execution_id, "execute")


def _result(fact: Fact) -> JsonValue:
    """What a plate settled by this fact reports as its result."""
    if isinstance(fact, ExecutionSucceeded):
        return dict(fact.result)
    if isinstance(fact, ExecutionFailed):
        return {"error": fact.error, "exit_code": fact.exit_code}
    if isinstance(fact, CompileFailed | CompileRejected | ExecutionRejected):
        return fact.error
    if isinstance(fact, EngineLost):
        return fact.reason
    return None


class _Fields(Mapping[str, Any]):
    """What a cell's note may name: the fact's fields, ``id``, ``phase`` and ``outcome``."""

    def __init__(self, fact: Fact, plate: _Plate | None) -> None:
        self._fact = fact
        self._plate = plate

    def __getitem__(self, key: str) -> Any:
        if key in ("id", "phase"):
            submission = _submission(self._fact)
            if submission is None:
                return "-"
            return submission[0] if key == "id" else _PHASE_WORD[submission[1]]
        if key == "outcome":
            outcome = None if self._plate is None else self._plate.outcome
            return "-" if outcome is None else outcome.value
        return getattr(self._fact, key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


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

    def in_flight(self) -> tuple[Literal["compile", "execute"], str] | None:
        """The phase and id of the submission the engine may be working on, if any."""
        phase = None if self.outcome is not None else IN_FLIGHT.get(self.state)
        issued = self.job_id if phase == "compile" else self.execution_id
        return None if phase is None or issued is None else (phase, issued)


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
        self._out: list[Decision] = []
        self._changes: list[Change] = []
        self._rules: dict[Rule, Callable[[_Plate | None, Any], str | None]] = {
            Rule.START: self._start,
            Rule.CANCEL_ALL: self._cancel_all,
            Rule.ENGINE_LOST: self._engine_lost,
            Rule.REPORT_CALLBACK: self._report_callback,
            Rule.COMPILED: self._compiled,
            Rule.STARTED: self._started,
            Rule.PROGRESS: self._progress,
            Rule.CANCELLED: self._cancelled,
            Rule.CANCEL: self._cancel,
            Rule.TIME_OUT: self._time_out,
            Rule.LOST: self._lost,
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

    def lookup(self, fact: Fact) -> Cell | None:
        """The fact-table cell ``fact`` would be handled by now; None for an unknown plate."""
        key = fact_key(fact)
        if key in _BATCH_KINDS:
            column = SETTLED if self._state.is_terminal else self._state
            return _BATCH_CELLS[(key, None, column)]
        plate = self._plates.get(getattr(fact, "plate_id", None) or "")
        if plate is None:
            return None
        submission = _submission(fact)
        ids = None
        if submission is not None:
            issued = plate.job_id if submission[1] == "compile" else plate.execution_id
            ids = (
                IdMatch.UNISSUED
                if issued is None
                else IdMatch.CURRENT
                if issued == submission[0]
                else IdMatch.OTHER
            )
        column = SETTLED if plate.outcome is not None else plate.state
        return _PLATE_CELLS[(key, ids, column)]

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
        return tuple(
            (plate.plate_id, *flight)
            for plate in self._plates.values()
            if (flight := plate.in_flight()) is not None
        )

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

    # --- applying a cell ---------------------------------------------------------------

    def _apply(self, fact: Fact) -> tuple[Disposition, str]:
        """Look the fact up and do what its cell says; return how to journal it."""
        cell = self.lookup(fact)
        plate = self._plates.get(getattr(fact, "plate_id", None) or "")
        if cell is None:
            message = _UNKNOWN_PLATE.format_map(_Fields(fact, None))
            self._out.append(ReportError(ErrorCode.UNKNOWN_PLATE, message, None, self._stimulus))
            return Disposition.REJECTED, message
        if cell.disposition is None:
            raise PlateflowBug(
                f"{fact_key(fact)} (stimulus {fact.stimulus_id!r}) arrived where the fact table "
                f"says it cannot: {cell.note}"
            )
        detail = cell.note.format_map(_Fields(fact, plate))
        if cell.disposition in _DROPPED:
            return cell.disposition, detail
        if cell.disposition is Disposition.REJECTED:
            assert plate is not None  # every rejected cell is a plate's protocol error
            return self._protocol_error(plate, detail)
        if cell.rule is not None:
            dropped = self._check(cell.rule, plate, fact)
            if dropped is not None:
                return dropped
        for event in cell.moves:
            if isinstance(event, BatchEvent):
                self._move_batch(event)
            else:
                assert plate is not None
                self._move(plate, event)
        if cell.settle is not None:
            assert plate is not None
            self._converge(plate, *cell.settle, _result(fact))
        if cell.rule is not None:
            detail = self._rules[cell.rule](plate, fact) or detail
        return Disposition.APPLIED, detail

    def _check(self, rule: Rule, plate: _Plate | None, fact: Any) -> tuple[Disposition, str] | None:
        """The data a rule looks at before anything moves: a reason to drop the fact, or None."""
        assert plate is not None or rule not in (
            Rule.STARTED,
            Rule.PROGRESS,
            Rule.CANCEL,
            Rule.TIME_OUT,
        )
        if rule is Rule.STARTED and plate is not None and plate.started_at is not None:
            return Disposition.IGNORED_DUPLICATE, "duplicate: execution already started"
        if rule is Rule.PROGRESS and plate is not None:
            if fact.done > fact.total:
                return self._protocol_error(
                    plate,
                    f"engine protocol error: progress {fact.done}/{fact.total} reports more "
                    "done than total",
                )
            if plate.total and (fact.done, fact.total) == (plate.done, plate.total):
                return (
                    Disposition.IGNORED_DUPLICATE,
                    f"duplicate: progress {fact.done}/{fact.total} already recorded",
                )
            if fact.done < plate.done:
                return (
                    Disposition.IGNORED_STALE,
                    f"stale: progress {fact.done} is behind {plate.done} already recorded",
                )
        if rule is Rule.CANCEL and plate is not None and plate.cancel_requested:
            return Disposition.IGNORED_DUPLICATE, "duplicate: plate cancel already requested"
        if rule is Rule.TIME_OUT and plate is not None and not plate.cancel_requested:
            return Disposition.IGNORED_STALE, "stale: no cancel is pending for the plate"
        return None

    def _protocol_error(self, plate: _Plate, detail: str) -> tuple[Disposition, str]:
        """An impossible fact: report it, fail the plate, journal the fact as rejected."""
        message = detail.removeprefix("engine protocol error: ")
        self._out.append(
            ReportError(ErrorCode.ENGINE_PROTOCOL_ERROR, message, plate.plate_id, self._stimulus)
        )
        self._converge(plate, PlateOutcome.FAILED, Reason.ENGINE_PROTOCOL_ERROR, message)
        return Disposition.REJECTED, detail

    # --- the data rules (see ``Rule``) -----------------------------------------------------

    def _start(self, _plate: _Plate | None, _fact: Any) -> str | None:
        if self._aborts_on(self._failed_before_start()):
            self._abort()  # a plate failed before the start: execute nothing, submit nothing
            return "started, then aborted"
        for plate in self._unsettled_plates():
            self._move(plate, PlateEvent.SELECTED)
            plate.job_id = f"{self.batch_id}.{plate.index}.c"
            self._out.append(SubmitCompile(plate.plate_id, plate.job_id, self._stimulus))
        return None

    def _cancel_all(self, _plate: _Plate | None, _fact: Any) -> str | None:
        self._cancel_requested = True
        for plate in self._unsettled_plates():
            if not plate.cancel_requested:
                self._cancel(plate, None)
        return None

    def _engine_lost(self, _plate: _Plate | None, fact: EngineLost) -> str | None:
        for plate in self._unsettled_plates():
            self._converge(plate, PlateOutcome.FAILED, Reason.ENGINE_LOST, fact.reason)
        return None

    def _report_callback(self, _plate: _Plate | None, fact: Any) -> str | None:
        # Reporting a failure of emit_error through emit_error could loop forever.
        if fact.callback != "emit_error":
            message = f"host callback {fact.callback} raised: {fact.error}"
            self._out.append(
                ReportError(ErrorCode.HOST_CALLBACK_FAILED, message, fact.plate_id, self._stimulus)
            )
        return None

    def _compiled(self, plate: _Plate | None, fact: Any) -> str | None:
        assert plate is not None
        plate.artifact_id = fact.artifact_id
        plate.awaiting_compile = False
        self._awaiting_compile -= 1
        if self.mode is BatchMode.COMPILE_ONLY:
            self._converge(plate, PlateOutcome.COMPILED, Reason.SUCCEEDED, fact.artifact_id)
        elif plate.cancel_requested:
            self._converge(plate, PlateOutcome.CANCELLED, Reason.CANCEL_REQUESTED)
        return None

    def _started(self, plate: _Plate | None, _fact: Any) -> str | None:
        assert plate is not None
        plate.started_at = self._now
        return None

    def _progress(self, plate: _Plate | None, fact: Any) -> str | None:
        assert plate is not None
        plate.done = fact.done
        plate.total = fact.total
        self._out.append(
            ProgressRecorded(plate.plate_id, fact.done, fact.total, fact.message, self._stimulus)
        )
        return None

    def _cancelled(self, plate: _Plate | None, _fact: Any) -> str | None:
        assert plate is not None
        reason = Reason.CANCEL_REQUESTED if plate.cancel_requested else Reason.ENGINE_CANCELLED
        self._converge(plate, PlateOutcome.CANCELLED, reason)
        return None

    def _cancel(self, plate: _Plate | None, _fact: Any) -> str | None:
        assert plate is not None
        plate.cancel_requested = True
        if not self._cancel_outstanding(plate):
            self._converge(plate, PlateOutcome.CANCELLED, Reason.CANCEL_REQUESTED)
        return None

    def _time_out(self, plate: _Plate | None, _fact: Any) -> str | None:
        assert plate is not None
        self._converge(plate, PlateOutcome.CANCELLED, Reason.CANCEL_UNCONFIRMED)
        return None

    def _lost(self, plate: _Plate | None, fact: Any) -> str | None:
        assert plate is not None
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

    # --- moving things -------------------------------------------------------------------

    def _unsettled_plates(self) -> list[_Plate]:
        return [plate for plate in self._plates.values() if plate.outcome is None]

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

    def _before_barrier(self) -> bool:
        """Whether the batch can still take the compile barrier (the table says so)."""
        return self._batch_machine.row(self._state, BatchEvent.ALL_COMPILED) is not None

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
        if outcome is PlateOutcome.FAILED and self._before_barrier() and self._aborts_on(reason):
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
        self._out.append(ReportBatch(self.summary(), self._stimulus))

    def _react(self) -> None:
        """Batch-level consequences, computed after the fact's own moves."""
        if self.mode is BatchMode.RUN and self._awaiting_compile == 0 and self._before_barrier():
            ready = self._unsettled_plates()
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
        flight = plate.in_flight()
        if flight is None:
            return False
        self._out.append(CancelSubmission(plate.plate_id, *flight, self._stimulus))
        return True
