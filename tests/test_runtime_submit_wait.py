"""BatchSubmitWaitEngine: submit all, then wait all, event-driven, with fail-fast and timeouts."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

import pytest

from plateflow.runtime import BatchSubmitWaitEngine, JobCancelled, JobStatus, Outcome

T = TypeVar("T")

KEYS = [f"p{i}" for i in range(6)]


def run(coro: Coroutine[Any, Any, T], timeout: float = 5.0) -> T:
    """Run a test coroutine on a fresh loop, bounded so a hang fails instead of freezing."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Recorder:
    """Records every callback, so tests can check each fired exactly once per job."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.succeeded: list[tuple[str, object]] = []
        self.errors: list[tuple[str, BaseException]] = []
        self.finally_: list[Mapping[str, Outcome]] = []
        self.cancelled: list[str] = []
        self.submitted: list[str] = []

    def engine(
        self,
        submit: Callable[[str], Awaitable[None]],
        *,
        fail_fast: bool,
        **kwargs: Any,
    ) -> BatchSubmitWaitEngine[str]:
        async def submit_and_note(key: str) -> None:
            self.submitted.append(key)
            await submit(key)

        async def cancel(key: str) -> None:
            self.cancelled.append(key)

        return BatchSubmitWaitEngine(
            submit_and_note,
            cancel,
            fail_fast=fail_fast,
            on_start=self.started.append,
            on_success=lambda key, value: self.succeeded.append((key, value)),
            on_error=lambda key, error: self.errors.append((key, error)),
            on_finally=self.finally_.append,
            **kwargs,
        )

    def assert_each_job_reported_once(self, keys: list[str]) -> None:
        reported = Counter([k for k, _ in self.succeeded] + [k for k, _ in self.errors])
        assert reported == Counter(keys)
        assert len(self.finally_) == 1


def test_all_jobs_succeed() -> None:
    rec = Recorder()

    async def main() -> dict[str, Outcome]:
        loop = asyncio.get_running_loop()

        async def submit(key: str) -> None:
            # The engine pushes completion later; the service turns it into complete().
            loop.call_soon(engine.complete, key, f"artifact-{key}")

        engine = rec.engine(submit, fail_fast=True)
        return await engine.run(KEYS, timeout=2)

    results = run(main())
    assert list(results) == KEYS
    assert all(o.status is JobStatus.SUCCEEDED and o.ok for o in results.values())
    assert results["p3"].value == "artifact-p3"
    assert Counter(rec.started) == Counter(KEYS)
    assert rec.succeeded == [(k, f"artifact-{k}") for k in KEYS]
    assert rec.errors == []
    assert rec.cancelled == []
    rec.assert_each_job_reported_once(KEYS)
    assert rec.finally_[0] == results


def test_fail_fast_cancels_every_other_job_exactly_once() -> None:
    rec = Recorder()
    boom = RuntimeError("compile failed")

    async def main() -> tuple[dict[str, Outcome], BatchSubmitWaitEngine[str]]:
        loop = asyncio.get_running_loop()

        async def submit(key: str) -> None:
            if key == "p0":
                loop.call_soon(engine.complete, key, "ok")
            if key == "p2":
                loop.call_later(0.01, engine.fail, key, boom)
            # every other job stays running on the engine until cancelled

        engine = rec.engine(submit, fail_fast=True)
        return await engine.run(KEYS, timeout=2), engine

    results, engine = run(main())
    assert results["p0"].status is JobStatus.SUCCEEDED
    assert results["p2"] == Outcome(JobStatus.FAILED, error=boom)
    others = [k for k in KEYS if k not in ("p0", "p2")]
    for key in others:
        outcome = results[key]
        assert outcome.status is JobStatus.CANCELLED
        assert isinstance(outcome.error, JobCancelled)
        assert outcome.error.reason == "fail_fast"
    assert Counter(rec.cancelled) == Counter(others)  # once each, never the finished ones
    rec.assert_each_job_reported_once(KEYS)
    stats = engine.statistics()
    assert (stats.succeeded, stats.failed, stats.cancelled, stats.pending) == (1, 1, 4, 0)
    assert stats.cancel_calls == 4
    assert not stats.running
    # Late and duplicate reports change nothing and call nothing.
    assert engine.complete("p3", "late") is False
    assert engine.fail("p2", boom) is False
    rec.assert_each_job_reported_once(KEYS)


def test_a_submit_that_raises_is_that_jobs_error() -> None:
    rec = Recorder()
    boom = ConnectionError("engine refused")

    async def main() -> dict[str, Outcome]:
        async def submit(key: str) -> None:
            if key == "p4":
                raise boom

        engine = rec.engine(submit, fail_fast=True)
        return await engine.run(KEYS, timeout=2)

    results = run(main())
    assert results["p4"] == Outcome(JobStatus.FAILED, error=boom)
    assert all(results[k].status is JobStatus.CANCELLED for k in KEYS if k != "p4")
    # p5's submit had not started when p4 failed: it is cancelled without an engine call.
    assert rec.submitted == KEYS[:5]
    assert Counter(rec.cancelled) == Counter(KEYS[:4])
    rec.assert_each_job_reported_once(KEYS)


def test_without_fail_fast_every_job_is_waited_for() -> None:
    rec = Recorder()
    boom = RuntimeError("bad plate")

    async def main() -> dict[str, Outcome]:
        loop = asyncio.get_running_loop()

        async def submit(key: str) -> None:
            if key == "p1":
                loop.call_soon(engine.fail, key, boom)
            else:
                loop.call_later(0.03, engine.complete, key, key.upper())

        engine = rec.engine(submit, fail_fast=False)
        return await engine.run(KEYS, timeout=2)

    results = run(main())
    assert results["p1"].status is JobStatus.FAILED
    assert all(results[k].value == k.upper() for k in KEYS if k != "p1")
    assert rec.cancelled == []
    rec.assert_each_job_reported_once(KEYS)


def test_timeout_cancels_what_is_left() -> None:
    rec = Recorder()

    async def main() -> dict[str, Outcome]:
        loop = asyncio.get_running_loop()

        async def submit(key: str) -> None:
            if key == "p5":
                loop.call_soon(engine.complete, key, None)

        engine = rec.engine(submit, fail_fast=False)
        started = loop.time()
        results = await engine.run(KEYS, timeout=0.05)
        assert loop.time() - started < 1.0
        return results

    results = run(main())
    assert results["p5"].ok
    left = [k for k in KEYS if k != "p5"]
    for key in left:
        error = results[key].error
        assert isinstance(error, JobCancelled)
        assert error.reason == "timeout"
    assert Counter(rec.cancelled) == Counter(left)
    rec.assert_each_job_reported_once(KEYS)


def test_bounded_submit_concurrency_and_unsubmitted_jobs_are_not_sent_cancels() -> None:
    rec = Recorder()
    in_flight = 0
    peak = 0

    async def main() -> dict[str, Outcome]:
        async def submit(key: str) -> None:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1
            if key == "p1":
                engine.fail(key, RuntimeError("nope"))

        engine = rec.engine(submit, fail_fast=True, max_concurrent_submits=2)
        return await engine.run(KEYS, timeout=2)

    results = run(main())
    assert peak == 2
    # p0 and p1 were submitted together; p1's failure stopped the rest before submission.
    assert rec.submitted == ["p0", "p1"]
    assert rec.started == ["p0", "p1"]
    assert rec.cancelled == ["p0"]
    assert all(results[k].status is JobStatus.CANCELLED for k in KEYS[2:])
    rec.assert_each_job_reported_once(KEYS)


def test_a_hung_submit_is_bounded_by_submit_timeout() -> None:
    rec = Recorder()

    async def main() -> dict[str, Outcome]:
        never = asyncio.Event()

        async def submit(key: str) -> None:
            await never.wait()

        engine = rec.engine(submit, fail_fast=False, submit_timeout=0.02)
        return await engine.run(["a", "b"], timeout=2)

    results = run(main())
    assert all(isinstance(o.error, TimeoutError) for o in results.values())
    rec.assert_each_job_reported_once(["a", "b"])


def test_engine_reported_cancel_and_cancel_all() -> None:
    rec = Recorder()

    async def main() -> dict[str, Outcome]:
        loop = asyncio.get_running_loop()

        async def submit(key: str) -> None:
            if key == "p0":
                loop.call_soon(engine.mark_cancelled, key)
            if key == "p1":
                loop.call_later(0.01, engine.cancel_all)

        engine = rec.engine(submit, fail_fast=True)
        return await engine.run(KEYS, timeout=2)

    results = run(main())
    first = results["p0"].error
    assert isinstance(first, JobCancelled)
    assert first.reason == "engine"
    rest = [results[k].error for k in KEYS[1:]]
    assert all(isinstance(e, JobCancelled) and e.reason == "cancelled" for e in rest)
    assert Counter(rec.cancelled) == Counter(KEYS[1:])  # the engine already stopped p0
    rec.assert_each_job_reported_once(KEYS)


def test_cancelling_the_run_cancels_the_jobs_and_still_reports_each_once() -> None:
    rec = Recorder()

    async def main() -> None:
        async def submit(key: str) -> None:
            pass

        engine = rec.engine(submit, fail_fast=True)
        task = asyncio.create_task(engine.run(KEYS))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert Counter(rec.cancelled) == Counter(KEYS)
    rec.assert_each_job_reported_once(KEYS)
    assert all(isinstance(e, JobCancelled) and e.reason == "run_cancelled" for _, e in rec.errors)


def test_callbacks_that_raise_do_not_break_the_run(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> tuple[dict[str, Outcome], int]:
        loop = asyncio.get_running_loop()

        async def submit(key: str) -> None:
            loop.call_soon(engine.complete, key, 1)

        async def cancel(key: str) -> None:
            pass

        def explode(*args: object) -> None:
            raise ValueError("host bug")

        engine: BatchSubmitWaitEngine[str] = BatchSubmitWaitEngine(
            submit, cancel, fail_fast=True, on_start=explode, on_success=explode
        )
        results = await engine.run(["a", "b"], timeout=2)
        return results, engine.statistics().callback_errors

    results, callback_errors = run(main())
    assert all(o.ok for o in results.values())
    assert callback_errors == 4
    assert "callback raised" in caplog.text


def test_reports_must_come_from_the_loop_thread() -> None:
    async def main() -> None:
        async def submit(key: str) -> None:
            pass

        async def cancel(key: str) -> None:
            pass

        engine: BatchSubmitWaitEngine[str] = BatchSubmitWaitEngine(submit, cancel, fail_fast=False)
        task = asyncio.create_task(engine.run(["a"], timeout=2))
        await asyncio.sleep(0)
        errors: list[BaseException] = []

        def from_elsewhere() -> None:
            try:
                engine.complete("a")
            except RuntimeError as exc:
                errors.append(exc)

        thread = threading.Thread(target=from_elsewhere)
        thread.start()
        thread.join(5)
        assert len(errors) == 1
        engine.complete("a")
        assert (await task)["a"].ok

    run(main())


def test_a_large_phase_lets_the_loop_handle_news_between_chunks_of_submits() -> None:
    submitted: list[str] = []
    seen_at: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        all_submitted = asyncio.Event()

        async def submit(key: str) -> None:
            submitted.append(key)
            if len(submitted) == 1000:
                all_submitted.set()

        engine: BatchSubmitWaitEngine[str] = BatchSubmitWaitEngine(
            submit, _nothing, fail_fast=False
        )
        keys = [f"k{i}" for i in range(1000)]
        task = asyncio.create_task(engine.run(keys, timeout=10))
        # News arriving as the phase starts (a fact, say) is handled long before the
        # last submit, not after all thousand of them.
        loop.call_soon(lambda: loop.call_soon(lambda: seen_at.append(len(submitted))))
        await all_submitted.wait()
        for key in keys:
            engine.complete(key)
        assert all(o.ok for o in (await task).values())

    run(main())
    assert len(submitted) == 1000
    assert len(seen_at) == 1
    assert seen_at[0] <= 64, seen_at


async def _nothing(key: str) -> None:
    return None


def test_argument_checks_and_empty_runs() -> None:
    async def main() -> None:
        async def nothing(key: str) -> None:
            pass

        engine: BatchSubmitWaitEngine[str] = BatchSubmitWaitEngine(nothing, nothing, fail_fast=True)
        assert await engine.run([]) == {}
        with pytest.raises(ValueError, match="unique"):
            await engine.run(["a", "a"])
        with pytest.raises(ValueError, match="max_concurrent_submits"):
            BatchSubmitWaitEngine(nothing, nothing, fail_fast=True, max_concurrent_submits=0)

    run(main())
