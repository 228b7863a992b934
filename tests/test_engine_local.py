"""The local engine against real worker processes.

Every wait is bounded: facts are collected by a sink into a list under a
condition, and a test waits for a predicate over them with a timeout. Every
worker a test starts is stopped by it (or by ``close``), and a fixture checks
that no child process is left afterwards.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from helpers import engine_job as job
from helpers import spec
from plateflow.core.facts import (
    CompileAccepted,
    CompileCancelled,
    CompileFailed,
    CompileRejected,
    CompileSucceeded,
    ExecutionAccepted,
    ExecutionCancelled,
    ExecutionFailed,
    ExecutionProgress,
    ExecutionRejected,
    ExecutionStarted,
    ExecutionSucceeded,
    Fact,
)
from plateflow.engines.base import TERMINAL_FACTS, EngineError, Submission
from plateflow.engines.local import LocalEngine
from plateflow.jobs import CompileJob
from plateflow.pipeline.run import fingerprint
from plateflow.pipeline.spec import PipelineSpec, StepSpec

ALLOWED = ("steps_for_tests",)
TIMEOUT = 15.0


# --- helpers ---------------------------------------------------------------------


def _sid(fact: Fact) -> str | None:
    return getattr(fact, "execution_id", None) or getattr(fact, "job_id", None)


class Facts:
    """A sink that keeps every fact, and lets a test wait for a condition on them."""

    def __init__(self) -> None:
        self._facts: list[Fact] = []
        self._cond = threading.Condition()
        self.max_threads = threading.active_count()

    def __call__(self, fact: Fact) -> None:
        with self._cond:
            self._facts.append(fact)
            self.max_threads = max(self.max_threads, threading.active_count())
            self._cond.notify_all()

    @property
    def all(self) -> list[Fact]:
        with self._cond:
            return list(self._facts)

    def of(self, sid: str) -> list[Fact]:
        return [f for f in self.all if _sid(f) == sid]

    def wait_for(self, predicate: Callable[[list[Fact]], bool], what: str) -> list[Fact]:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self._facts), TIMEOUT):
                raise AssertionError(f"timed out waiting for {what}; facts: {self._facts}")
            return list(self._facts)

    def terminal(self, sid: str) -> Fact:
        self.wait_for(
            lambda fs: any(_sid(f) == sid and isinstance(f, TERMINAL_FACTS) for f in fs),
            f"a terminal fact for {sid}",
        )
        (fact,) = [f for f in self.of(sid) if isinstance(f, TERMINAL_FACTS)]
        return fact

    def pid(self, sid: str) -> int:
        """The pid a waiting step announced (``pid=<n>``), once it has."""

        def announced(fs: list[Fact]) -> bool:
            return any(
                isinstance(f, ExecutionProgress)
                and f.execution_id == sid
                and f.message.startswith("pid=")
                for f in fs
            )

        self.wait_for(announced, f"{sid} to announce its pid")
        for fact in self.of(sid):
            if isinstance(fact, ExecutionProgress) and fact.message.startswith("pid="):
                return int(fact.message.removeprefix("pid="))
        raise AssertionError("unreachable")


Body = Callable[[LocalEngine, Facts], Awaitable[None]]


def run(body: Body, tmp_path: Path, **options: Any) -> Facts:
    """Start an engine inside ``asyncio.run``, run ``body``, always close the engine."""
    facts = Facts()

    async def main() -> None:
        options.setdefault("cancel_grace", 2.0)
        engine = LocalEngine(allowed_modules=ALLOWED, output_dir=str(tmp_path), **options)
        await engine.start(facts)
        try:
            await body(engine, facts)
        finally:
            await engine.close()

    asyncio.run(main())
    return facts


async def compile_ok(engine: LocalEngine, facts: Facts, compile_job: CompileJob) -> str:
    job_id = f"{compile_job.plate_id}.c"
    await engine.submit_compile(job_id, compile_job)
    fact = facts.terminal(job_id)
    assert isinstance(fact, CompileSucceeded), fact
    return fact.artifact_id


async def execute(
    engine: LocalEngine, facts: Facts, plate: str, pipeline: PipelineSpec, *, artifact: str = ""
) -> str:
    """Submit an execution of ``pipeline`` for ``plate`` (compiling it first unless given)."""
    compile_job = job(plate, pipeline)
    artifact = artifact or await compile_ok(engine, facts, compile_job)
    execution_id = f"{plate}.x"
    await engine.submit_execution(execution_id, compile_job, artifact)
    return execution_id


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(autouse=True)
def no_children_left() -> Iterator[None]:
    yield
    assert multiprocessing.active_children() == []


# --- compile ---------------------------------------------------------------------


def test_compile_succeeds_with_the_pipeline_fingerprint(tmp_path: Path) -> None:
    pipeline = spec("load")

    async def body(engine: LocalEngine, facts: Facts) -> None:
        await engine.submit_compile("p.c", job("p", pipeline))
        assert [(type(f), _sid(f)) for f in facts.all] == [(CompileAccepted, "p.c")]
        result = facts.terminal("p.c")
        assert isinstance(result, CompileSucceeded)
        assert result.artifact_id == fingerprint(pipeline)
        assert (await engine.server_info())["artifacts"] == 1

    run(body, tmp_path)


def test_compile_failures_name_the_problem(tmp_path: Path) -> None:
    bad = {
        "not-allowed": PipelineSpec(steps=(StepSpec(function="os:system"),)),
        "no-function": spec("no_such_step"),
        "bad-params": spec(("count", {"n": "three"})),
    }

    async def body(engine: LocalEngine, facts: Facts) -> None:
        for plate, pipeline in bad.items():
            await engine.submit_compile(f"{plate}.c", job(plate, pipeline))
        errors = {}
        for plate in bad:
            fact = facts.terminal(f"{plate}.c")
            assert isinstance(fact, CompileFailed), fact
            errors[plate] = fact.error
        assert "'os' is not allowed" in errors["not-allowed"]
        assert "'no_such_step'" in errors["no-function"]
        assert errors["no-function"].startswith("step 1 (steps_for_tests:no_such_step)")
        assert "parameter 'n' should be int" in errors["bad-params"]
        assert (await engine.server_info())["artifacts"] == 0

    run(body, tmp_path)


# --- execute ---------------------------------------------------------------------


def test_execution_reports_started_progress_in_order_then_result(tmp_path: Path) -> None:
    async def body(engine: LocalEngine, facts: Facts) -> None:
        xid = await execute(engine, facts, "p1", spec("load", ("count", {"n": 3}), "finish"))
        facts.terminal(xid)
        mine = facts.of(xid)
        assert [type(f) for f in mine[:2]] == [ExecutionAccepted, ExecutionStarted]
        assert isinstance(mine[-1], ExecutionSucceeded)
        assert mine[-1].result == {"plate": "p1", "ok": True}
        assert all(isinstance(f, ExecutionProgress) for f in mine[2:-1])
        progress = cast(list[ExecutionProgress], mine[2:-1])
        assert [f.message for f in progress] == [
            "steps_for_tests:load",
            "item 1",
            "item 2",
            "item 3",
            "steps_for_tests:count",
        ]  # not the last step's completion: the result right after it says as much
        assert len({f.total for f in progress}) == 1
        assert progress[-1].done == 2 * progress[-1].total // 3

    run(body, tmp_path)


def test_spawn_workers_behave_the_same(tmp_path: Path) -> None:
    async def body(engine: LocalEngine, facts: Facts) -> None:
        xid = await execute(engine, facts, "p", spec(("count", {"n": 2}), "finish"))
        assert isinstance(facts.terminal(xid), ExecutionSucceeded)
        assert [type(f) for f in facts.of(xid)][:2] == [ExecutionAccepted, ExecutionStarted]
        assert (await engine.server_info())["mp_context"] == "spawn"

    run(body, tmp_path, mp_context="spawn")


def test_a_step_that_raises_fails_the_execution_with_its_message(tmp_path: Path) -> None:
    async def body(engine: LocalEngine, facts: Facts) -> None:
        xid = await execute(engine, facts, "p", spec(("explode", {"message": "bad well A1"})))
        fact = facts.terminal(xid)
        assert isinstance(fact, ExecutionFailed)
        assert "ValueError: bad well A1" in fact.error
        assert "(at steps_for_tests.py:" in fact.error  # where the step raised
        assert fact.error.endswith("in explode)")
        assert fact.exit_code is None
        assert any(isinstance(f, ExecutionStarted) for f in facts.of(xid))

    run(body, tmp_path)


def test_a_worker_that_exits_without_a_result_fails_with_its_exit_code(tmp_path: Path) -> None:
    async def body(engine: LocalEngine, facts: Facts) -> None:
        xid = await execute(engine, facts, "p", spec(("crash", {"code": 3})))
        fact = facts.terminal(xid)
        assert isinstance(fact, ExecutionFailed)
        assert fact.exit_code == 3
        assert "worker process crashed" in fact.error

    run(body, tmp_path)


def test_sigkill_fails_one_execution_while_a_concurrent_one_succeeds(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def body(engine: LocalEngine, facts: Facts) -> None:
        victim = await execute(engine, facts, "victim", spec("wait_for_cancel"))
        other = await execute(
            engine, facts, "other", spec(("wait_for_file", {"path": str(gate)}), "finish")
        )
        victim_pid, other_pid = facts.pid(victim), facts.pid(other)
        info = await engine.server_info()
        running = info["running_submissions"]
        assert isinstance(running, list)
        assert {(r["submission_id"], r["pid"]) for r in running if isinstance(r, dict)} == {
            (victim, victim_pid),
            (other, other_pid),
        }

        os.kill(victim_pid, signal.SIGKILL)
        fact = facts.terminal(victim)
        assert isinstance(fact, ExecutionFailed)
        assert fact.exit_code == -signal.SIGKILL
        assert "killed by SIGKILL" in fact.error
        assert not any(isinstance(f, TERMINAL_FACTS) for f in facts.of(other))

        gate.touch()
        assert isinstance(facts.terminal(other), ExecutionSucceeded)
        assert pid_gone(victim_pid)

    run(body, tmp_path, max_workers=2)


# --- cancel ----------------------------------------------------------------------


def test_cancel_stops_only_that_one_of_several_running(tmp_path: Path) -> None:
    pipeline = spec("wait_for_cancel")
    seen: dict[str, int] = {}

    async def body(engine: LocalEngine, facts: Facts) -> None:
        artifact = await compile_ok(engine, facts, job("p0", pipeline))
        ids = [await execute(engine, facts, f"p{i}", pipeline, artifact=artifact) for i in range(3)]
        seen.update({xid: facts.pid(xid) for xid in ids})

        await engine.cancel(Submission("p1", "execute", ids[1]))
        assert isinstance(facts.terminal(ids[1]), ExecutionCancelled)
        info = await engine.server_info()
        running = info["running_submissions"]
        assert isinstance(running, list)
        assert {r["submission_id"] for r in running if isinstance(r, dict)} == {ids[0], ids[2]}
        for xid in (ids[0], ids[2]):
            assert not any(isinstance(f, TERMINAL_FACTS) for f in facts.of(xid))
            assert not pid_gone(seen[xid])

    facts = run(body, tmp_path, max_workers=3)
    # close() cancelled the other two, and their workers are gone
    assert all(isinstance(facts.terminal(xid), ExecutionCancelled) for xid in seen)
    assert all(pid_gone(pid) for pid in seen.values())


def test_cancel_of_a_queued_execution_is_immediate_and_it_never_starts(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def body(engine: LocalEngine, facts: Facts) -> None:
        later = await compile_ok(engine, facts, job("b", spec("finish")))
        running = await execute(engine, facts, "a", spec(("wait_for_file", {"path": str(gate)})))
        facts.pid(running)
        queued = await execute(engine, facts, "b", spec("finish"), artifact=later)
        info = await engine.server_info()
        assert (info["running"], info["queued"]) == (1, 1)

        await engine.cancel(Submission("b", "execute", queued))
        assert [type(f) for f in facts.of(queued)] == [ExecutionAccepted, ExecutionCancelled]
        assert (await engine.server_info())["queued"] == 0

        gate.touch()
        facts.terminal(running)
        assert [type(f) for f in facts.of(queued)] == [ExecutionAccepted, ExecutionCancelled]

    run(body, tmp_path, max_workers=1)


def test_cancel_of_a_queued_compile(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def body(engine: LocalEngine, facts: Facts) -> None:
        busy = await execute(engine, facts, "a", spec(("wait_for_file", {"path": str(gate)})))
        facts.pid(busy)
        await engine.submit_compile("b.c", job("b", spec("finish")))
        await engine.cancel(Submission("b", "compile", "b.c"))
        assert [type(f) for f in facts.of("b.c")] == [CompileAccepted, CompileCancelled]
        gate.touch()
        facts.terminal(busy)

    run(body, tmp_path, max_workers=1)


def test_cancel_after_completion_pushes_nothing(tmp_path: Path) -> None:
    async def body(engine: LocalEngine, facts: Facts) -> None:
        pipeline = spec("finish")
        first = await execute(engine, facts, "a", pipeline)
        assert isinstance(facts.terminal(first), ExecutionSucceeded)
        before = facts.of(first)
        await engine.cancel(Submission("a", "execute", first))
        await engine.cancel(Submission("zz", "execute", "never-submitted"))
        # A later execution's whole life passes through the same watcher: if the
        # cancel had pushed anything, it would be there by the time this ends.
        second = await execute(engine, facts, "b", pipeline)
        facts.terminal(second)
        assert facts.of(first) == before
        assert facts.of("never-submitted") == []

    run(body, tmp_path)


def test_a_worker_ignoring_cancel_and_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    grace = 0.2

    async def body(engine: LocalEngine, facts: Facts) -> None:
        xid = await execute(engine, facts, "p", spec("stubborn"))
        pid = facts.pid(xid)
        asked = time.monotonic()
        await engine.cancel(Submission("p", "execute", xid))
        assert isinstance(facts.terminal(xid), ExecutionCancelled)
        took = time.monotonic() - asked
        assert 2 * grace <= took < 2 * grace + 5.0  # terminate after one grace, kill after two
        assert pid_gone(pid)

    run(body, tmp_path, cancel_grace=grace)


# --- the worker pool ---------------------------------------------------------------


def _pid_of(fact: Fact) -> int:
    assert isinstance(fact, ExecutionSucceeded), fact
    assert isinstance(fact.result, dict)
    pid = fact.result["pid"]
    assert isinstance(pid, int)
    return pid


def test_workers_are_started_once_and_reused(tmp_path: Path) -> None:
    async def body(engine: LocalEngine, facts: Facts) -> None:
        pipeline = spec("whoami")
        artifact = await compile_ok(engine, facts, job("p0", pipeline))
        pids = []
        for i in range(4):
            xid = await execute(engine, facts, f"p{i}", pipeline, artifact=artifact)
            pids.append(_pid_of(facts.terminal(xid)))
        assert len(set(pids)) == 1
        info = await engine.server_info()
        assert (info["processes"], info["idle"], info["running"]) == (1, 1, 0)

    run(body, tmp_path, max_workers=1)


def test_a_step_that_honours_cancel_leaves_its_worker_reusable(tmp_path: Path) -> None:
    async def body(engine: LocalEngine, facts: Facts) -> None:
        cancelled = await execute(engine, facts, "a", spec("wait_for_cancel"))
        pid = facts.pid(cancelled)
        await engine.cancel(Submission("a", "execute", cancelled))
        assert isinstance(facts.terminal(cancelled), ExecutionCancelled)
        # The same worker runs the next plate, and the earlier cancel does not reach it.
        later = await execute(engine, facts, "b", spec("count", "whoami"))
        assert _pid_of(facts.terminal(later)) == pid

    run(body, tmp_path, max_workers=1)


def test_a_crashed_worker_is_replaced_for_the_next_submission(tmp_path: Path) -> None:
    async def body(engine: LocalEngine, facts: Facts) -> None:
        first = await execute(engine, facts, "a", spec("whoami"))
        old = _pid_of(facts.terminal(first))
        crashed = await execute(engine, facts, "b", spec("crash"))
        fact = facts.terminal(crashed)
        assert isinstance(fact, ExecutionFailed)
        assert fact.exit_code == 3
        later = await execute(engine, facts, "c", spec("whoami"))
        assert _pid_of(facts.terminal(later)) != old
        assert pid_gone(old)

    run(body, tmp_path, max_workers=1)


def test_max_jobs_per_worker_retires_workers(tmp_path: Path) -> None:
    async def body(engine: LocalEngine, facts: Facts) -> None:
        pipeline = spec("whoami")
        artifact = await compile_ok(engine, facts, job("p", pipeline))  # job 1 of worker 1
        pids = []
        for i in range(4):
            xid = await execute(engine, facts, f"p{i}", pipeline, artifact=artifact)
            pids.append(_pid_of(facts.terminal(xid)))
        first, second, third = pids[0], pids[1], pids[3]
        assert pids[2] == second
        assert len({first, second, third}) == 3
        assert pid_gone(first)

    run(body, tmp_path, max_workers=1, max_jobs_per_worker=2)
    with pytest.raises(ValueError, match="max_jobs_per_worker"):
        LocalEngine(max_jobs_per_worker=0)


def test_a_long_stream_of_submissions_never_loses_a_wake_up(tmp_path: Path) -> None:
    # Submissions keep coming while workers finish: every one must be handed out. (The
    # lost wake-up this once hit is pinned deterministically in test_wakeup.py.)
    pipeline = spec("finish")

    async def body(engine: LocalEngine, facts: Facts) -> None:
        artifact = await compile_ok(engine, facts, job("p", pipeline))
        ids = []
        for i in range(600):
            xid = f"p{i}.x"
            await engine.submit_execution(xid, job(f"p{i}", pipeline), artifact)
            ids.append(xid)
            if i % 3 == 0:
                await asyncio.sleep(0)  # let workers finish while submissions go on
        done = set(ids)
        facts.wait_for(
            lambda fs: done <= {_sid(f) for f in fs if isinstance(f, ExecutionSucceeded)},
            "every execution to succeed",
        )

    run(body, tmp_path, max_workers=2)


# --- rejections, status, info --------------------------------------------------


def test_unknown_artifact_and_duplicate_ids_are_rejected(tmp_path: Path) -> None:
    async def body(engine: LocalEngine, facts: Facts) -> None:
        compile_job = job("p", spec("finish"))
        await engine.submit_execution("p.x", compile_job, "no-such-artifact")
        (fact,) = facts.of("p.x")
        assert isinstance(fact, ExecutionRejected)
        assert "unknown compile artifact 'no-such-artifact'" in fact.error

        artifact = await compile_ok(engine, facts, compile_job)
        await engine.submit_compile("p.c", compile_job)
        assert isinstance(facts.of("p.c")[-1], CompileRejected)
        await engine.submit_execution("p.x2", compile_job, artifact)
        facts.terminal("p.x2")
        await engine.submit_execution("p.x2", compile_job, artifact)
        duplicate = facts.of("p.x2")[-1]
        assert isinstance(duplicate, ExecutionRejected)
        assert "duplicate execution id" in duplicate.error

    run(body, tmp_path)


def test_status_reconciles_every_state_in_one_query(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def body(engine: LocalEngine, facts: Facts) -> None:
        done = await execute(engine, facts, "done", spec("finish"))
        pushed = facts.terminal(done)
        artifact = cast(CompileSucceeded, facts.terminal("done.c")).artifact_id
        running = await execute(
            engine, facts, "running", spec(("wait_for_file", {"path": str(gate)}))
        )
        facts.pid(running)
        queued = await execute(engine, facts, "queued", spec("finish"), artifact=artifact)

        status = await engine.status(
            [
                Submission("done", "execute", done),
                Submission("running", "execute", running),
                Submission("queued", "execute", queued),
                Submission("done", "compile", "done.c"),
                Submission("ghost", "execute", "ghost.x"),
            ]
        )
        assert [type(f) for f in status] == [
            ExecutionSucceeded,
            ExecutionStarted,
            ExecutionAccepted,
            CompileSucceeded,
        ]
        assert [_sid(f) for f in status] == [done, running, queued, "done.c"]
        assert status[0] == _restamp(pushed, status[0].stimulus_id)
        assert status[0].stimulus_id != pushed.stimulus_id
        assert status[0].observed_at == pushed.observed_at  # when it finished, not now
        # Asked under another plate's name, the answer still names the engine's plate.
        (mislabelled,) = await engine.status([Submission("someone-else", "execute", queued)])
        assert (type(mislabelled), mislabelled.plate_id) == (ExecutionAccepted, "queued")
        gate.touch()
        facts.terminal(queued)

    run(body, tmp_path, max_workers=1)


def test_only_the_last_keep_finished_submissions_are_remembered(tmp_path: Path) -> None:
    async def body(engine: LocalEngine, facts: Facts) -> None:
        compile_job = job("p", spec("finish"))
        for i in range(5):
            await engine.submit_compile(f"p.{i}.c", compile_job)
            facts.terminal(f"p.{i}.c")
        asked = [Submission("p", "compile", f"p.{i}.c") for i in range(5)]
        answered = await engine.status(asked)
        assert [_sid(f) for f in answered] == ["p.3.c", "p.4.c"]
        info = await engine.server_info()
        assert (info["remembered"], info["forgotten"], info["keep_finished"]) == (2, 3, 2)
        # A forgotten id is free again: this is a new submission, not a duplicate.
        await engine.submit_compile("p.0.c", compile_job)
        facts.wait_for(
            lambda fs: sum(isinstance(f, CompileSucceeded) and _sid(f) == "p.0.c" for f in fs) == 2,
            "the second compile of p.0.c",
        )

    run(body, tmp_path, max_workers=1, keep_finished=2)


def test_fifo_order_and_one_thread_for_any_number_of_plates(tmp_path: Path) -> None:
    baseline = threading.active_count()

    async def body(engine: LocalEngine, facts: Facts) -> None:
        pipeline = spec("finish")
        artifact = await compile_ok(engine, facts, job("p0", pipeline))
        ids = [await execute(engine, facts, f"p{i}", pipeline, artifact=artifact) for i in range(8)]
        for xid in ids:
            facts.terminal(xid)
        started = [f.execution_id for f in facts.all if isinstance(f, ExecutionStarted)]
        assert started == ids

    facts = run(body, tmp_path, max_workers=1)
    assert facts.max_threads <= baseline + 1  # the watcher, and nothing per plate
    assert threading.active_count() <= baseline


def test_close_cancels_everything_leaves_no_process_and_is_idempotent(tmp_path: Path) -> None:
    pids: list[int] = []
    baseline = threading.active_count()

    async def main() -> Facts:
        facts = Facts()
        engine = LocalEngine(allowed_modules=ALLOWED, output_dir=str(tmp_path), max_workers=2)
        await engine.start(facts)
        pipeline = spec("wait_for_cancel")
        artifact = await compile_ok(engine, facts, job("p0", pipeline))
        ids = [await execute(engine, facts, f"p{i}", pipeline, artifact=artifact) for i in range(4)]
        pids.extend(facts.pid(xid) for xid in ids[:2])
        await engine.close()
        assert multiprocessing.active_children() == []
        assert all(isinstance(facts.terminal(xid), ExecutionCancelled) for xid in ids)
        assert not any(isinstance(f, ExecutionStarted) for f in facts.of(ids[3]))
        await engine.close()
        with pytest.raises(EngineError, match="closed"):
            await engine.submit_compile("late.c", job("late", pipeline))
        info = await engine.server_info()
        assert (info["processes"], info["queued"], info["closed"]) == (0, 0, True)
        return facts

    asyncio.run(main())
    assert all(pid_gone(pid) for pid in pids)
    assert threading.active_count() <= baseline


def test_misuse_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_workers"):
        LocalEngine(max_workers=0)
    with pytest.raises(ValueError, match="fork"):
        LocalEngine(mp_context="fork")
    with pytest.raises(ValueError, match="cancel_grace"):
        LocalEngine(cancel_grace=0)
    for keep in (0, -1, 1.5):
        with pytest.raises(ValueError, match="keep_finished"):
            LocalEngine(keep_finished=keep)  # type: ignore[arg-type]

    async def main() -> None:
        engine = LocalEngine(allowed_modules=ALLOWED, output_dir=str(tmp_path))
        with pytest.raises(EngineError, match="not started"):
            await engine.submit_compile("p.c", job("p", spec("finish")))
        await engine.close()
        with pytest.raises(EngineError, match="closed"):
            await engine.start(Facts())

    asyncio.run(main())


# --- odds and ends ----------------------------------------------------------------


def _restamp(fact: Fact, stimulus_id: str) -> Fact:
    values = {
        name: getattr(fact, name) for name in fact.__dataclass_fields__ if name != "stimulus_id"
    }
    return type(fact)(stimulus_id=stimulus_id, **values)
