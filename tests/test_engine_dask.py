"""The Dask engine against real ``LocalCluster``s.

Most tests run an in-process cluster (workers are threads of this process,
cheap to start); one runs worker processes, to kill one. A test owns every
cluster it makes and closes it (``async with``), or lets the engine make one
and closes the engine. Every wait is bounded: facts are collected by a sink
and awaited with a timeout; a batch is awaited with ``asyncio.wait_for``.
Steps that wait (``tests/steps_for_tests.py``) are themselves bounded, and
announce ``pid=<n>`` as their first progress report once they run.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import dask
import pytest
from distributed import LocalCluster

from helpers import engine_job as job
from helpers import spec
from plateflow.core import BatchState, BatchSummary, PlateOutcome, PlateState, Reason
from plateflow.core.facts import (
    CompileFailed,
    CompileRejected,
    CompileSucceeded,
    EngineLost,
    ExecutionAccepted,
    ExecutionCancelled,
    ExecutionFailed,
    ExecutionProgress,
    ExecutionRejected,
    ExecutionStarted,
    ExecutionSucceeded,
    Fact,
)
from plateflow.engines.base import EngineError, Submission
from plateflow.engines.dask import DaskEngine
from plateflow.examples.platereader import demo_pipeline, generate_plates
from plateflow.host import BaseBatchHost
from plateflow.jobs import CompileJob
from plateflow.pipeline.spec import PipelineSpec, StepSpec
from plateflow.service import BatchWorkflowService, Plate

T = TypeVar("T")

ALLOWED = ("steps_for_tests",)
TIMEOUT = 30.0
TERMINAL = (
    CompileSucceeded,
    CompileFailed,
    CompileRejected,
    ExecutionSucceeded,
    ExecutionFailed,
    ExecutionRejected,
    ExecutionCancelled,
)
# The engine's default liveness bound is 1 s + 3 s; the tests use a tighter one.
LIVENESS: dict[str, Any] = {"liveness_interval": 0.5, "liveness_timeout": 1.5}


# --- helpers ---------------------------------------------------------------------------------


def _sid(fact: Fact) -> str | None:
    return getattr(fact, "execution_id", None) or getattr(fact, "job_id", None)


class Facts:
    """A sink that keeps every fact; a test awaits a condition on them, with a timeout.

    The engine pushes from the event loop (task events) and from Dask's
    callback thread, so waiting must never block the loop: a push only sets an
    asyncio event, through ``call_soon_threadsafe``.
    """

    def __init__(self) -> None:
        self._facts: list[Fact] = []
        self._lock = threading.Lock()
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()

    def __call__(self, fact: Fact) -> None:
        with self._lock:
            self._facts.append(fact)
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._changed.set)

    @property
    def all(self) -> list[Fact]:
        with self._lock:
            return list(self._facts)

    def of(self, sid: str) -> list[Fact]:
        return [f for f in self.all if _sid(f) == sid]

    async def wait_for(
        self, predicate: Callable[[list[Fact]], bool], what: str, timeout: float = TIMEOUT
    ) -> list[Fact]:
        deadline = self._loop.time() + timeout
        while True:
            self._changed.clear()
            facts = self.all
            if predicate(facts):
                return facts
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; facts: {facts}")
            with suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def terminal(self, sid: str) -> Fact:
        await self.wait_for(
            lambda fs: any(_sid(f) == sid and isinstance(f, TERMINAL) for f in fs),
            f"a terminal fact for {sid}",
        )
        (fact,) = [f for f in self.of(sid) if isinstance(f, TERMINAL)]
        return fact

    async def pid(self, sid: str) -> int:
        """The pid a waiting step announced (``pid=<n>``): it is running."""

        def announced(fs: list[Fact]) -> bool:
            return any(
                isinstance(f, ExecutionProgress) and _sid(f) == sid and f.message[:4] == "pid="
                for f in fs
            )

        await self.wait_for(announced, f"{sid} to announce its pid")
        for fact in self.of(sid):
            if isinstance(fact, ExecutionProgress) and fact.message.startswith("pid="):
                return int(fact.message.removeprefix("pid="))
        raise AssertionError("unreachable")


@asynccontextmanager
async def cluster(n_workers: int = 1, threads: int = 2) -> AsyncIterator[LocalCluster]:
    """An in-process cluster on this test's loop, owned (and closed) by the test."""
    async with LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=n_workers,
        threads_per_worker=threads,
        processes=False,
        asynchronous=True,
        dashboard_address=None,
    ) as made:
        yield made


