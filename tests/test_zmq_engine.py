"""The ZeroMQ engine against real ``plateflow serve`` processes and a scripted fake server.

Every wait is bounded (``until`` polls a predicate with a deadline; whole
scenarios run under ``asyncio.wait_for``). Every server process a test starts
is stopped by it: engines close in ``finally``, servers started directly are
terminated by the ``serve`` context manager, and the ``rdir`` fixture kills
(and reports) any ``plateflow serve`` left running in its runtime dir.
Runtime dirs are short paths under the temp dir, because Unix socket paths
are limited to about 100 bytes and pytest's ``tmp_path`` can be longer.

The fake server (a ROUTER and a PUB in a thread of the test process, holding
``server.lock`` like a real one) makes the protocol cases deterministic:
sequence gaps, a replaced server, heartbeats that stop, refusals, requests
that are never answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq
from pydantic import JsonValue

from plateflow.core import BatchState, BatchSummary, Journal, PlateOutcome, PlateState, Reason
from plateflow.core.facts import (
    CompileAccepted,
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
from plateflow.engines.base import TERMINAL_FACTS, Engine, EngineError, FactSink, Submission
from plateflow.engines.zmq import rundir
from plateflow.engines.zmq.engine import (
    DEFAULT_MAX_IN_FLIGHT,
    POLL_TICK,
    WINDOW_PER_WORKER,
    ZmqEngine,
)
from plateflow.engines.zmq.rundir import ServerRecord
from plateflow.engines.zmq.wire import (
    PROTOCOL_VERSION,
    CancelRequest,
    CompileRequest,
    ExecuteRequest,
    FactEvent,
    HeartbeatEvent,
    PingRequest,
    Reply,
    Request,
    ShutdownRequest,
    StoppingEvent,
    WireSubmission,
    decode_event,
    decode_reply,
    decode_request,
    encode,
)
from plateflow.examples.platereader import GeneratedPlate, demo_pipeline, generate_plates
from plateflow.host import BaseBatchHost
from plateflow.jobs import CompileJob
from plateflow.pipeline.spec import PipelineSpec, StepSpec
from plateflow.service import BatchWorkflowService, Plate
from processes import descendants, kill_quietly, pid_alive, server_pids

T = TypeVar("T")
TIMEOUT = 30.0
"""The bound of every single wait; scenarios as a whole get ``2 * TIMEOUT``."""
TESTS_DIR = Path(__file__).resolve().parent
FAST = ("--heartbeat", "0.2")
"""Server heartbeats every 0.2 s, so a 1 s heartbeat timeout detects loss quickly."""


# --- helpers ---------------------------------------------------------------------------------


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 2 * TIMEOUT)

    return asyncio.run(bounded())


async def until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def _sid(fact: Fact) -> str | None:
    return getattr(fact, "execution_id", None) or getattr(fact, "job_id", None)


class Facts:
    """A thread-safe sink that keeps every fact with the time it arrived."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._facts: list[tuple[float, Fact]] = []

    def __call__(self, fact: Fact) -> None:
        with self._lock:
            self._facts.append((time.monotonic(), fact))

    @property
    def all(self) -> list[Fact]:
        with self._lock:
            return [f for _, f in self._facts]

    def of(self, sid: str) -> list[Fact]:
        return [f for f in self.all if _sid(f) == sid]

    def terminal(self, sid: str) -> list[Fact]:
        return [f for f in self.of(sid) if isinstance(f, TERMINAL_FACTS)]

    def kinds(self, sid: str) -> list[str]:
        return [f.kind for f in self.of(sid)]

    def lost(self) -> list[tuple[float, EngineLost]]:
        with self._lock:
            return [(t, f) for t, f in self._facts if isinstance(f, EngineLost)]

    async def wait(self, sid: str, kind: type[Any]) -> Any:
        await until(lambda: any(isinstance(f, kind) for f in self.of(sid)), f"{kind} for {sid}")
        return next(f for f in self.of(sid) if isinstance(f, kind))


@pytest.fixture
def rdir() -> Iterator[Path]:
    """A fresh, short, private runtime dir; any server left in it is killed and reported."""
    path = Path(tempfile.mkdtemp(prefix="pfz-"))
    try:
        yield path
    finally:
        leftovers = server_pids(path)
        kill_quietly(leftovers)
        shutil.rmtree(path, ignore_errors=True)
        assert not leftovers, f"the test left plateflow servers running: {leftovers}"


@pytest.fixture
def plates(tmp_path: Path) -> list[GeneratedPlate]:
    return generate_plates(tmp_path / "plates", 4, seed=3, wells=96)


def compile_job(plate: GeneratedPlate, pipeline: PipelineSpec | None = None) -> CompileJob:
    return CompileJob(
        plate_id=plate.plate_id, plate_path=str(plate.path), pipeline=pipeline or demo_pipeline()
    )


def engine_for(directory: Path, tmp_path: Path, *args: str, **options: Any) -> ZmqEngine:
    options.setdefault("heartbeat_timeout", 1.0)
    server_args = (*FAST, "--output-dir", str(tmp_path / "out"), *args)
    return ZmqEngine(directory, server_args=server_args, **options)


