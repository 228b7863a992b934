"""Stateful property test of the core: one ``Batch`` driven through random fact orderings.

A Hypothesis ``RuleBasedStateMachine`` builds a batch of 1-8 plates (run or
compile-only, abort or continue policy) and hands it facts in any order: the
honest next fact of a fake engine that only answers what the batch asked of it
(``SubmitCompile`` / ``SubmitExecution`` / ``CancelSubmission``), facts that
overtook an earlier one and the late arrival of the one they overtook,
re-sent facts, facts with stale ids, impossible facts, facts about plates that
are not in the batch, plate and batch cancels, cancel time-outs and engine
loss. A flaky host carries out the reports and raises on a drawn schedule; the
driver feeds each failure back as ``HostCallbackFailed`` after the current
decisions are done, never re-entrantly.

Every ``handle`` call is checked twice:

- against the guarantees of DESIGN.md section 1.3 (C1-C5), write-once
  terminals, the compile barrier, monotone progress and the journal (one
  record per fact); every assertion message names what it checks;
- against an oracle: a plain model of the semantics (``Oracle``) that
  predicts the disposition, the whole snapshot and the decisions.

At teardown the run is drained (the engine finishes every lifecycle, or the
engine is lost), after which every plate must have been reported exactly
once, the batch exactly once with the outcome the oracle expects, and the
journal must replay, also through its JSON Lines form, to the same snapshot.

Keeping runs interesting: a run opens at a drawn position (not started,
started, some plates compiled, every plate executing); cancels, engine loss
and impossible facts are held back for a drawn number of calm steps, and the
engine's mishaps (failures, rejections, its own cancels) have a drawn rate, so
that many runs reach the execution phase before anything breaks.

A failure prints the shrunk steps; replay them with ``@reproduce_failure`` (the
``ci`` profile prints the blob) or pin them as a plain test of ``Batch.handle``
calls. ``HYPOTHESIS_PROFILE=nightly`` runs 5,000 examples instead of 300.
"""

from __future__ import annotations

import io
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NoReturn, TypeAlias

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from plateflow.core import (
    Batch,
    BatchChanged,
    BatchMode,
    BatchSnapshot,
    BatchStarted,
    BatchState,
    CancelRequested,
    CancelSubmission,
    CancelTimedOut,
    CompileAccepted,
    CompileCancelled,
    CompileFailed,
    CompileFailurePolicy,
    CompileRejected,
    CompileSucceeded,
    Decision,
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
    Journal,
    PlateChanged,
    PlateOutcome,
    PlateSnapshot,
    PlateState,
    ProgressRecorded,
    Reason,
    ReportBatch,
    ReportError,
    ReportPlate,
    SubmitCompile,
    SubmitExecution,
    fact_adapter,
    replay,
)
from plateflow.errors import ErrorCode

BATCH_ID: Final = "b7"
OTHER_BATCH_ID: Final = "b6"
"""Ids issued by another batch (same shape as ours): stale for this one."""
TOTAL_STEPS: Final = 4
"""How many progress steps the fake engine reports per execution."""
REPLAY_EVERY: Final = 10
"""Replay the journal every this many steps (replay is O(records))."""
Opening = Literal["started", "not started", "some compiled", "executing"]
OPENINGS: Final[tuple[Opening, ...]] = ("started", "not started", "some compiled", "executing")
"""Where a run starts: ``some compiled`` compiles every other plate; ``executing``
(run batches) compiles every plate and has every execution accepted."""
MAX_FEEDBACK: Final = 500
"""More handle calls than this for one fact means host failures feed back forever."""
MISHAP_ODDS: Final = {"never": 0, "rare": 10, "often": 4}
"""An honest engine move is a mishap (failure, rejection, own cancel) one time in N."""

_P = PlateState
_COMPILE_FACTS: Final = (
    CompileAccepted,
    CompileSucceeded,
    CompileFailed,
    CompileRejected,
    CompileCancelled,
)
_ABORTING: Final = frozenset(
    {Reason.COMPILE_FAILED, Reason.COMPILE_REJECTED, Reason.ENGINE_PROTOCOL_ERROR}
)

CompileFact: TypeAlias = (
    CompileAccepted | CompileSucceeded | CompileFailed | CompileRejected | CompileCancelled
)
ExecutionFact: TypeAlias = (
    ExecutionAccepted
    | ExecutionStarted
    | ExecutionProgress
    | ExecutionSucceeded
    | ExecutionFailed
    | ExecutionRejected
    | ExecutionCancelled
)
EngineFact: TypeAlias = CompileFact | ExecutionFact

COMPILE_KINDS: Final = (
    "compile_accepted",
    "compile_succeeded",
    "compile_failed",
    "compile_rejected",
    "compile_cancelled",
)
EXECUTION_KINDS: Final = (
    "execution_accepted",
    "execution_started",
    "execution_progress",
    "execution_succeeded",
    "execution_failed",
    "execution_rejected",
    "execution_cancelled",
)
_REQUIRED: Final[dict[str, dict[str, Any]]] = {
    "compile_succeeded": {"artifact_id": "art-x"},
    "compile_failed": {"error": "compile blew up"},
    "compile_rejected": {"error": "compile refused"},
    "execution_progress": {"done": 1, "total": TOTAL_STEPS},
    "execution_failed": {"error": "worker died", "exit_code": 9},
    "execution_rejected": {"error": "unknown artifact"},
}


def engine_fact(kind: str, plate_id: str, submission_id: str, **extra: Any) -> Fact:
    """An engine fact of ``kind`` about ``plate_id`` naming ``submission_id``."""
    id_field = "job_id" if kind.startswith("compile") else "execution_id"
    raw = {"kind": kind, "plate_id": plate_id, id_field: submission_id}
    return fact_adapter.validate_python({**raw, **_REQUIRED.get(kind, {}), **extra})


def with_new_stimulus(fact: Fact, stimulus_id: str) -> Fact:
    """The same fact (equal content) under another stimulus id."""
    raw = fact_adapter.dump_python(fact)
    return fact_adapter.validate_python({**raw, "stimulus_id": stimulus_id})


def job_id(index: int, batch_id: str = BATCH_ID) -> str:
    return f"{batch_id}.{index}.c"


