"""Submit every job, then wait for all of them: the barrier under a batch phase.

Theory of operation: the engine reports completion as pushed facts, so
waiting must be event-driven, not a poll per job. ``run`` submits every key
(optionally at most ``max_concurrent_submits`` at a time) and then awaits a
single event; whoever handles facts (the service) calls ``complete``,
``fail`` or ``mark_cancelled`` for a key, and the event fires when every job
has finished, or, under ``fail_fast``, at the first error. A job finishes
exactly once: the first report wins and later ones are ignored, which is
what makes "callbacks exactly once per job" hold under duplicate and late
facts.

Nothing here waits without a bound if ``timeout`` is given: on timeout, or on
a fail-fast trip, every unfinished job is marked cancelled at once (so the
result is final when ``run`` returns), ``cancel(key)`` is sent once for each
of them that was submitted, and those cancels are themselves bounded by
``cancel_timeout``. A job whose submit never started is cancelled without
bothering the engine. This object only tracks flow: whether a plate really
completed is decided by the core, from facts.

All methods must be called on the event loop thread running ``run``
(guarantee C6); a call from another thread raises ``RuntimeError``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, Literal, TypeVar, final

from plateflow.errors import PlateflowError
from plateflow.runtime._bounded import call_bounded

__all__ = [
    "BatchSubmitWaitEngine",
    "JobCancelled",
    "JobStatus",
    "Outcome",
    "SubmitWaitStatistics",
]

_log = logging.getLogger("plateflow.runtime")

_SUBMIT_CHUNK = 32
"""Submits started per turn of the loop."""

K = TypeVar("K")

CancelReason = Literal["fail_fast", "timeout", "cancelled", "run_cancelled", "engine"]


class JobStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobCancelled(PlateflowError):
    """The error reported for a job that was cancelled rather than finished.

    ``reason`` says why: ``fail_fast`` (another job failed), ``timeout`` (the
    run's timeout expired), ``cancelled`` (``cancel_all`` was called),
    ``run_cancelled`` (the task running ``run`` was cancelled) or ``engine``
    (``mark_cancelled``: the engine reported it cancelled).
    """

    def __init__(self, key: object, reason: CancelReason) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"job {key!r} was cancelled ({reason})")


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one job ended. ``value`` is set when it succeeded, ``error`` otherwise."""

    status: JobStatus
    value: object = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.status is JobStatus.SUCCEEDED


@dataclass(frozen=True, slots=True)
class SubmitWaitStatistics:
    jobs: int
    submitted: int
    succeeded: int
    failed: int
    cancelled: int
    pending: int
    cancel_calls: int
    callback_errors: int
    running: bool


@final
class BatchSubmitWaitEngine(Generic[K]):
    """Submits all jobs, then waits until they finish (or one fails, under ``fail_fast``).

    Callbacks (all optional, all called on the event loop, each exactly once per
    job where it applies): ``on_start(key)`` just before a job is submitted;
    then exactly one of ``on_success(key, value)`` or ``on_error(key, error)``
    (``error`` is a ``JobCancelled`` for a cancelled job); and
    ``on_finally(results)`` once per ``run``. A callback that raises is logged
    and counted, never allowed to break the run. ``on_cancel_error(key, error)``
    reports a ``cancel(key)`` that raised or timed out.
    """

    def __init__(
        self,
        submit: Callable[[K], Awaitable[None]],
        cancel: Callable[[K], Awaitable[None]],
        *,
        fail_fast: bool,
        on_start: Callable[[K], None] | None = None,
        on_success: Callable[[K, object], None] | None = None,
        on_error: Callable[[K, BaseException], None] | None = None,
        on_finally: Callable[[Mapping[K, Outcome]], None] | None = None,
        on_cancel_error: Callable[[K, BaseException], None] | None = None,
        max_concurrent_submits: int | None = None,
        submit_timeout: float | None = None,
        cancel_timeout: float = 5.0,
    ) -> None:
        if max_concurrent_submits is not None and max_concurrent_submits < 1:
            raise ValueError("max_concurrent_submits must be at least 1 (or None)")
        self._submit = submit
        self._cancel = cancel
        self._fail_fast = fail_fast
        self._on_start = on_start
        self._on_success = on_success
        self._on_error = on_error
        self._on_finally = on_finally
        self._on_cancel_error = on_cancel_error
        self._max_concurrent = max_concurrent_submits
        self._submit_timeout = submit_timeout
        self._cancel_timeout = cancel_timeout
        self._reset(())
        self._running = False
        self._thread: int | None = None

    def _reset(self, keys: Iterable[K]) -> None:
        self._keys: list[K] = list(keys)
        self._results: dict[K, Outcome] = {}
        self._submitted: set[K] = set()
        self._submit_tasks: dict[K, asyncio.Task[None]] = {}
        self._tripped = False
        self._cancel_reason: CancelReason = "fail_fast"
        self._settled = asyncio.Event()
        self._cancel_calls = 0
        self._callback_errors = 0

    # --- reports from whoever handles facts -------------------------------------

    def complete(self, key: K, value: object = None) -> bool:
        """Job ``key`` succeeded. Returns False (and changes nothing) if it had already
        finished or is not part of the current run."""
        return self._finish(key, Outcome(JobStatus.SUCCEEDED, value=value))

    def fail(self, key: K, error: BaseException) -> bool:
        """Job ``key`` failed; under ``fail_fast`` this cancels every unfinished job."""
        return self._finish(key, Outcome(JobStatus.FAILED, error=error))

    def mark_cancelled(self, key: K) -> bool:
        """The engine reports job ``key`` cancelled. Not an error: does not trip fail-fast."""
        return self._finish(key, Outcome(JobStatus.CANCELLED, error=JobCancelled(key, "engine")))

    def cancel_all(self) -> None:
        """Stop waiting: unfinished jobs are cancelled and ``run`` returns (soon)."""
        if self._running:
            self._trip("cancelled")

    # --- the run ------------------------------------------------------------------

    async def run(self, keys: Iterable[K], *, timeout: float | None = None) -> dict[K, Outcome]:
        """Submit every key, wait for them all; return each key's outcome, in key order.

        ``timeout`` bounds the whole run (submits included); what is unfinished
        then is cancelled. One run at a time per engine; the engine can be
        reused for another run afterwards.
        """
        if self._running:
            raise RuntimeError("BatchSubmitWaitEngine.run is already running")
        key_list = list(keys)
        if len(set(key_list)) != len(key_list):
            raise ValueError("keys must be unique")
        self._reset(key_list)
        self._running = True
        self._thread = threading.get_ident()
        try:
            if key_list:
                await self._submit_and_wait(key_list, timeout)
        finally:
            self._running = False
            results = {key: self._results[key] for key in key_list if key in self._results}
            if self._on_finally is not None:
                self._call("on_finally", self._on_finally, results)
        return results

    async def _submit_and_wait(self, keys: list[K], timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        semaphore = asyncio.Semaphore(self._max_concurrent) if self._max_concurrent else None
        try:
            async with asyncio.timeout(timeout):
                for i, key in enumerate(keys, 1):
                    if self._settled.is_set():
                        break  # tripped or cancelled meanwhile: the rest is never submitted
                    self._submit_tasks[key] = loop.create_task(self._submit_one(key, semaphore))
                    if i % _SUBMIT_CHUNK == 0:
                        # Let the loop run what queued meanwhile (facts coming back) before
                        # the next chunk: a phase's submits must not hold up every fact.
                        await asyncio.sleep(0)
                await self._settled.wait()
        except TimeoutError:
            self._cancel_reason = "timeout"
        except asyncio.CancelledError:
            await self._cancel_unfinished("run_cancelled")
            raise
        await self._cancel_unfinished(self._cancel_reason)

    async def _submit_one(self, key: K, semaphore: asyncio.Semaphore | None) -> None:
        if semaphore is not None:
            await semaphore.acquire()
        try:
            if self._tripped or key in self._results:
                return
            self._submitted.add(key)
            if self._on_start is not None:
                self._call("on_start", self._on_start, key)
            try:
                if self._submit_timeout is None:
                    await self._submit(key)
                else:
                    await call_bounded(
                        lambda: self._submit(key), self._submit_timeout, what=f"submit({key!r})"
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.fail(key, exc)
        finally:
            if semaphore is not None:
                semaphore.release()

    async def _cancel_unfinished(self, reason: CancelReason) -> None:
        """Mark every unfinished job cancelled, stop pending submits, cancel on the engine."""
        unfinished = [key for key in self._keys if key not in self._results]
        to_cancel = [key for key in unfinished if key in self._submitted]
        for key in unfinished:
            self._finish(key, Outcome(JobStatus.CANCELLED, error=JobCancelled(key, reason)))
            task = self._submit_tasks.get(key)
            if task is not None:  # a key whose task was never made was never submitted
                task.cancel()
        # A job can finish before its submit returns (the fact outran the reply):
        # let such submits end on their own, within the cancel bound.
        pending = [task for task in self._submit_tasks.values() if not task.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=self._cancel_timeout)
            for task in still:
                task.cancel()
        if to_cancel:
            self._cancel_calls += len(to_cancel)
            await asyncio.gather(*(self._cancel_one(key) for key in to_cancel))

    async def _cancel_one(self, key: K) -> None:
        try:
            await call_bounded(
                lambda: self._cancel(key), self._cancel_timeout, what=f"cancel({key!r})"
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._on_cancel_error is not None:
                self._call("on_cancel_error", self._on_cancel_error, key, exc)
            else:
                _log.warning("cancel(%r) failed", key, exc_info=exc)

    # --- bookkeeping ----------------------------------------------------------------

    def _finish(self, key: K, outcome: Outcome) -> bool:
        if not self._running or key in self._results or key not in self._submit_tasks:
            return False
        if threading.get_ident() != self._thread:
            raise RuntimeError(
                "BatchSubmitWaitEngine must be told about jobs on its event loop thread (C6)"
            )
        self._results[key] = outcome
        if outcome.status is JobStatus.SUCCEEDED:
            if self._on_success is not None:
                self._call("on_success", self._on_success, key, outcome.value)
        elif self._on_error is not None:
            assert outcome.error is not None
            self._call("on_error", self._on_error, key, outcome.error)
        if outcome.status is JobStatus.FAILED and self._fail_fast:
            self._trip("fail_fast")
        elif len(self._results) == len(self._keys):
            self._settled.set()
        return True

    def _trip(self, reason: CancelReason) -> None:
        if not self._tripped:
            self._tripped = True
            self._cancel_reason = reason
        self._settled.set()

    def _call(self, name: str, callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:
            self._callback_errors += 1
            _log.exception("BatchSubmitWaitEngine %s callback raised", name)

    def statistics(self) -> SubmitWaitStatistics:
        counts = dict.fromkeys(JobStatus, 0)
        for outcome in self._results.values():
            counts[outcome.status] += 1
        return SubmitWaitStatistics(
            jobs=len(self._keys),
            submitted=len(self._submitted),
            succeeded=counts[JobStatus.SUCCEEDED],
            failed=counts[JobStatus.FAILED],
            cancelled=counts[JobStatus.CANCELLED],
            pending=len(self._keys) - len(self._results),
            cancel_calls=self._cancel_calls,
            callback_errors=self._callback_errors,
            running=self._running,
        )

    def __repr__(self) -> str:
        stats = self.statistics()
        return (
            f"<BatchSubmitWaitEngine jobs={stats.jobs} pending={stats.pending} "
            f"fail_fast={self._fail_fast} running={stats.running}>"
        )
