"""Every server has an owner, and lost means stopped: leases on the ZeroMQ server.

Real ``plateflow serve`` processes on IPC sockets in short private runtime dirs.
The plates run ``steps_for_tests:tick_until_cancelled``, which appends the time
to ``<plate id>.ticks`` every 50 ms until cancelled: while that file grows, the
plate's work is running. Every wait polls a condition with a deadline; every
process a test starts is stopped by it (``Processes``), and the ``rdir``
fixture kills and reports any server or worker still alive. Servers register in
a registry dir of the test's own (``$PLATEFLOW_RUNTIME_DIR``), so ``plateflow
status`` sees only this test's servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import JsonValue

from plateflow.batchfile import (
    BatchFile,
    PipelineSection,
    PlateEntry,
    StepEntry,
    ZmqEngineSettings,
    render_batch_file,
)
from plateflow.cli import main
from plateflow.core import BatchState, PlateOutcome, Reason
from plateflow.core.facts import (
    CompileSucceeded,
    EngineLost,
    ExecutionAccepted,
    ExecutionCancelled,
    ExecutionFailed,
    ExecutionStarted,
    ExecutionSucceeded,
    Fact,
)
from plateflow.engines.base import TERMINAL_FACTS, Engine, Submission, submission_key
from plateflow.engines.zmq import rundir, stop_server
from plateflow.engines.zmq.control import ask_info, call
from plateflow.engines.zmq.engine import ZmqEngine
from plateflow.engines.zmq.lease import loss_threshold
from plateflow.engines.zmq.wire import ExecuteRequest, LeaseRequest
from plateflow.errors import UsageError
from plateflow.host import BaseBatchHost
from plateflow.jobs import CompileJob
from plateflow.pipeline.spec import PipelineSpec, StepSpec
from plateflow.service import BatchWorkflowService, Plate
from processes import descendants, kill_quietly, pid_alive, server_pids
from test_zmq_engine import FAST, TESTS_DIR, TIMEOUT, Facts, Spy, run, until

STEPS = ("--allow", "steps_for_tests")
STOPPED_BOUND = 1.0
"""After SIGCONT, a lost plate's work has stopped within this (measured: one loop turn
plus the step's 50 ms tick)."""


# --- helpers -------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def ticks(directory: Path, plate_id: str) -> list[float]:
    try:
        text = (directory / f"{plate_id}.ticks").read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [float(line) for line in text.split("\n")[:-1]]  # the last line may be partial


def wait_still(directory: Path, plate_ids: Sequence[str], quiet: float = 0.5) -> None:
    """Until no plate's ticks file has grown for ``quiet`` seconds (bounded)."""
    sizes: dict[str, int] = {}
    since = time.monotonic()
    deadline = since + TIMEOUT
    while time.monotonic() - since < quiet:
        now = {p: len(ticks(directory, p)) for p in plate_ids}
        if now != sizes:
            sizes, since = now, time.monotonic()
        assert time.monotonic() < deadline, f"the ticks never stopped: {sizes}"
        time.sleep(0.05)


def ticking(directory: Path) -> PipelineSpec:
    step = StepSpec(
        function="steps_for_tests:tick_until_cancelled",
        params={"directory": str(directory), "every": 0.05, "timeout": 120.0},
    )
    return PipelineSpec(name="ticking", steps=(step,))


NOOP = PipelineSpec(name="noop", steps=(StepSpec(function="steps_for_tests:finish"),))


class Processes:
    """Every process a test starts; whatever is still alive at the end is killed."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[Any]] = []
        self.pids: set[int] = set()

    def start(self, args: Sequence[str], log: Path, env: dict[str, str]) -> subprocess.Popen[Any]:
        with log.open("ab") as output:
            process = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.popens.append(process)
        return process

    def stop_all(self) -> None:
        """Stop what is left (continuing stopped ones first), killing what will not stop."""
        for process in self.popens:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
                    process.terminate()
        for process in self.popens:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        kill_quietly({pid for pid in self.pids if pid_alive(pid)})


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Steps importable by servers; a registry of this test's own."""
    registry = Path(tempfile.mkdtemp(prefix="pfl-reg-"))
    monkeypatch.setenv("PLATEFLOW_RUNTIME_DIR", str(registry))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    )
    try:
        yield dict(os.environ)
    finally:
        shutil.rmtree(registry, ignore_errors=True)