def execution_id(index: int, batch_id: str = BATCH_ID) -> str:
    return f"{batch_id}.{index}.x"


# --- the oracle ------------------------------------------------------------------------


@dataclass
class PlateModel:
    plate_id: str
    index: int
    state: PlateState = PlateState.IDLE
    outcome: PlateOutcome | None = None
    reason: Reason | None = None
    job_id: str | None = None
    artifact_id: str | None = None
    execution_id: str | None = None
    started_at: float | None = None
    done: int = 0
    total: int = 0
    cancel_requested: bool = False

    def snapshot(self) -> PlateSnapshot:
        return PlateSnapshot(
            plate_id=self.plate_id,
            state=self.state,
            outcome=self.outcome,
            reason=self.reason,
            job_id=self.job_id,
            artifact_id=self.artifact_id,
            execution_id=self.execution_id,
            started_at=self.started_at,
            done=self.done,
            total=self.total,
            cancel_requested=self.cancel_requested,
        )


@dataclass
class Expectation:
    """What the oracle expects one fact to do."""

    disposition: Disposition = Disposition.APPLIED
    settled: list[tuple[str, PlateOutcome, Reason]] = field(default_factory=list)
    compiles: list[tuple[str, str]] = field(default_factory=list)
    executions: list[tuple[str, str]] = field(default_factory=list)
    cancels: list[tuple[str, str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    batch_outcome: list[BatchState] = field(default_factory=list)


class Oracle:
    """The semantics of DESIGN.md section 1 written out plainly, one plate at a time.

    Classification of an engine fact about a plate, in order: unknown plate
    (rejected), settled plate (stale), a submission never issued to the plate
    (protocol error), another submission id (stale), a move already made
    (duplicate), else applied with any move it implies.
    """

    def __init__(
        self, plate_ids: Sequence[str], mode: BatchMode, policy: CompileFailurePolicy
    ) -> None:
        self.mode = mode
        self.policy = policy
        self.plates = {pid: PlateModel(pid, i) for i, pid in enumerate(plate_ids)}
        self.state = BatchState.IDLE
        self.cancel_requested = False
        self.aborted = False
        self._exp = Expectation()
        self._now = 0.0

    def snapshot(self) -> BatchSnapshot:
        return BatchSnapshot(
            batch_id=BATCH_ID,
            state=self.state,
            cancel_requested=self.cancel_requested,
            plates=tuple(p.snapshot() for p in self.plates.values()),
        )

    def apply(self, fact: Fact, now: float) -> Expectation:
        self._exp = Expectation()
        self._now = now
        self._exp.disposition = self._classify(fact)
        self._react()
        return self._exp

    def outcome_rule(self) -> BatchState:
        """Completed iff every plate succeeded; cancelled if a cancel was asked; else failed."""
        success = (
            PlateOutcome.COMPILED
            if self.mode is BatchMode.COMPILE_ONLY
            else (PlateOutcome.COMPLETED)
        )
        outcomes = [p.outcome for p in self.plates.values()]
        if all(o is success for o in outcomes):
            return BatchState.COMPLETED
        if self.cancel_requested or (
            PlateOutcome.FAILED not in outcomes
            and any(p.cancel_requested for p in self.plates.values())
        ):
            return BatchState.CANCELLED
        return BatchState.FAILED

    # --- classification -------------------------------------------------------------

    def _classify(self, fact: Fact) -> Disposition:
        if isinstance(fact, BatchStarted):
            return self._start()
        if isinstance(fact, CancelRequested):
            if fact.plate_id is None:
                return self._cancel_batch()
            return self._cancel_one(fact.plate_id)
        if isinstance(fact, CancelTimedOut):
            return self._cancel_timed_out(fact.plate_id)
        if isinstance(fact, HostCallbackFailed):
            if fact.callback != "emit_error":
                self._exp.errors.append(ErrorCode.HOST_CALLBACK_FAILED)
            return Disposition.APPLIED
        if isinstance(fact, EngineLost):
            if self.state.is_terminal:
                return Disposition.IGNORED_STALE
            for plate in self.plates.values():
                if plate.outcome is None:
                    self._settle(plate, PlateOutcome.FAILED, Reason.ENGINE_LOST)
            return Disposition.APPLIED
        return self._engine_fact(fact)

    def _known(self, plate_id: str) -> PlateModel | None:
        plate = self.plates.get(plate_id)
        if plate is None:
            self._exp.errors.append(ErrorCode.UNKNOWN_PLATE)
        return plate

    def _engine_fact(self, fact: EngineFact) -> Disposition:
        plate = self._known(fact.plate_id)
        if plate is None:
            return Disposition.REJECTED
        if plate.outcome is not None:
            return Disposition.IGNORED_STALE
        if isinstance(fact, _COMPILE_FACTS):
            issued, named = plate.job_id, fact.job_id
        else:
            issued, named = plate.execution_id, fact.execution_id
        if issued is None:
            return self._protocol_error(plate)
        if named != issued:
            return Disposition.IGNORED_STALE
        return self._apply(plate, fact)

    def _apply(self, plate: PlateModel, fact: EngineFact) -> Disposition:
        dup = Disposition.IGNORED_DUPLICATE
        compiling = (_P.QUEUED, _P.COMPILING)
        match fact:
            case CompileAccepted():
                if plate.state is not _P.QUEUED:
                    return dup
                plate.state = _P.COMPILING
            case CompileSucceeded():
                if plate.state not in compiling:
                    return dup
                plate.state = _P.COMPILED
                plate.artifact_id = fact.artifact_id
                if self.mode is BatchMode.COMPILE_ONLY:
                    self._settle(plate, PlateOutcome.COMPILED, Reason.SUCCEEDED)
                elif plate.cancel_requested:
                    self._settle(plate, PlateOutcome.CANCELLED, Reason.CANCEL_REQUESTED)
            case CompileFailed() | CompileRejected():
                if plate.state not in compiling:
                    return self._protocol_error(plate)
                reason = (
                    Reason.COMPILE_REJECTED
                    if isinstance(fact, CompileRejected)
                    else Reason.COMPILE_FAILED
                )
                self._settle(plate, PlateOutcome.FAILED, reason)
            case CompileCancelled():
                if plate.state not in compiling:
                    return Disposition.IGNORED_STALE
                self._settle(plate, PlateOutcome.CANCELLED, self._cancel_reason(plate))
            case ExecutionAccepted():
                if plate.state is not _P.COMPILED:
                    return dup
                plate.state = _P.EXECUTING
            case ExecutionStarted():
                if plate.started_at is not None:
                    return dup
                plate.state = _P.EXECUTING
                plate.started_at = self._now
            case ExecutionProgress():
                if fact.done > fact.total:
                    return self._protocol_error(plate)
                if plate.total and (fact.done, fact.total) == (plate.done, plate.total):
                    return dup  # the same record again: the host hears it once
                if fact.done < plate.done:
                    return Disposition.IGNORED_STALE
                plate.state = _P.EXECUTING
                plate.done, plate.total = fact.done, fact.total
            case ExecutionSucceeded():
                self._settle(plate, PlateOutcome.COMPLETED, Reason.SUCCEEDED)
            case ExecutionFailed():
                self._settle(plate, PlateOutcome.FAILED, Reason.EXECUTION_FAILED)
            case ExecutionRejected():
                if plate.state is not _P.COMPILED:
                    return self._protocol_error(plate)
                self._settle(plate, PlateOutcome.FAILED, Reason.EXECUTION_REJECTED)
            case ExecutionCancelled():
                self._settle(plate, PlateOutcome.CANCELLED, self._cancel_reason(plate))
        return Disposition.APPLIED

    # --- host commands ----------------------------------------------------------------

    def _start(self) -> Disposition:
        if self.state.is_terminal:
            return Disposition.IGNORED_STALE
        if self.state is not BatchState.IDLE:
            return Disposition.IGNORED_DUPLICATE
        self.state = BatchState.COMPILING
        failed_before = any(
            p.outcome is PlateOutcome.FAILED and p.reason in _ABORTING for p in self.plates.values()
        )
        if failed_before and self._aborts():
            # A plate failed before the start: the abort policy executes nothing.
            self._abort()
            return Disposition.APPLIED
        for plate in self.plates.values():
            # A plate that already settled (cancelled or failed before the start)
            # stays settled: it is not selected and gets no compile job.
            if plate.outcome is None:
                plate.state = _P.QUEUED
                plate.job_id = job_id(plate.index)
                self._exp.compiles.append((plate.plate_id, plate.job_id))
        return Disposition.APPLIED

    def _cancel_batch(self) -> Disposition:
        if self.state.is_terminal:
            return Disposition.IGNORED_STALE
        if self.cancel_requested:
            return Disposition.IGNORED_DUPLICATE
        self.cancel_requested = True
        self.state = BatchState.CANCELLING
        for plate in self.plates.values():
            if plate.outcome is None and not plate.cancel_requested:
                self._cancel_plate(plate)
        return Disposition.APPLIED

    def _cancel_one(self, plate_id: str) -> Disposition:
        plate = self._known(plate_id)
        if plate is None:
            return Disposition.REJECTED
        if plate.outcome is not None:
            return Disposition.IGNORED_STALE
        if plate.cancel_requested:
            return Disposition.IGNORED_DUPLICATE
        self._cancel_plate(plate)
        return Disposition.APPLIED

    def _cancel_timed_out(self, plate_id: str) -> Disposition:
        plate = self._known(plate_id)
        if plate is None:
            return Disposition.REJECTED
        if plate.outcome is not None or not plate.cancel_requested:
            return Disposition.IGNORED_STALE
        self._settle(plate, PlateOutcome.CANCELLED, Reason.CANCEL_UNCONFIRMED)
        return Disposition.APPLIED

    # --- consequences -------------------------------------------------------------------

    @staticmethod
    def _cancel_reason(plate: PlateModel) -> Reason:
        return Reason.CANCEL_REQUESTED if plate.cancel_requested else Reason.ENGINE_CANCELLED

    def _cancel_in_flight(self, plate: PlateModel) -> bool:
        if plate.state in (_P.QUEUED, _P.COMPILING) and plate.job_id is not None:
            self._exp.cancels.append((plate.plate_id, "compile", plate.job_id))
            return True
        if plate.state in (_P.COMPILED, _P.EXECUTING) and plate.execution_id is not None:
            self._exp.cancels.append((plate.plate_id, "execute", plate.execution_id))
            return True
        return False

    def _cancel_plate(self, plate: PlateModel) -> None:
        plate.cancel_requested = True
        if not self._cancel_in_flight(plate):
            self._settle(plate, PlateOutcome.CANCELLED, Reason.CANCEL_REQUESTED)

    def _protocol_error(self, plate: PlateModel) -> Disposition:
        self._exp.errors.append(ErrorCode.ENGINE_PROTOCOL_ERROR)
        self._settle(plate, PlateOutcome.FAILED, Reason.ENGINE_PROTOCOL_ERROR)
        return Disposition.REJECTED

    def _settle(self, plate: PlateModel, outcome: PlateOutcome, reason: Reason) -> None:
        assert plate.outcome is None, f"oracle bug: {plate.plate_id} settled twice"
        plate.outcome, plate.reason = outcome, reason
        if outcome is not PlateOutcome.COMPILED:  # compiled rests in `compiled`
            plate.state = PlateState(outcome.value)
        self._exp.settled.append((plate.plate_id, outcome, reason))
        if (
            outcome is PlateOutcome.FAILED
            and reason in _ABORTING
            and self.state is BatchState.COMPILING
            and self._aborts()
        ):
            self._abort()

    def _aborts(self) -> bool:
        """A plate failing before execution aborts a run batch under the abort policy."""
        return (
            self.mode is BatchMode.RUN
            and self.policy is CompileFailurePolicy.ABORT
            and not self.aborted
        )

    def _abort(self) -> None:
        """Execute nothing: cancel what is in flight, settle the rest ``batch_aborted``."""
        self.aborted = True
        for other in self.plates.values():
            if other.outcome is None:
                if not other.cancel_requested:  # a pending cancel already reached the engine
                    self._cancel_in_flight(other)
                self._settle(other, PlateOutcome.CANCELLED, Reason.BATCH_ABORTED)

    def _react(self) -> None:
        plates = self.plates.values()
        if (
            self.state is BatchState.COMPILING
            and self.mode is BatchMode.RUN
            and all(p.outcome is not None or p.artifact_id is not None for p in plates)
        ):
            ready = [p for p in plates if p.outcome is None]
            if ready:
                self.state = BatchState.EXECUTING
                for plate in ready:
                    plate.execution_id = execution_id(plate.index)
                    self._exp.executions.append((plate.plate_id, plate.execution_id))
        if all(p.outcome is not None for p in plates) and not self.state.is_terminal:
            self.state = self.outcome_rule()
            self._exp.batch_outcome.append(self.state)


# --- the fake engine and the flaky host --------------------------------------------------

Status = Literal["submitted", "accepted", "started", "finished"]


@dataclass
class Submission:
    """One submission as the engine sees it."""

    plate_id: str
    phase: Literal["compile", "execute"]
    submission_id: str
    status: Status = "submitted"
    cancel_asked: bool = False
    done: int = 0


_HAPPY: Final[dict[tuple[str, Status], tuple[str, ...]]] = {
    ("compile", "submitted"): ("accept", "succeed"),
    ("compile", "accepted"): ("succeed",),
    ("execute", "submitted"): ("accept", "start", "progress", "succeed"),
    ("execute", "accepted"): ("start", "progress", "succeed"),
    ("execute", "started"): ("progress", "succeed"),
}
"""Moves along the happy path (a move from ``submitted`` but ``accept`` overtakes it)."""
_MISHAPS: Final[dict[tuple[str, Status], tuple[str, ...]]] = {
    ("compile", "submitted"): ("fail", "reject", "cancel"),
    ("compile", "accepted"): ("fail", "cancel"),
    ("execute", "submitted"): ("fail", "reject", "cancel"),
    ("execute", "accepted"): ("fail", "cancel"),
    ("execute", "started"): ("fail", "cancel"),
}
"""Honest but unhappy moves; ``cancel`` without being asked is the engine's own cancel."""
_KIND_SUFFIX: Final = {
    "accept": "accepted",
    "succeed": "succeeded",
    "fail": "failed",
    "reject": "rejected",
    "cancel": "cancelled",
    "start": "started",
    "progress": "progress",
}


class FakeEngine:
    """Answers only what the batch asked of it, in an order an engine could.

    A move from ``submitted`` that implies the acceptance (success, start,
    progress) overtakes the acceptance, and a progress record that skips steps
    overtakes the records of the skipped steps: those stay ``in_transit`` and
    may arrive later.
    """

    def __init__(self) -> None:
        self.current: dict[str, Submission] = {}
        self.by_id: dict[str, Submission] = {}
        self.in_transit: list[Fact] = []

    def observe(self, decisions: Sequence[Decision]) -> None:
        for d in decisions:
            if isinstance(d, SubmitCompile):
                self._submit(Submission(d.plate_id, "compile", d.job_id))
            elif isinstance(d, SubmitExecution):
                self._submit(Submission(d.plate_id, "execute", d.execution_id))
            elif isinstance(d, CancelSubmission) and d.submission_id in self.by_id:
                self.by_id[d.submission_id].cancel_asked = True

    def _submit(self, sub: Submission) -> None:
        self.current[sub.plate_id] = sub
        self.by_id[sub.submission_id] = sub

    def live(self) -> list[str]:
        return [p for p, sub in self.current.items() if sub.status != "finished"]

    def moves(self, plate_id: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(happy moves, mishaps) for the plate's live submission."""
        sub = self.current[plate_id]
        key = (sub.phase, sub.status)
        if sub.cancel_asked:  # confirming a cancel it was asked for is the happy path
            return (*_HAPPY[key], "cancel"), tuple(m for m in _MISHAPS[key] if m != "cancel")
        return _HAPPY[key], _MISHAPS[key]

    def report(self, plate_id: str, move: str, done: int = 0) -> Fact:
        """The fact for ``move``; updates what the engine believes it told the batch."""
        sub = self.current[plate_id]
        prefix = "compile" if sub.phase == "compile" else "execution"
        if sub.status == "submitted" and move in ("succeed", "start", "progress"):
            self.in_transit.append(engine_fact(f"{prefix}_accepted", *_ids(sub)))
        extra: dict[str, Any] = {}
        if move == "succeed":
            if sub.phase == "compile":
                extra["artifact_id"] = f"art-{sub.submission_id}"
            else:
                extra["result"] = {"wells": 96}
        if move == "progress":  # skipped records were sent earlier and are overtaken
            for skipped in range(sub.done + 1, done):
                self.in_transit.append(
                    engine_fact("execution_progress", *_ids(sub), done=skipped, total=TOTAL_STEPS)
                )
            extra["done"] = sub.done = done
        if move in ("accept", "progress"):
            sub.status = "accepted" if sub.status == "submitted" else sub.status
        elif move == "start":
            sub.status = "started"
        else:
            sub.status = "finished"
        return engine_fact(f"{prefix}_{_KIND_SUFFIX[move]}", *_ids(sub), **extra)


def _ids(sub: Submission) -> tuple[str, str]:
    return sub.plate_id, sub.submission_id


_CALLBACK_FOR: Final = {
    ReportPlate: "on_plate_completed",
    ReportBatch: "on_all_plates_completed",
    ReportError: "emit_error",
}


class FlakyHost:
    """Carries out reports; raises on a fixed, drawn schedule (cycled)."""

    def __init__(self, faults: Sequence[bool]) -> None:
        self._faults = tuple(faults)
        self._calls = 0
        self.raised = 0

    def carry_out(self, decisions: Sequence[Decision]) -> list[HostCallbackFailed]:
        failures: list[HostCallbackFailed] = []
        for d in decisions:
            callback = _CALLBACK_FOR.get(type(d))
            if callback is None:
                continue
            fault = self._faults[self._calls % len(self._faults)]
            self._calls += 1
            if fault:
                self.raised += 1
                plate_id = d.plate_id if isinstance(d, ReportPlate | ReportError) else None
                failures.append(
                    HostCallbackFailed(
                        callback=callback,
                        plate_id=plate_id,
                        error=f"RuntimeError: host fault #{self.raised}",
                    )
                )
        return failures


# --- the state machine -------------------------------------------------------------------


class BatchMachine(RuleBasedStateMachine):
    """Drives one batch through random fact orderings; checks C1-C5 and the oracle."""

    batch: Batch
    oracle: Oracle
    engine: FakeEngine
    host: FlakyHost
    plate_ids: tuple[str, ...]
    drain_by: Literal["finishing", "engine_lost"]
    calm_steps: int
    mishap_odds: int

    def __init__(self) -> None:
        super().__init__()
        self.ready = False
        self.failed = False
        self.time = 0.0
        self.steps = 0
        self.started = False
        self.sent: list[Fact] = []
        self.reports: dict[str, ReportPlate] = {}
        self.batch_reports: list[ReportBatch] = []
        self.settled_snapshots: dict[str, PlateSnapshot] = {}
        self.max_done: dict[str, int] = {}
        self.executions_submitted: set[str] = set()

    # --- plumbing -------------------------------------------------------------------------

    def fail(self, message: str) -> NoReturn:
        self.failed = True  # teardown does not drain a run that already failed
        raise AssertionError(message)

    def clock(self) -> float:
        self.time += 1.0
        return self.time

    def send(self, fact: Fact) -> None:
        """Hand in a fact, carry out the decisions, then feed back the host's failures."""
        queue: deque[Fact] = deque([fact])
        handled = 0
        while queue:
            handled += 1
            if handled > MAX_FEEDBACK:
                self.fail(f"C5: feeding host failures back after {fact!r} does not settle down")
            current = queue.popleft()
            decisions = self.handle_checked(current)
            self.engine.observe(decisions)
            queue.extend(self.host.carry_out(decisions))  # after, never re-entrantly

    def handle_checked(self, fact: Fact) -> tuple[Decision, ...]:
        before = self.batch.snapshot()
        records = len(self.batch.journal)
        try:
            decisions = self.batch.handle(fact)
        except Exception as exc:  # any escape at all breaks C1
            self.failed = True
            raise AssertionError(
                f"C1: handle({fact!r}) raised {type(exc).__name__}: {exc}; the core must never "
                "raise for anything an engine or host can send"
            ) from exc
        self.sent.append(fact)
        after = self.batch.snapshot()
        self.check_journal(fact, records)
        self.check_plates(fact, before, after, decisions)
        self.check_reports(fact, before, after, decisions)
        self.check_engine_decisions(after, decisions)
        self.check_notifications(before, after, decisions)
        self.check_oracle(fact, after, decisions)
        return decisions

    # --- checks after every handle call -----------------------------------------------------

    def check_journal(self, fact: Fact, records: int) -> None:
        journal = self.batch.journal
        if len(journal) != records + 1:
            self.fail(f"journal: {fact!r} appended {len(journal) - records} records, not one")
        last = journal[-1]
        if last.fact is not fact or last.seq != records or last.time != self.time:
            self.fail(
                f"journal: the record for {fact!r} is seq {last.seq} at {last.time} about "
                f"{last.fact!r}; expected seq {records} at {self.time}"
            )

    def check_plates(
        self, fact: Fact, before: BatchSnapshot, after: BatchSnapshot, decisions: Sequence[Decision]
    ) -> None:
        reported = {d.plate_id for d in decisions if isinstance(d, ReportPlate)}
        for old, new in zip(before.plates, after.plates, strict=True):
            pid = new.plate_id
            settled_now = old.outcome is None and new.outcome is not None
            if (settled_now or (new.state.is_terminal and not old.state.is_terminal)) and (
                pid not in reported
            ):
                self.fail(
                    f"C1: plate {pid} settled ({old.state} -> {new.state}, {new.outcome}) on "
                    f"{fact!r} but that handle call returned no ReportPlate for it"
                )
            frozen = self.settled_snapshots.get(pid)
            if frozen is not None and new != frozen:
                self.fail(
                    f"write-once: settled plate {pid} changed on {fact!r}:\n"
                    f"  was {frozen}\n  now {new}"
                )
            if new.done < self.max_done.get(pid, 0):
                self.fail(
                    f"monotone progress: plate {pid} done fell from {self.max_done[pid]} to "
                    f"{new.done} on {fact!r}"
                )
            self.max_done[pid] = new.done

    def check_reports(
        self, fact: Fact, before: BatchSnapshot, after: BatchSnapshot, decisions: Sequence[Decision]
    ) -> None:
        last = self.batch.journal[-1]
        for index, d in enumerate(decisions):
            if isinstance(d, ReportPlate):
                pid = d.plate_id
                if pid in self.reports:
                    self.fail(
                        f"C2: plate {pid} reported a second time on {fact!r}: {d}; "
                        f"the first report was {self.reports[pid]}"
                    )
                snap = after.plate(pid)
                if before.plate(pid).outcome is not None:
                    self.fail(f"C2: {d} for a plate that had settled before {fact!r}")
                want_state = (
                    _P.COMPILED if d.outcome is PlateOutcome.COMPILED else _P(d.outcome.value)
                )
                if (snap.state, snap.outcome, snap.reason) != (want_state, d.outcome, d.reason):
                    self.fail(f"C4: {d} returned but the snapshot still shows {snap}")
                if not any(
                    c.plate_id == pid
                    and c.new == snap.state
                    and (snap.state.is_terminal or c.old == c.new)
                    for c in last.changes
                ):
                    self.fail(
                        f"C4: {d} returned but the last journal record has no settling change "
                        f"for the plate: {last.changes}"
                    )
                self.reports[pid] = d
                self.settled_snapshots[pid] = snap
            elif isinstance(d, ReportBatch):
                self.check_batch_report(fact, d, decisions[index + 1 :], after)
        if len(self.reports) == len(self.plate_ids):
            if len(self.batch_reports) != 1 or not after.state.is_terminal:
                self.fail(
                    f"C3: every plate is reported after {fact!r} but the batch was reported "
                    f"{len(self.batch_reports)} times and is {after.state}"
                )
        elif after.state.is_terminal:
            self.fail(f"C3: the batch settled {after.state} on {fact!r} with plates unreported")

    def check_batch_report(
        self, fact: Fact, report: ReportBatch, later: Sequence[Decision], after: BatchSnapshot
    ) -> None:
        if self.batch_reports:
            self.fail(f"C3: the batch was reported a second time on {fact!r}: {report}")
        self.batch_reports.append(report)
        unreported = [p for p in self.plate_ids if p not in self.reports]
        late = [d.plate_id for d in later if isinstance(d, ReportPlate)]
        if unreported or late:
            self.fail(f"C3: ReportBatch on {fact!r} before the ReportPlate of {unreported + late}")
        summary = report.summary
        plates = sorted((s.plate_id, s.outcome, s.reason) for s in summary.plates)
        expected = sorted((r.plate_id, r.outcome, r.reason) for r in self.reports.values())
        if plates != expected:
            self.fail(f"C3: the summary's plates {plates} do not match the reports {expected}")
        counts = Counter(r.outcome for r in self.reports.values())
        reasons = Counter(r.reason for r in self.reports.values())
        if dict(summary.counts) != dict(counts) or dict(summary.reasons) != dict(reasons):
            self.fail(
                f"C3: the summary counts {summary.counts} / {summary.reasons} do not match "
                f"the reports {dict(counts)} / {dict(reasons)}"
            )
        if (summary.batch_id, summary.mode) != (BATCH_ID, self.batch.mode):
            self.fail(f"C3: the summary names another batch or mode: {summary}")
        if after.state is not summary.outcome:
            self.fail(f"C4: {report} returned but the snapshot shows the batch {after.state}")
        if not any(
            c.plate_id is None and c.new == summary.outcome for c in self.batch.journal[-1].changes
        ):
            self.fail(f"C4: {report} returned but the last journal record does not settle it")

    def check_engine_decisions(self, after: BatchSnapshot, decisions: Sequence[Decision]) -> None:
        for d in decisions:
            if isinstance(d, SubmitExecution):
                if self.batch.mode is not BatchMode.RUN:
                    self.fail(f"barrier: a compile-only batch submitted an execution: {d}")
                compiling = [
                    p.plate_id for p in after.plates if p.outcome is None and p.artifact_id is None
                ]
                if compiling:
                    self.fail(f"barrier: {d} returned while {compiling} were still compiling")
                if d.plate_id in self.executions_submitted:
                    self.fail(f"barrier: plate {d.plate_id} submitted for execution twice")
                if d.artifact_id != after.plate(d.plate_id).artifact_id:
                    self.fail(f"barrier: {d} does not carry the plate's compile artifact")
                self.executions_submitted.add(d.plate_id)
            elif isinstance(d, CancelSubmission):
                sub = self.engine.by_id.get(d.submission_id)
                if sub is None or sub.plate_id != d.plate_id:
                    self.fail(f"cancel: {d} names a submission never issued to the plate")

    def check_notifications(
        self, before: BatchSnapshot, after: BatchSnapshot, decisions: Sequence[Decision]
    ) -> None:
        """PlateChanged / BatchChanged chain from the old states to the new ones."""
        plates = {p.plate_id: p.state for p in before.plates}
        batch = before.state
        for d in decisions:
            if isinstance(d, PlateChanged):
                if plates[d.plate_id] is not d.old or d.old is d.new:
                    self.fail(f"notifications: {d} but the plate was {plates[d.plate_id]}")
                plates[d.plate_id] = d.new
            elif isinstance(d, BatchChanged):
                if batch is not d.old or d.old is d.new:
                    self.fail(f"notifications: {d} but the batch was {batch}")
                batch = d.new
            elif isinstance(d, ProgressRecorded):
                snap = after.plate(d.plate_id)
                if (snap.done, snap.total) != (d.done, d.total):
                    self.fail(f"notifications: {d} but the plate records {snap.done}/{snap.total}")
        if plates != {p.plate_id: p.state for p in after.plates} or batch is not after.state:
            self.fail(
                f"notifications: the PlateChanged/BatchChanged decisions lead to {batch} "
                f"{plates}, but the snapshot shows {after.state} "
                f"{ {p.plate_id: p.state for p in after.plates} }"
            )

    def check_oracle(self, fact: Fact, after: BatchSnapshot, decisions: Sequence[Decision]) -> None:
        exp = self.oracle.apply(fact, self.time)
        got = self.batch.journal[-1].disposition
        if got is not exp.disposition:
            self.fail(f"oracle: {fact!r} was journaled {got}, expected {exp.disposition}")
        model = self.oracle.snapshot()
        if after != model:
            diffs = [
                f"  {g.plate_id}: got  {g}\n  {g.plate_id}: want {w}"
                for g, w in zip(after.plates, model.plates, strict=True)
                if g != w
            ]
            self.fail(
                f"oracle: after {fact!r} the snapshot differs from the model:\n"
                f"  batch: got {after.state} (cancel {after.cancel_requested}), "
                f"want {model.state} (cancel {model.cancel_requested})\n" + "\n".join(diffs)
            )
        observed: dict[str, list[Any]] = {
            "settled": [
                (d.plate_id, d.outcome, d.reason) for d in decisions if isinstance(d, ReportPlate)
            ],
            "compiles": [(d.plate_id, d.job_id) for d in decisions if isinstance(d, SubmitCompile)],
            "executions": [
                (d.plate_id, d.execution_id) for d in decisions if isinstance(d, SubmitExecution)
            ],
            "cancels": [
                (d.plate_id, d.phase, d.submission_id)
                for d in decisions
                if isinstance(d, CancelSubmission)
            ],
            "errors": [d.code for d in decisions if isinstance(d, ReportError)],
            "batch_outcome": [d.summary.outcome for d in decisions if isinstance(d, ReportBatch)],
        }
        for name, got_list in observed.items():
            want = getattr(exp, name)
            if got_list != want:
                self.fail(f"oracle: {fact!r} gave {name} {got_list}, expected {want}")

    def check_replay(self) -> None:
        snapshot = self.batch.snapshot()
        try:
            replayed = replay(self.batch.journal).snapshot()
        except Exception as exc:  # any failure is a replay failure
            self.fail(f"replay: the journal does not replay: {type(exc).__name__}: {exc}")
        if replayed != snapshot:
            self.fail(f"replay: the replayed snapshot\n  {replayed}\n!= the live one\n  {snapshot}")

    # --- setup ---------------------------------------------------------------------------

    @initialize(
        n_plates=st.integers(1, 8),
        mode=st.sampled_from([BatchMode.RUN, BatchMode.COMPILE_ONLY]),
        policy=st.sampled_from([CompileFailurePolicy.ABORT, CompileFailurePolicy.CONTINUE]),
        host_faults=st.lists(st.booleans(), min_size=1, max_size=6),
        drain_by=st.sampled_from(["finishing", "engine_lost"]),
        opening=st.sampled_from(OPENINGS),
        calm_steps=st.integers(0, 15),
        engine_mishaps=st.sampled_from(list(MISHAP_ODDS)),
    )
    def setup(
        self,
        n_plates: int,
        mode: BatchMode,
        policy: CompileFailurePolicy,
        host_faults: list[bool],
        drain_by: Literal["finishing", "engine_lost"],
        opening: Opening,
        calm_steps: int,
        engine_mishaps: str,
    ) -> None:
        """A fresh batch, brought honestly to the ``opening`` position.

        ``calm_steps``: steps before cancels, engine loss and impossible facts are
        enabled; with the openings, this lets many runs reach the execution phase.
        """
        self.plate_ids = tuple(f"plate-{i}" for i in range(n_plates))
        self.batch = Batch(BATCH_ID, self.plate_ids, mode=mode, policy=policy, clock=self.clock)
        self.oracle = Oracle(self.plate_ids, mode, policy)
        self.engine = FakeEngine()
        self.host = FlakyHost(host_faults)
        self.drain_by = drain_by
        self.calm_steps = calm_steps
        self.mishap_odds = MISHAP_ODDS[engine_mishaps]
        self.ready = True
        if opening == "not started":
            return
        self.start_batch()
        if opening == "started":
            return
        everything = opening == "executing" and mode is BatchMode.RUN
        for index, plate_id in enumerate(self.plate_ids):
            if everything or index % 2 == 0:
                self.send(self.engine.report(plate_id, "succeed"))  # compiles
        if everything:
            for plate_id in self.engine.live():
                self.send(self.engine.report(plate_id, "accept"))  # executions accepted

    # --- rules: the host's commands ------------------------------------------------------------

    def stormy(self) -> bool:
        """Past the calm steps: cancels, engine loss and impossible facts may happen."""
        return self.steps >= self.calm_steps

    @precondition(lambda self: not self.started)
    @rule()
    def start_batch(self) -> None:
        self.started = True
        self.send(BatchStarted())

    @precondition(stormy)
    @rule(data=st.data())
    def cancel_plate(self, data: st.DataObject) -> None:
        """Cancel one plate; an unsettled one twice as likely as a settled one."""
        unsettled = [p.plate_id for p in self.batch.snapshot().plates if p.outcome is None]
        plate_id = data.draw(st.sampled_from([*unsettled, *self.plate_ids]), label="plate")
        self.send(CancelRequested(plate_id=plate_id))

    @precondition(stormy)
    @rule()
    def cancel_batch(self) -> None:
        self.send(CancelRequested())

    @precondition(stormy)
    @rule(data=st.data())
    def cancel_times_out(self, data: st.DataObject) -> None:
        pending = [
            p.plate_id
            for p in self.batch.snapshot().plates
            if p.cancel_requested and p.outcome is None
        ]
        plate_id = data.draw(st.sampled_from(pending or list(self.plate_ids)), label="plate")
        self.send(CancelTimedOut(plate_id=plate_id))

    # --- rules: the engine ---------------------------------------------------------------------

    def engine_step(self, data: st.DataObject, plate_id: str | None = None) -> None:
        """The engine reports one honest fact for ``plate_id`` (drawn when None)."""
        live = self.engine.live()
        if plate_id is None:
            if not live:
                return
            plate_id = data.draw(st.sampled_from(live), label="plate")
        elif plate_id not in live:
            return
        happy, mishaps = self.engine.moves(plate_id)
        odds = self.mishap_odds
        mishap = odds > 0 and data.draw(st.integers(1, odds), label="mishap roll") == odds
        move = data.draw(st.sampled_from(mishaps if mishap and mishaps else happy), label="move")
        done = 0
        if move == "progress":
            low = self.engine.current[plate_id].done
            done = data.draw(st.integers(low, TOTAL_STEPS), label="done")
        self.send(self.engine.report(plate_id, move, done))

    @rule(data=st.data())
    def engine_reports(self, data: st.DataObject) -> None:
        """The honest next fact of one plate's current submission."""
        self.engine_step(data)

    @rule(data=st.data(), count=st.integers(2, 4))
    def engine_reports_a_burst(self, data: st.DataObject, count: int) -> None:
        """Several honest facts in a row, for any plates."""
        for _ in range(count):
            self.engine_step(data)

    @rule(data=st.data())
    def engine_works_through_every_plate(self, data: st.DataObject) -> None:
        """One honest fact for every plate with a live submission, in a drawn order."""
        for plate_id in data.draw(st.permutations(self.engine.live()), label="order"):
            self.engine_step(data, plate_id)

    @rule(data=st.data())
    def engine_finishes_a_submission(self, data: st.DataObject) -> None:
        """A live submission ends well: it succeeds, or confirms the cancel it was asked for."""
        if not self.engine.live():
            return
        plate_id = data.draw(st.sampled_from(self.engine.live()), label="plate")
        cancel_asked = self.engine.current[plate_id].cancel_asked
        self.send(self.engine.report(plate_id, "cancel" if cancel_asked else "succeed"))

    @precondition(lambda self: bool(self.engine.in_transit))
    @rule(data=st.data())
    def overtaken_fact_arrives(self, data: st.DataObject) -> None:
        """A fact that a later one overtook (an acceptance, a progress record) arrives late."""
        index = data.draw(st.integers(0, len(self.engine.in_transit) - 1), label="which")
        self.send(self.engine.in_transit.pop(index))

    @precondition(stormy)
    @rule()
    def engine_is_lost(self) -> None:
        self.send(EngineLost(reason="heartbeats missed"))

    # --- rules: noise ----------------------------------------------------------------------

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data(), same_object=st.booleans())
    def fact_is_repeated(self, data: st.DataObject, same_object: bool) -> None:
        """Any earlier fact again: the same object, or the same content with a new stimulus.

        The last few facts are twice as likely: their plates are more often unsettled.
        """
        fact = data.draw(st.sampled_from([*self.sent[-8:], *self.sent]), label="earlier fact")
        if not same_object:
            fact = with_new_stimulus(fact, f"{fact.stimulus_id}-again{self.time:g}")
        self.send(fact)

    @precondition(lambda self: bool(self.engine.by_id))
    @rule(data=st.data(), source=st.sampled_from(["other_batch", "other_plate"]))
    def fact_with_stale_id(self, data: st.DataObject, source: str) -> None:
        """An engine fact about a submitted plate, naming a submission id not its own."""
        sub = data.draw(st.sampled_from(list(self.engine.by_id.values())), label="submission")
        kinds = COMPILE_KINDS if sub.phase == "compile" else EXECUTION_KINDS
        kind = data.draw(st.sampled_from(kinds), label="kind")
        make_id = job_id if sub.phase == "compile" else execution_id
        index = self.plate_ids.index(sub.plate_id)
        if source == "other_plate" and len(self.plate_ids) > 1:
            stale = make_id((index + 1) % len(self.plate_ids))
        else:
            stale = make_id(index, OTHER_BATCH_ID)
        self.send(engine_fact(kind, sub.plate_id, stale))

    def impossible_facts(self) -> dict[str, list[Fact]]:
        """Facts that cannot happen in the batch's current state, by kind of impossibility."""
        out: dict[str, list[Fact]] = {
            "compile fact before the compile was submitted": [],
            "execution fact before the execution was submitted": [],
            "progress with more done than total": [],
            "execution rejected after it was accepted": [],
            "compile failed after it succeeded": [],
        }
        plates = self.batch.snapshot().plates
        unsettled = [p for p in plates if p.outcome is None]
        for plate in unsettled or plates:  # once every plate settled, they are all stale
            pid = plate.plate_id
            i = self.plate_ids.index(pid)
            if plate.job_id is None:
                out["compile fact before the compile was submitted"] += [
                    engine_fact(k, pid, job_id(i)) for k in COMPILE_KINDS
                ]
            if plate.execution_id is None:
                out["execution fact before the execution was submitted"] += [
                    engine_fact(k, pid, execution_id(i)) for k in EXECUTION_KINDS
                ]
            else:
                over = {"done": TOTAL_STEPS + 1, "total": TOTAL_STEPS}
                out["progress with more done than total"].append(
                    engine_fact("execution_progress", pid, execution_id(i), **over)
                )
            if plate.state is _P.EXECUTING:
                out["execution rejected after it was accepted"].append(
                    engine_fact("execution_rejected", pid, execution_id(i))
                )
            if plate.artifact_id is not None and self.batch.mode is BatchMode.RUN:
                out["compile failed after it succeeded"].append(
                    engine_fact("compile_failed", pid, job_id(i))
                )
        return {what: facts for what, facts in out.items() if facts}

    @precondition(stormy)
    @rule(data=st.data())
    def impossible_fact(self, data: st.DataObject) -> None:
        """A fact that cannot happen now: before its submission, or after its success."""
        candidates = self.impossible_facts()
        what = data.draw(st.sampled_from(sorted(candidates)), label="impossibility")
        self.send(data.draw(st.sampled_from(candidates[what]), label="impossible fact"))

    @rule(kind=st.sampled_from(("compile_succeeded", "execution_failed", "cancel", "timeout")))
    def fact_about_unknown_plate(self, kind: str) -> None:
        ghost = "plate-ghost"
        fact: Fact
        if kind == "cancel":
            fact = CancelRequested(plate_id=ghost)
        elif kind == "timeout":
            fact = CancelTimedOut(plate_id=ghost)
        else:
            make_id = job_id if kind.startswith("compile") else execution_id
            fact = engine_fact(kind, ghost, make_id(0))
        self.send(fact)

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def c3_batch_reported_once_every_plate_is(self) -> None:
        if len(self.batch_reports) != (1 if len(self.reports) == len(self.plate_ids) else 0):
            self.fail(
                f"C3: {len(self.reports)}/{len(self.plate_ids)} plates reported, "
                f"the batch {len(self.batch_reports)} times"
            )

    @invariant()
    def journal_replays_to_the_same_snapshot(self) -> None:
        """Every few steps; also counts the steps (for the calm period)."""
        self.steps += 1
        if self.steps % REPLAY_EVERY == 0:
            self.check_replay()

    # --- teardown: drain, then check the end state ------------------------------------------

    def drain(self) -> None:
        """Converge everything: finish every lifecycle honestly, or lose the engine."""
        for _ in range(4 * len(self.plate_ids) + 4):
            if self.batch.settled:
                return
            if self.drain_by == "engine_lost":
                self.send(EngineLost(reason="drain"))
            elif not self.started:
                self.started = True
                self.send(BatchStarted())
            elif live := self.engine.live():
                for plate_id in live:
                    cancel_asked = self.engine.current[plate_id].cancel_asked
                    self.send(self.engine.report(plate_id, "cancel" if cancel_asked else "succeed"))
            else:
                self.send(EngineLost(reason="nothing left in flight"))

    def teardown(self) -> None:
        if not self.ready or self.failed:
            return
        executed = len(self.executions_submitted)
        self.drain()
        if not self.batch.settled:
            self.fail(f"C5/C7: the drain did not converge the batch: {self.batch!r}")
        missing = [p for p in self.plate_ids if p not in self.reports]
        if missing or len(self.batch_reports) != 1:
            self.fail(
                f"C2/C3: after the drain plates {missing} were never reported and the batch "
                f"was reported {len(self.batch_reports)} times"
            )
        want = self.oracle.outcome_rule()
        got = self.batch_reports[0].summary.outcome
        if got is not want:
            settled = [(r.plate_id, r.outcome, r.reason) for r in self.reports.values()]
            self.fail(f"outcome: the batch ended {got}, the oracle expects {want} from {settled}")
        # A settled batch ignores everything after: nothing more is reported.
        self.send(EngineLost(reason="after the end"))
        self.send(CancelRequested())
        self.check_replay()
        stream = io.StringIO()
        self.batch.journal.write(stream)
        stream.seek(0)
        if replay(Journal.read(stream)).snapshot() != self.batch.snapshot():
            self.fail("replay: the journal read back from JSON Lines replays differently")
        event(f"outcome: {self.batch.mode.value} {got.value}")
        event(f"host faults raised: {min(self.host.raised, 3)}+")
        event(f"plates executed before the drain: {min(executed, 3)}+")


BatchMachine.TestCase.settings = settings(stateful_step_count=50)
TestBatchMachine = BatchMachine.TestCase
