"""What can be read from a batch: immutable snapshots, summaries, counts.

Theory of operation: a batch's read-only answers (its snapshot, summary,
settled plates, outstanding submissions, statistics) are ``BatchView``'s,
computed from its plate records; ``core.batch`` adds only what changes a
batch. Snapshots are immutable values, for hosts, tests and replay comparison.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from plateflow.core.cells import PlateRecord, cell_for
from plateflow.core.decisions import BatchSummary, PlateSettlement, SettledPlate
from plateflow.core.facts import Fact
from plateflow.core.journal import Journal
from plateflow.core.tables import BatchMode, BatchState, Cell, PlateOutcome, PlateState, Reason

__all__ = ["BatchSnapshot", "BatchView", "PlateSnapshot"]


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


class BatchView:
    """The read-only half of a batch (``core.batch.Batch`` is the other)."""

    batch_id: str
    mode: BatchMode
    journal: Journal
    _state: BatchState
    _cancel_requested: bool
    _plates: dict[str, PlateRecord]

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

    def lookup(self, fact: Fact) -> Cell | None:
        """The fact-table cell ``fact`` would be handled by now; None for an unknown plate."""
        found = cell_for(fact, self._state, self._plates)
        return None if found is None else found[0]

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

    def summary(self) -> BatchSummary:
        """The batch's summary so far: every plate settled until now, counted."""
        settlements = tuple(
            PlateSettlement(s.plate_id, s.outcome, s.reason) for s in self.settled_plates()
        )
        return BatchSummary(
            batch_id=self.batch_id,
            mode=self.mode,
            outcome=self._state,
            plates=settlements,
            counts=dict(Counter(s.outcome for s in settlements)),
            reasons=dict(Counter(s.reason for s in settlements)),
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
        return {
            "batch_id": self.batch_id,
            "state": self._state.value,
            "plates": len(self._plates),
            "unsettled": sum(1 for p in self._plates.values() if p.outcome is None),
            "plates_per_state": dict(per_state),
            "facts": len(self.journal),
            "facts_per_disposition": dict(Counter(r.disposition.value for r in self.journal)),
        }

    def __repr__(self) -> str:
        unsettled = sum(1 for p in self._plates.values() if p.outcome is None)
        return (
            f"<Batch {self.batch_id!r} {self._state.value} mode={self.mode.value} "
            f"plates={len(self._plates)} unsettled={unsettled}>"
        )