@pytest.fixture
def processes() -> Iterator[Processes]:
    tracked = Processes()
    try:
        yield tracked
    finally:
        tracked.stop_all()


@pytest.fixture
def rdir(processes: Processes) -> Iterator[Path]:
    """A fresh, short, private runtime dir; a server or worker left in it is killed and reported."""
    path = Path(tempfile.mkdtemp(prefix="pfl-"))
    try:
        yield path
    finally:
        processes.stop_all()  # what the test started itself, stopped or not
        leftovers = server_pids(path)  # anything else: a server nobody stopped
        workers = {child for pid in leftovers for child in descendants(pid)}
        kill_quietly({*leftovers, *workers})
        shutil.rmtree(path, ignore_errors=True)
        assert not leftovers, f"the test left plateflow servers running: {leftovers}"


def serve(
    processes: Processes, directory: Path, env: dict[str, str], *args: str
) -> subprocess.Popen[Any]:
    """A standalone server (not started by an engine), listening once this returns."""
    process = processes.start(
        [
            sys.executable,
            "-m",
            "plateflow",
            "serve",
            "--runtime-dir",
            str(directory),
            *FAST,
            *STEPS,
            *args,
        ],
        directory / "test-serve.log",
        env,
    )
    wait_until(
        lambda: (
            ((record := rundir.read_record(directory)) is not None and record.pid == process.pid)
            or process.poll() is not None
        ),
        "the server to listen",
    )
    assert process.poll() is None, (directory / "test-serve.log").read_text()
    return process


def plate_file(tmp_path: Path) -> str:
    path = tmp_path / "plate.csv"
    path.write_text("well,role,signal\n", encoding="utf-8")
    return str(path)


async def compiled(engine: Engine, facts: Facts, job: CompileJob, job_id: str) -> str:
    await engine.submit_compile(job_id, job)
    await until(lambda: bool(facts.terminal(job_id)), f"compile {job_id}")
    (done,) = facts.terminal(job_id)
    assert isinstance(done, CompileSucceeded), done
    return done.artifact_id


# --- the loss threshold ---------------------------------------------------------------------


def test_the_loss_threshold_is_a_little_under_the_timeout_but_over_a_heartbeat_pause() -> None:
    assert loss_threshold(3.0, 0.5) == 2.5
    assert loss_threshold(1.0, 0.2) == 0.75
    assert loss_threshold(60.0, 0.5) == 59.5
    assert loss_threshold(0.6, 0.5) == 0.6, "never under 1.5 heartbeat intervals, nor the timeout"


# --- lost means stopped ---------------------------------------------------------------------


