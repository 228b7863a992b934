"""Exhaustive interleavings: every ordering of two plates' lifecycles, not a sample.

Theory of operation: a batch of two plates (``A`` at index 0, ``B`` at index 1)
is fed ``BatchStarted`` and then every merge of the two plates' fact sequences
(``C(m + n, m)`` of them for sequences of length m and n), optionally with one
batch-level fact (``EngineLost`` or a batch ``CancelRequested``) inserted at
every one of the ``m + n + 1`` positions. Submission ids are derived from the
batch id, so every fact can be written before the batch exists. After the
facts, an ``EngineLost`` drains any batch that has not settled, so every case
ends settled.

Each lifecycle is split into a compile phase and an execution phase. A merge
is *causal* when every execution-phase fact comes after every compile-phase
fact of both plates, which is the only order a real engine can produce (no
execution id exists before the compile barrier). The other merges are
*acausal*: some execution fact overtakes the barrier, which the core must
treat as an engine protocol error or a stale fact, never as a crash. Causal
and acausal merges of a pair are separate test cases that together cover
every merge; each test asserts it checked exactly the binomial count.

Every fact of every case is checked against the guarantees of DESIGN.md
section 1 (C1-C4, C7, write-once terminals, the compile barrier, first
terminal fact wins, one journal record per fact, replay, the batch outcome
rule). Causal merges without a batch-level fact are also compared with an
oracle that predicts each plate's outcome from its lifecycle alone.

The matrix (``MATRIX``; every cell walks all the merges it names):

- run batches, no batch-level fact: every unordered pair of the nine run
  lifecycles, causal and acausal cells, under the default ``abort`` policy,
  and under ``continue`` for the pairs with a compile failure (the policy's
  subject; elsewhere it only matters after a protocol error);
- run batches with ``EngineLost`` and with a batch cancel at every position:
  the pairs in ``RUN_BATCH_LEVEL``, chosen to put the batch-level fact into
  every plate state (queued, compiling, compiled before and after the
  barrier, executing, a pending cancel, settled);
- compile-only batches: every pair of the seven compile lifecycles under both
  policies, and the pairs in ``COMPILE_ONLY_BATCH_LEVEL`` with engine loss and
  a batch cancel at every position.

Why restricted: each case builds two batches (the live one and its replay),
and building a batch costs about a millisecond (two ``transitions``
machines), so a case costs 3-5 ms and the full cross product (over half a
million cases) would take most of an hour.
Pairs are unordered: swapping ``A`` and ``B`` mirrors the same merges. The
counts are in the test ids (``-n<count>``) and printed with ``-s``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import pytest

from plateflow.core import (
    Batch,
    BatchMode,
    BatchSnapshot,
    BatchStarted,
    BatchState,
    CancelRequested,
    CancelSubmission,
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
    ExecutionStarted,
    ExecutionSucceeded,
    Fact,
    PlateOutcome,
    PlateState,
    Reason,
    ReportBatch,
    ReportError,
    ReportPlate,
    SubmitCompile,
    SubmitExecution,
    replay,
)
from plateflow.errors import ErrorCode, JournalError

BATCH_ID: Final = "b"
PLATES: Final = ("A", "B")

RUN: Final = BatchMode.RUN
COMPILE_ONLY: Final = BatchMode.COMPILE_ONLY
ABORT: Final = CompileFailurePolicy.ABORT
CONTINUE: Final = CompileFailurePolicy.CONTINUE

BatchKind = Literal["none", "engine_lost", "batch_cancel"]
Causality = Literal["causal", "acausal", "all"]
Expected = tuple[PlateOutcome, Reason]

_SUCCESS: Final = frozenset({PlateOutcome.COMPLETED, PlateOutcome.COMPILED})
_COMPILE_TERMINAL: Final = (CompileFailed, CompileRejected, CompileCancelled)
_EXECUTION_TERMINAL: Final = (ExecutionSucceeded, ExecutionFailed, ExecutionCancelled)
_EXECUTION_FACTS: Final = (
    ExecutionAccepted,
    ExecutionStarted,
    ExecutionProgress,
    *_EXECUTION_TERMINAL,
)


def job_id(index: int) -> str:
    return f"{BATCH_ID}.{index}.c"


def execution_id(index: int) -> str:
    return f"{BATCH_ID}.{index}.x"


# --- lifecycles -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """One plate's facts, split into its compile and execution phases."""

    name: str
    compile: tuple[Fact, ...]
    execute: tuple[Fact, ...]
    outcome: Expected
    """How the plate settles when nothing outside its own facts intervenes."""

    @property
    def facts(self) -> tuple[Fact, ...]:
        return self.compile + self.execute


