"""The one reconciliation loop for every active submission.

Theory of operation: engines *push* facts, and pushes can be lost (a dropped
PUB message, an engine without push at all). The original started a polling
thread per plate; here one loop asks the engine about the tracked
submissions in one batched query (``Engine.status``) at most once per
interval, and hands the facts it gets back to the same sink the engine
pushes to. Facts the batch already has are ignored by the core as duplicates
or stale, so the loop needs no knowledge of plate state: it is a safety net,
not a second source of truth.

The net costs little when pushes work: a submission the service ``heard``
about within the last interval is not asked about; an answer of the same kind
as the last answer about that submission (a queued execution still
``accepted``, a running one still ``started``) is dropped here instead of
reaching the batch, whose journal would keep it as one more duplicate; and
each unchanged answer doubles the time until that submission is asked about
again, up to ``max_backoff`` intervals. News or a changed answer resets it.
So a lost push is found within ``max_backoff * interval`` seconds, and ten
thousand queued submissions cost a few queries, not one per second each.

The loop exists only while something is tracked: ``track`` starts it,
untracking the last submission ends it, so an idle service runs no timer at
all. A query that raises or exceeds its timeout is reported through
``on_error`` and simply retried at the next interval: a flaky engine must
never stop reconciliation, and a hung one must never freeze it (C7). All
methods must be called from the event loop thread that runs the poller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import final

from plateflow.core.facts import ExecutionProgress, ExecutionStarted, Fact
from plateflow.engines.base import FactSink, Submission
from plateflow.runtime._bounded import PollTimeout, call_bounded

__all__ = ["ExecutionStatusPoller", "StatusPollerStatistics", "StatusQuery"]

_log = logging.getLogger("plateflow.runtime")

StatusQuery = Callable[[Sequence[Submission]], Awaitable[list[Fact]]]
"""A batched status query, normally ``engine.status``."""


@dataclass(frozen=True, slots=True)
class StatusPollerStatistics:
    tracked: int
    running: bool
    queries: int
    submissions_queried: int
    facts_delivered: int
    answers_unchanged: int
    """Answers dropped because they said what the last answer about it said."""
    errors: int
    timeouts: int


def _submission_id(fact: Fact) -> str | None:
    return getattr(fact, "job_id", None) or getattr(fact, "execution_id", None)


def _log_error(exc: BaseException) -> None:
    _log.warning("status query failed; retrying next interval", exc_info=exc)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@final
class ExecutionStatusPoller:
    """Queries the status of every tracked submission in one call, once per ``interval``.

    The first query happens one ``interval`` after tracking starts (pushes are
    the primary path); ``poll_soon()`` asks for one at once, e.g. when a gap in
    an engine's event sequence was detected.
    """

    def __init__(
        self,
        query: StatusQuery,
        sink: FactSink,
        *,
        interval: float = 2.0,
        timeout: float = 10.0,
        max_backoff: float = 8.0,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be positive")
        if max_backoff < 1:
            raise ValueError("max_backoff must be at least 1 (interval)")
        self._max_backoff = max_backoff
        self._query = query
        self._sink = sink
        self._interval = interval
        self._timeout = timeout
        self._on_error = on_error or _log_error
        self._tracked: dict[str, Submission] = {}
        self._due: dict[str, float] = {}
        """Loop time when each tracked submission is next asked about."""
        self._quiet: dict[str, int] = {}
        """Unchanged answers in a row about each tracked submission."""
        self._answers: dict[str, type[Fact]] = {}
        """The kind of the last status answer about each tracked submission."""
        self._task: asyncio.Task[None] | None = None
        self._sleeper: asyncio.Future[None] | None = None
        self._poll_requested = False
        self._queries = 0
        self._queried = 0
        self._unchanged = 0
        self._facts = 0
        self._errors = 0
        self._timeouts = 0

    # --- what is tracked ----------------------------------------------------------

    def track(self, submission: Submission) -> None:
        """Reconcile ``submission`` from now on; starts the loop if it is not running.

        Tracking the same submission id again replaces it. Must be called from
        a running event loop.
        """
        loop = asyncio.get_running_loop()
        self._tracked[submission.submission_id] = submission
        self._due[submission.submission_id] = loop.time() + self._interval
        self._quiet[submission.submission_id] = 0
        self._answers.pop(submission.submission_id, None)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="plateflow-status-poller")

    def untrack(self, submission_id: str) -> None:
        """Stop reconciling a submission (it settled). Unknown ids are ignored.

        When nothing is left, the loop ends without waiting for its next tick.
        """
        self._tracked.pop(submission_id, None)
        self._due.pop(submission_id, None)
        self._quiet.pop(submission_id, None)
        self._answers.pop(submission_id, None)
        if not self._tracked:
            self._wake()

    def heard(self, submission_id: str, kind: type[Fact] | None = None) -> None:
        """News about a submission arrived: it need not be asked about for an interval.

        ``kind`` is the news's fact type: a status answer of that kind later says
        nothing new, so it is dropped like a repeated answer.
        """
        if submission_id in self._due:
            self._due[submission_id] = asyncio.get_running_loop().time() + self._interval
            self._quiet[submission_id] = 0
            if kind is not None:
                # Progress is news of a running execution, which status calls "started".
                self._answers[submission_id] = (
                    ExecutionStarted if kind is ExecutionProgress else kind
                )

    def tracked(self) -> tuple[Submission, ...]:
        return tuple(self._tracked.values())

    def __len__(self) -> int:
        return len(self._tracked)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def poll_soon(self) -> None:
        """Query at once about everything tracked, heard from lately or not.

        Requests made meanwhile coalesce into one query.
        """
        if self._tracked:
            self._poll_requested = True
            self._wake()

    async def stop(self) -> None:
        """End the loop (cancelling a query in flight) and forget everything tracked.

        Idempotent; a later ``track()`` starts a fresh loop.
        """
        self._tracked.clear()
        self._due.clear()
        self._quiet.clear()
        self._answers.clear()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    def statistics(self) -> StatusPollerStatistics:
        return StatusPollerStatistics(
            tracked=len(self._tracked),
            running=self.running,
            queries=self._queries,
            submissions_queried=self._queried,
            facts_delivered=self._facts,
            answers_unchanged=self._unchanged,
            errors=self._errors,
            timeouts=self._timeouts,
        )

    def __repr__(self) -> str:
        state = "running" if self.running else "idle"
        return (
            f"<ExecutionStatusPoller {state} tracked={len(self._tracked)} "
            f"interval={self._interval:g}s queries={self._queries}>"
        )

    # --- the loop -----------------------------------------------------------------

    def _wake(self) -> None:
        if self._sleeper is not None:
            _wake(self._sleeper)

    async def _sleep_until(self, when: float) -> None:
        """Sleep until ``when`` (loop time) unless woken by ``_wake``."""
        loop = asyncio.get_running_loop()
        sleeper: asyncio.Future[None] = loop.create_future()
        handle = loop.call_at(when, _wake, sleeper)
        self._sleeper = sleeper
        try:
            await sleeper
        finally:
            handle.cancel()
            self._sleeper = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self._interval
        while True:
            while self._tracked and not self._poll_requested and loop.time() < due:
                await self._sleep_until(due)
            if not self._tracked:
                return
            everything, self._poll_requested = self._poll_requested, False
            started = loop.time()
            batch = tuple(
                submission
                for sid, submission in self._tracked.items()
                if everything or self._due.get(sid, started) <= started
            )
            if batch:
                changed = await self._poll_once(batch)
                self._reschedule(batch, changed, started)
            due = started + self._interval

    def _reschedule(self, batch: tuple[Submission, ...], changed: set[str], asked: float) -> None:
        """Ask again after one interval if the answer changed, else after twice as long."""
        for submission in batch:
            sid = submission.submission_id
            quiet = self._quiet.get(sid)
            if quiet is None:
                continue  # untracked meanwhile
            quiet = 0 if sid in changed else quiet + 1
            self._quiet[sid] = quiet
            self._due[sid] = asked + self._interval * min(2.0**quiet, self._max_backoff)

    async def _poll_once(self, batch: tuple[Submission, ...]) -> set[str]:
        """Query once; deliver what changed. Returns the ids whose answer changed."""
        changed: set[str] = set()
        self._queries += 1
        self._queried += len(batch)
        try:
            facts = await call_bounded(
                lambda: self._query(batch), self._timeout, what="status query"
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._errors += 1
            if isinstance(exc, PollTimeout):
                self._timeouts += 1
            self._report(exc)
            return {s.submission_id for s in batch}  # no answer: ask again next interval
        for fact in facts:
            sid = _submission_id(fact)
            if sid is not None and sid in self._tracked:
                if self._answers.get(sid) is type(fact):
                    self._unchanged += 1
                    continue
                self._answers[sid] = type(fact)
                changed.add(sid)
            try:
                self._sink(fact)
            except Exception as exc:
                self._errors += 1
                self._report(exc)
            else:
                self._facts += 1
        return changed

    def _report(self, exc: BaseException) -> None:
        try:
            self._on_error(exc)
        except Exception:
            _log.exception("status poller on_error callback raised while reporting %r", exc)
