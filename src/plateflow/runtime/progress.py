"""Progress projection: batch progress from plate states and progress records.

Theory of operation: an engine may send thousands of progress records a
second, and a host repainting a progress bar for each would stall. So the
work is split in three. ``ProgressProjection`` is sans-IO bookkeeping: it
folds plate state changes and ``done``/``total`` records into per-plate state
in O(1) each, and computes a ``ProgressSnapshot`` (counts per state, plates
settled, fraction done, ETA from an injected clock) only when asked.
``Coalescer`` is the sans-IO decision of *when* to emit: at most once per
interval, leading edge first, with one trailing emit for what arrived in
between and a final one on ``flush()``. ``CoalescingProgressEmitter`` is the
thin async shell: it feeds the projection, asks the coalescer, and when an
emit must wait it schedules exactly one ``loop.call_later``; there is no
timer while nothing is pending. A burst of N records therefore costs the
host at most ``elapsed / interval + 2`` updates, whatever N is.

The fraction counts a settled plate as 1, an executing plate as
``done / total`` and any other plate as 0. The ETA is
``elapsed / fraction * (1 - fraction)``: None before any progress, 0 when done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import final

from plateflow.core.decisions import Decision, PlateChanged, ProgressRecorded
from plateflow.core.tables import BatchMode, PlateState
from plateflow.runtime.dispatch import Dispatcher, inline_dispatcher

__all__ = [
    "Coalescer",
    "CoalescingProgressEmitter",
    "PlateProgress",
    "ProgressEmitterStatistics",
    "ProgressProjection",
    "ProgressSnapshot",
]

_log = logging.getLogger("plateflow.runtime")

_SCALE = 1 << 32
"""Fixed-point units of one plate's fraction, for the exact running sum."""


@dataclass(frozen=True, slots=True)
class PlateProgress:
    plate_id: str
    state: PlateState
    done: int
    total: int
    message: str
    fraction: float
    """This plate's contribution to the batch fraction, in [0, 1]."""


@dataclass(frozen=True, slots=True)
class ProgressSnapshot:
    """Batch progress at one moment. ``counts`` has an entry for every ``PlateState``."""

    counts: Mapping[PlateState, int]
    settled: int
    total: int
    fraction: float
    elapsed: float
    eta: float | None
    """Seconds left, extrapolated from the pace so far; None before any progress."""
    plates: tuple[PlateProgress, ...]