_COMPLETED: Final = (PlateOutcome.COMPLETED, Reason.SUCCEEDED)
_COMPILED: Final = (PlateOutcome.COMPILED, Reason.SUCCEEDED)
_CANCELLED: Final = (PlateOutcome.CANCELLED, Reason.CANCEL_REQUESTED)

RUN_VARIANTS: Final = (
    "success",
    "compile_failed",
    "compile_rejected",
    "execution_failed",
    "cancel_compile",
    "cancel_execution",
    "cancel_race",
    "duplicate",
    "out_of_order",
)
COMPILE_ONLY_VARIANTS: Final = (
    "success",
    "compile_failed",
    "compile_rejected",
    "cancel_compile",
    "cancel_race",
    "duplicate",
    "out_of_order",
)


def lifecycle(name: str, index: int, mode: BatchMode) -> Lifecycle:
    """The facts of variant ``name`` for the plate at ``index`` (fresh fact objects)."""
    plate = PLATES[index]
    job, exe = job_id(index), execution_id(index)

    def ca() -> Fact:
        return CompileAccepted(plate_id=plate, job_id=job)

    def cs() -> Fact:
        return CompileSucceeded(plate_id=plate, job_id=job, artifact_id=f"artifact-{plate}")

    def xa() -> Fact:
        return ExecutionAccepted(plate_id=plate, execution_id=exe)

    def xs() -> Fact:
        return ExecutionStarted(plate_id=plate, execution_id=exe)

    def xp() -> Fact:
        return ExecutionProgress(plate_id=plate, execution_id=exe, done=1, total=2)

    def ok() -> Fact:
        return ExecutionSucceeded(plate_id=plate, execution_id=exe, result={"plate": plate})

    def cancel() -> Fact:
        return CancelRequested(plate_id=plate)

    failed = CompileFailed(plate_id=plate, job_id=job, error="syntax")
    rejected = CompileRejected(plate_id=plate, job_id=job, error="queue full")
    compile_cancelled = CompileCancelled(plate_id=plate, job_id=job)
    failure = (PlateOutcome.FAILED, Reason.COMPILE_FAILED)
    rejection = (PlateOutcome.FAILED, Reason.COMPILE_REJECTED)

    if mode is COMPILE_ONLY:
        if name == "success":
            return Lifecycle(name, (ca(), cs()), (), _COMPILED)
        if name == "cancel_race":
            # The compile's success overtakes the cancel's confirmation: compiled wins.
            return Lifecycle(name, (ca(), cancel(), cs(), compile_cancelled), (), _COMPILED)
        if name == "duplicate":
            compiled = cs()
            return Lifecycle(name, (ca(), compiled, compiled), (), _COMPILED)
        if name == "out_of_order":
            return Lifecycle(name, (cs(), ca()), (), _COMPILED)
        if name not in ("compile_failed", "compile_rejected", "cancel_compile"):
            raise ValueError(f"no compile-only lifecycle variant {name!r}")

    if name == "success":
        return Lifecycle(name, (ca(), cs()), (xa(), xs(), xp(), ok()), _COMPLETED)
    if name == "compile_failed":
        return Lifecycle(name, (ca(), failed), (), failure)
    if name == "compile_rejected":
        return Lifecycle(name, (rejected,), (), rejection)
    if name == "execution_failed":
        broke = ExecutionFailed(plate_id=plate, execution_id=exe, error="segfault", exit_code=139)
        # Started overtakes accepted (acceptance implied), then the run fails.
        return Lifecycle(
            name, (ca(), cs()), (xs(), broke), (PlateOutcome.FAILED, Reason.EXECUTION_FAILED)
        )
    if name == "cancel_compile":
        return Lifecycle(name, (ca(), cancel(), compile_cancelled), (), _CANCELLED)
    if name == "cancel_execution":
        stopped = ExecutionCancelled(plate_id=plate, execution_id=exe)
        return Lifecycle(name, (ca(), cs()), (xa(), cancel(), stopped), _CANCELLED)
    if name == "cancel_race":
        # Cancel sent while executing; the engine reports success before it confirms
        # the cancel: completed wins. (A terse engine: no acceptances, they are implied.)
        stopped = ExecutionCancelled(plate_id=plate, execution_id=exe)
        return Lifecycle(name, (cs(),), (xs(), cancel(), ok(), stopped), _COMPLETED)
    if name == "duplicate":
        # Redelivery: the very same message arrives twice.
        compiled, succeeded = cs(), ok()
        return Lifecycle(name, (ca(), compiled, compiled), (succeeded, succeeded), _COMPLETED)
    if name == "out_of_order":
        # Each success overtakes its acceptance on the way.
        return Lifecycle(name, (cs(), ca()), (ok(), xa()), _COMPLETED)
    raise ValueError(f"unknown lifecycle variant {name!r}")