@asynccontextmanager
async def engine_on(facts: Facts, tmp_path: Path, **options: Any) -> AsyncIterator[DaskEngine]:
    options.setdefault("allowed_modules", ALLOWED)
    engine = DaskEngine(output_dir=str(tmp_path / "out"), **options)
    await engine.start(facts)
    try:
        yield engine
    finally:
        await engine.close()


async def compile_ok(engine: DaskEngine, facts: Facts, compile_job: CompileJob) -> str:
    job_id = f"{compile_job.plate_id}.c"
    await engine.submit_compile(job_id, compile_job)
    fact = await facts.terminal(job_id)
    assert isinstance(fact, CompileSucceeded), fact
    return fact.artifact_id


async def execute(
    engine: DaskEngine, facts: Facts, plate: str, pipeline: PipelineSpec, artifact: str = ""
) -> str:
    """Submit an execution of ``pipeline`` for ``plate`` (compiling it first unless given)."""
    compile_job = job(plate, pipeline)
    artifact = artifact or await compile_ok(engine, facts, compile_job)
    execution_id = f"{plate}.x"
    await engine.submit_execution(execution_id, compile_job, artifact)
    return execution_id


def run(body: Callable[[], Awaitable[T]], timeout: float = 90.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(body(), timeout)

    return asyncio.run(bounded())


class Host(BaseBatchHost):
    """Keeps the plate reports and lets a test react to state changes."""

    def __init__(self) -> None:
        super().__init__()
        self.completed: dict[str, tuple[PlateOutcome, Any]] = {}
        self.summaries: list[BatchSummary] = []
        self.on_state: Callable[[str, PlateState], None] | None = None
        self.executing: set[str] = set()
        self.changed = asyncio.Event()  # callbacks run on the loop (the inline dispatcher)

    async def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        async def until() -> None:
            while not condition():
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(until(), TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None

    def on_plate_completed(self, plate_id: str, outcome: PlateOutcome, result: Any) -> None:
        assert plate_id not in self.completed, "C2: one report per plate"
        self.completed[plate_id] = (outcome, result)
        self.changed.set()

    def on_all_plates_completed(self, summary: BatchSummary) -> None:
        self.summaries.append(summary)

    def emit_orchestrator_state(self, plate_id: str, state: PlateState) -> None:
        if state is PlateState.EXECUTING:
            self.executing.add(plate_id)
        self.changed.set()
        if self.on_state is not None:
            self.on_state(plate_id, state)


@pytest.fixture(autouse=True)
def _no_children_left() -> Iterator[None]:
    yield
    assert multiprocessing.active_children() == [], "a test left worker processes behind"


# --- the seed's flows through the service -------------------------------------------------------


def test_seed_flows_on_a_local_cluster_the_engine_starts(tmp_path: Path) -> None:
    generated = generate_plates(tmp_path / "plates", 3, seed=11, wells=96)
    plates = [Plate(g.plate_id, str(g.path)) for g in generated]
    host = Host()

    async def body() -> None:
        engine = DaskEngine(n_workers=2, processes=False, output_dir=str(tmp_path / "out"))
        service = BatchWorkflowService(host, engine)
        try:
            compiled = await service.compile_plates(plates, pipeline=demo_pipeline())
            assert compiled.outcome is BatchState.COMPLETED
            assert compiled.counts == {PlateOutcome.COMPILED: 3}
            assert len(set(host.plate_compiled_data.values())) == 1, "one pipeline, one artifact"

            host.completed.clear()
            summary = await service.run_plates(plates, pipeline=demo_pipeline())
            assert summary.outcome is BatchState.COMPLETED, summary
            info = await engine.server_info()
            assert info["local_cluster"] is True
            assert info["workers"] == 2
        finally:
            await service.close()
        assert (await engine.server_info())["closed"] is True

    run(body)
    for g in generated:
        outcome, result = host.completed[g.plate_id]
        assert outcome is PlateOutcome.COMPLETED
        assert set(g.planted_hits) <= {hit["well"] for hit in result["hits"]}
        assert Path(result["report"]).is_file()
    assert len(host.summaries) == 2


def test_keys_dependency_and_the_order_of_facts(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pipeline = spec("load", ("count", {"n": 3}), ("wait_for_file", {"path": str(gate)}), "finish")

    async def body() -> None:
        async with cluster() as made:
            facts = Facts()
            async with engine_on(facts, tmp_path, scheduler_address=made.scheduler_address) as e:
                xid = await execute(e, facts, "p1", pipeline)
                await facts.pid(xid)
                scheduler = made.scheduler
                assert scheduler is not None
                compile_key = ("plateflow-compile", "p1.c", "p1")
                execute_key = ("plateflow-execute", xid, "p1")
                task = scheduler.tasks[execute_key]
                assert {d.key for d in task.dependencies} == {compile_key}
                assert task.state == "processing"

                gate.touch()
                done = await facts.terminal(xid)
                assert isinstance(done, ExecutionSucceeded)
                assert done.result == {"plate": "p1", "ok": True}
                mine = facts.of(xid)
                assert [type(f) for f in mine[:2]] == [ExecutionAccepted, ExecutionStarted]
                assert all(isinstance(f, ExecutionProgress) for f in mine[2:-1])
                assert mine[-1] is done
                # Settled: the engine lets Dask forget both tasks.
                # (The scheduler announces nothing when it forgets a task: look, bounded.)
                await asyncio.wait_for(_until(lambda: not scheduler.tasks), TIMEOUT)
            assert len(scheduler.workers) == 1, "an engine closes only what it started"

    run(body)


async def _until(condition: Callable[[], bool]) -> None:
    """Look at the in-process scheduler's state until ``condition`` (the caller bounds it)."""
    while not condition():
        await asyncio.sleep(0.01)


# --- cancel -------------------------------------------------------------------------------------


def test_cancel_stops_one_running_execution_and_frees_its_thread(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def body() -> None:
        async with cluster(n_workers=1, threads=2) as made:
            facts = Facts()
            async with engine_on(facts, tmp_path, scheduler_address=made.scheduler_address) as e:
                # Compiled first: a compile is a Dask task too, and would wait for a thread.
                later = await compile_ok(e, facts, job("queued", spec("finish")))
                victim = await execute(e, facts, "victim", spec("wait_for_cancel"))
                other = await execute(
                    e, facts, "other", spec(("wait_for_file", {"path": str(gate)}), "finish")
                )
                await facts.pid(victim)
                await facts.pid(other)
                # Both threads are busy: this one waits in Dask's queue.
                queued = await execute(e, facts, "queued", spec("finish"), artifact=later)
                info = await e.server_info()
                assert (info["running"], info["queued"]) == (2, 1)

                await e.cancel(Submission("victim", "execute", victim))
                assert isinstance(await facts.terminal(victim), ExecutionCancelled)
                # The step really stopped: its thread ran the queued plate.
                assert isinstance(await facts.terminal(queued), ExecutionSucceeded)
                assert not any(isinstance(f, TERMINAL) for f in facts.of(other))

                gate.touch()
                assert isinstance(await facts.terminal(other), ExecutionSucceeded)
                await e.cancel(Submission("other", "execute", other))  # finished: no-op
                await e.cancel(Submission("ghost", "execute", "ghost.x"))
                assert [type(f) for f in facts.of(other)][-1] is ExecutionSucceeded

    run(body)


def test_cancel_of_a_queued_execution_never_runs_it(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def body() -> None:
        async with cluster(n_workers=1, threads=1) as made:
            facts = Facts()
            async with engine_on(facts, tmp_path, scheduler_address=made.scheduler_address) as e:
                later = await compile_ok(e, facts, job("queued", spec("finish")))
                busy = await execute(e, facts, "busy", spec(("wait_for_file", {"path": str(gate)})))
                await facts.pid(busy)
                queued = await execute(e, facts, "queued", spec("finish"), artifact=later)
                await e.cancel(Submission("queued", "execute", queued))
                assert isinstance(await facts.terminal(queued), ExecutionCancelled)
                gate.touch()
                await facts.terminal(busy)
                assert [type(f) for f in facts.of(queued)] == [
                    ExecutionAccepted,
                    ExecutionCancelled,
                ]

    run(body)


def test_cancel_one_plate_through_the_service_while_others_run(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    waiting = spec(("wait_for_file", {"path": str(gate)}), "finish")
    plates = [
        Plate("victim", "/plates/victim", pipeline=spec("wait_for_cancel")),
        Plate("a", "/plates/a"),
        Plate("b", "/plates/b"),
    ]
    host = Host()

    async def body() -> BatchSummary:
        async with cluster(n_workers=1, threads=3) as made:
            engine = DaskEngine(
                made.scheduler_address, allowed_modules=ALLOWED, output_dir=str(tmp_path)
            )
            service = BatchWorkflowService(host, engine, cancel_grace=10.0)

            def react(plate_id: str, state: PlateState) -> None:
                if plate_id == "victim" and state is PlateState.EXECUTING:
                    service.cancel("victim")

            host.on_state = react
            try:
                summary = asyncio.ensure_future(service.run_plates(plates, pipeline=waiting))
                await host.wait_for(lambda: "victim" in host.completed, "the victim to settle")
                assert not summary.done()
                gate.touch()
                return await asyncio.wait_for(summary, TIMEOUT)
            finally:
                await service.close()

    summary = run(body)
    reasons = {s.plate_id: s.reason for s in summary.plates}
    # Confirmed by the engine (the step stopped), not settled by the service's grace timer.
    assert reasons == {
        "victim": Reason.CANCEL_REQUESTED,
        "a": Reason.SUCCEEDED,
        "b": Reason.SUCCEEDED,
    }
    assert summary.outcome is BatchState.CANCELLED


# --- losing a worker, losing the scheduler ------------------------------------------------


def test_a_killed_worker_process_fails_only_its_plate(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def body() -> None:
        facts = Facts()
        # Worker processes, one thread each: the two plates run in different processes.
        async with engine_on(facts, tmp_path, n_workers=2, processes=True) as e:
            victim = await execute(e, facts, "victim", spec("wait_for_cancel"))
            other = await execute(
                e, facts, "other", spec(("wait_for_file", {"path": str(gate)}), "finish")
            )
            victim_pid, other_pid = await facts.pid(victim), await facts.pid(other)
            assert len({victim_pid, other_pid, os.getpid()}) == 3

            os.kill(victim_pid, signal.SIGKILL)
            lost = await facts.terminal(victim)
            assert isinstance(lost, ExecutionFailed), lost
            assert "worker" in lost.error
            assert "lost" in lost.error
            assert not any(isinstance(f, TERMINAL) for f in facts.of(other))

            gate.touch()
            assert isinstance(await facts.terminal(other), ExecutionSucceeded)

    run(body)


def test_scheduler_stopped_mid_batch_every_plate_fails_engine_lost_within_the_bound(
    tmp_path: Path,
) -> None:
    plates = [Plate(f"p{i}", f"/plates/p{i}") for i in range(3)]
    host = Host()
    bound = LIVENESS["liveness_interval"] + LIVENESS["liveness_timeout"]

    async def body() -> tuple[BatchSummary, float]:
        async with cluster(n_workers=1, threads=3) as made:
            engine = DaskEngine(
                made.scheduler_address,
                allowed_modules=ALLOWED,
                output_dir=str(tmp_path),
                **LIVENESS,
            )
            service = BatchWorkflowService(host, engine)
            try:
                batch = asyncio.ensure_future(
                    service.run_plates(plates, pipeline=spec("wait_for_cancel"))
                )
                await host.wait_for(lambda: len(host.executing) == 3, "every plate executing")
                stopped = time.monotonic()
                assert made.scheduler is not None
                await made.scheduler.close()
                summary = await asyncio.wait_for(batch, bound + 5.0)
                took = time.monotonic() - stopped
                with pytest.raises(EngineError, match="lost"):
                    await engine.submit_compile("late.c", job("late", spec("finish")))
                return summary, took
            finally:
                await service.close()

    # Closing a LocalCluster whose scheduler is gone retries the connection to it for
    # the connect timeout (30 s by default) before giving up: shortened for this test.
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        summary, took = run(body)
    assert summary.outcome is BatchState.FAILED
    assert {s.reason for s in summary.plates} == {Reason.ENGINE_LOST}
    assert {outcome for outcome, _ in host.completed.values()} == {PlateOutcome.FAILED}
    assert took < bound + 1.0, f"converged {took:.2f} s after the scheduler stopped"


def test_a_hung_scheduler_is_reported_lost_within_the_bound(tmp_path: Path) -> None:
    """SIGSTOP keeps the connection open: only the engine's liveness check can notice."""
    bound = LIVENESS["liveness_interval"] + LIVENESS["liveness_timeout"]

    async def body() -> float:
        scheduler = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert scheduler.stderr is not None
            address = await asyncio.wait_for(_scheduler_address(scheduler.stderr), TIMEOUT)
            facts = Facts()
            async with engine_on(
                facts, tmp_path, scheduler_address=address, connect_timeout=1.0, **LIVENESS
            ):
                scheduler.send_signal(signal.SIGSTOP)
                stopped = time.monotonic()
                await facts.wait_for(
                    lambda fs: any(isinstance(f, EngineLost) for f in fs), "EngineLost"
                )
                took = time.monotonic() - stopped
                (lost,) = [f for f in facts.all if isinstance(f, EngineLost)]
                assert "did not answer" in lost.reason
                return took
        finally:
            scheduler.kill()
            scheduler.send_signal(signal.SIGCONT)
            await asyncio.wait_for(scheduler.wait(), TIMEOUT)

    took = run(body)
    assert took < bound + 1.0, f"EngineLost {took:.2f} s after the scheduler hung"


async def _scheduler_address(stream: asyncio.StreamReader) -> str:
    """Read the scheduler's log until it says where it listens."""
    while line := (await stream.readline()).decode():
        if "Scheduler at:" in line:
            return line.rsplit("Scheduler at:", 1)[1].strip()
    raise AssertionError("the scheduler exited before it listened")


# --- rejections, status, misuse ----------------------------------------------------------------


def test_rejections_status_and_close(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster() as made:
            facts = Facts()
            engine = DaskEngine(
                made.scheduler_address, allowed_modules=ALLOWED, output_dir=str(tmp_path)
            )
            with pytest.raises(EngineError, match="not started"):
                await engine.submit_compile("p.c", job("p", spec("finish")))
            await engine.start(facts)
            try:
                bad = PipelineSpec(steps=(StepSpec(function="os:system"),))
                await engine.submit_compile("bad.c", job("bad", bad))
                failed = await facts.terminal("bad.c")
                assert isinstance(failed, CompileFailed)
                assert "'os' is not allowed" in failed.error

                compile_job = job("p", spec("finish"))
                await engine.submit_execution("p.x0", compile_job, "no-such-artifact")
                (rejected,) = facts.of("p.x0")
                assert isinstance(rejected, ExecutionRejected)
                assert "unknown compile artifact 'no-such-artifact'" in rejected.error

                artifact = await compile_ok(engine, facts, compile_job)
                await engine.submit_compile("p.c", compile_job)
                assert isinstance(facts.of("p.c")[-1], CompileRejected)
                await engine.submit_execution("p.x", compile_job, artifact)
                pushed = await facts.terminal("p.x")
                assert isinstance(pushed, ExecutionSucceeded)

                status = await engine.status(
                    [
                        Submission("p", "execute", "p.x"),
                        Submission("p", "compile", "p.c"),
                        Submission("ghost", "execute", "ghost.x"),
                    ]
                )
                assert [type(f) for f in status] == [ExecutionSucceeded, CompileSucceeded]
                assert status[0].stimulus_id != pushed.stimulus_id
            finally:
                await engine.close()
            await engine.close()
            with pytest.raises(EngineError, match="closed"):
                await engine.submit_compile("late.c", compile_job)
            with pytest.raises(EngineError, match="closed"):
                await engine.start(facts)
            assert not any(isinstance(f, EngineLost) for f in facts.all)

    run(body)


def test_misuse_and_an_unreachable_scheduler_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="liveness_timeout"):
        DaskEngine(liveness_timeout=0)
    with pytest.raises(ValueError, match="n_workers"):
        DaskEngine("tcp://127.0.0.1:1", n_workers=2)

    async def body() -> None:
        engine = DaskEngine("tcp://127.0.0.1:9", connect_timeout=0.5, output_dir=str(tmp_path))
        started = time.monotonic()
        with pytest.raises(EngineError, match="cannot connect"):
            await engine.start(Facts())
        assert time.monotonic() - started < 5.0
        await engine.close()

    run(body)
