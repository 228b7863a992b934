"""Decisions: what the core wants done after it handled a fact.

Theory of operation: the core never calls an engine or a host. Handling a
fact returns a tuple of decisions in the order they must be carried out; the
service turns them into engine calls and host callbacks *after* the batch has
committed and journaled the change (guarantee C4). Each decision names the
stimulus that caused it, so a host report can be traced to a journal record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import JsonValue

from plateflow.core.tables import BatchMode, BatchState, PlateOutcome, PlateState, Reason

__all__ = [
    "BatchChanged",
    "BatchSummary",
    "CancelSubmission",
    "Decision",
    "PlateChanged",
    "PlateSettlement",
    "ProgressRecorded",
    "ReportBatch",
    "ReportError",
    "ReportPlate",
    "ResumedBatch",
    "SettledPlate",
    "SubmitCompile",
    "SubmitExecution",
]


# --- instructions for the engine ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubmitCompile:
    plate_id: str
    job_id: str
    stimulus_id: str


@dataclass(frozen=True, slots=True)
class SubmitExecution:
    plate_id: str
    execution_id: str
    artifact_id: str
    stimulus_id: str


@dataclass(frozen=True, slots=True)
class CancelSubmission:
    """Ask the engine to stop one submission (a compile job or an execution)."""

    plate_id: str
    phase: Literal["compile", "execute"]
    submission_id: str
    stimulus_id: str


# --- notifications and reports for the host -------------------------------------------


@dataclass(frozen=True, slots=True)
class PlateChanged:
    plate_id: str
    old: PlateState
    new: PlateState
    stimulus_id: str


@dataclass(frozen=True, slots=True)
class BatchChanged:
    old: BatchState
    new: BatchState
    stimulus_id: str


@dataclass(frozen=True, slots=True)
class ProgressRecorded:
    plate_id: str
    done: int
    total: int
    message: str
    stimulus_id: str


@dataclass(frozen=True, slots=True)
class ReportPlate:
    """The plate settled: call ``on_plate_completed`` (exactly once per plate, C2)."""

    plate_id: str
    outcome: PlateOutcome
    reason: Reason
    result: JsonValue
    stimulus_id: str


@dataclass(frozen=True, slots=True)
class PlateSettlement:
    plate_id: str
    outcome: PlateOutcome
    reason: Reason


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """How a batch ended: its outcome and counts per plate outcome and per reason."""

    batch_id: str
    mode: BatchMode
    outcome: BatchState
    plates: tuple[PlateSettlement, ...]
    counts: Mapping[PlateOutcome, int] = field(default_factory=dict)
    reasons: Mapping[Reason, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SettledPlate:
    """A plate that settled, with its result (what ``on_plate_completed`` was given)."""

    plate_id: str
    outcome: PlateOutcome
    reason: Reason
    result: JsonValue


@dataclass(frozen=True, slots=True)
class ResumedBatch:
    """What a host hears once when a batch is resumed from its journal (``on_resumed``).

    ``settled`` are the plates that settled before the restart, each with its
    outcome, reason and result: the host hears of them here and never again
    through ``on_plate_completed``. Every plate in ``unsettled`` gets exactly one
    ``on_plate_completed`` later, then the batch's callbacks follow once.
    """

    batch_id: str
    mode: BatchMode
    state: BatchState
    """The batch's state when it was resumed."""
    settled: tuple[SettledPlate, ...]
    unsettled: tuple[str, ...]
    journal: str
    """The journal file the batch goes on writing."""
    records: int
    """How many records the journal held (the ones replayed)."""


@dataclass(frozen=True, slots=True)
class ReportBatch:
    """Every plate settled: call ``on_all_plates_completed`` once (C3)."""

    summary: BatchSummary
    stimulus_id: str


@dataclass(frozen=True, slots=True)
class ReportError:
    """Call ``emit_error``: something went wrong that the host should hear about."""

    code: str
    message: str
    plate_id: str | None
    stimulus_id: str


Decision = (
    SubmitCompile
    | SubmitExecution
    | CancelSubmission
    | PlateChanged
    | BatchChanged
    | ProgressRecorded
    | ReportPlate
    | ReportBatch
    | ReportError
)