# --- the matrix -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    facts: tuple[Fact, ...]
    """Everything after ``BatchStarted``, in delivery order."""
    causal: bool
    expected: dict[str, Expected] | None
    """Each plate's outcome predicted by the oracle, when it applies."""


@dataclass(frozen=True)
class Spec:
    """One element of the matrix: every merge of one pair, under one batch-level variant."""

    mode: BatchMode
    policy: CompileFailurePolicy
    first: str
    second: str
    batch_kind: BatchKind
    causality: Causality
    lifecycles: tuple[Lifecycle, Lifecycle] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pair = (lifecycle(self.first, 0, self.mode), lifecycle(self.second, 1, self.mode))
        object.__setattr__(self, "lifecycles", pair)

    @property
    def merges(self) -> int:
        """How many merges of the two plates this spec covers (by formula, not by walking)."""
        a, b = self.lifecycles
        m, n = len(a.facts), len(b.facts)
        causal = math.comb(len(a.compile) + len(b.compile), len(a.compile)) * math.comb(
            len(a.execute) + len(b.execute), len(a.execute)
        )
        return {"causal": causal, "acausal": math.comb(m + n, m) - causal}.get(
            self.causality, math.comb(m + n, m)
        )

    @property
    def count(self) -> int:
        """How many interleavings (fact sequences) this spec checks."""
        a, b = self.lifecycles
        positions = 1 if self.batch_kind == "none" else len(a.facts) + len(b.facts) + 1
        return self.merges * positions

    @property
    def id(self) -> str:
        return (
            f"{self.mode.value}-{self.policy.value}-{self.first}+{self.second}"
            f"-{self.batch_kind}-{self.causality}-n{self.count}"
        )

    def cases(self) -> Iterator[Case]:
        a, b = self.lifecycles
        m, n = len(a.facts), len(b.facts)
        extra: Fact | None = None
        if self.batch_kind == "engine_lost":
            extra = EngineLost(reason="engine lost mid-batch")
        elif self.batch_kind == "batch_cancel":
            extra = CancelRequested(plate_id=None)
        for slots in itertools.combinations(range(m + n), m):
            taken = set(slots)
            a_items, b_items = iter(enumerate(a.facts)), iter(enumerate(b.facts))
            order: list[tuple[int, int, Fact]] = []
            for position in range(m + n):
                index, (k, fact) = (0, next(a_items)) if position in taken else (1, next(b_items))
                order.append((index, k, fact))
            causal = _is_causal(order, (len(a.compile), len(b.compile)))
            if self.causality == "causal" and not causal:
                continue
            if self.causality == "acausal" and causal:
                continue
            facts = tuple(fact for _, _, fact in order)
            if extra is None:
                expected = self._oracle(order) if causal else None
                yield Case(facts, causal, expected)
            else:
                for cut in range(m + n + 1):
                    yield Case((*facts[:cut], extra, *facts[cut:]), causal, None)

    def _oracle(self, order: Sequence[tuple[int, int, Fact]]) -> dict[str, Expected]:
        """Each plate's outcome in a causal merge with no batch-level fact.

        Without an abort, a plate settles as its own lifecycle says. Under the
        abort policy the first compile failure fails its plate and cancels the
        other (``batch_aborted``) unless that one already confirmed a cancel.
        """
        outcome = {PLATES[i]: lc.outcome for i, lc in enumerate(self.lifecycles)}
        if self.mode is not RUN or self.policy is not ABORT:
            return outcome
        for position, (index, _, fact) in enumerate(order):
            if isinstance(fact, CompileFailed | CompileRejected):
                other = 1 - index
                confirmed = any(
                    i == other and isinstance(f, CompileCancelled) for i, _, f in order[:position]
                )
                outcome[PLATES[other]] = (
                    _CANCELLED if confirmed else (PlateOutcome.CANCELLED, Reason.BATCH_ABORTED)
                )
                break
        return outcome