@final
class ProgressProjection:
    """Per-plate state and progress of one batch, and the snapshot computed from them.

    Sans-IO and single-threaded: feed it from the event loop. In a compile-only
    batch (``mode=BatchMode.COMPILE_ONLY``) a ``compiled`` plate counts as settled.
    Every change costs O(1), and so does most of a snapshot: its ``plates`` tuple
    is a copy of the current per-plate entries (a pointer copy, no new objects).
    """

    def __init__(
        self,
        plate_ids: Iterable[str] = (),
        *,
        mode: BatchMode = BatchMode.RUN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.reset(plate_ids, mode=mode)

    def reset(self, plate_ids: Iterable[str], *, mode: BatchMode | None = None) -> None:
        """Start over for a new batch: every plate ``idle``, no progress, elapsed 0."""
        if mode is not None:
            self._mode = mode
        self._settled_states = frozenset(
            state
            for state in PlateState
            if state.is_terminal
            or (self._mode is BatchMode.COMPILE_ONLY and state is PlateState.COMPILED)
        )
        self._index: dict[str, int] = {}
        self._entries: list[PlateProgress] = []
        for plate_id in plate_ids:
            if plate_id not in self._index:
                self._index[plate_id] = len(self._entries)
                self._entries.append(PlateProgress(plate_id, PlateState.IDLE, 0, 1, "", 0.0))
        self._counts = dict.fromkeys(PlateState, 0)
        self._counts[PlateState.IDLE] = len(self._entries)
        self._executing = 0
        """The plates now executing: the sum of their fractions in units of 1/_SCALE.

        Integers, so the sum is exact however many changes it went through."""
        self._started_at = self._clock()
        self._version = 0

    @property
    def version(self) -> int:
        """Increases on every change; equal versions mean equal snapshots (but elapsed)."""
        return self._version

    @property
    def plate_ids(self) -> tuple[str, ...]:
        return tuple(self._index)

    def set_state(self, plate_id: str, state: PlateState) -> bool:
        """Record a plate's new state. Returns False if nothing changed or the plate is unknown."""
        i = self._index.get(plate_id)
        if i is None or self._entries[i].state is state:
            return False
        old = self._entries[i]
        self._counts[old.state] -= 1
        self._counts[state] += 1
        self._replace(i, old, state, old.done, old.total, old.message)
        return True

    def record(self, plate_id: str, done: int, total: int, message: str = "") -> bool:
        """Record ``done`` of ``total`` steps for a plate. Returns False if nothing changed."""
        i = self._index.get(plate_id)
        if i is None:
            return False
        total = max(total, 1)
        done = min(max(done, 0), total)
        old = self._entries[i]
        if (old.done, old.total, old.message) == (done, total, message):
            return False
        self._replace(i, old, old.state, done, total, message)
        return True

    def apply(self, decision: Decision) -> bool:
        """Fold in a core decision (``PlateChanged``, ``ProgressRecorded``); ignore the rest."""
        if isinstance(decision, PlateChanged):
            return self.set_state(decision.plate_id, decision.new)
        if isinstance(decision, ProgressRecorded):
            return self.record(decision.plate_id, decision.done, decision.total, decision.message)
        return False

    def _replace(
        self, i: int, old: PlateProgress, state: PlateState, done: int, total: int, message: str
    ) -> None:
        if state in self._settled_states:
            fraction = 1.0
        elif state is PlateState.EXECUTING:
            fraction = done / total
        else:
            fraction = 0.0
        if old.state is PlateState.EXECUTING:
            self._executing -= old.done * _SCALE // old.total
        if state is PlateState.EXECUTING:
            self._executing += done * _SCALE // total
        self._entries[i] = PlateProgress(old.plate_id, state, done, total, message, fraction)
        self._version += 1

    def snapshot(self) -> ProgressSnapshot:
        """The batch's progress now: O(1) but for copying the tuple of plate entries."""
        total = len(self._entries)
        settled = sum(self._counts[state] for state in self._settled_states)
        if settled == total:
            fraction = 1.0  # exact, whatever the float sum says
        else:
            fraction = min((settled * _SCALE + self._executing) / (total * _SCALE), 1.0)
        elapsed = max(self._clock() - self._started_at, 0.0)
        eta: float | None
        if fraction >= 1.0:
            eta = 0.0
        elif fraction <= 0.0:
            eta = None
        else:
            eta = elapsed / fraction * (1.0 - fraction)
        return ProgressSnapshot(
            counts=MappingProxyType(dict(self._counts)),
            settled=settled,
            total=total,
            fraction=fraction,
            elapsed=elapsed,
            eta=eta,
            plates=tuple(self._entries),
        )

    def __repr__(self) -> str:
        return f"<ProgressProjection plates={len(self._entries)} version={self._version}>"


@final
class Coalescer:
    """Decides when to emit so that emits are at least ``interval`` apart.

    ``offer(now)`` says "something changed": True means emit now (the first
    change, or one at least ``interval`` after the last emit); False means the
    change is pending until ``due()``, when ``tick(now)`` will say True.
    ``flush()`` says whether a final emit is owed. Times are whatever the
    caller's clock says; nothing here reads one.
    """

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self._last_emit: float | None = None
        self._pending = False
        self.emits = 0

    @property
    def pending(self) -> bool:
        return self._pending

    def offer(self, now: float) -> bool:
        self._pending = True
        return self.tick(now)

    def tick(self, now: float) -> bool:
        """Emit what is pending if it is due."""
        if not self._pending:
            return False
        # Compared exactly as ``due()`` computes it, so a timer set for ``due()``
        # can never find the emit not yet due (float rounding) and spin.
        if self._last_emit is not None and now < self._last_emit + self.interval:
            return False
        self._last_emit = now
        self._pending = False
        self.emits += 1
        return True

    def due(self) -> float | None:
        """When what is pending may be emitted (None when nothing is pending)."""
        if not self._pending:
            return None
        return self._last_emit + self.interval if self._last_emit is not None else float("-inf")

    def flush(self) -> bool:
        """True (once) if a change is still pending: emit it now, whatever the interval."""
        if not self._pending:
            return False
        self._pending = False
        self.emits += 1
        return True


@dataclass(frozen=True, slots=True)
class ProgressEmitterStatistics:
    changes: int
    emits: int
    pending: bool
    timer_armed: bool


@final
class CoalescingProgressEmitter:
    """Feeds a ``ProgressProjection`` and emits its snapshot to the host, coalesced.

    ``emit(snapshot)`` runs through ``dispatcher`` at most once per ``interval``
    (plus a final one on ``flush()``); the snapshot is computed on the loop at
    emit time, so it is always the latest. ``clock`` defaults to the running
    loop's clock. Use from the event loop thread only.
    """

    def __init__(
        self,
        projection: ProgressProjection,
        emit: Callable[[ProgressSnapshot], None],
        *,
        interval: float = 0.2,
        dispatcher: Dispatcher = inline_dispatcher,
        clock: Callable[[], float] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.projection = projection
        self._emit = emit
        self._coalescer = Coalescer(interval)
        self._dispatcher = dispatcher
        self._clock = clock
        self._on_error = on_error
        self._timer: asyncio.TimerHandle | None = None
        self._changes = 0
        self._closed = False

    # --- feeding ----------------------------------------------------------------------

    def set_state(self, plate_id: str, state: PlateState) -> None:
        if self.projection.set_state(plate_id, state):
            self.notify()

    def record(self, plate_id: str, done: int, total: int, message: str = "") -> None:
        if self.projection.record(plate_id, done, total, message):
            self.notify()

    def apply(self, decision: Decision) -> None:
        if self.projection.apply(decision):
            self.notify()

    def notify(self) -> None:
        """The projection changed (call this if you fed it directly)."""
        if self._closed:
            return
        self._changes += 1
        if self._coalescer.offer(self._now()):
            self._cancel_timer()
            self._send()
        elif self._timer is None:
            self._arm()

    # --- ending -----------------------------------------------------------------------

    def flush(self) -> bool:
        """Emit a pending change now (the final update). Returns whether one was emitted."""
        self._cancel_timer()
        if self._coalescer.flush():
            self._send()
            return True
        return False

    def close(self) -> None:
        """Flush, then ignore further changes. Idempotent."""
        if not self._closed:
            self.flush()
            self._closed = True

    def statistics(self) -> ProgressEmitterStatistics:
        return ProgressEmitterStatistics(
            changes=self._changes,
            emits=self._coalescer.emits,
            pending=self._coalescer.pending,
            timer_armed=self._timer is not None,
        )

    # --- internals --------------------------------------------------------------------

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        return asyncio.get_running_loop().time()

    def _arm(self) -> None:
        due = self._coalescer.due()
        if due is None:
            return
        delay = max(due - self._now(), 0.0)
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        if self._coalescer.tick(self._now()):
            self._send()
        elif self._coalescer.pending:
            self._arm()  # the timer fired a hair early: try again at the due time

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _send(self) -> None:
        snapshot = self.projection.snapshot()
        emit, on_error = self._emit, self._on_error

        def deliver() -> None:
            try:
                emit(snapshot)
            except Exception as exc:
                if on_error is None:
                    raise
                on_error(exc)

        try:
            self._dispatcher(deliver)
        except Exception:
            _log.exception("progress emitter could not deliver an update")
