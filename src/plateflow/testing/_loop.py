"""An asyncio event loop on virtual time, run one pass at a time.

Theory of operation: the service, its pollers and its timers all read
``loop.time()`` and sleep with ``call_later`` / ``call_at``. A loop whose
``time()`` is a :class:`VirtualClock` turns every one of those into virtual
time: ten minutes of cancel grace pass in one call to :meth:`advance`, and a
run is the same on every machine, which is what Hypothesis needs to replay
and shrink a failure.

The loop is never left to run freely, because an idle asyncio loop blocks in
``select`` for as long as its next timer is away, and that would be real
time. It is run one pass at a time (``stop()`` then ``run_forever()``, the
documented way to run exactly one iteration). To know when it has nothing
left to do, it counts the callbacks scheduled through the public
``call_soon`` / ``call_soon_threadsafe`` / ``call_at`` (tasks and futures
schedule through them too) and which of them have run or were cancelled.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar, final

__all__ = ["LoopStalled", "VirtualClock", "VirtualTimeLoop"]

T = TypeVar("T")

MAX_PASSES: Final = 100_000
"""More loop passes than this without going idle means something spins forever."""


@final
class VirtualClock:
    """Time that moves only when told to. Calling it returns the current time."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    @property
    def now(self) -> float:
        return self._now

    def __call__(self) -> float:
        return self._now

    def advance_to(self, when: float) -> None:
        """Move to ``when``; moving backwards is a bug in the caller."""
        if when < self._now:
            raise ValueError(f"virtual time cannot go back from {self._now} to {when}")
        self._now = float(when)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"cannot advance by a negative time: {seconds}")
        self._now += seconds

    def __repr__(self) -> str:
        return f"VirtualClock(now={self._now:g})"


class LoopStalled(RuntimeError):
    """The loop kept finding work for more than ``MAX_PASSES`` passes (a busy loop)."""


class _Mark:
    __slots__ = ("ran",)

    def __init__(self) -> None:
        self.ran = False


def _marked(mark: _Mark, callback: Callable[..., object]) -> Callable[..., object]:
    def run(*args: object) -> object:
        mark.ran = True
        return callback(*args)

    return run


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector loop whose ``time()`` is a :class:`VirtualClock`, run by passes."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self.clock = clock
        self._soon: list[tuple[asyncio.Handle, _Mark]] = []
        self._timers: list[tuple[float, int, asyncio.TimerHandle, _Mark]] = []
        self._order = itertools.count()

    # --- time and scheduling -------------------------------------------------------------

    def time(self) -> float:
        return self.clock.now

    def call_soon(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        mark = _Mark()
        handle = super().call_soon(_marked(mark, callback), *args, context=context)
        self._soon.append((handle, mark))
        return handle

    def call_soon_threadsafe(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        mark = _Mark()
        handle = super().call_soon_threadsafe(_marked(mark, callback), *args, context=context)
        self._soon.append((handle, mark))
        return handle

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        mark = _Mark()
        handle = super().call_at(when, _marked(mark, callback), *args, context=context)
        heapq.heappush(self._timers, (when, next(self._order), handle, mark))
        return handle

    # --- running -----------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When the earliest live timer is due (None when no timer is armed)."""
        timers = self._timers
        while timers and (timers[0][3].ran or timers[0][2].cancelled()):
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def idle(self) -> bool:
        """Nothing is ready to run now (timers due later do not count)."""
        self._soon = [(h, m) for h, m in self._soon if not (m.ran or h.cancelled())]
        if self._soon:
            return False
        due = self.next_timer()
        return due is None or due > self.clock.now

    def run_pass(self) -> None:
        """One iteration: everything ready now runs, nothing waits."""
        self.stop()
        self.run_forever()

    def run_until_idle(self) -> int:
        """Run passes until nothing is ready; returns how many passes it took."""
        for passes in range(MAX_PASSES):
            if self.idle():
                return passes
            self.run_pass()
        raise LoopStalled(f"the event loop was still busy after {MAX_PASSES} passes")

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass, firing every timer due on the way, in order."""
        deadline = self.clock.now + seconds
        self.run_until_idle()
        while (due := self.next_timer()) is not None and due <= deadline:
            self.clock.advance_to(max(due, self.clock.now))
            self.run_until_idle()
        self.clock.advance_to(deadline)
        self.run_until_idle()

    def run_until_done(
        self, awaitable: Awaitable[T], *, within: float, step: float = 0.5
    ) -> asyncio.Future[T]:
        """Run until ``awaitable`` is done or ``within`` virtual seconds passed.

        Returns the future; the caller looks at ``done()`` (nothing here waits in real time).
        """
        future = asyncio.ensure_future(awaitable, loop=self)
        deadline = self.clock.now + within
        self.run_until_idle()
        while not future.done() and self.clock.now < deadline:
            due = self.next_timer()
            target = deadline if due is None else min(max(due, self.clock.now), deadline)
            self.advance(max(target - self.clock.now, 0.0) or min(step, deadline - self.clock.now))
        return future

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        return self.create_task(coro)