def test_a_frozen_server_stops_the_lost_work_on_waking_and_a_new_client_is_served_at_once(
    rdir: Path, tmp_path: Path, env: dict[str, str], processes: Processes
) -> None:
    """SIGSTOP until the client reports the plates failed (engine_lost), then SIGCONT:
    their work stops within one loop turn, instead of holding the workers."""
    marks = tmp_path / "ticks"
    marks.mkdir()
    server = serve(processes, rdir, env, "--workers", "2", "--output-dir", str(tmp_path / "out"))
    processes.pids.update([server.pid])
    path = plate_file(tmp_path)
    spy = Spy(ZmqEngine(rdir, start_server=False, heartbeat_timeout=1.0))
    lost_ids = ["lost-a", "lost-b"]
    stopped: list[float] = []

    async def lose() -> Any:
        service = BatchWorkflowService(BaseBatchHost(), spy, status_interval=0.2)
        try:
            running = asyncio.ensure_future(
                service.run_plates([Plate(p, path) for p in lost_ids], pipeline=ticking(marks))
            )
            await until(lambda: all(len(ticks(marks, p)) >= 3 for p in lost_ids), "both ticking")
            os.kill(server.pid, signal.SIGSTOP)
            stopped.append(time.monotonic())
            return await asyncio.wait_for(running, TIMEOUT)
        finally:
            await service.close()

    try:
        summary = run(lose())
        reported = time.monotonic()
        assert summary.outcome is BatchState.FAILED
        assert {(s.outcome, s.reason) for s in summary.plates} == {
            (PlateOutcome.FAILED, Reason.ENGINE_LOST)
        }
        assert [f for f in spy.facts.all if isinstance(f, EngineLost)], "the client gave up"
        assert reported - stopped[0] < 1.0 + 2.0, "lost within the heartbeat timeout (+ margin)"
        # The workers are not frozen, only the server: the plates' work still runs.
        before = {p: len(ticks(marks, p)) for p in lost_ids}
        wait_until(
            lambda: all(len(ticks(marks, p)) > before[p] + 2 for p in lost_ids),
            "the lost plates still ticking while the server is frozen",
        )
    finally:
        woken = time.time()
        os.kill(server.pid, signal.SIGCONT)
    wait_still(marks, lost_ids)
    late = max(ticks(marks, p)[-1] for p in lost_ids) - woken
    assert late < STOPPED_BOUND, f"a lost plate still ran {late:.3f} s after SIGCONT"
    print(f"\nlast tick of lost work {late * 1000:.0f} ms after SIGCONT")

    executions = {
        f.plate_id: f.execution_id for f in spy.facts.all if isinstance(f, ExecutionAccepted)
    }
    host = BaseBatchHost()
    engine = ZmqEngine(rdir, start_server=False, heartbeat_timeout=1.0)

    async def new_client() -> tuple[Any, float, list[Fact], dict[str, JsonValue]]:
        began = time.monotonic()
        service = BatchWorkflowService(host, engine, status_interval=0.2)
        try:
            done = await service.run_plates(
                [Plate(p, path) for p in ("new-a", "new-b")], pipeline=NOOP
            )
            took = time.monotonic() - began
            asked = [Submission(p, "execute", executions[p]) for p in lost_ids]
            return done, took, await engine.status(asked), await engine.server_info()
        finally:
            await service.close()

    summary, took, answers, info = run(new_client())
    assert summary.outcome is BatchState.COMPLETED
    assert took < 2.0, f"the new client's two no-op plates took {took:.2f} s"
    print(f"a new client's two no-op plates: {took:.2f} s")
    assert [type(f) for f in answers] == [ExecutionFailed, ExecutionFailed], answers
    for answer in answers:
        assert isinstance(answer, ExecutionFailed)
        assert "lease of its session ended" in answer.error
        assert "published nothing for" in answer.error, "the server's own measure, on waking"
    ended = info["leases_ended"]
    assert isinstance(ended, dict)
    # Lost (once by the server's own measure; a renewal the frozen server had queued may
    # take a lease again, which the client's release marked lost then ends).
    assert ended["lost"] in (1, 2), ended
    assert ended["expired"] == ended["released"] == 0, ended
    assert server.poll() is None, "a standalone server stays up"


