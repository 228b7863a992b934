"""ExecutionStatusPoller: one batched query per interval for everything tracked."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import pytest

from plateflow.core.facts import ExecutionAccepted, ExecutionProgress, ExecutionStarted, Fact
from plateflow.engines.base import Submission
from plateflow.runtime import ExecutionStatusPoller, PollTimeout

T = TypeVar("T")

INTERVAL = 0.02


def run(coro: Coroutine[Any, Any, T], timeout: float = 5.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Bounded check of a condition the code under test makes true on its own schedule."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.002)


def submission(i: int) -> Submission:
    return Submission(plate_id=f"p{i}", phase="execute", submission_id=f"b.{i}.x")


def started(sub: Submission) -> Fact:
    return ExecutionStarted(plate_id=sub.plate_id, execution_id=sub.submission_id)


def accepted(sub: Submission) -> Fact:
    return ExecutionAccepted(plate_id=sub.plate_id, execution_id=sub.submission_id)


class Engine:
    """A status query that records each call; ``script`` may make a call fail or hang.

    It answers about the first three submissions asked about; the answer changes from
    one call to the next (accepted, started, accepted, ...) so that no answer is one
    the poller drops as unchanged, unless ``constant`` is set.
    """

    def __init__(
        self,
        script: Callable[[int], Coroutine[Any, Any, None]] | None = None,
        *,
        constant: bool = False,
    ) -> None:
        self.calls: list[tuple[float, int]] = []
        self.asked: list[tuple[str, ...]] = []
        self.script = script
        self.constant = constant

    async def status(self, submissions: Sequence[Submission]) -> list[Fact]:
        self.calls.append((asyncio.get_running_loop().time(), len(submissions)))
        self.asked.append(tuple(s.submission_id for s in submissions))
        if self.script is not None:
            await self.script(len(self.calls))
        answer = started if self.constant or len(self.calls) % 2 == 0 else accepted
        return [answer(s) for s in submissions[:3]]


def test_one_batched_query_per_interval_for_a_thousand_submissions() -> None:
    engine = Engine()
    delivered: list[Fact] = []

    async def main() -> ExecutionStatusPoller:
        # max_backoff=1: the 997 the engine never answers about are asked about every time
        poller = ExecutionStatusPoller(
            engine.status, delivered.append, interval=INTERVAL, max_backoff=1
        )
        loop = asyncio.get_running_loop()
        began = loop.time()
        for i in range(1000):
            poller.track(submission(i))
        await wait_until(lambda: len(delivered) >= 8 * 3)
        elapsed = loop.time() - began
        # one query per interval, not one per submission
        assert len(engine.calls) <= elapsed / INTERVAL + 1
        await poller.stop()
        return poller

    poller = run(main())
    assert all(size == 1000 for _, size in engine.calls)
    starts = [t for t, _ in engine.calls]
    assert all(b - a >= INTERVAL * 0.9 for a, b in itertools.pairwise(starts))
    stats = poller.statistics()
    assert stats.queries == len(engine.calls)
    assert stats.facts_delivered == len(delivered)
    # every completed query delivered its facts; at most one was cut short by stop()
    assert len(delivered) % 3 == 0
    assert stats.queries - len(delivered) // 3 in (0, 1)
    assert (stats.errors, stats.tracked, stats.running) == (0, 0, False)


def test_the_loop_ends_when_nothing_is_tracked_and_restarts_on_track() -> None:
    engine = Engine()

    async def main() -> None:
        poller = ExecutionStatusPoller(engine.status, lambda fact: None, interval=INTERVAL)
        assert not poller.running
        poller.track(submission(1))
        poller.track(submission(2))
        assert poller.running
        await wait_until(lambda: len(engine.calls) >= 1)
        poller.untrack("b.1.x")
        poller.untrack("unknown")
        assert poller.running
        poller.untrack("b.2.x")
        await wait_until(lambda: not poller.running, timeout=1.0)
        calls = len(engine.calls)
        await asyncio.sleep(INTERVAL * 3)
        assert len(engine.calls) == calls  # no timer, no query while idle
        poller.track(submission(3))
        assert poller.running
        await wait_until(lambda: len(engine.calls) > calls)
        assert engine.calls[-1][1] == 1
        await poller.stop()
        assert not poller.running

    run(main())


def test_a_raising_query_is_reported_and_retried() -> None:
    async def script(call: int) -> None:
        if call in (1, 2):
            raise ConnectionError(f"lost reply {call}")

    engine = Engine(script)
    errors: list[BaseException] = []
    delivered: list[Fact] = []

    async def main() -> ExecutionStatusPoller:
        poller = ExecutionStatusPoller(
            engine.status, delivered.append, interval=INTERVAL, on_error=errors.append
        )
        poller.track(submission(0))
        await wait_until(lambda: len(engine.calls) >= 4)
        await poller.stop()
        return poller

    poller = run(main())
    assert [str(e) for e in errors] == ["lost reply 1", "lost reply 2"]
    assert len(delivered) >= 1
    assert poller.statistics().errors == 2


def test_a_hung_query_times_out_and_polling_goes_on() -> None:
    hang = asyncio.Event()  # never set

    async def script(call: int) -> None:
        if call == 1:
            await hang.wait()

    engine = Engine(script)
    errors: list[BaseException] = []
    delivered: list[Fact] = []

    async def main() -> ExecutionStatusPoller:
        poller = ExecutionStatusPoller(
            engine.status, delivered.append, interval=INTERVAL, timeout=0.03, on_error=errors.append
        )
        poller.track(submission(0))
        await wait_until(lambda: len(delivered) >= 2)
        await poller.stop()
        return poller

    poller = run(main())
    assert len(errors) == 1
    assert isinstance(errors[0], PollTimeout)
    assert not errors[0].abandoned
    assert poller.statistics().timeouts == 1


def test_a_raising_sink_is_reported_and_does_not_stop_the_loop() -> None:
    engine = Engine()
    errors: list[BaseException] = []

    def sink(fact: Fact) -> None:
        raise RuntimeError("sink broke")

    async def main() -> None:
        poller = ExecutionStatusPoller(
            engine.status, sink, interval=INTERVAL, on_error=errors.append
        )
        poller.track(submission(0))
        await wait_until(lambda: len(engine.calls) >= 2)
        await poller.stop()

    run(main())
    assert len(errors) >= 2
    assert all(str(e) == "sink broke" for e in errors)


def test_poll_soon_queries_at_once() -> None:
    engine = Engine()

    async def main() -> None:
        poller = ExecutionStatusPoller(engine.status, lambda fact: None, interval=60.0)
        poller.track(submission(0))
        await asyncio.sleep(0)
        assert engine.calls == []
        poller.poll_soon()
        poller.poll_soon()  # coalesces with the first
        await wait_until(lambda: len(engine.calls) == 1)
        await asyncio.sleep(0.01)
        assert len(engine.calls) == 1
        await poller.stop()
        assert poller.tracked() == ()
        assert not poller.running
        poller.track(submission(1))  # a stopped poller starts afresh
        assert poller.running
        await poller.stop()

    run(main())


def test_an_answer_like_the_last_one_is_dropped_not_delivered() -> None:
    engine = Engine(constant=True)
    delivered: list[Fact] = []

    async def main() -> ExecutionStatusPoller:
        poller = ExecutionStatusPoller(engine.status, delivered.append, interval=INTERVAL)
        poller.track(submission(0))
        poller.track(submission(1))
        await wait_until(lambda: len(engine.calls) >= 3)
        await poller.stop()
        return poller

    poller = run(main())
    assert [type(f) for f in delivered] == [ExecutionStarted, ExecutionStarted]
    stats = poller.statistics()
    assert stats.facts_delivered == 2
    # every later answer was dropped (stop() may have cut the last query short)
    assert stats.answers_unchanged in (2 * (stats.queries - 1), 2 * (stats.queries - 2))


def test_a_submission_heard_from_within_the_interval_is_not_asked_about() -> None:
    interval = 0.2  # long against the 10 ms news, so a busy machine cannot blur them
    engine = Engine()

    async def main() -> ExecutionStatusPoller:
        poller = ExecutionStatusPoller(engine.status, lambda fact: None, interval=interval)
        chatty, quiet = submission(0), submission(1)
        poller.track(chatty)
        poller.track(quiet)
        async with asyncio.timeout(5.0):
            while len(engine.calls) < 3:
                poller.heard(chatty.submission_id)  # the engine keeps pushing about it
                await asyncio.sleep(0.01)  # the pace of that news, not a wait for a result
        poller.poll_soon()  # on request, everything is asked about
        await wait_until(lambda: len(engine.calls) >= 4)
        await poller.stop()
        return poller

    poller = run(main())
    assert engine.asked[:3] == [("b.1.x",)] * 3
    assert engine.asked[3] == ("b.0.x", "b.1.x")
    assert poller.statistics().submissions_queried == 5


def test_each_unchanged_answer_doubles_the_wait_up_to_max_backoff() -> None:
    interval = 0.05
    engine = Engine(constant=True)

    async def main() -> None:
        poller = ExecutionStatusPoller(
            engine.status, lambda fact: None, interval=interval, max_backoff=8
        )
        poller.track(submission(0))
        await wait_until(lambda: len(engine.calls) >= 6, timeout=10.0)
        await poller.stop()

    run(main(), timeout=15.0)
    times = [t for t, _ in engine.calls[:6]]
    gaps = [(b - a) / interval for a, b in itertools.pairwise(times)]
    # the first answer is news (wait 1), then unchanged: 2, 4, 8, and 8 again (the cap);
    # the loop looks once per interval, so a due ask can come up to one interval late
    for gap, expected in zip(gaps, [1, 2, 4, 8, 8], strict=True):
        assert expected * 0.9 <= gap <= expected + 1 + 10 * interval, gaps
    with pytest.raises(ValueError, match="max_backoff"):
        ExecutionStatusPoller(engine.status, lambda fact: None, max_backoff=0.5)


def test_an_answer_of_the_kind_last_heard_is_dropped_too() -> None:
    engine = Engine(constant=True)  # answers "started" about everything, every time
    delivered: list[Fact] = []

    async def main() -> None:
        poller = ExecutionStatusPoller(engine.status, delivered.append, interval=INTERVAL)
        running, progressing, accepted_only = submission(0), submission(1), submission(2)
        for sub in (running, progressing, accepted_only):
            poller.track(sub)
        poller.heard(running.submission_id, ExecutionStarted)
        poller.heard(progressing.submission_id, ExecutionProgress)  # progress means started
        poller.heard(accepted_only.submission_id, ExecutionAccepted)
        poller.poll_soon()
        await wait_until(lambda: len(delivered) >= 1)  # a query's answers come all at once
        await poller.stop()

    run(main())
    # only the one whose last news was "accepted" learns something from "started"
    assert [(type(f), _sid(f)) for f in delivered] == [(ExecutionStarted, "b.2.x")]


def _sid(fact: Fact) -> str | None:
    return getattr(fact, "execution_id", None)
