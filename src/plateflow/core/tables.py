"""The states, events and transition tables of the plate and batch machines.

Theory of operation: each machine has exactly one literal table below. The
``transitions`` machines are built from it (``core.machines``), the diagrams
and docs are generated from it, and the totality tests walk it. Nothing else
in the package decides what move is legal, so reading a table tells you the
whole machine.

Rows marked ``convergence=True`` are the terminal moves. Only the convergence
path may take them (guarantee C1); the machine builder puts a guard on every
such row that raises ``ConvergenceViolation`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

__all__ = [
    "BATCH_TABLE",
    "PLATE_TABLE",
    "BatchEvent",
    "BatchMode",
    "BatchState",
    "CompileFailurePolicy",
    "PlateEvent",
    "PlateOutcome",
    "PlateState",
    "Reason",
    "Row",
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
