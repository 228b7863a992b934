"""IntervalSnapshotPoller: change detection, one poll in flight, bounded fetches, dispatch."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from plateflow.runtime import IntervalSnapshotPoller, PollTimeout, ThreadDispatcher

T = TypeVar("T")

INTERVAL = 0.01


def run(coro: Coroutine[Any, Any, T], timeout: float = 5.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Bounded check of a condition the code under test makes true on its own schedule."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.002)


def test_only_changed_snapshots_are_delivered() -> None:
    values = iter([1, 1, 2, 2, 2, 3])
    fetched: list[int] = []
    changes: list[int] = []

    async def fetch() -> int:
        value = next(values, 3)
        fetched.append(value)
        return value

    async def main() -> IntervalSnapshotPoller[int]:
        poller = IntervalSnapshotPoller(fetch, changes.append, interval=INTERVAL)
        poller.start()
        await wait_until(lambda: len(fetched) >= 10)
        await poller.stop()
        return poller

    poller = run(main())
    assert changes == [1, 2, 3]
    assert poller.latest == 3
    stats = poller.statistics()
    assert (stats.changes, stats.errors, stats.running) == (3, 0, False)
    assert stats.polls == len(fetched)


def test_a_failing_fetch_is_reported_and_polling_continues() -> None:
    calls = 0
    changes: list[str] = []
    errors: list[BaseException] = []

    async def fetch() -> str:
        nonlocal calls
        calls += 1
        if calls in (2, 3):
            raise ConnectionError(f"server busy {calls}")
        return "up" if calls < 4 else "busy"

    async def main() -> None:
        poller = IntervalSnapshotPoller(
            fetch, changes.append, interval=INTERVAL, on_error=errors.append
        )
        poller.start()
        await wait_until(lambda: len(changes) == 2)
        await poller.stop()

    run(main())
    assert changes == ["up", "busy"]
    assert [str(e) for e in errors] == ["server busy 2", "server busy 3"]


def test_a_hung_fetch_is_abandoned_reported_and_polling_goes_on() -> None:
    never = asyncio.Event()  # nobody sets it: the first fetch would hang forever
    calls = 0
    changes: list[int] = []
    errors: list[BaseException] = []

    async def fetch() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await never.wait()
        return calls

    async def main() -> IntervalSnapshotPoller[int]:
        poller = IntervalSnapshotPoller(
            fetch, changes.append, interval=INTERVAL, timeout=0.05, on_error=errors.append
        )
        poller.start()
        await wait_until(lambda: len(changes) >= 2)
        await poller.stop()
        return poller

    poller = run(main())
    assert len(errors) == 1
    assert isinstance(errors[0], PollTimeout)
    assert changes[:2] == [2, 3]
    assert poller.statistics().timeouts == 1


def test_a_fetch_that_ignores_cancellation_cannot_freeze_the_poller() -> None:
    changes: list[int] = []
    errors: list[BaseException] = []
    calls = 0

    async def main() -> None:
        release = asyncio.Event()

        async def fetch() -> int:
            nonlocal calls
            calls += 1
            if calls == 1:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    await release.wait()  # stubborn: swallows the cancel, ends only when told
            return calls

        poller = IntervalSnapshotPoller(
            fetch, changes.append, interval=INTERVAL, timeout=0.03, on_error=errors.append
        )
        poller.start()
        await wait_until(lambda: len(changes) >= 1)
        await poller.stop()
        release.set()  # let the abandoned fetch end before the loop closes

    run(main())
    assert isinstance(errors[0], PollTimeout)
    assert errors[0].abandoned
    assert changes[0] == 2


def test_one_poll_in_flight_even_with_poll_now() -> None:
    in_flight = 0
    peak = 0
    calls = 0

    async def fetch() -> int:
        nonlocal in_flight, peak, calls
        calls += 1
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)  # slower than the interval
        in_flight -= 1
        return calls

    async def main() -> None:
        poller = IntervalSnapshotPoller(fetch, lambda snapshot: None, interval=INTERVAL)
        poller.start()
        results = await asyncio.gather(*(poller.poll_now() for _ in range(5)))
        assert results == [True] * 5
        await wait_until(lambda: calls >= 10)
        await poller.stop()

    run(main())
    assert peak == 1


def test_callbacks_arrive_on_the_dispatcher_thread() -> None:
    calls = 0
    seen: list[tuple[str, int]] = []

    async def fetch() -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ValueError("flaky")
        return calls // 3  # 0, error, 1, 1, 1, 2, ...

    async def main(dispatcher: ThreadDispatcher) -> None:
        loop = asyncio.get_running_loop()
        got_enough = asyncio.Event()

        def note(kind: str) -> None:
            seen.append((kind, threading.get_ident()))
            if len(seen) >= 3:
                loop.call_soon_threadsafe(got_enough.set)

        poller = IntervalSnapshotPoller(
            fetch,
            lambda snapshot: note("change"),
            interval=INTERVAL,
            on_error=lambda exc: note("error"),
            dispatcher=dispatcher,
        )
        poller.start()
        await asyncio.wait_for(got_enough.wait(), 2)
        await poller.stop()

    with ThreadDispatcher() as dispatcher:
        run(main(dispatcher))
    assert [kind for kind, _ in seen[:3]] == ["change", "error", "change"]
    assert {ident for _, ident in seen} == {dispatcher.thread_id}
    assert dispatcher.thread_id != threading.get_ident()


def test_on_change_raising_goes_to_on_error_and_polling_continues() -> None:
    calls = 0
    errors: list[BaseException] = []

    async def fetch() -> int:
        nonlocal calls
        calls += 1
        return calls

    def on_change(snapshot: int) -> None:
        raise RuntimeError(f"host bug {snapshot}")

    async def main() -> None:
        poller = IntervalSnapshotPoller(fetch, on_change, interval=INTERVAL, on_error=errors.append)
        poller.start()
        await wait_until(lambda: len(errors) >= 3)
        await poller.stop()

    run(main())
    assert [str(e) for e in errors[:3]] == ["host bug 1", "host bug 2", "host bug 3"]


def test_stop_cancels_a_fetch_in_flight_and_start_resumes() -> None:
    cancelled = False
    gate: list[asyncio.Event] = []

    async def fetch() -> str:
        nonlocal cancelled
        try:
            event = asyncio.Event()
            gate.append(event)
            await event.wait()
        except asyncio.CancelledError:
            cancelled = True
            raise
        return "x"

    async def main() -> None:
        poller = IntervalSnapshotPoller(fetch, lambda snapshot: None, interval=INTERVAL)
        poller.start()
        poller.start()  # idempotent
        await wait_until(lambda: len(gate) == 1)
        await poller.stop()
        assert cancelled
        assert not poller.running
        await poller.stop()
        poller.start()
        await wait_until(lambda: len(gate) == 2)
        gate[1].set()
        await wait_until(lambda: poller.latest == "x")
        await poller.stop()

    run(main())
