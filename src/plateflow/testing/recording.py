"""RecordingHost: a host that writes down every callback and what it could see then.

Theory of operation: most questions a test asks of a host run — was plate 3
reported once, what did the stores say when the batch was reported, which
thread delivered it — are questions about the *sequence of callbacks*. The
recording host keeps that sequence as :class:`Call` values: the callback's
name and arguments, the thread it ran on, and a :class:`HostView` (a copy of
the stores the service writes) taken at that moment, so a test can check the
"after commit" guarantee (C4) from the host's side.

It is also a fixture for tests that drive a service from another thread:
:meth:`RecordingHost.wait_for` blocks, with a bound, until a callback
matching a predicate has been recorded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import JsonValue

from plateflow.core import BatchState, BatchSummary, PlateOutcome, PlateState, ResumedBatch
from plateflow.host import BaseBatchHost, BatchHost

if TYPE_CHECKING:
    from plateflow.runtime.progress import ProgressSnapshot

__all__ = ["Call", "HostView", "RecordingHost"]


@dataclass(frozen=True, slots=True)
class HostView:
    """Copies of a host's stores, taken at one moment."""

    plate_execution_states: Mapping[str, PlateState]
    plate_compiled_data: Mapping[str, JsonValue]
    plate_execution_ids: Mapping[str, str]
    progress_tracker: ProgressSnapshot | None

    @classmethod
    def of(cls, host: BatchHost) -> HostView:
        return cls(
            dict(host.plate_execution_states),
            dict(host.plate_compiled_data),
            dict(host.plate_execution_ids),
            host.progress_tracker,
        )


@dataclass(frozen=True, slots=True)
class Call:
    """One callback: what was called, with what, on which thread, seeing which stores."""

    seq: int
    name: str
    args: tuple[Any, ...]
    thread_id: int
    thread_name: str
    view: HostView

    def __str__(self) -> str:
        shown = ", ".join(_short(a) for a in self.args)
        return f"#{self.seq} {self.name}({shown}) on {self.thread_name}"


def _short(value: object) -> str:
    if isinstance(value, BatchSummary):
        return f"<summary {value.outcome.value} {dict(value.counts)}>"
    if isinstance(value, PlateState | PlateOutcome | BatchState):
        return value.value
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class RecordingHost(BaseBatchHost):
    """Records every callback as a :class:`Call`; can raise on demand and react to calls.

    ``raise_in`` names callbacks that raise ``RuntimeError`` after recording
    (to exercise C5); ``on_call`` is called with each :class:`Call` after it
    is recorded (e.g. to cancel a plate when it reaches ``executing``).
    Arguments are recorded positionally in the order of the callback's
    signature: ``emit_error`` records ``(message, code, plate_id)``.
    """

    def __init__(
        self,
        *,
        raise_in: set[str] | None = None,
        on_call: Callable[[Call], None] | None = None,
    ) -> None:
        super().__init__()
        self.calls: list[Call] = []
        self.raise_in: set[str] = set(raise_in or ())
        self.on_call = on_call
        self._changed = threading.Condition()

    # --- reading what was recorded ----------------------------------------------------------

    def names(self, name: str) -> list[tuple[Any, ...]]:
        """The arguments of every call to ``name``, in order."""
        return [c.args for c in self.calls if c.name == name]

    def calls_to(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.name == name]

    @property
    def threads(self) -> set[int]:
        """Every thread a callback ran on."""
        return {c.thread_id for c in self.calls}

    def completed(self) -> dict[str, PlateOutcome]:
        """Plate id → outcome from ``on_plate_completed`` (the last one, if called twice)."""
        return {c.args[0]: c.args[1] for c in self.calls_to("on_plate_completed")}

    def wait_for(self, predicate: Callable[[Call], bool], *, timeout: float) -> Call:
        """Block until a recorded call matches; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for call in self.calls:
                    if predicate(call):
                        return call
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"no matching host callback within {timeout:g} s; "
                        f"recorded: {[c.name for c in self.calls][-10:]}"
                    )
                self._changed.wait(left)

    def transcript(self) -> str:
        """The calls, one per line: what a failing test prints."""
        return "\n".join(str(c) for c in self.calls)

    # --- recording -------------------------------------------------------------------------

    def _record(self, name: str, *args: Any) -> None:
        thread = threading.current_thread()
        with self._changed:
            view = HostView.of(self)
            call = Call(len(self.calls), name, args, thread.ident or 0, thread.name, view)
            self.calls.append(call)
            self._changed.notify_all()
        if self.on_call is not None:
            self.on_call(call)
        if name in self.raise_in:
            raise RuntimeError(f"RecordingHost raises in {name} (raise_in)")

    def emit_status(self, message: str) -> None:
        self._record("emit_status", message)

    def emit_error(self, message: str, *, code: str = "", plate_id: str | None = None) -> None:
        self._record("emit_error", message, code, plate_id)

    def emit_progress_started(self, total: int) -> None:
        self._record("emit_progress_started", total)

    def emit_progress_updated(self, snapshot: ProgressSnapshot) -> None:
        self._record("emit_progress_updated", snapshot)

    def emit_progress_finished(self, snapshot: ProgressSnapshot) -> None:
        self._record("emit_progress_finished", snapshot)

    def update_item_list(self) -> None:
        self._record("update_item_list")

    def update_button_states(self, batch_state: BatchState) -> None:
        self._record("update_button_states", batch_state)

    def emit_orchestrator_state(self, plate_id: str, state: PlateState) -> None:
        self._record("emit_orchestrator_state", plate_id, state)

    def emit_execution_complete(self, summary: BatchSummary) -> None:
        self._record("emit_execution_complete", summary)

    def on_plate_completed(self, plate_id: str, outcome: PlateOutcome, result: JsonValue) -> None:
        self._record("on_plate_completed", plate_id, outcome, result)

    def on_all_plates_completed(self, summary: BatchSummary) -> None:
        self._record("on_all_plates_completed", summary)

    def on_resumed(self, resumed: ResumedBatch) -> None:
        self._record("on_resumed", resumed)
