"""Finding a fact's cell: which line and column of the fact tables it is handled by.

Theory of operation: the fact tables of ``core.tables`` are literal grids, easy
to read and to generate documentation from; this module indexes them once
(refusing a grid with a missing or doubled cell) and answers the one question
the batch asks of every fact: *which cell?* The line is the fact's kind
(``fact_key``), refined where a kind means two things (a cancel of a plate or of
the batch, a lost compile or execution) and, for a fact that names a
submission, the relation of its id to the plate's (``IdMatch``). The column is
the plate's state, or ``settled`` once it settled; for a fact about the whole
batch, the batch's. A plate's bookkeeping (``PlateRecord``) lives here too,
since the lookup reads it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, Literal

from pydantic import JsonValue

from plateflow.core.facts import (
    CompileFailed,
    CompileRejected,
    EngineLost,
    ExecutionFailed,
    ExecutionRejected,
    ExecutionSucceeded,
    Fact,
)
from plateflow.core.tables import (
    BATCH_COLUMNS,
    BATCH_FACTS,
    IN_FLIGHT,
    PLATE_COLUMNS,
    PLATE_FACTS,
    SETTLED,
    BatchState,
    Cell,
    Disposition,
    FactRow,
    IdMatch,
    PlateOutcome,
    PlateState,
    Reason,
    Rule,
)
from plateflow.errors import PlateflowBug, UsageError

__all__ = [
    "BATCH_CELLS",
    "PLATE_CELLS",
    "PlateRecord",
    "cell_for",
    "check",
    "fact_key",
    "note",
    "plate_records",
    "result_of",
    "submission_of",
]

Phase = Literal["compile", "execute"]
_PHASE_WORD: Final = {"compile": "compile", "execute": "execution"}


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


PLATE_CELLS: Final = _index(PLATE_FACTS, PLATE_COLUMNS)
"""``PLATE_FACTS`` by ``(fact key, IdMatch or None, column)``."""
BATCH_CELLS: Final = _index(BATCH_FACTS, BATCH_COLUMNS)
"""``BATCH_FACTS`` by ``(fact key, None, column)``."""
_BATCH_KINDS: Final = frozenset(kind for kind, _ids, _column in BATCH_CELLS)


class PlateRecord:
    """One plate's bookkeeping in one batch. Its state changes only through the machines."""

    __slots__ = (
        "artifact_id",
        "awaiting_compile",
        "cancel_requested",
        "done",
        "execution_id",
        "index",
        "job_id",
        "outcome",
        "own_ids",
        "plate_id",
        "reason",
        "result",
        "started_at",
        "state",
        "total",
    )

    def __init__(self, plate_id: str, index: int, batch_id: str) -> None:
        self.plate_id = plate_id
        self.index = index
        prefix = f"{batch_id}.{index}"
        self.own_ids: Final = {"compile": f"{prefix}.c", "execute": f"{prefix}.x"}
        """The ids this batch issues the plate's submissions under; derived from the batch
        id, so a replay issues the same ones and a fact naming any other id is stale."""
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

    def in_flight(self) -> tuple[Phase, str] | None:
        """The phase and id of the submission the engine may be working on, if any."""
        phase = None if self.outcome is not None else IN_FLIGHT.get(self.state)
        issued = self.job_id if phase == "compile" else self.execution_id
        return None if phase is None or issued is None else (phase, issued)


def plate_records(batch_id: str, plate_ids: Iterable[str]) -> dict[str, PlateRecord]:
    """A new batch's plate records, by id in batch order; refuses ids a batch cannot have."""
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
    return {pid: PlateRecord(pid, index, batch_id) for index, pid in enumerate(ids)}


def fact_key(fact: Fact) -> str:
    """The fact's line in the fact tables: its kind, refined where the kind has two lines."""
    if fact.kind == "cancel_requested":
        return "cancel_requested[batch]" if fact.plate_id is None else "cancel_requested[plate]"
    if fact.kind == "submission_lost":
        return f"submission_lost[{fact.phase}]"
    return fact.kind


def submission_of(fact: Any) -> tuple[str, Phase] | None:
    """The submission id a plate fact names, with its phase; None for host commands."""
    if fact.kind == "submission_lost":
        return fact.submission_id, fact.phase
    job_id = getattr(fact, "job_id", None)
    if job_id is not None:
        return job_id, "compile"
    execution_id = getattr(fact, "execution_id", None)
    return None if execution_id is None else (execution_id, "execute")


def cell_for(
    fact: Fact, batch_state: BatchState, plates: Mapping[str, PlateRecord]
) -> tuple[Cell, PlateRecord | None] | None:
    """The cell ``fact`` is handled by, with the plate it names; None for an unknown plate."""
    key = fact_key(fact)
    if key in _BATCH_KINDS:
        column = SETTLED if batch_state.is_terminal else batch_state
        return BATCH_CELLS[(key, None, column)], None
    plate = plates.get(getattr(fact, "plate_id", None) or "")
    if plate is None:
        return None
    submission = submission_of(fact)
    ids = None
    if submission is not None:
        sid, phase = submission
        issued = plate.job_id if phase == "compile" else plate.execution_id
        if sid != plate.own_ids[phase]:
            ids = IdMatch.OTHER
        else:
            ids = IdMatch.UNISSUED if issued is None else IdMatch.CURRENT
    column = SETTLED if plate.outcome is not None else plate.state
    return PLATE_CELLS[(key, ids, column)], plate


def result_of(fact: Fact) -> JsonValue:
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
    """What a note may name: the fact's fields, ``id``, ``phase`` and ``outcome``."""

    def __init__(self, fact: Fact, plate: PlateRecord | None) -> None:
        self._fact = fact
        self._plate = plate

    def __getitem__(self, key: str) -> Any:
        if key in ("id", "phase"):
            submission = submission_of(self._fact)
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


def note(template: str, fact: Fact, plate: PlateRecord | None) -> str:
    """A cell's note filled in with what the fact and the plate say (the journal's detail)."""
    return template.format_map(_Fields(fact, plate))


def check(rule: Rule, plate: PlateRecord, fact: Any) -> tuple[Disposition, str] | None:
    """What a rule finds in the data before anything moves: why the fact is dropped, or
    ``rejected`` with the protocol error it is; None when the cell applies."""
    if rule is Rule.STARTED and plate.started_at is not None:
        return Disposition.IGNORED_DUPLICATE, "duplicate: execution already started"
    if rule is Rule.PROGRESS:
        figures = f"progress {fact.done}/{fact.total}"
        if fact.done > fact.total:
            too_many = f"engine protocol error: {figures} reports more done than total"
            return Disposition.REJECTED, too_many
        if plate.total and (fact.done, fact.total) == (plate.done, plate.total):
            return Disposition.IGNORED_DUPLICATE, f"duplicate: {figures} already recorded"
        if fact.done < plate.done:
            behind = f"stale: progress {fact.done} is behind {plate.done} already recorded"
            return Disposition.IGNORED_STALE, behind
    if rule is Rule.CANCEL and plate.cancel_requested:
        return Disposition.IGNORED_DUPLICATE, "duplicate: plate cancel already requested"
    if rule is Rule.TIME_OUT and not plate.cancel_requested:
        return Disposition.IGNORED_STALE, "stale: no cancel is pending for the plate"
    return None
