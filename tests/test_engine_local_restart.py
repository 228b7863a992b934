"""The local engine across a crash of its host: real processes, a real SIGKILL (issue #12).

A test starts a *host*: a Python subprocess running ``HOST_SCRIPT``, which
starts a LocalEngine, compiles one pipeline, submits executions and prints
every fact it gets as a JSON line. The test kills it with SIGKILL, so no
Python code of it runs after that, and then checks what became of the
processes it owned and, with a ledger, what a new engine in this process
recovers from it.

The work is ``steps_for_tests.gated_mark``: per plate it waits for a gate file the
test creates, then appends one line to the plate's marks file. So the test
decides which plates finish before the crash and which are running at it,
and the marks files count how often each plate's work ran.

Every wait is bounded: the host's output and the new engine's facts are
gathered under a condition and waited for with a timeout, and a process's
end is waited for on its pidfd. Every process a test starts is stopped by
the test: the host by SIGKILL, and its descendants (listed with their start
times while the host lives, so a reused pid is never signalled) by SIGKILL
on the way out if they are still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import spec
from plateflow.core.facts import (
    CompileSucceeded,
    ExecutionCancelled,
    ExecutionFailed,
    ExecutionProgress,
    ExecutionStarted,
    ExecutionSucceeded,
    Fact,
    fact_adapter,
)
from plateflow.engines._ledger import Ledger, process_start
from plateflow.engines.base import TERMINAL_FACTS, EngineError, Submission, submission_key
from plateflow.engines.local import LocalEngine
from plateflow.errors import UsageError
from plateflow.jobs import CompileJob
from plateflow.pipeline.spec import PipelineSpec

TESTS = Path(__file__).parent
ALLOWED = ("steps_for_tests",)
TIMEOUT = 20.0
GONE_BOUND = 2.0
"""Seconds from a host's SIGKILL until every process it started has ended (no step to finish)."""

HOST_SCRIPT = """
import asyncio, json, os, sys, threading

from plateflow.core.facts import CompileSucceeded, fact_adapter
from plateflow.engines.local import LocalEngine
from plateflow.jobs import CompileJob
from plateflow.pipeline.spec import PipelineSpec


def main():
    config = json.loads(sys.argv[1])
    failsafe = threading.Timer(120, os._exit, (3,))  # outlive no test that lost track of us
    failsafe.daemon = True
    failsafe.start()
    lock = threading.Lock()
    compiled = threading.Event()
    artifacts = []

    def say(line):
        with lock:
            sys.stdout.write(line + "\\n")
            sys.stdout.flush()

    def sink(fact):
        if isinstance(fact, CompileSucceeded):
            artifacts.append(fact.artifact_id)
            compiled.set()
        say(fact_adapter.dump_json(fact).decode())

    async def run():
        engine = LocalEngine(
            allowed_modules=("steps_for_tests",),
            max_workers=config["workers"],
            output_dir=config["out"],
            ledger_dir=config["ledger"],
            mp_context=config["mp"],
        )
        await engine.start(sink)
        say(json.dumps({"identity": engine.identity()}))
        pipeline = PipelineSpec.model_validate(config["pipeline"])
        job = lambda plate: CompileJob(plate_id=plate, plate_path="/p/" + plate, pipeline=pipeline)
        await engine.submit_compile("c", job("compile"))
        await asyncio.to_thread(compiled.wait, 30)
        for plate in config["plates"]:
            await engine.submit_execution(plate + ".x", job(plate), artifacts[0])
        await asyncio.to_thread(sys.stdin.read)  # until the test closes our stdin
        await engine.close()

    asyncio.run(run())


if __name__ == "__main__":
    main()
"""


# --- helpers ---------------------------------------------------------------------


def _sid(fact: Fact) -> str | None:
    key = submission_key(fact)
    return None if key is None else key[1]


def content(fact: Fact) -> dict[str, Any]:
    """What a fact says, without its stimulus id and time (a repeat report has new ones)."""
    said: dict[str, Any] = fact_adapter.dump_python(fact, mode="json")
    del said["stimulus_id"], said["observed_at"]
    return said


