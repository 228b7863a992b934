"""Server-status snapshots at an interval, delivered only when they change.

Theory of operation: a status panel wants "what is the server doing" every
so often, but must not be woken for identical snapshots, must not pile up
requests against a slow server, and must not freeze when the server stops
answering. So there is exactly one poll in flight (an ``asyncio.Lock``
serialises the loop and ``poll_now``), the next poll is due one ``interval``
after the previous one *started* but never before it *ended* (a slow fetch
delays the next one instead of overlapping it), every fetch is bounded by
``timeout`` (a hung fetch is cancelled, or abandoned if it ignores that,
reported, and polling goes on), and a snapshot is delivered only when it
differs from the last one delivered. Callbacks go through a ``Dispatcher`` so
a GUI host receives them on its own thread; the poller's bookkeeping stays on
the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import operator
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar, final

from plateflow.runtime._bounded import PollTimeout, call_bounded
from plateflow.runtime.dispatch import Dispatcher, inline_dispatcher

__all__ = ["IntervalSnapshotPoller", "SnapshotPollerStatistics"]

_log = logging.getLogger("plateflow.runtime")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SnapshotPollerStatistics:
    running: bool
    polls: int
    changes: int
    errors: int
    timeouts: int


def _log_error(exc: BaseException) -> None:
    _log.warning("snapshot fetch failed; polling continues", exc_info=exc)


@final
class IntervalSnapshotPoller(Generic[T]):
    """Fetches a snapshot every ``interval`` seconds and reports changes.

    ``on_change(snapshot)`` runs (through ``dispatcher``) for the first
    snapshot and for every one that differs (by ``equals``) from the last one
    delivered; ``on_error(exc)`` runs (through ``dispatcher``) for a fetch that
    raised or timed out (``PollTimeout``). ``on_change`` raising is reported to
    ``on_error`` on the same thread.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[T]],
        on_change: Callable[[T], None],
        *,
        interval: float = 1.0,
        timeout: float = 5.0,
        on_error: Callable[[BaseException], None] | None = None,
        dispatcher: Dispatcher = inline_dispatcher,
        equals: Callable[[T, T], bool] = operator.eq,
    ) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be positive")
        self._fetch = fetch
        self._on_change = on_change
        self._on_error = on_error or _log_error
        self._interval = interval
        self._timeout = timeout
        self._dispatcher = dispatcher
        self._equals = equals
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task[None] | None = None
        self._last: tuple[T] | None = None  # boxed: a snapshot may itself be None
        self._started_at: float | None = None
        self._ended_at: float | None = None
        self._polls = 0
        self._changes = 0
        self._errors = 0
        self._timeouts = 0

    @property
    def latest(self) -> T | None:
        """The last snapshot delivered to ``on_change`` (None before the first)."""
        return None if self._last is None else self._last[0]

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start polling (the first poll is immediate). Must be called from a running loop."""
        if self.running:
            return
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="plateflow-snapshot-poller"
        )

    async def stop(self) -> None:
        """Stop polling, cancelling a fetch in flight. Idempotent; ``start()`` may follow."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def poll_now(self) -> bool:
        """Poll at once (after any poll in flight) and deliver as usual.

        Returns True when the fetch succeeded. Works whether or not the poller
        is started.
        """
        return await self._poll()

    def statistics(self) -> SnapshotPollerStatistics:
        return SnapshotPollerStatistics(
            running=self.running,
            polls=self._polls,
            changes=self._changes,
            errors=self._errors,
            timeouts=self._timeouts,
        )

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<IntervalSnapshotPoller {state} interval={self._interval:g}s "
            f"polls={self._polls} changes={self._changes} errors={self._errors}>"
        )

    # --- the loop -----------------------------------------------------------------

    def _next_due(self, now: float) -> float:
        if self._started_at is None or self._ended_at is None:
            return now
        return max(self._started_at + self._interval, self._ended_at)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            delay = self._next_due(loop.time()) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing, not a wait: poll_now may move the due time
                continue
            await self._poll()

    async def _poll(self) -> bool:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            loop = asyncio.get_running_loop()
            self._started_at = loop.time()
            self._polls += 1
            try:
                snapshot = await call_bounded(self._fetch, self._timeout, what="snapshot fetch")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._errors += 1
                if isinstance(exc, PollTimeout):
                    self._timeouts += 1
                self._deliver_error(exc)
                return False
            finally:
                self._ended_at = loop.time()
            if self._last is None or not self._equals(self._last[0], snapshot):
                self._last = (snapshot,)
                self._changes += 1
                self._deliver_change(snapshot)
            return True

    def _deliver_change(self, snapshot: T) -> None:
        on_change, on_error = self._on_change, self._on_error

        def deliver() -> None:
            try:
                on_change(snapshot)
            except Exception as exc:
                on_error(exc)

        self._dispatch(deliver)

    def _deliver_error(self, exc: BaseException) -> None:
        on_error = self._on_error
        self._dispatch(lambda: on_error(exc))

    def _dispatch(self, fn: Callable[[], None]) -> None:
        try:
            self._dispatcher(fn)
        except Exception:
            # An inline callback's on_error raised, or the dispatcher is closed:
            # nowhere left to report to but the log. The poller carries on.
            _log.exception("snapshot poller could not deliver a callback")
