"""Dispatchers: how a callback reaches the thread the host wants it on.

Theory of operation: the service and the pollers run on one event loop
(guarantee C6), but a host often needs its callbacks somewhere else: a Qt
host on its GUI thread, a plain script on a worker thread so a slow callback
cannot stall the loop. A *dispatcher* is the whole interface for that: a
function that takes a zero-argument callable and arranges for it to run on
the host's chosen thread, in the order given. A Qt host emits a signal whose
queued connection runs ``fn`` on the GUI thread (``QTimer.singleShot(0, fn)``
without a context object would queue ``fn`` to the calling thread, which has
no Qt event loop); tests and simple hosts use
``inline_dispatcher`` (run it now, on the loop) or ``ThreadDispatcher``.

``ThreadDispatcher`` is one non-daemon worker thread draining a FIFO queue.
Non-daemon so queued callbacks are never killed half-way at interpreter exit;
to keep a forgotten dispatcher from hanging that exit, it is closed (drained,
then stopped) just before the interpreter joins its threads, and when it is
garbage-collected. An exception from a callable is handed to ``on_error``,
never lost and never fatal to the worker.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

__all__ = [
    "Dispatcher",
    "DispatcherClosed",
    "DispatcherStatistics",
    "ThreadDispatcher",
    "inline_dispatcher",
]

_log = logging.getLogger("plateflow.runtime")

Dispatcher = Callable[[Callable[[], None]], None]
"""Runs a zero-argument callable on the host's chosen thread, in submission order.

It must not block waiting for the callable to finish, and must not raise for a
callable that raises (that is the callable's problem, to be reported by it or
by the dispatcher).
"""


def inline_dispatcher(fn: Callable[[], None]) -> None:
    """Run ``fn`` now, on the calling thread (the service's event loop)."""
    fn()


class DispatcherClosed(RuntimeError):
    """A callable was handed to a dispatcher after ``close()``; it will not run."""


@dataclass(frozen=True, slots=True)
class DispatcherStatistics:
    submitted: int
    completed: int
    errors: int
    pending: int
    closed: bool


# The queue item that tells the worker to stop after everything queued before it.
_STOP: Final = object()

_QueueItem = Callable[[], None] | object


class _Counters:
    """Counts shared by the dispatcher and its worker (the worker must not hold the dispatcher)."""

    __slots__ = ("completed", "errors", "submitted")

    def __init__(self) -> None:
        self.submitted = 0
        self.completed = 0
        self.errors = 0


def _report(on_error: Callable[[BaseException], None], exc: BaseException) -> None:
    try:
        on_error(exc)
    except Exception:
        _log.exception("dispatcher on_error callback raised while reporting %r", exc)


def _log_error(exc: BaseException) -> None:
    _log.error("callable run by ThreadDispatcher raised", exc_info=exc)


def _work(
    items: queue.SimpleQueue[_QueueItem],
    on_error: Callable[[BaseException], None],
    counters: _Counters,
) -> None:
    while True:
        item = items.get()
        if item is _STOP:
            return
        assert callable(item)
        try:
            item()
        except Exception as exc:
            counters.errors += 1
            _report(on_error, exc)
        finally:
            counters.completed += 1


def _post_stop(items: queue.SimpleQueue[_QueueItem]) -> None:
    items.put(_STOP)


@final
class ThreadDispatcher:
    """Runs callables one at a time, in order, on a single worker thread of its own.

    ``on_error`` receives any exception a callable raises, on the worker thread;
    by default it is logged to the ``plateflow.runtime`` logger. Call ``close()``
    (or use the dispatcher as a context manager) to drain the queue and join the
    worker.
    """

    def __init__(
        self,
        *,
        name: str = "plateflow-dispatch",
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._items: queue.SimpleQueue[_QueueItem] = queue.SimpleQueue()
        self._counters = _Counters()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(
            target=_work,
            args=(self._items, on_error or _log_error, self._counters),
            name=name,
            daemon=False,
        )
        self._thread.start()
        # Stop the worker when this object is collected or the interpreter is
        # shutting down; neither callback may keep ``self`` alive.
        self._finalizer = weakref.finalize(self, _post_stop, self._items)
        register_atexit = getattr(threading, "_register_atexit", None)
        if register_atexit is not None:  # CPython >= 3.9; runs before threads are joined
            with contextlib.suppress(RuntimeError):  # raised once shutdown has begun
                register_atexit(self._finalizer)

    @property
    def thread_id(self) -> int | None:
        """``threading.get_ident()`` of the worker thread (what callbacks will see)."""
        return self._thread.ident

    @property
    def closed(self) -> bool:
        return self._closed

    def __call__(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` to run on the worker thread. Raises ``DispatcherClosed`` after close."""
        with self._lock:
            if self._closed:
                raise DispatcherClosed("ThreadDispatcher is closed; the callable was not queued")
            self._counters.submitted += 1
            self._items.put(fn)

    def close(self, timeout: float | None = 5.0) -> bool:
        """Run what is queued, stop the worker and join it for at most ``timeout`` seconds.

        Returns True when the worker has ended. Idempotent; calling it from a
        callable running on the worker itself only schedules the stop.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                self._finalizer()
        if threading.get_ident() == self._thread.ident:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> ThreadDispatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def statistics(self) -> DispatcherStatistics:
        counters = self._counters
        return DispatcherStatistics(
            submitted=counters.submitted,
            completed=counters.completed,
            errors=counters.errors,
            pending=counters.submitted - counters.completed,
            closed=self._closed,
        )

    def __repr__(self) -> str:
        stats = self.statistics()
        state = "closed" if stats.closed else "open"
        return f"<ThreadDispatcher {self._thread.name!r} {state} pending={stats.pending}>"
