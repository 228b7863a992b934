"""The states, events and tables of the plate and batch machines, and what facts do.

Theory of operation: four literal tables decide everything, and nothing else
in the package does.

- ``PLATE_TABLE`` and ``BATCH_TABLE`` are the *moves*: which event takes a
  plate or the batch from which state to which. The ``transitions`` machines
  are built from them (``core.machines``) and execute every move; the diagrams
  are drawn from them.
- ``PLATE_FACTS`` and ``BATCH_FACTS`` are what a *fact* does: for every fact
  kind, in every state (and, for a fact about a submission, whatever the
  relation of its id to the plate's: current, another, never issued), the
  disposition it is journaled with, the moves it takes in order, how it
  settles the plate, and which data rule (``Rule``) finishes the job. The
  batch looks the cell up and applies it generically; the documentation's
  classification and the totality test are generated from these tables.

Rows marked ``convergence=True`` are the terminal moves. Only the convergence
path may take them (guarantee C1); the machine builder puts a guard on every
such row that raises ``ConvergenceViolation`` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Generic, Literal, TypeVar

__all__ = [
    "ABORTING_REASONS",
    "BATCH_COLUMNS",
    "BATCH_FACTS",
    "BATCH_TABLE",
    "IN_FLIGHT",
    "PLATE_COLUMNS",
    "PLATE_FACTS",
    "PLATE_TABLE",
    "RULES",
    "SETTLED",
    "SETTLE_BATCH",
    "SETTLE_PLATE",
    "BatchEvent",
    "BatchMode",
    "BatchState",
    "Cell",
    "CompileFailurePolicy",
    "Disposition",
    "FactRow",
    "IdMatch",
    "PlateEvent",
    "PlateOutcome",
    "PlateState",
    "Reason",
    "Row",
    "Rule",
]


class PlateState(StrEnum):
    """Where one plate is in one batch. Values are stable on the wire and in diagrams."""

    IDLE = "idle"
    QUEUED = "queued"
    COMPILING = "compiling"
    COMPILED = "compiled"
    EXECUTING = "executing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in _PLATE_TERMINAL


class BatchState(StrEnum):
    """Where a batch is. ``cancelling`` waits for the engine to confirm a stop."""

    IDLE = "idle"
    COMPILING = "compiling"
    EXECUTING = "executing"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in _BATCH_TERMINAL


_PLATE_TERMINAL = frozenset({PlateState.COMPLETED, PlateState.FAILED, PlateState.CANCELLED})
_BATCH_TERMINAL = frozenset({BatchState.COMPLETED, BatchState.FAILED, BatchState.CANCELLED})


class PlateEvent(StrEnum):
    """Triggers of the plate machine (what a fact means for one plate)."""

    SELECTED = "selected"
    COMPILE_ACCEPTED = "compile_accepted"
    COMPILE_SUCCEEDED = "compile_succeeded"
    EXECUTION_ACCEPTED = "execution_accepted"
    EXECUTION_STARTED = "execution_started"
    PROGRESS = "progress"
    CONVERGE_COMPLETED = "converge_completed"
    CONVERGE_FAILED = "converge_failed"
    CONVERGE_CANCELLED = "converge_cancelled"


class BatchEvent(StrEnum):
    """Triggers of the batch machine."""

    START = "start"
    ALL_COMPILED = "all_compiled"
    CANCEL = "cancel"
    CONVERGE_COMPLETED = "converge_completed"
    CONVERGE_FAILED = "converge_failed"
    CONVERGE_CANCELLED = "converge_cancelled"


class BatchMode(StrEnum):
    """A compile-only batch rests plates in ``compiled``; a run batch executes them."""

    COMPILE_ONLY = "compile_only"
    RUN = "run"


class CompileFailurePolicy(StrEnum):
    """What a run batch does when a plate fails before execution starts."""

    ABORT = "abort"
    """Execute nothing: the other plates converge ``cancelled`` (``batch_aborted``)."""
    CONTINUE = "continue"
    """Execute the plates that compiled."""


class PlateOutcome(StrEnum):
    """How a plate settled in a batch, as reported to ``on_plate_completed``.

    ``compiled`` is the success outcome of a compile-only batch: the plate is
    settled for that batch but its state is not terminal.
    """

    COMPILED = "compiled"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Reason(StrEnum):
    """Why a plate settled the way it did. Counted per batch in the summary."""

    SUCCEEDED = "succeeded"
    COMPILE_FAILED = "compile_failed"
    COMPILE_REJECTED = "compile_rejected"
    EXECUTION_FAILED = "execution_failed"
    EXECUTION_REJECTED = "execution_rejected"
    ENGINE_LOST = "engine_lost"
    ENGINE_PROTOCOL_ERROR = "engine_protocol_error"
    BATCH_ABORTED = "batch_aborted"
    CANCEL_REQUESTED = "cancel_requested"
    CANCEL_UNCONFIRMED = "cancel_unconfirmed"
    ENGINE_CANCELLED = "engine_cancelled"
    LOST_IN_RESTART = "lost_in_restart"


S = TypeVar("S", PlateState, BatchState)
E = TypeVar("E", PlateEvent, BatchEvent)


@dataclass(frozen=True, slots=True)
class Row(Generic[S, E]):
    """One legal move. ``dest is None`` is an internal move: the state stays."""

    source: S
    event: E
    dest: S | None
    label: str
    convergence: bool = False


_P = PlateState
_PE = PlateEvent

PLATE_TABLE: tuple[Row[PlateState, PlateEvent], ...] = (
    Row(_P.IDLE, _PE.SELECTED, _P.QUEUED, "batch started (plate selected)"),
    Row(_P.QUEUED, _PE.COMPILE_ACCEPTED, _P.COMPILING, "compile submission accepted"),
    Row(_P.COMPILING, _PE.COMPILE_SUCCEEDED, _P.COMPILED, "compile succeeded (artifact id)"),
    Row(_P.COMPILED, _PE.EXECUTION_ACCEPTED, _P.EXECUTING, "execution submission accepted"),
    Row(_P.EXECUTING, _PE.EXECUTION_STARTED, None, "execution running (records started_at)"),
    Row(_P.IDLE, _PE.PROGRESS, None, "progress record"),
    Row(_P.QUEUED, _PE.PROGRESS, None, "progress record"),
    Row(_P.COMPILING, _PE.PROGRESS, None, "progress record"),
    Row(_P.COMPILED, _PE.PROGRESS, None, "progress record"),
    Row(_P.EXECUTING, _PE.PROGRESS, None, "progress record"),
    Row(_P.EXECUTING, _PE.CONVERGE_COMPLETED, _P.COMPLETED, "converge: completed", True),
    Row(_P.IDLE, _PE.CONVERGE_FAILED, _P.FAILED, "converge: failed", True),
    Row(_P.QUEUED, _PE.CONVERGE_FAILED, _P.FAILED, "converge: failed", True),
    Row(_P.COMPILING, _PE.CONVERGE_FAILED, _P.FAILED, "converge: failed", True),
    Row(_P.COMPILED, _PE.CONVERGE_FAILED, _P.FAILED, "converge: failed", True),
    Row(_P.EXECUTING, _PE.CONVERGE_FAILED, _P.FAILED, "converge: failed", True),
    Row(_P.IDLE, _PE.CONVERGE_CANCELLED, _P.CANCELLED, "converge: cancelled", True),
    Row(_P.QUEUED, _PE.CONVERGE_CANCELLED, _P.CANCELLED, "converge: cancelled", True),
    Row(_P.COMPILING, _PE.CONVERGE_CANCELLED, _P.CANCELLED, "converge: cancelled", True),
    Row(_P.COMPILED, _PE.CONVERGE_CANCELLED, _P.CANCELLED, "converge: cancelled", True),
    Row(_P.EXECUTING, _PE.CONVERGE_CANCELLED, _P.CANCELLED, "converge: cancelled", True),
)
"""The plate machine. Terminal states have no outgoing rows: they are final."""

_B = BatchState
_BE = BatchEvent

BATCH_TABLE: tuple[Row[BatchState, BatchEvent], ...] = (
    Row(_B.IDLE, _BE.START, _B.COMPILING, "batch started"),
    Row(_B.COMPILING, _BE.ALL_COMPILED, _B.EXECUTING, "every plate compiled or settled"),
    Row(_B.IDLE, _BE.CANCEL, _B.CANCELLING, "cancel requested"),
    Row(_B.COMPILING, _BE.CANCEL, _B.CANCELLING, "cancel requested"),
    Row(_B.EXECUTING, _BE.CANCEL, _B.CANCELLING, "cancel requested"),
    Row(_B.IDLE, _BE.CONVERGE_FAILED, _B.FAILED, "converge: failed", True),
    Row(_B.IDLE, _BE.CONVERGE_CANCELLED, _B.CANCELLED, "converge: cancelled", True),
    Row(_B.COMPILING, _BE.CONVERGE_COMPLETED, _B.COMPLETED, "converge: completed", True),
    Row(_B.COMPILING, _BE.CONVERGE_FAILED, _B.FAILED, "converge: failed", True),
    Row(_B.COMPILING, _BE.CONVERGE_CANCELLED, _B.CANCELLED, "converge: cancelled", True),
    Row(_B.EXECUTING, _BE.CONVERGE_COMPLETED, _B.COMPLETED, "converge: completed", True),
    Row(_B.EXECUTING, _BE.CONVERGE_FAILED, _B.FAILED, "converge: failed", True),
    Row(_B.EXECUTING, _BE.CONVERGE_CANCELLED, _B.CANCELLED, "converge: cancelled", True),
    Row(_B.CANCELLING, _BE.CONVERGE_COMPLETED, _B.COMPLETED, "converge: completed", True),
    Row(_B.CANCELLING, _BE.CONVERGE_CANCELLED, _B.CANCELLED, "converge: cancelled", True),
)
"""The batch machine. A compile-only batch never takes ``all_compiled``."""


SETTLE_PLATE: Final[Mapping[PlateOutcome, PlateEvent]] = {
    PlateOutcome.COMPLETED: PlateEvent.CONVERGE_COMPLETED,
    PlateOutcome.FAILED: PlateEvent.CONVERGE_FAILED,
    PlateOutcome.CANCELLED: PlateEvent.CONVERGE_CANCELLED,
}
"""The convergence event that settles a plate with each outcome (``compiled`` has none:
a compile-only batch's plate settles where it is)."""
SETTLE_BATCH: Final[Mapping[BatchState, BatchEvent]] = {
    BatchState.COMPLETED: BatchEvent.CONVERGE_COMPLETED,
    BatchState.FAILED: BatchEvent.CONVERGE_FAILED,
    BatchState.CANCELLED: BatchEvent.CONVERGE_CANCELLED,
}
"""The convergence event that settles the batch in each terminal state."""
ABORTING_REASONS: Final = frozenset(
    {Reason.COMPILE_FAILED, Reason.COMPILE_REJECTED, Reason.ENGINE_PROTOCOL_ERROR}
)
"""A run batch under the ``abort`` policy aborts when a plate fails for one of these
before the compile barrier."""


# --- what facts do -------------------------------------------------------------------


class Disposition(StrEnum):
    """What the batch did with a fact; every journal record carries one."""

    APPLIED = "applied"
    IGNORED_STALE = "ignored_stale"
    IGNORED_DUPLICATE = "ignored_duplicate"
    REJECTED = "rejected"


class IdMatch(StrEnum):
    """How a fact's submission id relates to the plate's id for that phase."""

    CURRENT = "current"
    """The plate's own submission of that phase in this batch."""
    OTHER = "other"
    """Not an id this batch issues the plate: another batch's, or one made up."""
    UNISSUED = "unissued"
    """The id this batch would issue the plate for that phase, but has not issued yet."""


class Rule(StrEnum):
    """The data-dependent rules a cell hands over to (described in ``RULES``)."""

    START = "start"
    CANCEL_ALL = "cancel_all"
    ENGINE_LOST = "engine_lost"
    REPORT_CALLBACK = "report_callback"
    COMPILED = "compiled"
    STARTED = "started"
    PROGRESS = "progress"
    CANCELLED = "cancelled"
    CANCEL = "cancel"
    TIME_OUT = "time_out"
    LOST = "lost"


RULES: Final[Mapping[Rule, str]] = {
    Rule.START: (
        "Select every unsettled plate and submit its compile, or abort at once when a plate "
        "already failed in a way that aborts the batch."
    ),
    Rule.CANCEL_ALL: (
        "Cancel every unsettled plate that has no cancel pending, as *cancel* does for one."
    ),
    Rule.ENGINE_LOST: "Settle every unsettled plate ``failed`` (``engine_lost``).",
    Rule.REPORT_CALLBACK: "Report the failed host callback, unless it was ``emit_error`` itself.",
    Rule.COMPILED: (
        "Keep the artifact and pass the compile barrier; a compile-only batch settles the "
        "plate ``compiled``; a plate with a cancel pending settles ``cancelled``."
    ),
    Rule.STARTED: "Record when the execution started; a second start is a duplicate.",
    Rule.PROGRESS: (
        "Record the progress: more done than total is a protocol error, the same figures "
        "again a duplicate, fewer done than recorded stale."
    ),
    Rule.CANCELLED: (
        "Settle ``cancelled``: reason ``cancel_requested`` when the host asked for it, "
        "``engine_cancelled`` when the engine stopped the work on its own."
    ),
    Rule.CANCEL: (
        "A cancel already pending is a duplicate; otherwise ask the engine to stop the "
        "plate's in-flight submission, or settle ``cancelled`` when it has none."
    ),
    Rule.TIME_OUT: (
        "Without a cancel pending, the time-out is stale (and the plate does not settle)."
    ),
    Rule.LOST: (
        "The engine lost the submission in a restart: with a cancel pending that confirms the "
        "cancel; with ``resubmit`` it is submitted again under the same id; otherwise the "
        "plate settles ``failed`` (``lost_in_restart``)."
    ),
}
"""What each rule decides. Everything a rule decides depends on the fact's or the plate's
data, not on a state: the state part was decided by the table already."""


@dataclass(frozen=True, slots=True)
class Cell:
    """What one fact does in one state. ``disposition None``: the fact cannot arrive there.

    The batch applies a cell in this order: journal the ``disposition``; take
    each event of ``moves`` through its machine (so every move is checked by
    the move tables); settle the plate through the convergence path when
    ``settle`` is set (a ``rejected`` cell with ``settle`` is an engine protocol
    error, reported as such); then run ``rule``, which may still find the fact
    stale or duplicate by its data before anything moved.
    """

    disposition: Disposition | None
    note: str
    moves: tuple[PlateEvent, ...] | tuple[BatchEvent, ...] = ()
    settle: tuple[PlateOutcome, Reason] | None = None
    rule: Rule | None = None


SETTLED: Final = "settled"
"""The fact tables' column for a plate that settled (or a batch that did): whatever
its state, every fact about it is stale from then on."""

PLATE_COLUMNS: Final[tuple[PlateState | Literal["settled"], ...]] = (
    PlateState.IDLE,
    PlateState.QUEUED,
    PlateState.COMPILING,
    PlateState.COMPILED,
    PlateState.EXECUTING,
    SETTLED,
)
BATCH_COLUMNS: Final[tuple[BatchState | Literal["settled"], ...]] = (
    BatchState.IDLE,
    BatchState.COMPILING,
    BatchState.EXECUTING,
    BatchState.CANCELLING,
    SETTLED,
)

IN_FLIGHT: Final[Mapping[PlateState, Literal["compile", "execute"]]] = {
    PlateState.QUEUED: "compile",
    PlateState.COMPILING: "compile",
    PlateState.COMPILED: "execute",
    PlateState.EXECUTING: "execute",
}
"""The phase of the submission a plate in each state may have at the engine (a
compiled plate waiting at the barrier has none issued yet)."""


@dataclass(frozen=True, slots=True)
class FactRow:
    """One line of a fact table: the cells of some fact kinds, one per column."""

    kinds: tuple[str, ...]
    ids: IdMatch | None
    """The relation of the fact's submission id to the plate's; None when the fact
    names no submission (host commands, batch facts)."""
    cells: tuple[Cell, ...]


_A = Disposition.APPLIED
_S = Disposition.IGNORED_STALE
_D = Disposition.IGNORED_DUPLICATE
_R = Disposition.REJECTED
_O = PlateOutcome
_RE = Reason

# The legend: every cell the plate fact table uses, named.
_NO = Cell(None, "cannot happen: no submission of this phase can have this id here")
_SETTLED = Cell(_S, "stale: the plate already settled {outcome}")
_NOT_CURRENT = Cell(_S, "stale: {id!r} is not this batch's {phase} of the plate")
_PAST_COMPILE = Cell(_S, "stale: the compile already succeeded")
_NEVER = Cell(
    _R,
    "engine protocol error: {kind} for {id!r}, but no {phase} was submitted for the plate",
    settle=(_O.FAILED, _RE.ENGINE_PROTOCOL_ERROR),
)
_COMPILE_FAILED_LATE = Cell(
    _R,
    "engine protocol error: {kind} for {id!r} after the compile succeeded",
    settle=(_O.FAILED, _RE.ENGINE_PROTOCOL_ERROR),
)
_REJECTED_LATE = Cell(
    _R,
    "engine protocol error: execution {id!r} rejected after it was accepted",
    settle=(_O.FAILED, _RE.ENGINE_PROTOCOL_ERROR),
)
_DUP_COMPILE_ACCEPTED = Cell(_D, "duplicate: the compile was already accepted")
_DUP_COMPILED = Cell(_D, "duplicate: the compile already succeeded")
_DUP_EXECUTION_ACCEPTED = Cell(_D, "duplicate: the execution was already accepted")
_COMPILE_ACCEPTED = Cell(_A, "compile accepted", (PlateEvent.COMPILE_ACCEPTED,))
_COMPILED_EARLY = Cell(
    _A,
    "compile succeeded (its acceptance was overtaken)",
    (PlateEvent.COMPILE_ACCEPTED, PlateEvent.COMPILE_SUCCEEDED),
    rule=Rule.COMPILED,
)
_COMPILED = Cell(_A, "compile succeeded", (PlateEvent.COMPILE_SUCCEEDED,), rule=Rule.COMPILED)
_COMPILE_FAILED = Cell(_A, "compile failed", settle=(_O.FAILED, _RE.COMPILE_FAILED))
_COMPILE_REJECTED = Cell(_A, "compile rejected", settle=(_O.FAILED, _RE.COMPILE_REJECTED))
_COMPILE_CANCELLED = Cell(_A, "compile cancelled", rule=Rule.CANCELLED)
_EXECUTION_ACCEPTED = Cell(_A, "execution accepted", (PlateEvent.EXECUTION_ACCEPTED,))
_STARTED_EARLY = Cell(
    _A,
    "execution started (its acceptance was overtaken)",
    (PlateEvent.EXECUTION_ACCEPTED, PlateEvent.EXECUTION_STARTED),
    rule=Rule.STARTED,
)
_STARTED = Cell(_A, "execution started", (PlateEvent.EXECUTION_STARTED,), rule=Rule.STARTED)
_PROGRESS_EARLY = Cell(
    _A,
    "progress (the execution's acceptance was overtaken)",
    (PlateEvent.EXECUTION_ACCEPTED, PlateEvent.PROGRESS),
    rule=Rule.PROGRESS,
)
_PROGRESS = Cell(_A, "progress", (PlateEvent.PROGRESS,), rule=Rule.PROGRESS)
_SUCCEEDED_EARLY = Cell(
    _A,
    "execution succeeded (its acceptance was overtaken)",
    (PlateEvent.EXECUTION_ACCEPTED,),
    settle=(_O.COMPLETED, _RE.SUCCEEDED),
)
_SUCCEEDED = Cell(_A, "execution succeeded", settle=(_O.COMPLETED, _RE.SUCCEEDED))
_EXECUTION_FAILED = Cell(_A, "execution failed", settle=(_O.FAILED, _RE.EXECUTION_FAILED))
_EXECUTION_REJECTED = Cell(_A, "execution rejected", settle=(_O.FAILED, _RE.EXECUTION_REJECTED))
_EXECUTION_CANCELLED = Cell(_A, "execution cancelled", rule=Rule.CANCELLED)
_LOST = Cell(_A, "lost in a restart", rule=Rule.LOST)
_LOST_UNISSUED = Cell(_S, "stale: no {phase} was submitted for the plate")
_CANCEL = Cell(_A, "plate cancel requested", rule=Rule.CANCEL)
_TIME_OUT = Cell(
    _A, "cancel unconfirmed", settle=(_O.CANCELLED, _RE.CANCEL_UNCONFIRMED), rule=Rule.TIME_OUT
)

_COMPILE_FACTS = (
    "compile_accepted",
    "compile_succeeded",
    "compile_failed",
    "compile_rejected",
    "compile_cancelled",
)
_EXECUTION_FACTS = (
    "execution_accepted",
    "execution_started",
    "execution_progress",
    "execution_succeeded",
    "execution_failed",
    "execution_rejected",
    "execution_cancelled",
)
_CUR, _OTH, _UNI = IdMatch.CURRENT, IdMatch.OTHER, IdMatch.UNISSUED

# fmt: off
PLATE_FACTS: tuple[FactRow, ...] = (
    #                                              idle            queued              compiling              compiled               executing                settled  # noqa: E501
    FactRow(("compile_accepted",), _CUR,         (_NO,            _COMPILE_ACCEPTED,  _DUP_COMPILE_ACCEPTED, _DUP_COMPILE_ACCEPTED, _DUP_COMPILE_ACCEPTED,   _SETTLED)),  # noqa: E501
    FactRow(("compile_succeeded",), _CUR,        (_NO,            _COMPILED_EARLY,    _COMPILED,             _DUP_COMPILED,         _DUP_COMPILED,           _SETTLED)),  # noqa: E501
    FactRow(("compile_failed",), _CUR,           (_NO,            _COMPILE_FAILED,    _COMPILE_FAILED,       _COMPILE_FAILED_LATE,  _COMPILE_FAILED_LATE,    _SETTLED)),  # noqa: E501
    FactRow(("compile_rejected",), _CUR,         (_NO,            _COMPILE_REJECTED,  _COMPILE_REJECTED,     _COMPILE_FAILED_LATE,  _COMPILE_FAILED_LATE,    _SETTLED)),  # noqa: E501
    FactRow(("compile_cancelled",), _CUR,        (_NO,            _COMPILE_CANCELLED, _COMPILE_CANCELLED,    _PAST_COMPILE,         _PAST_COMPILE,           _SETTLED)),  # noqa: E501
    FactRow(_COMPILE_FACTS, _OTH,                (_NOT_CURRENT,   _NOT_CURRENT,       _NOT_CURRENT,          _NOT_CURRENT,          _NOT_CURRENT,            _SETTLED)),  # noqa: E501
    FactRow(_COMPILE_FACTS, _UNI,                (_NEVER,         _NO,                _NO,                   _NO,                   _NO,                     _SETTLED)),  # noqa: E501
    FactRow(("execution_accepted",), _CUR,       (_NO,            _NO,                _NO,                   _EXECUTION_ACCEPTED,   _DUP_EXECUTION_ACCEPTED, _SETTLED)),  # noqa: E501
    FactRow(("execution_started",), _CUR,        (_NO,            _NO,                _NO,                   _STARTED_EARLY,        _STARTED,                _SETTLED)),  # noqa: E501
    FactRow(("execution_progress",), _CUR,       (_NO,            _NO,                _NO,                   _PROGRESS_EARLY,       _PROGRESS,               _SETTLED)),  # noqa: E501
    FactRow(("execution_succeeded",), _CUR,      (_NO,            _NO,                _NO,                   _SUCCEEDED_EARLY,      _SUCCEEDED,              _SETTLED)),  # noqa: E501
    FactRow(("execution_failed",), _CUR,         (_NO,            _NO,                _NO,                   _EXECUTION_FAILED,     _EXECUTION_FAILED,       _SETTLED)),  # noqa: E501
    FactRow(("execution_rejected",), _CUR,       (_NO,            _NO,                _NO,                   _EXECUTION_REJECTED,   _REJECTED_LATE,          _SETTLED)),  # noqa: E501
    FactRow(("execution_cancelled",), _CUR,      (_NO,            _NO,                _NO,                   _EXECUTION_CANCELLED,  _EXECUTION_CANCELLED,    _SETTLED)),  # noqa: E501
    FactRow(_EXECUTION_FACTS, _OTH,              (_NOT_CURRENT,   _NOT_CURRENT,       _NOT_CURRENT,          _NOT_CURRENT,          _NOT_CURRENT,            _SETTLED)),  # noqa: E501
    FactRow(_EXECUTION_FACTS, _UNI,              (_NEVER,         _NEVER,             _NEVER,                _NEVER,                _NO,                     _SETTLED)),  # noqa: E501
    FactRow(("submission_lost[compile]",), _CUR, (_NO,            _LOST,              _LOST,                 _PAST_COMPILE,         _PAST_COMPILE,           _SETTLED)),  # noqa: E501
    FactRow(("submission_lost[compile]",), _OTH, (_NOT_CURRENT,   _NOT_CURRENT,       _NOT_CURRENT,          _NOT_CURRENT,          _NOT_CURRENT,            _SETTLED)),  # noqa: E501
    FactRow(("submission_lost[compile]",), _UNI, (_LOST_UNISSUED, _NO,                _NO,                   _NO,                   _NO,                     _SETTLED)),  # noqa: E501
    FactRow(("submission_lost[execute]",), _CUR, (_NO,            _NO,                _NO,                   _LOST,                 _LOST,                   _SETTLED)),  # noqa: E501
    FactRow(("submission_lost[execute]",), _OTH, (_NOT_CURRENT,   _NOT_CURRENT,       _NOT_CURRENT,          _NOT_CURRENT,          _NOT_CURRENT,            _SETTLED)),  # noqa: E501
    FactRow(("submission_lost[execute]",), _UNI, (_LOST_UNISSUED, _LOST_UNISSUED,     _LOST_UNISSUED,        _LOST_UNISSUED,        _NO,                     _SETTLED)),  # noqa: E501
    FactRow(("cancel_requested[plate]",), None,  (_CANCEL,        _CANCEL,            _CANCEL,               _CANCEL,               _CANCEL,                 _SETTLED)),  # noqa: E501
    FactRow(("cancel_timed_out",), None,         (_TIME_OUT,      _TIME_OUT,          _TIME_OUT,             _TIME_OUT,             _TIME_OUT,               _SETTLED)),  # noqa: E501
)
"""What a fact about one plate does, by the plate's column (``PLATE_COLUMNS``).

A fact naming a plate that is not in the batch is rejected before this table
(``unknown_plate``): it has no plate to look up."""
# fmt: on

_BATCH_SETTLED = Cell(_S, "stale: the batch already settled")
_START = Cell(_A, "started", (BatchEvent.START,), rule=Rule.START)
_DUP_START = Cell(_D, "duplicate: the batch already started")
_CANCEL_ALL = Cell(_A, "batch cancel requested", (BatchEvent.CANCEL,), rule=Rule.CANCEL_ALL)
_DUP_CANCEL_ALL = Cell(_D, "duplicate: batch cancel already requested")
_ENGINE_LOST = Cell(_A, "engine lost: {reason}", rule=Rule.ENGINE_LOST)
_CALLBACK = Cell(_A, "host callback {callback} failed", rule=Rule.REPORT_CALLBACK)
_RESUMED = Cell(_A, "resumed: {note}")

# fmt: off
BATCH_FACTS: tuple[FactRow, ...] = (
    #                                             idle          compiling     executing     cancelling       settled  # noqa: E501
    FactRow(("batch_started",), None,           (_START,       _DUP_START,   _DUP_START,   _DUP_START,      _BATCH_SETTLED)),  # noqa: E501
    FactRow(("cancel_requested[batch]",), None, (_CANCEL_ALL,  _CANCEL_ALL,  _CANCEL_ALL,  _DUP_CANCEL_ALL, _BATCH_SETTLED)),  # noqa: E501
    FactRow(("engine_lost",), None,             (_ENGINE_LOST, _ENGINE_LOST, _ENGINE_LOST, _ENGINE_LOST,    _BATCH_SETTLED)),  # noqa: E501
    FactRow(("host_callback_failed",), None,    (_CALLBACK,    _CALLBACK,    _CALLBACK,    _CALLBACK,       _CALLBACK)),  # noqa: E501
    FactRow(("batch_resumed",), None,           (_RESUMED,     _RESUMED,     _RESUMED,     _RESUMED,        _RESUMED)),  # noqa: E501
)
"""What a fact about the whole batch does, by the batch's column (``BATCH_COLUMNS``)."""
# fmt: on
