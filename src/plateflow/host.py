"""The host contract: what an application implements to drive batches.

A host *subclasses* :class:`BatchHost` (the contract is nominal, not duck
typed: the service refuses anything else with a ``TypeError`` naming what is
missing). :class:`BaseBatchHost` implements every callback as a no-op and
owns empty stores, so a host overrides only what it needs.

What a host can rely on (the guarantees, numbered as in the documentation):

- **C1 one path** — a plate reaches a terminal state only through the
  service's convergence path; nothing else settles a plate.
- **C2 exactly once per plate** — ``on_plate_completed`` is called exactly
  once per plate per batch, whatever the engine repeats or reorders.
- **C3 exactly once per batch** — ``on_all_plates_completed`` and
  ``emit_execution_complete`` are called once, after ``on_plate_completed``
  was called for every plate.
- **C4 after commit** — every callback runs after the change it reports is
  committed and journaled; callbacks are never nested inside one another.
- **C5 faults contained** — a callback that raises is reported through
  ``emit_error`` and the journal; other plates and the batch still converge.
- **C6 one thread** — all state changes happen on the service's event loop;
  callbacks (and writes to the stores below) run wherever the host's
  dispatcher puts them, e.g. a Qt host's GUI thread.
- **C7 bounded** — every plate converges within a bounded time of the engine
  being lost, a cancel, or an abort; nothing waits forever.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from pydantic import JsonValue

from plateflow.core import BatchState, BatchSummary, PlateOutcome, PlateState, ResumedBatch

if TYPE_CHECKING:
    from plateflow.runtime.progress import ProgressSnapshot

__all__ = ["HOST_CALLBACKS", "BaseBatchHost", "BatchHost"]


class BatchHost(ABC):
    """The contract between the service and an application. Subclass it.

    Stores the service writes (through the dispatcher, so on the host's
    thread): ``plate_compiled_data`` (plate id → compile artifact id),
    ``plate_execution_states`` (plate id → ``PlateState``),
    ``plate_execution_ids`` (plate id → execution id) and
    ``progress_tracker`` (the latest progress snapshot).
    """

    plate_compiled_data: dict[str, JsonValue]
    plate_execution_states: dict[str, PlateState]
    plate_execution_ids: dict[str, str]
    progress_tracker: ProgressSnapshot | None

    @abstractmethod
    def emit_status(self, message: str) -> None:
        """A one-line human status ("compiling 12 plates", "batch completed")."""

    @abstractmethod
    def emit_error(self, message: str, *, code: str = "", plate_id: str | None = None) -> None:
        """Something went wrong that the user should hear about; nothing was lost."""

    @abstractmethod
    def emit_progress_started(self, total: int) -> None:
        """A batch of ``total`` plates starts; reset progress views."""

    @abstractmethod
    def emit_progress_updated(self, snapshot: ProgressSnapshot) -> None:
        """Coalesced progress: at most a few updates per second, whatever the engine sends."""

    @abstractmethod
    def emit_progress_finished(self, snapshot: ProgressSnapshot) -> None:
        """The batch settled; the final progress figures."""

    @abstractmethod
    def update_item_list(self) -> None:
        """Plate states changed; refresh the list of plates."""

    @abstractmethod
    def update_button_states(self, batch_state: BatchState) -> None:
        """The batch changed state; enable or disable run / cancel controls."""

    @abstractmethod
    def emit_orchestrator_state(self, plate_id: str, state: PlateState) -> None:
        """One plate moved to ``state``."""

    @abstractmethod
    def emit_execution_complete(self, summary: BatchSummary) -> None:
        """The batch settled (once, C3)."""

    @abstractmethod
    def on_plate_completed(self, plate_id: str, outcome: PlateOutcome, result: JsonValue) -> None:
        """One plate settled (exactly once per plate, C2)."""

    @abstractmethod
    def on_all_plates_completed(self, summary: BatchSummary) -> None:
        """Every plate settled (once, after every ``on_plate_completed``, C3)."""

    @abstractmethod
    def on_resumed(self, resumed: ResumedBatch) -> None:
        """A batch was resumed from its journal after a restart (once, before any other
        report of that batch): the plates that settled before the restart are in
        ``resumed.settled`` and are never reported again; each plate still running gets
        one ``on_plate_completed`` later."""


HOST_CALLBACKS: tuple[str, ...] = tuple(
    sorted(
        name
        for name, value in vars(BatchHost).items()
        if getattr(value, "__isabstractmethod__", False)
    )
)
"""The callbacks a host provides; named in the error when something else is passed."""


class BaseBatchHost(BatchHost):
    """A ready host: every callback does nothing and the stores start empty."""

    def __init__(self) -> None:
        self.plate_compiled_data = {}
        self.plate_execution_states = {}
        self.plate_execution_ids = {}
        self.progress_tracker = None

    def emit_status(self, message: str) -> None:
        pass

    def emit_error(self, message: str, *, code: str = "", plate_id: str | None = None) -> None:
        pass

    def emit_progress_started(self, total: int) -> None:
        pass

    def emit_progress_updated(self, snapshot: ProgressSnapshot) -> None:
        pass

    def emit_progress_finished(self, snapshot: ProgressSnapshot) -> None:
        pass

    def update_item_list(self) -> None:
        pass

    def update_button_states(self, batch_state: BatchState) -> None:
        pass

    def emit_orchestrator_state(self, plate_id: str, state: PlateState) -> None:
        pass

    def emit_execution_complete(self, summary: BatchSummary) -> None:
        pass

    def on_plate_completed(self, plate_id: str, outcome: PlateOutcome, result: JsonValue) -> None:
        pass

    def on_all_plates_completed(self, summary: BatchSummary) -> None:
        pass

    def on_resumed(self, resumed: ResumedBatch) -> None:
        pass