def _is_causal(order: Sequence[tuple[int, int, Fact]], compile_lengths: tuple[int, int]) -> bool:
    last_compile = max(
        (p for p, (i, k, _) in enumerate(order) if k < compile_lengths[i]), default=-1
    )
    first_execute = min(
        (p for p, (i, k, _) in enumerate(order) if k >= compile_lengths[i]), default=len(order)
    )
    return last_compile < first_execute


def _pairs(variants: Sequence[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations_with_replacement(variants, 2))


RUN_BATCH_LEVEL: Final[tuple[tuple[str, str, CompileFailurePolicy, Causality], ...]] = (
    # A plate succeeds while the other is rejected, cancelled while compiling, or is
    # itself succeeding out of order: engine loss / batch cancel in queued, compiling,
    # compiled before and after the barrier, executing, and settled states.
    ("success", "compile_rejected", ABORT, "causal"),
    ("success", "compile_rejected", ABORT, "acausal"),
    ("success", "compile_rejected", CONTINUE, "causal"),
    ("success", "cancel_compile", ABORT, "causal"),
    ("out_of_order", "out_of_order", ABORT, "causal"),
    # A pending plate cancel meets a batch cancel or engine loss; the other plate failed.
    ("cancel_execution", "compile_failed", CONTINUE, "causal"),
    # The race, next to a compile failure that aborts the batch (or does not).
    ("cancel_race", "compile_failed", ABORT, "causal"),
    ("cancel_race", "compile_failed", ABORT, "acausal"),
    ("cancel_race", "compile_failed", CONTINUE, "causal"),
    # Redelivered compile results next to a confirmed compile cancel.
    ("duplicate", "cancel_compile", ABORT, "causal"),
)
"""Run pairs checked with engine loss and a batch cancel at every position."""

COMPILE_ONLY_BATCH_LEVEL: Final = (
    ("success", "success"),
    ("success", "cancel_race"),
    ("compile_rejected", "cancel_race"),
    ("cancel_compile", "compile_failed"),
    ("duplicate", "out_of_order"),
)
"""Compile-only pairs checked with engine loss and a batch cancel at every position."""


_BATCH_LEVEL_KINDS: Final[tuple[BatchKind, ...]] = ("engine_lost", "batch_cancel")


def _build_matrix() -> list[Spec]:
    specs: list[Spec] = []
    # Run batches: every pair of lifecycles, no batch-level fact, causal and acausal
    # merges, under the default policy; under ``continue`` the pairs where the policy
    # is the subject (a compile failure).
    for first, second in _pairs(RUN_VARIANTS):
        compile_failure = {first, second} & {"compile_failed", "compile_rejected"}
        for policy in (ABORT, CONTINUE) if compile_failure else (ABORT,):
            for causality in ("causal", "acausal"):
                specs.append(Spec(RUN, policy, first, second, "none", causality))
    for kind in _BATCH_LEVEL_KINDS:
        for first, second, policy, causality in RUN_BATCH_LEVEL:
            specs.append(Spec(RUN, policy, first, second, kind, causality))
    # Compile-only batches (every merge is causal: there is no execution phase). The
    # policy only governs run batches, so ``continue`` runs the plain pairs to show it.
    for policy in (ABORT, CONTINUE):
        for first, second in _pairs(COMPILE_ONLY_VARIANTS):
            specs.append(Spec(COMPILE_ONLY, policy, first, second, "none", "all"))
    for kind in _BATCH_LEVEL_KINDS:
        for first, second in COMPILE_ONLY_BATCH_LEVEL:
            specs.append(Spec(COMPILE_ONLY, ABORT, first, second, kind, "all"))
    return [s for s in specs if s.count]


MATRIX: Final = _build_matrix()
TOTAL: Final = sum(s.count for s in MATRIX)


# --- checking one case ------------------------------------------------------------------


class _Clock:
    __slots__ = ("_now",)

    def __init__(self) -> None:
        self._now = 1000.0

    def __call__(self) -> float:
        self._now += 0.25
        return self._now


def _label(fact: Fact) -> str:
    plate = getattr(fact, "plate_id", None)
    return f"{plate}:{fact.kind}" if plate else fact.kind


def _describe(spec: Spec, case: Case) -> str:
    kinds = ", ".join(_label(f) for f in case.facts)
    return (
        f"[{spec.mode.value}/{spec.policy.value} {spec.first}+{spec.second}] batch_started, {kinds}"
    )


def check_case(spec: Spec, case: Case) -> None:
    """Run one interleaving through a fresh batch and check every guarantee on the way."""
    mode = spec.mode
    batch = Batch(BATCH_ID, PLATES, mode=mode, policy=spec.policy, clock=_Clock())

    def why(message: str) -> str:
        return f"{message}\n  case: {_describe(spec, case)}"

    reports: dict[str, ReportPlate] = {}
    report_step: dict[str, int] = {}
    batch_reports: list[tuple[int, ReportBatch]] = []
    submitted: set[str] = set()
    batch_cancel_applied = False
    cancel_applied: set[str] = set()
    handled = 0
    prev = batch.snapshot()
    facts: list[Fact] = [BatchStarted(), *case.facts]
    drain = EngineLost(reason="drain")
    step = 0
    while True:
        if step < len(facts):
            fact = facts[step]
        elif step == len(facts) and not batch.settled:
            fact = drain
        else:
            break
        try:
            decisions = batch.handle(fact)
        except Exception as exc:
            pytest.fail(why(f"C1: handle({_label(fact)}) raised {type(exc).__name__}: {exc}"))
        handled += 1
        where = _label(fact)
        after = batch.snapshot()
        assert len(batch.journal) == handled, why(
            f"journal: {handled} facts handled but {len(batch.journal)} records"
        )
        record = batch.journal[-1]
        assert record.fact is fact, why(f"journal: the last record is not {where}'s")
        _check_step(mode, fact, record.disposition, decisions, prev, after, why)
        if step == 0:
            expected_submits = {
                SubmitCompile(p, job_id(i), fact.stimulus_id) for i, p in enumerate(PLATES)
            }
            assert expected_submits <= set(decisions), why(
                f"ids: BatchStarted did not submit compiles {sorted(job_id(i) for i in (0, 1))}"
            )

        for decision in decisions:
            if isinstance(decision, ReportPlate):
                p = decision.plate_id
                assert p not in reports, why(
                    f"C2: second ReportPlate for {p} at {where} "
                    f"(first {reports[p].outcome}, now {decision.outcome})"
                )
                assert not batch_reports, why(f"C3: ReportPlate for {p} after ReportBatch")
                reports[p] = decision
                report_step[p] = step
                plate_now = after.plate(p)
                assert (plate_now.outcome, plate_now.reason) == (
                    decision.outcome,
                    decision.reason,
                ), why(
                    f"C4: ReportPlate({p}, {decision.outcome}, {decision.reason}) returned but "
                    f"the snapshot shows {plate_now.outcome}/{plate_now.reason}"
                )
                assert any(c.plate_id == p for c in record.changes), why(
                    f"C4: ReportPlate for {p} at {where} but the journal record has no Change "
                    f"for it: {record.changes}"
                )
            elif isinstance(decision, ReportBatch):
                assert not batch_reports, why(f"C3: a second ReportBatch at {where}")
                missing = set(PLATES) - set(reports)
                assert not missing, why(f"C3: ReportBatch before ReportPlate for {missing}")
                assert after.state.is_terminal, why(
                    f"C3: ReportBatch returned but the batch is {after.state}"
                )
                assert decision.summary.outcome is after.state, why(
                    f"C3: summary says {decision.summary.outcome}, batch is {after.state}"
                )
                batch_reports.append((step, decision))
            elif isinstance(decision, SubmitExecution):
                p = decision.plate_id
                assert mode is RUN, why(f"barrier: SubmitExecution({p}) in a compile-only batch")
                assert p not in submitted, why(f"barrier: execution of {p} submitted twice")
                submitted.add(p)
                index = PLATES.index(p)
                assert decision.execution_id == execution_id(index), why(
                    f"ids: execution id {decision.execution_id!r} != {execution_id(index)!r}"
                )
                for q in after.plates:
                    assert q.outcome is not None or q.artifact_id is not None, why(
                        f"barrier: SubmitExecution({p}) at {where} while {q.plate_id} is "
                        f"{q.state} (neither compiled nor settled)"
                    )
                assert after.plate(p).outcome is None, why(
                    f"barrier: SubmitExecution for settled plate {p}"
                )
            elif isinstance(decision, ReportError):
                assert not case.causal, why(
                    f"protocol: a causally consistent delivery was reported as an error at "
                    f"{where}: {decision.message}"
                )
                assert decision.code == ErrorCode.ENGINE_PROTOCOL_ERROR, why(
                    f"protocol: unexpected error code {decision.code}"
                )

        # Track which cancels took effect, for the batch outcome rule.
        if isinstance(fact, CancelRequested):
            if fact.plate_id is None:
                if not prev.state.is_terminal and not prev.cancel_requested:
                    batch_cancel_applied = True
                    cancel_applied |= {q.plate_id for q in prev.plates if q.outcome is None}
            elif prev.plate(fact.plate_id).outcome is None:
                cancel_applied.add(fact.plate_id)

        prev = after
        step += 1

    # --- the case is over: everything settled exactly once -------------------------------
    final = batch.snapshot()
    assert batch.settled, why(f"C7: batch still {final.state} after the drain")
    assert set(reports) == set(PLATES), why(
        f"C2: ReportPlate missing for {set(PLATES) - set(reports)}"
    )
    assert len(batch_reports) == 1, why(f"C3: {len(batch_reports)} ReportBatch, expected 1")
    batch_step, batch_report = batch_reports[0]
    assert batch_step == max(report_step.values()), why(
        f"C3/C7: batch reported at fact {batch_step}, last plate settled at fact "
        f"{max(report_step.values())}"
    )
    summary = batch_report.summary
    assert {s.plate_id: (s.outcome, s.reason) for s in summary.plates} == {
        p: (r.outcome, r.reason) for p, r in reports.items()
    }, why(f"C3: summary {summary.plates} disagrees with the plate reports")
    assert dict(summary.counts) == dict(Counter(r.outcome for r in reports.values())), why(
        f"C3: summary counts {summary.counts} disagree with the plate reports"
    )
    for q in final.plates:
        r = reports[q.plate_id]
        assert (q.outcome, q.reason) == (r.outcome, r.reason), why(
            f"C2: {q.plate_id} reported {r.outcome}/{r.reason} but ended {q.outcome}/{q.reason}"
        )

    outcomes = [r.outcome for r in reports.values()]
    if all(o in _SUCCESS for o in outcomes):
        rule = BatchState.COMPLETED
    elif batch_cancel_applied or (
        PlateOutcome.FAILED not in outcomes and cancel_applied & set(PLATES)
    ):
        rule = BatchState.CANCELLED
    else:
        rule = BatchState.FAILED
    assert final.state is rule, why(
        f"outcome rule: plates {outcomes}, batch cancel {batch_cancel_applied}, plate cancels "
        f"{sorted(cancel_applied)} -> expected {rule}, batch is {final.state}"
    )

    try:
        replayed = replay(batch.journal)
    except JournalError as exc:
        pytest.fail(why(f"replay: {exc}"))
    assert replayed.snapshot() == final, why(
        f"replay: replayed snapshot differs\n  live:     {final}\n  replayed: {replayed.snapshot()}"
    )

    if case.expected is not None:
        got = {p: (r.outcome, r.reason) for p, r in reports.items()}
        assert got == case.expected, why(
            f"oracle (first terminal fact wins): expected {case.expected}, got {got}"
        )


def _check_step(
    mode: BatchMode,
    fact: Fact,
    disposition: Disposition,
    decisions: tuple[Decision, ...],
    prev: BatchSnapshot,
    after: BatchSnapshot,
    why: Callable[[str], str],
) -> None:
    """The guarantees that relate one fact to the state just before and just after it."""
    label = _label(fact)
    if disposition in (Disposition.IGNORED_STALE, Disposition.IGNORED_DUPLICATE):
        assert after == prev, why(f"journal: {label} was journaled {disposition} but changed state")
    newly_settled = {
        a.plate_id
        for b, a in zip(prev.plates, after.plates, strict=True)
        if b.outcome is None and a.outcome is not None
    }
    reported = {d.plate_id for d in decisions if isinstance(d, ReportPlate)}
    assert newly_settled == reported, why(
        f"C2: at {label} plates {sorted(newly_settled)} settled but {sorted(reported)} reported"
    )
    for before, now in zip(prev.plates, after.plates, strict=True):
        p = now.plate_id
        if before.outcome is not None:
            assert (now.state, now.outcome, now.reason) == (
                before.state,
                before.outcome,
                before.reason,
            ), why(
                f"write-once: {p} was {before.state}/{before.outcome}/{before.reason}, "
                f"{label} made it {now.state}/{now.outcome}/{now.reason}"
            )
        if mode is RUN:
            assert now.state.is_terminal == (now.outcome is not None), why(
                f"settled: {p} is {now.state} with outcome {now.outcome} after {label}"
            )
        else:
            settled = now.outcome is not None
            assert now.state.is_terminal or now.state is PlateState.COMPILED or not settled, why(
                f"settled: compile-only {p} settled {now.outcome} but is {now.state}"
            )
            assert now.outcome is not PlateOutcome.COMPILED or (now.state is PlateState.COMPILED), (
                why(f"settled: compile-only {p} outcome compiled but state {now.state}")
            )
    if prev.state.is_terminal:
        assert after == prev, why(f"write-once: the settled batch changed at {label}")

    # First terminal fact wins: a terminal engine fact that reaches an unsettled plate
    # with a current submission id settles it as the fact says; one that reaches a
    # settled plate changes nothing.
    plate_id = getattr(fact, "plate_id", None)
    if isinstance(fact, CompileSucceeded) and prev.plate(fact.plate_id).state in (
        PlateState.QUEUED,
        PlateState.COMPILING,
    ):
        before, now = prev.plate(fact.plate_id), after.plate(fact.plate_id)
        if mode is COMPILE_ONLY:
            expected: Expected | None = _COMPILED  # compiled is terminal here; a cancel lost
        elif before.cancel_requested:
            expected = _CANCELLED  # compiled but wanted stopped: nothing left to wait for
        else:
            expected = None
        assert (now.outcome, now.reason) == (expected or (None, None)), why(
            f"first terminal fact wins: {label} reached {before.state} {fact.plate_id} "
            f"(cancel requested: {before.cancel_requested}) and left {now.outcome}/{now.reason}"
        )
        assert now.artifact_id == fact.artifact_id, why(f"{label} did not record the artifact")
    if plate_id is not None and isinstance(fact, _COMPILE_TERMINAL + _EXECUTION_FACTS):
        before, now = prev.plate(plate_id), after.plate(plate_id)
        if before.outcome is not None:
            assert now == before, why(f"first terminal fact wins: {label} changed settled plate")
        elif isinstance(fact, _EXECUTION_FACTS) and before.execution_id is None:
            assert (now.outcome, now.reason) == (
                PlateOutcome.FAILED,
                Reason.ENGINE_PROTOCOL_ERROR,
            ), why(f"protocol: {label} before its execution was submitted left {now}")
            assert any(
                isinstance(d, ReportError) and d.code == ErrorCode.ENGINE_PROTOCOL_ERROR
                for d in decisions
            ), why(f"protocol: {label} before submission reported no error")
        elif isinstance(fact, _EXECUTION_TERMINAL):
            expected = _terminal_outcome(fact, before.cancel_requested)
            assert (now.outcome, now.reason) == expected, why(
                f"first terminal fact wins: {label} reached unsettled {plate_id} "
                f"({before.state}) but it settled {now.outcome}/{now.reason}, expected {expected}"
            )
        elif isinstance(fact, _COMPILE_TERMINAL) and before.state in (
            PlateState.QUEUED,
            PlateState.COMPILING,
        ):
            expected = _terminal_outcome(fact, before.cancel_requested)
            assert (now.outcome, now.reason) == expected, why(
                f"first terminal fact wins: {label} reached compiling {plate_id} but it settled "
                f"{now.outcome}/{now.reason}, expected {expected}"
            )

    if isinstance(fact, EngineLost):
        if prev.state.is_terminal:
            assert after == prev, why("engine lost: a settled batch changed")
        else:
            for before, now in zip(prev.plates, after.plates, strict=True):
                if before.outcome is None:
                    assert (now.outcome, now.reason) == (
                        PlateOutcome.FAILED,
                        Reason.ENGINE_LOST,
                    ), why(
                        f"engine lost: unsettled {now.plate_id} became {now.outcome}/{now.reason}"
                    )
            assert after.state.is_terminal, why(f"C7: engine lost left the batch {after.state}")

    if isinstance(fact, CancelRequested):
        targets: list[str] = []
        if fact.plate_id is None:
            if not prev.state.is_terminal and not prev.cancel_requested:
                assert after.cancel_requested, why("cancel: batch cancel not recorded")
                targets = [
                    q.plate_id for q in prev.plates if q.outcome is None and not q.cancel_requested
                ]
        elif (
            prev.plate(fact.plate_id).outcome is None
            and not prev.plate(fact.plate_id).cancel_requested
        ):
            targets = [fact.plate_id]
        cancels = {d.plate_id: d for d in decisions if isinstance(d, CancelSubmission)}
        for p in targets:
            before, now = prev.plate(p), after.plate(p)
            assert now.cancel_requested or now.outcome is not None, why(
                f"cancel: {p} neither cancel-requested nor settled after {label}"
            )
            if now.outcome is not None:
                continue
            sent = cancels.get(p)
            assert sent is not None, why(
                f"C7: {p} ({before.state}) was asked to cancel but neither settled nor had a "
                f"cancel sent to the engine"
            )
            index = PLATES.index(p)
            wanted = job_id(index) if sent.phase == "compile" else before.execution_id
            assert sent.submission_id == wanted, why(
                f"cancel: {p} cancel sent for {sent.submission_id!r}, current is {wanted!r}"
            )


def _terminal_outcome(fact: Fact, cancel_requested: bool) -> Expected:
    if isinstance(fact, ExecutionSucceeded):
        return (PlateOutcome.COMPLETED, Reason.SUCCEEDED)
    if isinstance(fact, ExecutionFailed):
        return (PlateOutcome.FAILED, Reason.EXECUTION_FAILED)
    if isinstance(fact, CompileFailed):
        return (PlateOutcome.FAILED, Reason.COMPILE_FAILED)
    if isinstance(fact, CompileRejected):
        return (PlateOutcome.FAILED, Reason.COMPILE_REJECTED)
    reason = Reason.CANCEL_REQUESTED if cancel_requested else Reason.ENGINE_CANCELLED
    return (PlateOutcome.CANCELLED, reason)


# --- the tests ----------------------------------------------------------------------------

_checked: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_totals() -> Iterator[None]:
    started = time.perf_counter()
    yield
    elapsed = time.perf_counter() - started
    print(
        f"\nexhaustive: {sum(_checked.values())} of {TOTAL} interleavings checked "
        f"({len(MATRIX)} matrix cells) in {elapsed:.1f} s; by batch-level variant: "
        f"{dict(_checked)}"
    )


@pytest.mark.parametrize("spec", MATRIX, ids=[s.id for s in MATRIX])
def test_every_interleaving(spec: Spec) -> None:
    checked = 0
    for case in spec.cases():
        check_case(spec, case)
        checked += 1
    assert checked == spec.count, f"enumerated {checked} interleavings, expected {spec.count}"
    _checked[spec.batch_kind] += checked
    print(f"{spec.id}: {checked} interleavings checked")


def test_matrix_has_every_merge_of_every_run_pair() -> None:
    """Every run pair is checked on all C(m+n, m) merges: its causal and acausal cells.

    Each cell's test asserts that its walk produced exactly its formula count
    (causal: merges of the compile phases times merges of the execution
    phases; acausal: the rest), so the two cells together are every merge. A
    cell whose count is zero (a pair without execution facts has no acausal
    merge) is left out of the matrix.
    """
    merges: Counter[tuple[CompileFailurePolicy, str, str]] = Counter()
    for spec in MATRIX:
        if spec.mode is RUN and spec.batch_kind == "none":
            merges[(spec.policy, spec.first, spec.second)] += spec.merges
    assert {(f, s) for p, f, s in merges if p is ABORT} == set(_pairs(RUN_VARIANTS))
    for (policy, first, second), got in merges.items():
        a, b = lifecycle(first, 0, RUN), lifecycle(second, 1, RUN)
        total = math.comb(len(a.facts) + len(b.facts), len(a.facts))
        assert got == total, f"{policy} {first}+{second}: {got} of {total} merges in the matrix"
    print(f"\nexhaustive matrix: {len(MATRIX)} cells, {TOTAL} interleavings")