class Facts:
    """A sink that keeps every fact, and lets a test wait for a condition on them."""

    def __init__(self) -> None:
        self._facts: list[Fact] = []
        self._cond = threading.Condition()

    def __call__(self, fact: Fact) -> None:
        with self._cond:
            self._facts.append(fact)
            self._cond.notify_all()

    @property
    def all(self) -> list[Fact]:
        with self._cond:
            return list(self._facts)

    def wait_for(self, predicate: Callable[[list[Fact]], bool], what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self._facts), TIMEOUT):
                raise AssertionError(f"timed out waiting for {what}; facts: {self._facts}")

    def terminals(self, sid: str) -> list[Fact]:
        return [f for f in self.all if _sid(f) == sid and isinstance(f, TERMINAL_FACTS)]

    def terminal(self, sid: str) -> Fact:
        self.wait_for(
            lambda fs: any(_sid(f) == sid for f in fs if isinstance(f, TERMINAL_FACTS)), sid
        )
        (fact,) = self.terminals(sid)
        return fact

    def pids(self, *sids: str) -> dict[str, int]:
        """The pid each waiting ``gated_mark`` step announced, once all have."""

        def announced(facts: list[Fact]) -> dict[str, int]:
            return {
                f.execution_id: int(f.message.removeprefix("pid="))
                for f in facts
                if isinstance(f, ExecutionProgress) and f.message.startswith("pid=")
            }

        self.wait_for(lambda fs: set(sids) <= set(announced(fs)), f"{sids} to announce pids")
        found = announced(self.all)
        return {sid: found[sid] for sid in sids}