@contextlib.contextmanager
def serve(directory: Path, tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A server started directly (not by an engine); stopped on exit whatever happened."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "plateflow",
            "serve",
            "--runtime-dir",
            str(directory),
            *FAST,
            "--output-dir",
            str(tmp_path / "out"),
            *args,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (
            (record := rundir.read_record(directory)) is not None and record.pid == process.pid
        ):
            assert process.poll() is None, f"the server exited with {process.returncode}"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
                process.send_signal(signal.SIGCONT)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


async def compile_ok(engine: Engine, facts: Facts, job: CompileJob, job_id: str) -> str:
    await engine.submit_compile(job_id, job)
    fact = await facts.wait(job_id, CompileSucceeded)
    assert isinstance(fact, CompileSucceeded)
    return fact.artifact_id


async def first_event(engine: ZmqEngine) -> None:
    """The SUB is subscribed once an event arrived; from then on no event is missed."""
    await until(lambda: engine.statistics().events > 0, "the first event")


class Spy(Engine):
    """Any engine, with a copy of every fact it pushes (and when) kept for the test."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.name = inner.name
        self.facts = Facts()

    async def start(self, sink: FactSink) -> None:
        def both(fact: Fact) -> None:
            self.facts(fact)
            sink(fact)

        await self.inner.start(both)

    async def submit_compile(self, job_id: str, job: CompileJob) -> None:
        await self.inner.submit_compile(job_id, job)

    async def submit_execution(self, execution_id: str, job: CompileJob, artifact_id: str) -> None:
        await self.inner.submit_execution(execution_id, job, artifact_id)

    async def cancel(self, submission: Submission) -> None:
        await self.inner.cancel(submission)

    async def status(self, submissions: Sequence[Submission]) -> list[Fact]:
        return await self.inner.status(submissions)

    async def server_info(self) -> dict[str, JsonValue]:
        return await self.inner.server_info()

    async def close(self) -> None:
        await self.inner.close()


class Host(BaseBatchHost):
    """Records the callbacks the convergence guarantees are about."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.completed: list[tuple[str, PlateOutcome, JsonValue]] = []
        self.summaries: list[BatchSummary] = []
        self.errors: list[tuple[str, str]] = []
        self.on_state: Callable[[str, PlateState], None] | None = None

    def emit_error(self, message: str, *, code: str = "", plate_id: str | None = None) -> None:
        self.errors.append((code, message))

    def emit_orchestrator_state(self, plate_id: str, state: PlateState) -> None:
        if self.on_state is not None:
            self.on_state(plate_id, state)

    def emit_execution_complete(self, summary: BatchSummary) -> None:
        self.names.append("emit_execution_complete")

    def on_plate_completed(self, plate_id: str, outcome: PlateOutcome, result: JsonValue) -> None:
        self.names.append("on_plate_completed")
        self.completed.append((plate_id, outcome, result))

    def on_all_plates_completed(self, summary: BatchSummary) -> None:
        self.names.append("on_all_plates_completed")
        self.summaries.append(summary)

    def check_convergence(self, plate_ids: list[str]) -> BatchSummary:
        """C2 and C3 as the host sees them; returns the one summary."""
        assert sorted(p for p, _, _ in self.completed) == sorted(plate_ids), "C2"
        assert self.names.count("on_all_plates_completed") == 1, "C3"
        assert self.names.count("emit_execution_complete") == 1, "C3"
        last_plate = max(i for i, n in enumerate(self.names) if n == "on_plate_completed")
        assert self.names.index("on_all_plates_completed") > last_plate, "C3: after every plate"
        return self.summaries[0]


def selection(generated: Sequence[GeneratedPlate]) -> list[Plate]:
    return [Plate(g.plate_id, str(g.path)) for g in generated]


# --- a real server: start, attach, run ----------------------------------------------------


def test_an_engine_starts_its_own_server_runs_a_pipeline_and_stops_the_server(
    rdir: Path, tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    facts = Facts()
    engine = engine_for(rdir, tmp_path)

    async def scenario() -> int:
        await engine.start(facts)
        try:
            assert engine.started_server
            record = engine.record
            assert record is not None
            assert server_pids(rdir) == [record.pid]
            io_threads = [t for t in threading.enumerate() if t.name.startswith("plateflow-zmq")]
            assert len(io_threads) == 1, "one client I/O thread"
            await first_event(engine)
            job = compile_job(plates[0])
            artifact = await compile_ok(engine, facts, job, "c1")
            await engine.submit_execution("x1", job, artifact)
            done = await facts.wait("x1", ExecutionSucceeded)
            assert done.result["plate_id"] == plates[0].plate_id
            assert {h["well"] for h in done.result["hits"]} >= set(plates[0].planted_hits)
            assert Path(str(done.result["report"])).is_file()
            info = await engine.server_info()
            assert info["engine"] == "zmq"
            assert info["server_id"] == record.server_id
            assert info["attached"] is False
            assert engine.statistics().outstanding == 0
            return record.pid
        finally:
            await engine.close()

    pid = run(scenario())
    assert facts.kinds("c1") == ["compile_accepted", "compile_succeeded"]
    kinds = facts.kinds("x1")
    assert kinds[:2] == ["execution_accepted", "execution_started"]
    assert kinds[-1] == "execution_succeeded"
    assert set(kinds[2:-1]) == {"execution_progress"}
    progress = [f for f in facts.of("x1") if isinstance(f, ExecutionProgress)]
    assert [p.done for p in progress] == sorted(p.done for p in progress)
    assert not facts.lost(), "closing the engine is not a lost engine"
    # close() shut down the server it started: process reaped, record removed.
    assert not pid_alive(pid)
    assert not (rdir / "server.json").exists()
    assert not rundir.server_alive(rdir)
    with pytest.raises(EngineError, match="closed"):
        run(engine.server_info())
    run(engine.close())  # idempotent


def test_two_engines_started_at_once_share_one_server_and_only_its_starter_stops_it(
    rdir: Path, tmp_path: Path
) -> None:
    first, second = engine_for(rdir, tmp_path), engine_for(rdir, tmp_path)

    async def scenario() -> None:
        try:
            await asyncio.gather(first.start(Facts()), second.start(Facts()))
            starters = [e for e in (first, second) if e.started_server]
            assert len(starters) == 1, "the start lock lets exactly one engine start a server"
            (starter,) = starters
            attached = second if starter is first else first
            assert starter.record is not None
            assert attached.record is not None
            assert attached.record.server_id == starter.record.server_id
            assert server_pids(rdir) == [starter.record.pid]
            await attached.close()
            assert rundir.server_alive(rdir), "closing an attached engine leaves the server"
            assert pid_alive(starter.record.pid)
            info = await starter.server_info()
            assert info["server_id"] == starter.record.server_id
            await starter.close()
            assert server_pids(rdir) == []
            assert not rundir.server_alive(rdir)
        finally:
            await first.close()
            await second.close()

    run(scenario())


def test_a_start_cancelled_midway_leaves_no_server_behind(rdir: Path, tmp_path: Path) -> None:
    engine = engine_for(rdir, tmp_path)

    async def scenario() -> None:
        starting = asyncio.ensure_future(engine.start(Facts()))
        await until(lambda: server_pids(rdir) != [], "the server process to be spawned")
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        with pytest.raises(EngineError, match="closed"):
            await engine.server_info()
        await engine.close()

    run(scenario())
    assert server_pids(rdir) == []


def test_the_seeds_run_flow_through_the_service(
    rdir: Path, tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    host = Host()
    engine = engine_for(rdir, tmp_path, "--workers", "2")

    async def scenario() -> BatchSummary:
        service = BatchWorkflowService(host, engine, status_interval=0.2)
        try:
            return await service.run_plates(selection(plates), pipeline=demo_pipeline())
        finally:
            await service.close()

    summary = run(scenario())
    ids = [p.plate_id for p in plates]
    assert summary.outcome is BatchState.COMPLETED
    assert summary.counts == {PlateOutcome.COMPLETED: 4}
    assert host.check_convergence(ids) == summary
    assert sorted(host.plate_execution_ids) == sorted(ids)
    assert set(host.plate_execution_states.values()) == {PlateState.COMPLETED}
    for plate_id, _, result in host.completed:
        assert isinstance(result, dict)
        assert result["plate_id"] == plate_id
    assert host.errors == []
    assert server_pids(rdir) == [], "the service closed the engine, which stopped its server"


# --- faults ------------------------------------------------------------------------------


def _lost_run(
    host: Host,
    spy: Spy,
    plates: list[GeneratedPlate],
    fault: Callable[[], None],
) -> tuple[BatchSummary, float]:
    """Run a slow batch, apply ``fault`` once every plate executes; when was it applied."""
    applied: list[float] = []

    async def scenario() -> BatchSummary:
        service = BatchWorkflowService(host, spy, status_interval=0.2)
        executing: set[str] = set()

        def on_state(plate_id: str, state: PlateState) -> None:
            if state is PlateState.EXECUTING:
                executing.add(plate_id)
                if len(executing) == len(plates) and not applied:
                    fault()
                    applied.append(time.monotonic())

        host.on_state = on_state
        try:
            return await service.run_plates(
                selection(plates), pipeline=demo_pipeline(pause_seconds=30.0)
            )
        finally:
            await service.close()

    summary = run(scenario())
    assert applied, "the fault was never applied"
    return summary, applied[0]


def _check_lost(host: Host, spy: Spy, summary: BatchSummary, applied: float, bound: float) -> None:
    (lost,) = spy.facts.lost()  # exactly once
    assert lost[0] - applied <= bound, f"EngineLost after {lost[0] - applied:.2f} s > {bound} s"
    assert summary.outcome is BatchState.FAILED
    assert {(s.outcome, s.reason) for s in summary.plates} == {
        (PlateOutcome.FAILED, Reason.ENGINE_LOST)
    }
    host.check_convergence([s.plate_id for s in summary.plates])


def test_a_server_killed_mid_batch_fails_every_plate_engine_lost_within_the_heartbeat_bound(
    rdir: Path, tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    """An attached server (not our child): only the missing heartbeats can tell."""
    host = Host()
    with serve(rdir, tmp_path, "--workers", "4") as server:
        engine = ZmqEngine(rdir, start_server=False, heartbeat_timeout=1.0)
        spy = Spy(engine)
        doomed: set[int] = set()

        def kill() -> None:
            doomed.update(descendants(server.pid))
            os.kill(server.pid, signal.SIGKILL)

        summary, applied = _lost_run(host, spy, plates, kill)
        assert doomed, "the server had worker processes when it was killed"
        # The heartbeat bound: timeout + one poll tick; the margin is for a loaded machine.
        _check_lost(host, spy, summary, applied, 1.0 + POLL_TICK + 0.5)
        assert "dead or frozen" in spy.facts.lost()[0][1].reason
        assert engine.statistics().broken is not None
        with pytest.raises(EngineError, match="closed"):  # the service closed it
            run(engine.server_info())
        server.wait(TIMEOUT)
    deadline = time.monotonic() + 10
    while (left := {p for p in doomed if pid_alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_quietly(left)
    assert not left, f"the killed server's workers outlived it: {left}"


def test_a_frozen_server_sigstop_is_lost_too_and_close_still_reaps_it(
    rdir: Path, tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    """Our own server, stopped: its process is alive, only the heartbeats can tell."""
    host = Host()
    engine = engine_for(rdir, tmp_path, "--workers", "4")
    spy = Spy(engine)
    stopped: list[int] = []

    def freeze() -> None:
        record = engine.record
        assert record is not None
        stopped.append(record.pid)
        os.kill(record.pid, signal.SIGSTOP)

    try:
        summary, applied = _lost_run(host, spy, plates, freeze)
        _check_lost(host, spy, summary, applied, 1.0 + POLL_TICK + 0.5)
        assert "dead or frozen" in spy.facts.lost()[0][1].reason
    finally:
        for pid in stopped:  # even if the service did not close the engine
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        run(engine.close())
    (pid,) = stopped
    assert not pid_alive(pid), "close() terminated the frozen server it had started"
    assert server_pids(rdir) == []


def test_cancel_stops_only_that_execution_and_a_cancel_after_completion_is_silent(
    rdir: Path, tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    facts = Facts()
    engine = engine_for(rdir, tmp_path, "--workers", "3")

    async def scenario() -> None:
        await engine.start(facts)
        try:
            await first_event(engine)
            slow = demo_pipeline(pause_seconds=1.0)
            jobs = [compile_job(p, slow) for p in plates[:3]]
            artifact = await compile_ok(engine, facts, jobs[0], "c0")
            for i, job in enumerate(jobs):
                await engine.submit_execution(f"x{i}", job, artifact)
            await facts.wait("x1", ExecutionStarted)
            await engine.cancel(Submission(jobs[1].plate_id, "execute", "x1"))
            await facts.wait("x1", ExecutionCancelled)
            await facts.wait("x0", ExecutionSucceeded)
            await facts.wait("x2", ExecutionSucceeded)
            before = len(facts.all)
            await engine.cancel(Submission(jobs[0].plate_id, "execute", "x0"))
            await asyncio.sleep(0.5)
            assert len(facts.all) == before, "cancelling a finished execution pushes nothing"
        finally:
            await engine.close()

    run(scenario())
    terminal = {sid: facts.kinds(sid)[-1] for sid in ("x0", "x1", "x2")}
    assert terminal == {
        "x0": "execution_succeeded",
        "x1": "execution_cancelled",
        "x2": "execution_succeeded",
    }
    assert facts.kinds("x1").count("execution_cancelled") == 1


def test_cancels_racing_completions_report_each_plate_exactly_once(
    rdir: Path, tmp_path: Path
) -> None:
    many = generate_plates(tmp_path / "plates", 6, seed=5, wells=96)
    host = Host()
    engine = engine_for(rdir, tmp_path, "--workers", "6")
    # Each plate's cancel lands at a different point around its completion.
    delays = dict(zip([g.plate_id for g in many], [0.0, 0.2, 0.3, 0.35, 0.4, 0.6], strict=True))

    async def scenario() -> BatchSummary:
        service = BatchWorkflowService(host, engine, status_interval=0.2, cancel_grace=5.0)
        loop = asyncio.get_running_loop()

        def on_state(plate_id: str, state: PlateState) -> None:
            if state is PlateState.EXECUTING:
                loop.call_later(delays[plate_id], service.cancel, plate_id)

        host.on_state = on_state
        try:
            return await service.run_plates(
                selection(many), pipeline=demo_pipeline(pause_seconds=0.3)
            )
        finally:
            await service.close()

    summary = run(scenario())
    host.check_convergence([g.plate_id for g in many])
    outcomes = {s.outcome for s in summary.plates}
    assert outcomes <= {PlateOutcome.COMPLETED, PlateOutcome.CANCELLED}
    (first,) = [s for s in summary.plates if s.plate_id == many[0].plate_id]
    assert first.outcome is PlateOutcome.CANCELLED, "a cancel at once beats a 0.3 s pause"


def test_a_client_that_closes_mid_batch_releases_its_lease_and_its_work_is_cancelled(
    rdir: Path, tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    """Closing releases the session's lease: the server cancels what it still runs for it
    (before protocol 3 the work ran on for nobody). A host that crashes instead is
    resumed by adopting the engine's identity: see test_zmq_lease."""
    before, after = Facts(), Facts()
    jobs = [compile_job(p, demo_pipeline(pause_seconds=30.0)) for p in plates[:2]]
    submissions = [Submission(j.plate_id, "execute", f"x{i}") for i, j in enumerate(jobs)]

    async def first_client() -> None:
        a = ZmqEngine(rdir, start_server=False, heartbeat_timeout=1.0)
        await a.start(before)
        try:
            assert not a.started_server
            await first_event(a)
            artifact = await compile_ok(a, before, jobs[0], "c0")
            for s, job in zip(submissions, jobs, strict=True):
                await a.submit_execution(s.submission_id, job, artifact)
            for s in submissions:
                await before.wait(s.submission_id, ExecutionStarted)
            assert a.statistics().leased
        finally:
            await a.close()  # mid-batch: the executions are cancelled

    async def second_client() -> list[Fact]:
        b = ZmqEngine(rdir, start_server=False, heartbeat_timeout=1.0)
        await b.start(after)
        try:
            deadline = time.monotonic() + TIMEOUT
            while True:
                facts = await b.status(submissions)
                if all(isinstance(f, ExecutionCancelled) for f in facts) and len(facts) == 2:
                    assert not b.statistics().leased, "asking status takes no lease"
                    return facts
                assert time.monotonic() < deadline, f"never cancelled: {facts}"
                await asyncio.sleep(0.1)
        finally:
            await b.close()

    with serve(rdir, tmp_path, "--workers", "2") as server:
        started = time.monotonic()
        run(first_client())
        assert all(not isinstance(f, ExecutionSucceeded) for f in before.all)
        assert server.poll() is None, "closing an attached engine leaves the server running"
        recovered = run(second_client())
        assert time.monotonic() - started < 30.0, "cancelled, not run to the end"
        assert server.poll() is None
    assert {_sid(f) for f in recovered} == {"x0", "x1"}


def test_a_burst_beyond_the_pub_high_water_mark_loses_no_terminal_fact(
    rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's PUB queues 10 000 events per subscriber, then drops.

    The client is made slow on purpose: its sink blocks on the execution's
    first progress fact until the server reports the execution finished (asked
    through a second, attached engine), so the burst of 15 000 progress facts
    and the terminal fact overflow every queue. The next heartbeat shows the
    gap and one status request recovers the terminal fact.
    """
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    )
    facts = Facts()
    release = threading.Event()

    def slow_sink(fact: Fact) -> None:
        if isinstance(fact, ExecutionProgress) and not release.is_set():
            release.wait(TIMEOUT)
        facts(fact)

    engine = engine_for(rdir, tmp_path, "--allow", "steps_for_tests", heartbeat_timeout=TIMEOUT)
    watcher = ZmqEngine(rdir, start_server=False)
    pipeline = PipelineSpec(
        name="burst",
        steps=(
            StepSpec(function="steps_for_tests:count", params={"n": 15_000}),
            StepSpec(function="steps_for_tests:finish"),
        ),
    )
    job = CompileJob(plate_id="p", plate_path="/nowhere", pipeline=pipeline)

    async def scenario() -> None:
        await engine.start(slow_sink)
        try:
            await watcher.start(Facts())
            await first_event(engine)
            artifact = await compile_ok(engine, facts, job, "c")
            await engine.submit_execution("x", job, artifact)

            async def finished() -> bool:
                info = await watcher.server_info()
                return info["running"] == 0 and info["queued"] == 0

            deadline = time.monotonic() + TIMEOUT
            await asyncio.sleep(0.2)
            while not await finished():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            published = (await watcher.server_info())["seq"]
            release.set()
            await facts.wait("x", ExecutionSucceeded)
            stats = engine.statistics()
            assert isinstance(published, int)
            assert stats.events < published, "the burst overflowed the queues"
            assert stats.gaps >= 1
            assert stats.reconciliations >= 1
            assert stats.reconciled_facts >= 1
            assert stats.outstanding == 0
        finally:
            release.set()
            await watcher.close()
            await engine.close()

    run(scenario())
    assert facts.kinds("x").count("execution_succeeded") >= 1
    assert not facts.lost()


# --- a scripted fake server: the protocol cases, deterministically ---------------------------


class FakeServer:
    """A ROUTER and a PUB in a thread, holding ``server.lock`` like a real server."""

    def __init__(self, directory: Path, heartbeat: float = 0.05) -> None:
        self.directory = directory
        self.server_id = "fake-one"
        self.heartbeat = heartbeat
        self.beating = threading.Event()
        self.beating.set()
        self.silent: set[str] = set()
        """Request types never answered."""
        self.refuse: dict[str, str] = {}
        """Request types answered ``ok=false`` with this error."""
        self.status_facts: dict[str, Fact] = {}
        """What ``status`` says about a submission id (nothing when absent)."""
        self.garbage: list[bytes] = []
        """Frames sent on the control socket before every reply (a hostile server)."""
        self._raw: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._outbox: queue.SimpleQueue[tuple[Fact | None, int, str | None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._stack = contextlib.ExitStack()
        self._thread = threading.Thread(target=self._run, name="fake-server", daemon=True)
        self.seq = 0

    def __enter__(self) -> FakeServer:
        self._stack.enter_context(rundir.exclusive_lock(self.directory / "server.lock"))
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "the fake server did not bind"
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self._stack.close()

    def requests(self, kind: str) -> list[Request]:
        with self._lock:
            return [r for r in self._requests if r.type == kind]

    def publish(self, fact: Fact, *, skip: int = 0) -> None:
        """Publish a fact event; ``skip`` events are 'dropped' before it (a gap)."""
        self._outbox.put((fact, skip, None))

    def publish_raw(self, frame: bytes) -> None:
        """Publish any bytes at all as an event (it uses up no sequence number)."""
        self._raw.put(frame)

    def replace(self, server_id: str) -> None:
        """Carry on as a new server (what a restart at the same endpoints looks like)."""
        self._outbox.put((None, 0, server_id))

    def _run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
        try:
            for sock in (router, pub):
                sock.setsockopt(zmq.LINGER, 0)
            router.bind(f"ipc://{self.directory}/control.sock")
            pub.bind(f"ipc://{self.directory}/events.sock")
            rundir.write_private(self.directory / "token", "secret\n")
            rundir.write_record(
                self.directory,
                ServerRecord(
                    server_id=self.server_id,
                    pid=os.getpid(),
                    control=f"ipc://{self.directory}/control.sock",
                    events=f"ipc://{self.directory}/events.sock",
                    protocol=PROTOCOL_VERSION,
                    heartbeat_interval=self.heartbeat,
                    started_at=time.time(),
                ),
            )
            self._ready.set()
            next_beat = time.monotonic()
            while not self._stop.is_set():
                if router.poll(10, zmq.POLLIN):
                    identity, frame = router.recv_multipart()
                    reply = self._answer(decode_request(frame))
                    if reply is not None:
                        for junk in self.garbage:
                            router.send_multipart([identity, junk])
                        router.send_multipart([identity, encode(reply)])
                while not self._raw.empty():
                    pub.send(self._raw.get_nowait())
                while True:
                    try:
                        fact, skip, new_id = self._outbox.get_nowait()
                    except queue.Empty:
                        break
                    if new_id is not None:
                        self.server_id, self.seq = new_id, 0
                    if fact is not None:
                        self.seq += skip
                        self._send(
                            pub, FactEvent(server_id=self.server_id, seq=self.seq, fact=fact)
                        )
                if self.beating.is_set() and time.monotonic() >= next_beat:
                    beat = HeartbeatEvent(
                        server_id=self.server_id, seq=self.seq, interval=self.heartbeat
                    )
                    self._send(pub, beat)
                    next_beat = time.monotonic() + self.heartbeat
        finally:
            router.close(linger=0)
            pub.close(linger=0)
            ctx.term()

    def _send(self, pub: zmq.Socket[bytes], event: FactEvent | HeartbeatEvent) -> None:
        pub.send(encode(event))
        self.seq += 1

    def _answer(self, request: Request) -> Reply | None:
        with self._lock:
            self._requests.append(request)
        if request.type in self.silent:
            return None
        if request.type in self.refuse:
            return Reply(id=request.id, ok=False, error=self.refuse[request.type])
        if request.type == "ping":
            return Reply(id=request.id, ok=True, result={"server_id": self.server_id})
        if request.type == "status":
            facts = tuple(
                self.status_facts[s.submission_id]
                for s in request.submissions
                if s.submission_id in self.status_facts
            )
            return Reply(id=request.id, ok=True, facts=facts)
        if request.type == "server_info":
            return Reply(id=request.id, ok=True, result={"server_id": self.server_id})
        return Reply(id=request.id, ok=True)


JOB = CompileJob(plate_id="p", plate_path="/p", pipeline=demo_pipeline())


def fake_run(
    directory: Path,
    body: Callable[[FakeServer, ZmqEngine, Facts], Awaitable[None]],
    *,
    beating: bool = True,
    **options: Any,
) -> Facts:
    """Start an engine on a fake server, run ``body``, always close both."""
    facts = Facts()
    options.setdefault("heartbeat_timeout", 1.0)

    async def scenario() -> None:
        engine = ZmqEngine(directory, start_server=False, **options)
        await engine.start(facts)
        try:
            await body(fake, engine, facts)
        finally:
            await engine.close()

    with FakeServer(directory) as fake:
        if not beating:
            fake.beating.clear()
        run(scenario())
    return facts


def test_first_contact_reconciles_what_was_published_before_the_subscription(
    rdir: Path,
) -> None:
    async def body(fake: FakeServer, engine: ZmqEngine, facts: Facts) -> None:
        # No event has reached the engine yet: a fact published now could be lost.
        await engine.submit_execution("x", JOB, "artifact")
        fake.status_facts["x"] = ExecutionStarted(plate_id="p", execution_id="x")
        fake.beating.set()
        await facts.wait("x", ExecutionStarted)
        (status,) = fake.requests("status")
        assert [s.submission_id for s in status.submissions] == ["x"]  # type: ignore[union-attr]
        assert engine.statistics().reconciliations == 1

    fake_run(rdir, body, beating=False, heartbeat_timeout=5.0)


def test_a_sequence_gap_triggers_one_status_request_whose_facts_reach_the_sink(
    rdir: Path,
) -> None:
    async def body(fake: FakeServer, engine: ZmqEngine, facts: Facts) -> None:
        await first_event(engine)
        await engine.submit_execution("x", JOB, "artifact")
        fake.publish(ExecutionAccepted(plate_id="p", execution_id="x"))
        await facts.wait("x", ExecutionAccepted)
        assert engine.statistics().gaps == 0
        assert fake.requests("status") == []
        fake.status_facts["x"] = ExecutionSucceeded(
            plate_id="p", execution_id="x", result={"ok": True}
        )
        fake.publish(ExecutionStarted(plate_id="p", execution_id="x"), skip=3)
        await facts.wait("x", ExecutionSucceeded)
        stats = engine.statistics()
        assert (stats.gaps, stats.reconciliations, stats.reconciled_facts) == (1, 1, 1)
        assert stats.outstanding == 0, "a terminal fact ends the tracking"
        (status,) = fake.requests("status")
        assert [s.submission_id for s in status.submissions] == ["x"]  # type: ignore[union-attr]
        # Nothing outstanding: a later gap needs no status request at all.
        fake.publish(ExecutionStarted(plate_id="p", execution_id="x"), skip=2)
        await until(lambda: engine.statistics().gaps == 2, "the second gap")
        assert len(fake.requests("status")) == 1

    facts = fake_run(rdir, body)
    assert facts.kinds("x") == [
        "execution_accepted",
        "execution_started",
        "execution_succeeded",
        "execution_started",  # a late duplicate: the batch ignores it as stale
    ]
    assert not facts.lost()


def test_an_accepted_or_started_fact_that_repeats_the_last_one_is_not_passed_on(
    rdir: Path,
) -> None:
    """Seen in the demo's journal: a submission sent just before the first event was
    reconciled, and its 'accepted' answer journaled as a duplicate of the event."""

    async def body(fake: FakeServer, engine: ZmqEngine, facts: Facts) -> None:
        await first_event(engine)
        await engine.submit_execution("x", JOB, "artifact")
        await engine.submit_execution("y", JOB, "artifact")
        fake.publish(ExecutionStarted(plate_id="p", execution_id="x"))
        fake.publish(ExecutionAccepted(plate_id="q", execution_id="y"))
        await facts.wait("y", ExecutionAccepted)
        fake.status_facts["x"] = ExecutionStarted(plate_id="p", execution_id="x")  # the same
        fake.status_facts["y"] = ExecutionStarted(plate_id="q", execution_id="y")  # news
        fake.publish(ExecutionAccepted(plate_id="z", execution_id="z"), skip=2)
        await facts.wait("y", ExecutionStarted)
        stats = engine.statistics()
        assert (stats.gaps, stats.reconciliations) == (1, 1)
        assert (stats.reconciled_facts, stats.repeats) == (1, 1)
        # The other order: the answer first, then the event (replies are read first).
        fake.status_facts["y"] = ExecutionStarted(plate_id="q", execution_id="y")
        await engine.submit_execution("w", JOB, "artifact")
        fake.status_facts["w"] = ExecutionAccepted(plate_id="r", execution_id="w")
        fake.publish(ExecutionAccepted(plate_id="z", execution_id="z"), skip=2)
        await facts.wait("w", ExecutionAccepted)
        fake.publish(ExecutionAccepted(plate_id="r", execution_id="w"))
        fake.publish(ExecutionProgress(plate_id="r", execution_id="w", done=1, total=2))
        fake.publish(ExecutionProgress(plate_id="r", execution_id="w", done=1, total=2))
        await until(lambda: len(facts.of("w")) == 3, "both progress facts")
        assert engine.statistics().repeats == 4  # x; x and y again in the second answer; w

    facts = fake_run(rdir, body)
    assert facts.kinds("x") == ["execution_started"]
    assert facts.kinds("y") == ["execution_accepted", "execution_started"]
    # Progress facts carry news even when they look alike: never dropped here.
    assert facts.kinds("w") == ["execution_accepted", "execution_progress", "execution_progress"]


def test_an_accepted_submission_the_server_no_longer_knows_fails_instead_of_waiting(
    rdir: Path,
) -> None:
    """A long-lived server forgets old finished submissions (--keep-finished). A client
    that missed the terminal event must not wait for it forever."""

    async def body(fake: FakeServer, engine: ZmqEngine, facts: Facts) -> None:
        await first_event(engine)
        await engine.submit_execution("x", JOB, "artifact")
        await engine.submit_compile("c", JOB)
        await engine.server_info()  # answered after both submits: both acknowledged
        # A gap: the reconciliation's answer knows neither.
        fake.publish(ExecutionAccepted(plate_id="z", execution_id="z"), skip=2)
        await facts.wait("x", ExecutionFailed)
        await facts.wait("c", CompileFailed)
        assert engine.statistics().forgotten == 2
        assert engine.statistics().outstanding == 0
        # The service's status poller path says the same about a later one.
        await engine.submit_execution("y", JOB, "artifact")
        await engine.server_info()
        (answer,) = await engine.status([Submission("q", "execute", "y")])
        assert isinstance(answer, ExecutionFailed)
        assert engine.statistics().forgotten == 3
        # Not acknowledged yet (no reply): unknown to the server proves nothing.
        fake.silent.add("execute")
        await engine.submit_execution("w", JOB, "artifact")
        await until(lambda: len(fake.requests("execute")) == 3, "the unanswered submit")
        assert await engine.status([Submission("r", "execute", "w")]) == []
        fake.publish(ExecutionAccepted(plate_id="z", execution_id="z"), skip=2)
        await until(lambda: engine.statistics().reconciliations == 2, "the second reconcile")
        await engine.server_info()  # the reconciliation's answer came before this one
        assert facts.of("w") == []

    facts = fake_run(rdir, body, request_timeout=30.0)
    (failed,) = facts.of("x")
    assert isinstance(failed, ExecutionFailed)
    assert "no longer knows this submission" in failed.error
    assert "--keep-finished" in failed.error


def test_a_replaced_server_is_reconciled_and_lost_only_if_it_forgot_our_work(
    rdir: Path,
) -> None:
    async def body(fake: FakeServer, engine: ZmqEngine, facts: Facts) -> None:
        await first_event(engine)
        await engine.submit_execution("x", JOB, "artifact")
        fake.status_facts["x"] = ExecutionStarted(plate_id="p", execution_id="x")
        fake.replace("fake-two")
        await facts.wait("x", ExecutionStarted)
        await until(lambda: engine.statistics().server_id == "fake-two", "the new server id")
        assert not facts.lost(), "the new server knows the execution: carry on"
        await engine.submit_execution("y", JOB, "artifact")
        fake.replace("fake-three")  # knows x but not y
        await until(lambda: bool(facts.lost()), "EngineLost")
        await asyncio.sleep(0.3)
        ((_, lost),) = facts.lost()
        assert "replaced" in lost.reason
        assert "'y'" in lost.reason
        with pytest.raises(EngineError, match="lost"):
            await engine.submit_execution("z", JOB, "artifact")
        assert engine.statistics().server_changes == 2

    fake_run(rdir, body)


def test_silence_is_reported_once_within_heartbeat_timeout_plus_one_tick(rdir: Path) -> None:
    async def body(fake: FakeServer, engine: ZmqEngine, facts: Facts) -> None:
        await first_event(engine)
        fake.silent.add("server_info")
        hanging = asyncio.ensure_future(engine.server_info())
        await asyncio.sleep(0.2)
        fake.beating.clear()
        stopped = time.monotonic()
        with pytest.raises(EngineError, match="lost"):
            await hanging  # failed at the loss, not at its 10 s request timeout
        await until(lambda: bool(facts.lost()), "EngineLost")
        ((when, lost),) = facts.lost()
        assert when - stopped <= 1.0 + POLL_TICK + 0.3
        assert "dead or frozen" in lost.reason
        fake.beating.set()  # it comes back: too late, the engine stays lost
        await asyncio.sleep(0.3)
        assert len(facts.lost()) == 1
        with pytest.raises(EngineError, match="lost"):
            await engine.status([Submission("p", "execute", "x")])

    fake_run(rdir, body, request_timeout=10.0)


def test_refusals_become_rejection_facts_and_a_silent_server_times_requests_out(
    rdir: Path,
) -> None:
    async def body(fake: FakeServer, engine: ZmqEngine, facts: Facts) -> None:
        await first_event(engine)
        fake.refuse.update(compile="no room", execute="unknown artifact", cancel="unknown")
        await engine.submit_compile("c", JOB)  # returns normally
        await engine.submit_execution("x", JOB, "artifact")
        rejected = await facts.wait("c", CompileRejected)
        assert "no room" in rejected.error
        assert "unknown artifact" in (await facts.wait("x", ExecutionRejected)).error
        await engine.cancel(Submission("p", "execute", "x"))  # refused cancel: no error
        assert engine.statistics().outstanding == 0
        fake.silent.add("server_info")
        started = time.monotonic()
        with pytest.raises(EngineError, match="no reply"):
            await engine.server_info()
        assert 0.4 <= time.monotonic() - started <= 0.5 + POLL_TICK + 0.5
        assert engine.statistics().timeouts == 1
        assert await engine.status([Submission("p", "execute", "x")]) == []
        assert not facts.lost(), "a timed-out request alone is not a lost server"

    facts = fake_run(rdir, body, request_timeout=0.5)
    assert [f.kind for f in facts.all] == ["compile_rejected", "execution_rejected"]


def test_without_a_server_and_without_start_server_start_fails_clearly(rdir: Path) -> None:
    engine = ZmqEngine(rdir, start_server=False, startup_timeout=2.0)
    with pytest.raises(EngineError, match="no plateflow server is running"):
        run(engine.start(Facts()))
    run(engine.close())


def test_a_heartbeat_timeout_below_the_servers_interval_is_refused(rdir: Path) -> None:
    with FakeServer(rdir, heartbeat=0.5):
        engine = ZmqEngine(rdir, start_server=False, heartbeat_timeout=0.5)
        with pytest.raises(EngineError, match="must exceed the server's heartbeat interval"):
            run(engine.start(Facts()))
        run(engine.close())


def test_the_window_holds_submissions_in_order_and_cancels_a_held_one_at_once(
    rdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    )
    gate = tmp_path / "gate"
    facts = Facts()
    engine = engine_for(
        rdir, tmp_path, "--workers", "2", "--allow", "steps_for_tests", max_in_flight=2
    )
    waiting = PipelineSpec(
        name="gated",
        steps=(
            StepSpec(function="steps_for_tests:wait_for_file", params={"path": str(gate)}),
            StepSpec(function="steps_for_tests:finish"),
        ),
    )
    job = CompileJob(plate_id="p", plate_path="/plates/p", pipeline=waiting)

    async def scenario() -> None:
        await engine.start(facts)
        try:
            await first_event(engine)
            artifact = await compile_ok(engine, facts, job, "c")
            for i in range(5):
                await engine.submit_execution(f"x{i}", job, artifact)
            await facts.wait("x1", ExecutionStarted)
            stats = engine.statistics()
            assert (stats.outstanding, stats.held) == (2, 3)
            info = await engine.server_info()
            assert (info["running"], info["queued"]) == (2, 0)  # the server has only two
            assert facts.of("x2") == []  # held: no fact until it is sent
            await engine.cancel(Submission("p", "execute", "x3"))
            assert facts.kinds("x3") == ["execution_cancelled"]  # at once, never sent
            gate.touch()
            for sid in ("x0", "x1", "x2", "x4"):
                await facts.wait(sid, ExecutionSucceeded)
        finally:
            await engine.close()

    run(scenario())
    accepted = [_sid(f) for f in facts.all if isinstance(f, ExecutionAccepted)]
    assert accepted == ["x0", "x1", "x2", "x4"]  # sent in submission order, x3 never
    assert facts.kinds("x3") == ["execution_cancelled"]


def test_the_auto_window_follows_the_server_worker_count(rdir: Path, tmp_path: Path) -> None:
    starter = engine_for(rdir, tmp_path, "--workers", "3")
    assert starter.max_in_flight == DEFAULT_MAX_IN_FLIGHT  # until the server is known

    async def scenario() -> None:
        await starter.start(Facts())
        try:
            assert starter.max_in_flight == 3 * WINDOW_PER_WORKER
            fixed = ZmqEngine(rdir, start_server=False, max_in_flight=5)
            unlimited = ZmqEngine(rdir, start_server=False, max_in_flight=None)
            # A record written by a server that does not say how many workers it has.
            record = rundir.read_record(rdir)
            assert record is not None
            assert record.workers == 3
            rundir.write_record(rdir, dataclasses.replace(record, workers=None))
            unknown = ZmqEngine(rdir, start_server=False)
            for engine in (fixed, unlimited, unknown):
                await engine.start(Facts())
                await engine.close()
            assert (fixed.max_in_flight, unlimited.max_in_flight) == (5, None)
            assert unknown.max_in_flight == DEFAULT_MAX_IN_FLIGHT
        finally:
            await starter.close()

    run(scenario())


def test_bad_arguments_are_refused() -> None:
    for bad in (0, -1, 2.5, "many", True):
        with pytest.raises(ValueError, match="max_in_flight"):
            ZmqEngine(Path("/nonexistent"), max_in_flight=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        ZmqEngine(Path("/nonexistent"), heartbeat_timeout=0)
    with pytest.raises(TypeError, match="sequence"):
        ZmqEngine(Path("/nonexistent"), server_args="--workers 2")


def test_a_burst_larger_than_the_socket_queue_waits_instead_of_failing(
    rdir: Path, tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    """Found by bench_e2e: 5,000 concurrent submits overflowed the DEALER's queue
    (libzmq's 1,000-message default) and raised EngineError, so the service
    declared the engine lost. Requests beyond the queue now wait to be sent."""
    engine = engine_for(rdir, tmp_path, max_in_flight=None)  # no window: all at once
    facts = Facts()
    job = compile_job(plates[0])

    async def scenario() -> None:
        await engine.start(facts)
        try:
            # Every call returns once its request is queued: none raised, none was refused.
            await asyncio.gather(
                *(engine.submit_compile(f"burst.{i}.c", job) for i in range(3_000))
            )
            await until(
                lambda: sum(isinstance(f, CompileAccepted) for f in facts.all) >= 3_000,
                "the server accepted every compile of the burst",
            )
        finally:
            await engine.close()

    asyncio.run(asyncio.wait_for(scenario(), 4 * TIMEOUT))
    assert not any(isinstance(f, (CompileRejected, EngineLost)) for f in facts.all)


# --- who may cancel, duplicates, and how a server's end is reported ------------------------


def raw_call(record: ServerRecord, request: Any) -> Reply:
    """One request on a throwaway DEALER (not an engine), its reply awaited (bounded)."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(record.control)
        dealer.send(encode(request))
        assert dealer.poll(int(TIMEOUT * 1000)), f"no reply to {request!r:.200}"
        return decode_reply(dealer.recv())
    finally:
        dealer.close(0)
        context.term()


@pytest.mark.parametrize("how", ["sigterm", "shutdown"])
def test_a_server_stopped_mid_batch_fails_every_plate_engine_lost_saying_why_never_cancelled(
    how: str, rdir: Path, tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    """Its last event says it stopped, and why; the pool's cancellations are not published.

    Before, the server's closing pool published ``*_cancelled`` for everything it
    ran, and every plate ended ``cancelled`` / ``engine_cancelled``: the wrong
    outcome, since nobody cancelled anything. A stop is seen at once, not after
    the heartbeat timeout (10 s here).
    """
    host = Host()
    with serve(rdir, tmp_path, "--workers", "4") as server, listening(rdir) as heard:
        engine = ZmqEngine(rdir, start_server=False, heartbeat_timeout=10.0)
        spy = Spy(engine)

        def stop() -> None:
            if how == "sigterm":
                os.kill(server.pid, signal.SIGTERM)
            else:  # another client with the token: the owner, or an admin
                record = engine.record
                assert record is not None
                token = rundir.read_token(rdir)
                assert raw_call(record, ShutdownRequest(id="admin-1", token=token)).ok

        summary, applied = _lost_run(host, spy, plates, stop)
        _check_lost(host, spy, summary, applied, 3.0)
        reason = spy.facts.lost()[0][1].reason
        expected = "SIGTERM" if how == "sigterm" else "shutdown requested"
        assert f"stopped: {expected}" in reason, reason
        cancelled = [f for f in spy.facts.all if f.kind.endswith("_cancelled")]
        assert cancelled == [], "nobody cancelled: the engine must not say so"
        assert Reason.ENGINE_CANCELLED not in summary.reasons
        assert server.wait(TIMEOUT) == 0
    # What any subscriber saw (not only a ZmqEngine, which stops listening once lost):
    # the stopping event last, and no cancellation before or after it.
    assert isinstance(heard[-1], StoppingEvent), heard[-3:]
    assert heard[-1].reason == expected
    assert not [e for e in heard if isinstance(e, FactEvent) and "cancelled" in e.fact.kind]


@contextlib.contextmanager
def listening(directory: Path) -> Iterator[list[Any]]:
    """A raw SUB on a running server's events, read by a thread of its own from before the
    body runs (a first event came) until after it (bounded in any case); what came after
    a stopping event is kept, so that a test can say nothing did."""
    record = rundir.read_record(directory)
    assert record is not None
    heard: list[Any] = []
    subscribed = threading.Event()
    ended: list[float] = []
    """When the body was over (monotonic)."""

    def read() -> None:
        context = zmq.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(record.events)
        last = time.monotonic()
        try:
            deadline = time.monotonic() + 2 * TIMEOUT  # a whole scenario's bound
            while time.monotonic() < deadline:
                if not sub.poll(50):
                    # The body is over: the last second was quiet after the stopping
                    # event, or ten seconds passed without one (a loaded machine is slow).
                    quiet = time.monotonic() - max(ended[0], last) if ended else 0.0
                    stopped = any(isinstance(e, StoppingEvent) for e in heard)
                    if quiet > (1.0 if stopped else 10.0):
                        return
                    continue
                heard.append(decode_event(sub.recv()))
                last = time.monotonic()
                subscribed.set()
        finally:
            subscribed.set()
            sub.close(0)
            context.term()

    reader = threading.Thread(target=read, name="listener")
    reader.start()
    try:
        assert subscribed.wait(TIMEOUT), "no first event"
        assert heard, "no first event"
        yield heard
    finally:
        ended.append(time.monotonic())
        reader.join(TIMEOUT + 10)


def test_a_crash_in_the_client_io_thread_is_engine_lost_naming_the_crash(
    rdir: Path, tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    """A bug in the client's I/O thread is reported (log, and the journal through the
    EngineLost fact's reason) and the batch converges at once, not when a heartbeat
    timeout (10 s here) finally notices nothing arrives any more."""
    host = Host()
    engine = engine_for(rdir, tmp_path, "--workers", "4", heartbeat_timeout=10.0)
    spy = Spy(engine)

    def plant() -> None:
        def boom(event: object) -> None:
            raise RuntimeError("planted fault")

        engine._on_event = boom  # type: ignore[method-assign]  # the next event (a heartbeat)

    summary, applied = _lost_run(host, spy, plates, plant)
    _check_lost(host, spy, summary, applied, 3.0)
    reason = spy.facts.lost()[0][1].reason
    assert "the client I/O thread crashed: RuntimeError: planted fault" in reason
    assert server_pids(rdir) == [], "close() still stopped the server it had started"


def test_only_the_submitting_session_or_the_token_may_cancel_a_submission(
    rdir: Path, tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    facts = Facts()
    with serve(rdir, tmp_path, "--workers", "2"):
        owner = ZmqEngine(rdir, start_server=False)
        other = ZmqEngine(rdir, start_server=False)

        async def scenario() -> None:
            await owner.start(facts)
            await other.start(Facts())
            try:
                await first_event(owner)
                slow = compile_job(plates[0], demo_pipeline(pause_seconds=3.0))
                artifact = await compile_ok(owner, facts, slow, "c0")
                for sid in ("x0", "x1", "x2"):
                    await owner.submit_execution(sid, slow, artifact)
                await facts.wait("x0", ExecutionStarted)
                await facts.wait("x1", ExecutionStarted)
                record = owner.record
                assert record is not None
                target = WireSubmission(plate_id=slow.plate_id, phase="execute", submission_id="x0")
                refused = raw_call(
                    record, CancelRequest(id="r1", submission=target, session="s" * 32)
                )
                assert not refused.ok
                assert "belongs to another session" in refused.error
                anonymous = raw_call(record, CancelRequest(id="r2", submission=target))
                assert not anonymous.ok
                await other.cancel(Submission(slow.plate_id, "execute", "x0"))  # refused too
                wrong_token = CancelRequest(id="r3", submission=target, token="x")
                assert "belongs to another session" in raw_call(record, wrong_token).error
                await owner.cancel(Submission(slow.plate_id, "execute", "x1"))  # its own
                await facts.wait("x1", ExecutionCancelled)
                token = rundir.read_token(rdir)
                third = WireSubmission(plate_id=slow.plate_id, phase="execute", submission_id="x2")
                assert raw_call(record, CancelRequest(id="r4", submission=third, token=token)).ok
                await facts.wait("x2", ExecutionCancelled)
                await facts.wait("x0", ExecutionSucceeded)
            finally:
                await other.close()
                await owner.close()

        run(scenario())
    assert facts.kinds("x0")[-1] == "execution_succeeded", "neither stranger stopped it"
    assert "execution_cancelled" not in facts.kinds("x0")


def test_a_duplicate_submission_id_is_refused_to_its_sender_and_its_owner_hears_nothing(
    rdir: Path, tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    """Before, the server's pool rejected the duplicate with a *broadcast* rejected
    fact, which the submission's real owner took as the end of its own submission."""
    facts = Facts()
    with serve(rdir, tmp_path, "--workers", "2"):
        owner = ZmqEngine(rdir, start_server=False)

        async def scenario() -> None:
            await owner.start(facts)
            try:
                await first_event(owner)
                slow = compile_job(plates[0], demo_pipeline(pause_seconds=1.0))
                artifact = await compile_ok(owner, facts, slow, "c0")
                await owner.submit_execution("x0", slow, artifact)
                await facts.wait("x0", ExecutionStarted)
                record = owner.record
                assert record is not None
                again = ExecuteRequest(
                    id="d1", session="d" * 32, execution_id="x0", job=slow, artifact_id=artifact
                )
                reply = raw_call(record, again)
                assert not reply.ok
                assert "duplicate submission" in reply.error
                compile_again = CompileRequest(id="d2", session="d" * 32, job_id="c0", job=slow)
                assert "duplicate submission" in raw_call(record, compile_again).error
                await facts.wait("x0", ExecutionSucceeded)
            finally:
                await owner.close()

        run(scenario())
    assert "execution_rejected" not in facts.kinds("x0")
    assert "compile_rejected" not in facts.kinds("c0")
    assert facts.kinds("x0")[-1] == "execution_succeeded"


def test_a_fault_answering_one_request_fails_that_request_only(plateflow_server: Any) -> None:
    """On a server in this process, so a fault can be planted in it."""
    server = plateflow_server.server
    record = server.record
    handle = server._handle

    def faulty(request: Any) -> Reply:
        if request.id == "doomed":
            raise RuntimeError("planted fault")
        reply: Reply = handle(request)
        return reply

    server._handle = faulty
    reply = raw_call(record, PingRequest(id="doomed"))
    assert (reply.ok, reply.id) == (False, "doomed")
    assert reply.error == "internal server error: RuntimeError: planted fault"
    assert raw_call(record, PingRequest(id="next")).ok
    assert plateflow_server.running


def test_the_server_loop_survives_a_fault_and_stops_saying_why_when_it_keeps_failing(
    plateflow_server: Any,
) -> None:
    server = plateflow_server.server
    record = server.record
    on_message = server._on_message
    faults = {"left": 3}

    def flaky(frames: list[bytes]) -> None:
        if faults["left"] > 0:
            faults["left"] -= 1
            raise RuntimeError("planted fault")
        on_message(frames)

    server._on_message = flaky
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(record.control)
        for n in range(3):  # each one lost to a fault that ends its turn of the loop
            dealer.send(encode(PingRequest(id=f"lost-{n}")))
        dealer.send(encode(PingRequest(id="after")))
        assert dealer.poll(int(TIMEOUT * 1000))
        # Replies leave in request order: the first one is "after", so none of the
        # three lost requests was answered, and the loop served the next one.
        assert decode_reply(dealer.recv()).id == "after"
        assert faults["left"] == 0
    finally:
        dealer.close(0)
        context.term()
    assert plateflow_server.running

    facts = Facts()
    engine = plateflow_server.engine(heartbeat_timeout=10.0)

    def broken(*args: Any) -> None:
        raise RuntimeError("planted for good")

    async def scenario() -> None:
        await engine.start(facts)
        try:
            await first_event(engine)
            with listening(plateflow_server.runtime_dir) as heard:
                server._turn = broken  # every turn from now on
                await until(lambda: bool(facts.lost()), "EngineLost")
            (lost,) = facts.lost()
            assert "stopped: crashed: the server loop failed 50 times in a row" in lost[1].reason
            assert "RuntimeError: planted for good" in lost[1].reason
            assert isinstance(heard[-1], StoppingEvent)
        finally:
            await engine.close()

    run(scenario())
    deadline = time.monotonic() + TIMEOUT
    while plateflow_server.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not plateflow_server.running, "the server gave up and stopped"


HOSTILE_FRAMES = [
    b'{"v":' + b"1" * 5000 + b"}",
    b"[" * 100_000,
    b'{"a":' * 50_000,
    b'{"v":3,"id":"\\ud800","type":"reply","ok":true}',
    b'\xef\xbb\xbf{"v":3,"id":"x","type":"reply","ok":true}',
    '{"v":3,"id":"x","type":"reply","ok":true}'.encode("utf-16"),
    b'{"v":3,"server_id":"fake-one","seq":1,"type":"heartbeat","interval":NaN}',
    b"\xff\xfe\x00",
    b"",
]


def test_hostile_events_and_replies_are_dropped_and_counted_and_nothing_stops(
    rdir: Path,
) -> None:
    """The client's event and reply paths survive any frame a (broken) server sends."""

    async def body(fake: FakeServer, engine: ZmqEngine, facts: Facts) -> None:
        await first_event(engine)
        for frame in HOSTILE_FRAMES:
            fake.publish_raw(frame)
        fake.garbage = HOSTILE_FRAMES
        fake.status_facts["x"] = ExecutionSucceeded(plate_id="p", execution_id="x")
        answer = await engine.status([Submission("p", "execute", "x")])
        assert [f.kind for f in answer] == ["execution_succeeded"]
        fake.publish(ExecutionStarted(plate_id="p", execution_id="y"))
        await facts.wait("y", ExecutionStarted)
        # One malformed count per hostile event and per hostile reply frame.
        await until(lambda: engine.statistics().malformed >= 2 * len(HOSTILE_FRAMES), "every frame")
        assert engine.statistics().broken is None
        assert facts.lost() == []

    facts = fake_run(rdir, body)
    assert [f.kind for f in facts.all] == ["execution_started"]


def test_text_that_is_not_unicode_crosses_the_wire_visibly_and_a_result_of_it_fails_clearly(
    rdir: Path, tmp_path: Path, plates: list[GeneratedPlate], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step's error or progress naming a file whose name is not UTF-8 holds a lone
    surrogate. Before, such a fact could not be encoded: the server dropped it (the
    plate waited) and a journal of it could not be read back. Now the text shows a
    visible escape, and a *result* holding one fails its plate saying why."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    )
    host = Host()
    engine = engine_for(rdir, tmp_path, "--workers", "3", "--allow", "steps_for_tests")
    wanted = {"error": plates[0], "progress": plates[1], "result": plates[2]}

    def selected(what: str) -> Plate:
        step = StepSpec(function="steps_for_tests:undecodable", params={"what": what})
        pipeline = PipelineSpec(name=what, steps=(step,))
        return Plate(wanted[what].plate_id, str(wanted[what].path), pipeline=pipeline)

    journals: list[Journal] = []

    async def scenario() -> BatchSummary:
        service = BatchWorkflowService(host, engine, status_interval=0.2)
        try:
            return await service.run_plates(
                [selected(what) for what in wanted], pipeline=demo_pipeline()
            )
        finally:
            if service.batch is not None:
                journals.append(service.batch.journal)
            await service.close()

    summary = run(scenario())
    outcome = {s.plate_id: (s.outcome, s.reason) for s in summary.plates}
    assert outcome == {
        plates[0].plate_id: (PlateOutcome.FAILED, Reason.EXECUTION_FAILED),
        plates[1].plate_id: (PlateOutcome.COMPLETED, Reason.SUCCEEDED),
        plates[2].plate_id: (PlateOutcome.FAILED, Reason.EXECUTION_FAILED),
    }
    errors = {
        plate: str(result.get("error"))
        for plate, _, result in host.completed
        if isinstance(result, dict)
    }
    assert "no such file: plate-\\udcff.csv" in errors[plates[0].plate_id]
    assert "cannot carry" in errors[plates[2].plate_id]
    assert "lone surrogate" in errors[plates[2].plate_id]
    progress = [r.fact.message for r in journals[0] if isinstance(r.fact, ExecutionProgress)]
    assert "reading plate-\\udcff.csv" in progress
    saved = tmp_path / "journal.jsonl"
    journals[0].save(saved)
    assert len(Journal.load(saved)) == len(journals[0]), "the journal reads back whole"