def test_a_standalone_server_stops_an_expired_sessions_work_and_keeps_a_renewed_ones(
    rdir: Path, tmp_path: Path, env: dict[str, str], processes: Processes
) -> None:
    """A session nobody renews loses its work after the grace (reported failed, not
    cancelled); a session whose client renews keeps it; the server stays up."""
    marks = tmp_path / "ticks"
    marks.mkdir()
    grace = 1.5
    serve(processes, rdir, env, "--workers", "2", "--lease-grace", str(grace))
    record = rundir.read_record(rdir)
    assert record is not None
    facts = Facts()
    engine = ZmqEngine(rdir, start_server=False, heartbeat_timeout=1.0)
    keep = CompileJob(plate_id="keep", plate_path=plate_file(tmp_path), pipeline=ticking(marks))
    drop = CompileJob(plate_id="drop", plate_path=keep.plate_path, pipeline=ticking(marks))
    session = "abandoned-session-0001"

    async def scenario() -> tuple[list[Fact], dict[str, JsonValue]]:
        await engine.start(facts)
        try:
            artifact = await compiled(engine, facts, keep, "c-keep")
            await engine.submit_execution("x-keep", keep, artifact)
            # Another client's session: it takes a lease once, submits, and is never heard again.
            assert call(record, LeaseRequest(id="l1", session=session, loss_timeout=600.0)).ok
            execute = ExecuteRequest(
                id="x1", session=session, execution_id="x-drop", job=drop, artifact_id=artifact
            )
            assert call(record, execute).ok
            await until(lambda: len(ticks(marks, "drop")) >= 2, "the abandoned work ticking")
            dropped = time.monotonic()
            await until(lambda: bool(facts.terminal("x-drop")), "the abandoned work to stop")
            assert time.monotonic() - dropped < grace + 1.0
            count = len(ticks(marks, "keep"))
            await until(lambda: len(ticks(marks, "keep")) > count + 5, "the renewed work ticking")
            assert facts.terminal("x-keep") == [], "renewed: its work goes on"
            answer = await engine.status([Submission("drop", "execute", "x-drop")])
            info = await engine.server_info()
            await engine.cancel(Submission("keep", "execute", "x-keep"))
            await until(lambda: bool(facts.terminal("x-keep")), "the cancel")
            return answer, info
        finally:
            await engine.close()

    answer, info = run(scenario())
    (failed,) = facts.terminal("x-drop")
    assert isinstance(failed, ExecutionFailed), "nobody asked to cancel it: it failed"
    assert "nobody renewed its lease" in failed.error
    assert answer == [dataclasses.replace(failed, stimulus_id=answer[0].stimulus_id)]
    assert answer[0].stimulus_id != failed.stimulus_id, "a new report of the old failure"
    assert [type(f) for f in facts.terminal("x-keep")] == [ExecutionCancelled]
    assert info["leases_ended"] == {"released": 0, "expired": 1, "lost": 0}
    leases = info["leases"]
    assert isinstance(leases, list)
    assert len(leases) == 1
    (lease,) = leases
    assert isinstance(lease, dict)
    assert lease["loss_timeout"] == 1.0
    assert session not in json.dumps(info), "a session is never repeated"
    wait_still(marks, ["drop", "keep"])
    assert rundir.server_alive(rdir), "a standalone server stays up"


# --- every server has an owner ---------------------------------------------------------------


