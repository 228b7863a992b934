"""Immutable views of a batch, for hosts, tests and replay comparison."""

from __future__ import annotations

from dataclasses import dataclass

from plateflow.core.tables import BatchState, PlateOutcome, PlateState, Reason

__all__ = ["BatchSnapshot", "PlateSnapshot"]


@dataclass(frozen=True, slots=True)
class PlateSnapshot:
    plate_id: str
    state: PlateState
    outcome: PlateOutcome | None
    reason: Reason | None
    job_id: str | None
    artifact_id: str | None
    execution_id: str | None
    started_at: float | None
    done: int
    total: int
    cancel_requested: bool


@dataclass(frozen=True, slots=True)
class BatchSnapshot:
    batch_id: str
    state: BatchState
    cancel_requested: bool
    plates: tuple[PlateSnapshot, ...]

    def plate(self, plate_id: str) -> PlateSnapshot:
        for plate in self.plates:
            if plate.plate_id == plate_id:
                return plate
        raise KeyError(plate_id)