def descendants(root: int) -> dict[int, str]:
    """Every living process below ``root``, with its start time (to never signal a reused pid)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_bytes()
                parents[int(entry)] = int(stat[stat.rfind(b")") + 2 :].split()[1])
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            start = process_start(pid)
            if ppid == parent and start is not None and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def alive(processes: dict[int, str]) -> set[int]:
    return {pid for pid, start in processes.items() if process_start(pid) == start}


def wait_gone(processes: dict[int, str], timeout: float) -> float:
    """Wait (on pidfds) until every one of ``processes`` has ended; the time it took."""
    began = time.monotonic()
    fds: dict[int, int] = {}
    try:
        for pid, start in processes.items():
            with contextlib.suppress(ProcessLookupError):
                fd = os.pidfd_open(pid)
                if process_start(pid) == start:
                    fds[fd] = pid
                else:
                    os.close(fd)
        while fds:
            left = began + timeout - time.monotonic()
            ready, _, _ = select.select(list(fds), [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"still running after {timeout} s: {sorted(fds.values())}")
            for fd in ready:
                del fds[fd]
                os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)
    return time.monotonic() - began


def kill_all(processes: dict[int, str]) -> None:
    for pid in alive(processes):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Host:
    """A host process running ``HOST_SCRIPT``, its facts, and every process it started."""

    def __init__(
        self,
        folder: Path,
        plates: list[str],
        *,
        ledger: Path | None,
        mp: str = "forkserver",
        workers: int = 2,
        pause: float = 0.0,
    ) -> None:
        self.marks = folder / "marks"
        self.marks.mkdir(exist_ok=True)
        script = folder / "host.py"
        script.write_text(HOST_SCRIPT)
        pipeline = spec(("gated_mark", {"folder": str(self.marks), "pause": pause}))
        config = {
            "workers": workers,
            "out": str(folder / "out"),
            "ledger": None if ledger is None else str(ledger),
            "mp": mp,
            "pipeline": pipeline.model_dump(mode="json"),
            "plates": plates,
        }
        self.pipeline = pipeline
        self.facts = Facts()
        self.identity: dict[str, Any] | None = None
        self.started: dict[int, str] = {}
        self.commands: dict[int, bytes] = {}
        self.killed_at = 0.0
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
        )
        self.process = subprocess.Popen(
            [sys.executable, str(script), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=folder,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            document = json.loads(line)
            if "identity" in document:
                self.identity = document["identity"]
            else:
                self.facts(fact_adapter.validate_python(document))

    def open_gates(self, plates: list[str]) -> None:
        for plate in plates:
            (self.marks / f"{plate}.go").touch()

    def marks_of(self, plate: str) -> list[str]:
        path = self.marks / f"{plate}.marks"
        return path.read_text().splitlines() if path.exists() else []

    def crash(self) -> dict[int, str]:
        """SIGKILL the host; every process it had started (forkserver, tracker, workers)."""
        self.started = descendants(self.process.pid)
        for pid in self.started:
            with contextlib.suppress(OSError):
                self.commands[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
        self.killed_at = time.monotonic()
        self.process.kill()
        self.process.wait(TIMEOUT)
        return dict(self.started)  # (its output ends when they do: they hold its stdout)

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.started.update(descendants(self.process.pid))
            self.process.kill()
            self.process.wait(TIMEOUT)
        kill_all(self.started)
        assert self.process.stdin is not None
        self.process.stdin.close()
        self._reader.join(TIMEOUT)
        assert self.process.stdout is not None
        self.process.stdout.close()


def job(plate: str, pipeline: PipelineSpec) -> CompileJob:
    return CompileJob(plate_id=plate, plate_path=f"/p/{plate}", pipeline=pipeline)


def executions(plates: list[str]) -> list[Submission]:
    return [Submission(plate, "execute", f"{plate}.x") for plate in plates]


COMPILE = Submission("compile", "compile", "c")


def new_engine(folder: Path, **options: Any) -> LocalEngine:
    return LocalEngine(allowed_modules=ALLOWED, output_dir=str(folder / "out2"), **options)


@pytest.fixture(autouse=True)
def no_children_left() -> Iterator[None]:
    yield
    assert multiprocessing.active_children() == []


# --- without a ledger ------------------------------------------------------------


@pytest.mark.parametrize("mp", ["forkserver", "spawn"])
def test_without_a_ledger_every_process_ends_at_once_with_its_host(tmp_path: Path, mp: str) -> None:
    with Host(tmp_path, ["p0", "p1"], ledger=None, mp=mp) as host:
        workers = host.facts.pids("p0.x", "p1.x")  # both steps are running (their gates closed)
        started = host.crash()
        assert set(workers.values()) <= set(started)
        if mp == "forkserver":
            assert any(b"forkserver" in command for command in host.commands.values())
        took = wait_gone(started, GONE_BOUND)  # worker, fork server, resource tracker: all
        assert took < GONE_BOUND
        assert host.marks_of("p0") == host.marks_of("p1") == []  # nobody finished the work


# --- with a ledger: crash, adopt, recover ----------------------------------------


@pytest.mark.parametrize("mp", ["forkserver", "spawn"])
def test_a_crashed_hosts_batch_is_recovered_and_every_plate_runs_once(
    tmp_path: Path, mp: str
) -> None:
    plates = [f"p{i}" for i in range(8)]
    ledger = tmp_path / "ledger"
    facts = Facts()
    with Host(tmp_path, plates, ledger=ledger, mp=mp) as host:
        host.open_gates(plates[:3])  # p0-p2 finish, p3 and p4 hold, p5-p7 wait in the queue
        before = {f"{p}.x": host.facts.terminal(f"{p}.x") for p in plates[:3]}
        orphans = host.facts.pids("p3.x", "p4.x")
        started = host.crash()
        assert set(orphans.values()) <= alive(started)  # the busy workers finish their step
        assert host.identity == {"ledger_dir": str(ledger)}

        async def main() -> None:
            engine = new_engine(tmp_path)
            engine.adopt(host.identity or {})
            await engine.start(facts)
            try:
                recovered = await engine.recover([COMPILE, *executions(plates)])
                by_sid = {_sid(f): f for f in recovered.facts}
                assert isinstance(by_sid["c"], CompileSucceeded)
                for sid, fact in before.items():  # known from the ledger, as the host heard it
                    assert isinstance(fact, ExecutionSucceeded)
                    assert content(by_sid[sid]) == content(fact)
                assert type(by_sid["p3.x"]) is type(by_sid["p4.x"]) is ExecutionStarted
                assert {s.submission_id for s in recovered.unknown} == {"p5.x", "p6.x", "p7.x"}
                assert recovered.never_ran == {"p5.x", "p6.x", "p7.x"}
                (status,) = await engine.status(executions(["p3"]))
                assert content(status) == content(by_sid["p3.x"])

                host.open_gates(plates)  # the orphans finish and record; the engine pushes that
                for sid, pid in orphans.items():
                    fact = facts.terminal(sid)
                    assert isinstance(fact, ExecutionSucceeded)
                    assert fact.result["pid"] == pid
                # Then they exit, and the fork server and resource tracker they kept alive too.
                wait_gone(started, GONE_BOUND)
                assert all(host.marks_of(p) == [] for p in plates[5:])  # nobody started them

                # Compiled by the dead engine: this one finds it in the ledger.
                artifact = _artifact(host)
                for submission in recovered.unknown:
                    plate, sid = submission.plate_id, submission.submission_id
                    await engine.submit_execution(sid, job(plate, host.pipeline), artifact)
                for submission in recovered.unknown:
                    assert isinstance(facts.terminal(submission.submission_id), ExecutionSucceeded)
            finally:
                await engine.close()

        asyncio.run(main())
        for plate in plates:
            assert len(host.marks_of(plate)) == 1, plate  # no work lost, none ran twice
            pushed = facts.terminals(f"{plate}.x")
            assert len(pushed) == (0 if plate in plates[:3] else 1), (plate, pushed)
        assert not (ledger / "runs").exists()  # a normal close tidies the ledger


def test_a_host_killed_at_any_moment_loses_no_plate_and_runs_none_twice(tmp_path: Path) -> None:
    plates = [f"p{i:02}" for i in range(16)]
    ledger = tmp_path / "ledger"
    facts = Facts()
    with Host(tmp_path, plates, ledger=ledger, pause=0.05) as host:
        host.open_gates(plates)
        host.facts.wait_for(
            lambda fs: sum(isinstance(f, ExecutionSucceeded) for f in fs) >= 3, "three plates"
        )
        started = host.crash()
        heard = {_sid(f): f for f in host.facts.all if isinstance(f, TERMINAL_FACTS)}

        async def main() -> None:
            engine = new_engine(tmp_path)
            engine.adopt(host.identity or {})
            await engine.start(facts)
            try:
                recovered = await engine.recover(executions(plates))
                known = {_sid(f): f for f in recovered.facts}
                assert len(known) + len(recovered.unknown) == len(plates)
                assert recovered.never_ran == {s.submission_id for s in recovered.unknown}
                for sid, fact in heard.items():
                    if sid != "c":
                        assert content(known[sid]) == content(fact)
                running = [
                    f.execution_id for f in known.values() if isinstance(f, ExecutionStarted)
                ]
                for sid in running:
                    assert isinstance(facts.terminal(sid), ExecutionSucceeded)
                wait_gone(started, TIMEOUT)
                for submission in recovered.unknown:
                    plate, sid = submission.plate_id, submission.submission_id
                    await engine.submit_execution(sid, job(plate, host.pipeline), _artifact(host))
                for submission in recovered.unknown:
                    assert isinstance(facts.terminal(submission.submission_id), ExecutionSucceeded)
                for submission in executions(plates):  # one terminal fact each, all told
                    sid = submission.submission_id
                    told = [f for f in recovered.facts if _sid(f) == sid]
                    told = [f for f in told if isinstance(f, TERMINAL_FACTS)] + facts.terminals(sid)
                    assert len(told) == 1, (sid, told)
            finally:
                await engine.close()

        asyncio.run(main())
        assert [p for p in plates if len(host.marks_of(p)) != 1] == []


def _artifact(host: Host) -> str:
    (fact,) = [f for f in host.facts.all if isinstance(f, CompileSucceeded)]
    return fact.artifact_id


def test_cancelling_an_adopted_submission_kills_the_dead_hosts_worker(tmp_path: Path) -> None:
    facts = Facts()
    with Host(tmp_path, ["p0"], ledger=tmp_path / "ledger", workers=1) as host:
        (orphan,) = host.facts.pids("p0.x").values()
        started = host.crash()

        async def main() -> None:
            engine = new_engine(tmp_path)
            engine.adopt(host.identity or {})
            await engine.start(facts)
            try:
                (fact,) = (await engine.recover(executions(["p0"]))).facts
                assert isinstance(fact, ExecutionStarted)
                assert (await engine.server_info())["adopted_running"] == 1
                await engine.cancel(Submission("p0", "execute", "p0.x"))
                assert isinstance(facts.terminal("p0.x"), ExecutionCancelled)
                assert orphan not in alive(started)
                (status,) = await engine.status(executions(["p0"]))
                assert isinstance(status, ExecutionCancelled)
            finally:
                await engine.close()

        asyncio.run(main())
        wait_gone(started, GONE_BOUND)
        assert host.marks_of("p0") == []


# --- pid reuse, adopt errors, a tidy ledger ------------------------------------------


def _crashed_ledger(folder: Path) -> Path:
    """A ledger as an engine that died leaves it (the layout docs/engines.md describes)."""
    ledger = folder / "ledger"
    (ledger / "runs").mkdir(parents=True)
    (ledger / "artifacts").mkdir()
    owner = {"token": "dead", "pid": 1, "state": "open", "at": 0}
    (ledger / "owner.json").write_text(json.dumps(owner))
    return ledger


def _claim(ledger: Path, plate: str, pid: int, pid_start: str) -> None:
    sid = f"{plate}.x"
    name = "x-" + hashlib.sha256(sid.encode()).hexdigest()[:40] + ".start"
    record = {"phase": "execute", "submission_id": sid, "plate_id": plate, "pid": pid}
    record.update(pid_start=pid_start, token="dead", at=0)
    (ledger / "runs" / name).write_text(json.dumps(record))


def test_a_pid_that_now_names_another_process_is_never_taken_for_the_worker(
    tmp_path: Path,
) -> None:
    ledger = _crashed_ledger(tmp_path)
    stand_in = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    facts = Facts()
    try:
        start = process_start(stand_in.pid)
        assert start is not None
        _claim(ledger, "reused", stand_in.pid, str(int(start) + 1))  # same pid, other process
        _claim(ledger, "same", stand_in.pid, start)  # the very process: stands in for an orphan

        async def main() -> None:
            engine = new_engine(tmp_path)
            engine.adopt({"ledger_dir": str(ledger)})
            await engine.start(facts)
            try:
                recovered = await engine.recover(executions(["reused", "same"]))
                reused, same = recovered.facts
                assert isinstance(reused, ExecutionFailed)
                assert f"its worker (pid {stand_in.pid}) ended without recording" in reused.error
                assert isinstance(same, ExecutionStarted)
                await engine.cancel(Submission("reused", "execute", "reused.x"))
                assert stand_in.poll() is None  # not signalled: its start time does not match
                await engine.cancel(Submission("same", "execute", "same.x"))
                assert isinstance(facts.terminal("same.x"), ExecutionCancelled)
                assert stand_in.wait(TIMEOUT) == -signal.SIGKILL
                assert facts.terminals("reused.x") == []  # settled at recover, pushed once there
            finally:
                await engine.close()

        asyncio.run(main())
    finally:
        if stand_in.poll() is None:
            stand_in.kill()
        stand_in.wait(TIMEOUT)
        assert stand_in.stdin is not None
        stand_in.stdin.close()


def test_adopt_names_what_it_cannot_take_over(tmp_path: Path) -> None:
    plain = new_engine(tmp_path)
    assert plain.identity() == {}
    for identity in ({}, {"address": "ipc:///tmp/x"}, {"ledger_dir": 5}, {"ledger_dir": ""}):
        with pytest.raises(UsageError, match="not a local engine's identity"):
            new_engine(tmp_path).adopt(identity)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"ledger .*missing"):
        new_engine(tmp_path).adopt({"ledger_dir": str(tmp_path / "nowhere")})

    ledger = tmp_path / "ledger"
    facts = Facts()

    async def main() -> None:
        owner = new_engine(tmp_path, ledger_dir=ledger)
        await owner.start(facts)
        try:
            assert owner.identity() == {"ledger_dir": str(ledger)}
            with pytest.raises(UsageError, match="a live engine holds it"):
                new_engine(tmp_path).adopt(owner.identity())
            with pytest.raises(EngineError, match="in use by another engine"):
                await new_engine(tmp_path, ledger_dir=ledger).start(facts)
            with pytest.raises(UsageError, match="before start"):
                owner.adopt(owner.identity())
            pipeline = spec("whoami")
            await owner.submit_compile("c", job("q", pipeline))
            artifact = facts.terminal("c")
            assert isinstance(artifact, CompileSucceeded)
            await owner.submit_execution("q.x", job("q", pipeline), artifact.artifact_id)
            assert isinstance(facts.terminal("q.x"), ExecutionSucceeded)
            assert len(list((ledger / "runs").iterdir())) == 4  # a claim and an outcome each
        finally:
            await owner.close()

    asyncio.run(main())
    assert sorted(p.name for p in ledger.iterdir()) == ["lock", "owner.json"]

    async def after_close() -> None:
        engine = new_engine(tmp_path)
        engine.adopt({"ledger_dir": str(ledger)})
        await engine.start(facts)
        try:
            recovered = await engine.recover(executions(["q"]))
            assert recovered.unknown == tuple(executions(["q"]))
            assert recovered.never_ran == frozenset()  # a closed ledger vouches for nothing
        finally:
            await engine.close()

    asyncio.run(after_close())


def test_a_dead_engines_worker_gives_its_claim_back_to_a_new_owner(tmp_path: Path) -> None:
    """The handshake that makes ``never_ran`` trustworthy, one step at a time."""
    old = Ledger(str(tmp_path / "ledger"))
    assert old.open("old", adopting=False)
    ran, late = Submission("p", "execute", "p.x"), Submission("q", "execute", "q.x")
    assert old.claim(ran, "old", None) == "claimed"
    assert old.claim(ran, "old", None) == "taken"
    old.unlock()  # its process died: the kernel would drop the lock
    new = Ledger(old.path)
    assert new.open("new", adopting=True)  # a crashed ledger: it vouches for what it lacks
    # A worker of the dead engine that took ``q`` off its pipe only now claims it...
    assert old.claim(late, "old", None) == "fenced"
    # ...and gives it back, so the new owner may run it: nothing ran it before.
    assert new.claim_of(late) is None
    assert new.look_up(late) is None
    claim = new.claim_of(ran)
    assert claim is not None
    assert claim.pid == os.getpid()
    new.end("new")