def test_an_owned_server_nobody_leases_exits_after_the_grace_and_status_lists_it_until_then(
    rdir: Path, env: dict[str, str], processes: Processes, capsys: pytest.CaptureFixture[str]
) -> None:
    grace = 1.5
    began = time.monotonic()
    server = serve(processes, rdir, env, "--exit-when-unowned", "--lease-grace", str(grace))
    record = rundir.read_record(rdir)
    assert record is not None
    assert main(["status"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{record.server_id}  pid {server.pid}  {rdir}  leases 0  running 0")
    assert line.endswith("owned")
    assert main(["status", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["server_id"] == record.server_id
    assert row["leases"] == 0
    server.wait(grace + TIMEOUT)
    took = time.monotonic() - began
    assert server.returncode == 0
    assert grace < took < grace + 5.0
    log = (rdir / "test-serve.log").read_text(encoding="utf-8")
    assert "unowned: no client took a lease within the grace" in log
    assert main(["status"]) == 2
    assert "no plateflow server is running" in capsys.readouterr().err
    assert list((Path(env["PLATEFLOW_RUNTIME_DIR"]) / "servers").iterdir()) == []


def test_a_killed_plateflow_run_leaves_no_server_and_no_worker_behind(
    rdir: Path, tmp_path: Path, env: dict[str, str], processes: Processes
) -> None:
    """SIGKILL of ``plateflow run``: the server it started stops the work and exits
    once the lease grace passes; its workers go with it."""
    grace = 2.0
    marks = tmp_path / "ticks"
    marks.mkdir()
    (tmp_path / "plates").mkdir()
    for name in ("p1", "p2"):
        (tmp_path / "plates" / f"{name}.csv").write_text("well\n", encoding="utf-8")
    spec = ticking(marks).steps[0]
    batch = BatchFile(
        name="owner",
        plates=(PlateEntry(glob="plates/*.csv"),),
        pipeline=PipelineSection(steps=(StepEntry(function=spec.function, params=spec.params),)),
        engine=ZmqEngineSettings(
            runtime_dir=str(rdir),
            workers=2,
            allow=("steps_for_tests",),
            lease_grace=grace,
            heartbeat_timeout=1.0,
        ),
    )
    path = tmp_path / "batch.toml"
    path.write_text(render_batch_file(batch), encoding="utf-8")
    owner = processes.start(
        [sys.executable, "-m", "plateflow", "run", str(path), "-q"], tmp_path / "run.log", env
    )
    wait_until(
        lambda: (
            len(list(marks.glob("*.ticks"))) == 2
            and all(len(ticks(marks, p.stem)) >= 2 for p in marks.glob("*.ticks"))
        ),
        "both plates running",
        timeout=60.0,
    )
    record = rundir.read_record(rdir)
    assert record is not None
    info = ask_info(record)
    running = info["running_submissions"]
    assert isinstance(running, list)
    workers = {int(item["pid"]) for item in running if isinstance(item, dict)}  # type: ignore[arg-type]
    assert len(workers) == 2
    doomed = {record.pid, *descendants(record.pid)}
    assert workers <= doomed
    processes.pids.update(doomed)
    assert info["owned"] is True

    os.kill(owner.pid, signal.SIGKILL)
    owner.wait(TIMEOUT)
    killed = time.monotonic()
    wait_until(
        lambda: not any(pid_alive(pid) for pid in doomed),
        "the server and its workers to exit",
        timeout=grace + 5.0,
    )
    took = time.monotonic() - killed
    print(f"\nserver and workers gone {took:.2f} s after SIGKILL of the owner (grace {grace} s)")
    assert took > grace - 0.5, "not before the grace: a resumed host could still adopt the work"
    assert not rundir.server_alive(rdir)
    log = (rdir / "server.log").read_text(encoding="utf-8")
    assert (
        "plateflow serve: stopped: unowned: no client holds a lease any more (the last one " in log
    )
    assert "nobody renewed its lease" in log
    stems = [p.stem for p in marks.glob("*.ticks")]
    wait_still(marks, stems)
    assert list((Path(env["PLATEFLOW_RUNTIME_DIR"]) / "servers").iterdir()) == []


# --- re-attaching: identity, adopt, recover ---------------------------------------------------

FIRST_HOST = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from pathlib import Path

    from plateflow.core.facts import CompileSucceeded, ExecutionSucceeded
    from plateflow.engines.zmq import ZmqEngine
    from plateflow.jobs import CompileJob
    from plateflow.pipeline.spec import PipelineSpec, StepSpec

    rdir, marks, plate, grace = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    tick = StepSpec(function="steps_for_tests:tick_until_cancelled",
                    params={"directory": marks, "every": 0.05, "timeout": 120.0})
    noop = StepSpec(function="steps_for_tests:finish")

    async def main() -> None:
        facts = []
        engine = ZmqEngine(Path(rdir), heartbeat_timeout=1.0, lease_grace=grace,
                           server_args=["--heartbeat", "0.2", "--workers", "2",
                                        "--allow", "steps_for_tests"])
        await engine.start(facts.append)

        async def wait(kind, sid):
            deadline = time.monotonic() + 30
            while not any(isinstance(f, kind) and sid in (getattr(f, "job_id", None),
                          getattr(f, "execution_id", None)) for f in facts):
                assert time.monotonic() < deadline, (kind, sid, facts)
                await asyncio.sleep(0.02)
            return next(f for f in facts if isinstance(f, kind))

        jobs = {}
        for name, step in (("tick", tick), ("noop", noop)):
            job = CompileJob(plate_id=name, plate_path=plate,
                             pipeline=PipelineSpec(name=name, steps=(step,)))
            await engine.submit_compile(f"c-{name}", job)
            done = [f for f in [await wait(CompileSucceeded, f"c-{name}")]][0]
            artifact = next(f.artifact_id for f in facts if isinstance(f, CompileSucceeded)
                            and f.job_id == f"c-{name}")
            jobs[name] = (job, artifact)

        def named(name, plate_id):
            job, artifact = jobs[name]
            return job.model_copy(update={"plate_id": plate_id}), artifact

        await engine.submit_execution("done0", *named("noop", "done0"))
        await wait(ExecutionSucceeded, "done0")
        for sid in ("t0", "t1"):
            await engine.submit_execution(sid, *named("tick", sid))
        for sid in ("q0", "q1"):
            await engine.submit_execution(sid, *named("noop", sid))
        print(json.dumps({"identity": engine.identity(), "server_pid": engine.record.pid}),
              flush=True)
        await asyncio.sleep(120)  # until killed; bounded in any case

    asyncio.run(main())
    """
)


def test_a_host_killed_mid_batch_is_resumed_by_adopting_its_identity_and_recovering(
    rdir: Path, tmp_path: Path, env: dict[str, str], processes: Processes
) -> None:
    """Process 1 starts a server, submits, and is SIGKILLed; this process adopts its
    identity within the lease grace (the work goes on past the grace), recovers where
    every submission is, and gets every submission's terminal fact exactly once.
    Closing then releases the last lease, and the server process 1 started exits."""
    grace = 3.0
    marks = tmp_path / "ticks"
    marks.mkdir()
    script = tmp_path / "first_host.py"
    script.write_text(FIRST_HOST, encoding="utf-8")
    output = tmp_path / "first.out"
    first = processes.start(
        [sys.executable, str(script), str(rdir), str(marks), plate_file(tmp_path), str(grace)],
        output,
        env,
    )
    wait_until(
        lambda: b"identity" in output.read_bytes() or first.poll() is not None,
        "process 1 to submit",
        timeout=60.0,
    )
    server_log = rdir / "server.log"
    assert first.poll() is None, (
        output.read_text(),
        server_log.exists() and server_log.read_text(),
    )
    said = json.loads(output.read_text().splitlines()[-1])
    identity, server_pid = said["identity"], said["server_pid"]
    processes.pids.update({server_pid, *descendants(server_pid)})
    assert set(identity) >= {"runtime_dir", "session", "server_id"}
    assert "token" not in json.dumps(identity)
    assert rundir.read_token(rdir) not in json.dumps(identity)
    wait_until(lambda: len(ticks(marks, "t0")) >= 2 and len(ticks(marks, "t1")) >= 2, "ticking")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(TIMEOUT)
    killed_at = time.time()

    ids = ["done0", "t0", "t1", "q0", "q1"]
    asked = [Submission(sid, "execute", sid) for sid in [*ids, "never-sent"]]
    facts = Facts()
    engine = ZmqEngine(rdir, start_server=False, heartbeat_timeout=1.0)
    engine.adopt(identity)

    async def resume() -> Any:
        await engine.start(facts)
        assert not engine.started_server
        recovered = await engine.recover(asked)
        assert engine.statistics().outstanding == 4
        # Past the grace, the adopted session's work still runs: the lease was renewed.
        await until(lambda: ticks(marks, "t0")[-1:] > [killed_at + grace + 0.5], "past the grace")
        for sid in ("t0", "t1"):
            await engine.cancel(Submission(sid, "execute", sid))  # the adopted session may
        await until(
            lambda: all(facts.terminal(sid) for sid in ids[1:]), "every terminal fact", TIMEOUT
        )
        assert engine.statistics().outstanding == 0
        assert pid_alive(server_pid), "the adopted session holds the lease"
        return recovered

    try:
        recovered = run(resume())
    finally:
        run(engine.close())
    by_id = {getattr(f, "plate_id", None): f for f in recovered.facts}
    assert set(by_id) == set(ids)
    assert isinstance(by_id["done0"], ExecutionSucceeded)
    assert {type(by_id[s]) for s in ("t0", "t1")} == {ExecutionStarted}
    assert {type(by_id[s]) for s in ("q0", "q1")} <= {ExecutionAccepted, ExecutionStarted}
    assert recovered.unknown == (asked[-1],)
    assert recovered.never_ran == frozenset({"never-sent"}), "the very server: it never got it"
    for sid in ids:  # exactly once: the facts before and after, duplicates of one report
        reports: list[Fact] = [f for f in recovered.facts if isinstance(f, TERMINAL_FACTS)]
        reports += facts.terminal(sid)
        mine = {(type(f), f.observed_at) for f in reports if submission_key(f) == ("execute", sid)}
        assert len(mine) == 1, (sid, mine)
    assert {type(facts.terminal(s)[0]) for s in ("t0", "t1")} == {ExecutionCancelled}
    assert {type(facts.terminal(s)[0]) for s in ("q0", "q1")} == {ExecutionSucceeded}
    # The resumed host released the last lease of a server started for its session.
    wait_until(lambda: not pid_alive(server_pid), "the owned server to exit", timeout=10.0)


def test_adopt_checks_the_identity_and_never_ran_needs_the_very_same_server(
    rdir: Path, tmp_path: Path, env: dict[str, str], processes: Processes
) -> None:
    engine = ZmqEngine(rdir, start_server=False)
    good: dict[str, JsonValue] = {
        "engine": "zmq",
        "runtime_dir": str(rdir),
        "session": "s" * 32,
        "server_id": "x",
    }
    cases: list[tuple[dict[str, JsonValue], str]] = [
        ({**good, "engine": "local"}, "not written by a zmq engine"),
        ({}, "not written by a zmq engine"),
        ({**good, "runtime_dir": str(tmp_path)}, "make the engine with runtime_dir="),
        ({**good, "session": "short"}, "no valid session"),
        ({**good, "server_id": 7}, "server_id"),
    ]
    for bad, says in cases:
        with pytest.raises(UsageError, match=says):
            engine.adopt(bad)
    serve(processes, rdir, env)
    record = rundir.read_record(rdir)
    assert record is not None
    unknown = Submission("p", "execute", "never")

    async def recover(server_id: str) -> Any:
        adopter = ZmqEngine(rdir, start_server=False)
        adopter.adopt({**good, "server_id": server_id})
        await adopter.start(Facts())
        try:
            identity = adopter.identity()
            assert identity["session"] == good["session"]
            assert identity["server_id"] == record.server_id
            with pytest.raises(UsageError, match="before start"):
                adopter.adopt(good)
            return await adopter.recover([unknown])
        finally:
            await adopter.close()

    replaced = run(recover("an-older-server"))
    assert replaced.unknown == (unknown,)
    assert replaced.never_ran == frozenset(), "another server may have run it"
    same = run(recover(record.server_id))
    assert same.never_ran == frozenset({"never"})


# --- stopping a server from the command line ----------------------------------------------------


def test_plateflow_stop_stops_a_server_with_its_token_and_says_when_there_is_none(
    rdir: Path, env: dict[str, str], processes: Processes, capsys: pytest.CaptureFixture[str]
) -> None:
    other = Path(tempfile.mkdtemp(prefix="pfl-"))
    try:
        first = serve(processes, rdir, env)
        second = serve(processes, other, env)
        assert main(["status"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[2] for line in lines] == [str(first.pid), str(second.pid)]
        assert main(["stop", "--runtime-dir", str(rdir)]) == 0
        assert "plateflow stop: stopped server" in capsys.readouterr().out
        assert first.wait(TIMEOUT) == 0
        assert main(["stop", "--runtime-dir", str(rdir)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"plateflow: error: no plateflow server is running in {rdir}")
        stopped = stop_server(other)
        assert stopped is not None
        assert stopped.pid == second.pid
        assert second.wait(TIMEOUT) == 0
        assert stop_server(other) is None
        assert main(["status"]) == 2
    finally:
        leftovers = server_pids(other)
        kill_quietly(leftovers)
        shutil.rmtree(other, ignore_errors=True)
        assert not leftovers
