"""A host SIGKILLed mid-batch on a Dask cluster it does not own; a new process takes over.

The cluster is an in-process ``LocalCluster`` (one worker, threads) owned by the
test: it outlives the host, as a cluster somebody else runs would. The host is
this file run as a script (``python test_engine_dask_restart.py CONFIG``), a real
process that the test SIGKILLs. Like the service, the host writes every fact its
engine pushes, and the engine's identity, to a journal (a JSON line each, before
it does anything else), so the test knows what the dead host knew. The steps
append a line per run to a per-plate marker file, so "ran exactly once" is
checked on disk. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from distributed import LocalCluster

from helpers import engine_job as job
from helpers import spec
from plateflow.core.facts import (
    CompileAccepted,
    CompileFailed,
    CompileSucceeded,
    ExecutionAccepted,
    ExecutionCancelled,
    ExecutionProgress,
    ExecutionStarted,
    ExecutionSucceeded,
    Fact,
)
from plateflow.engines._dask_keep import task_key
from plateflow.engines.base import TERMINAL_FACTS, Submission
from plateflow.engines.dask import DaskEngine
from plateflow.errors import UsageError
from plateflow.pipeline.spec import PipelineSpec, StepSpec
from test_engine_dask import Facts, _sid, run

HERE = Path(__file__).resolve().parent
ALLOWED = ("steps_for_tests",)
TIMEOUT = 30.0
LIVENESS: dict[str, Any] = {"liveness_interval": 0.5, "liveness_timeout": 1.5}
BATCH = "c0ffee00c0de"


# --- helpers ---------------------------------------------------------------------------------


@asynccontextmanager
async def cluster(threads: int) -> AsyncIterator[LocalCluster]:
    """An in-process cluster on the test's loop, owned (and closed) by the test."""
    async with LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=1,
        threads_per_worker=threads,
        processes=False,
        protocol="tcp",  # not inproc://: the host is another process
        host="127.0.0.1",
        asynchronous=True,
        dashboard_address=None,
    ) as made:
        yield made


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Look at the in-process scheduler until ``condition`` holds (it announces none of it)."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def _published(made: LocalCluster) -> dict[Any, Any]:
    """The scheduler's published datasets: name -> {"data": ..., "keys": [what it keeps]}."""
    scheduler = made.scheduler
    assert scheduler is not None
    datasets: dict[Any, Any] = scheduler.extensions["publish"].datasets
    return datasets


def _kept(made: LocalCluster) -> set[Any]:
    """The task keys the published datasets keep alive."""
    return {key for dataset in _published(made).values() for key in dataset["keys"]}


def _clients(made: LocalCluster) -> set[str]:
    """The real clients connected to the scheduler (not its pseudo-clients)."""
    scheduler = made.scheduler
    assert scheduler is not None
    return {
        c
        for c in scheduler.clients
        if c != "fire-and-forget" and not c.startswith(("published-", "variable-", "queue-"))
    }


# --- the host that will be killed --------------------------------------------------------------
#
# Eight plates, on a worker with three threads:
#   done              compiled and executed before the crash: settled in the journal
#   run-a, run-b      executing at the crash, each waiting at its gate
#   victim            executing at the crash, waiting to be cancelled
#   queued-a/b        executions accepted at the crash, waiting for a free thread
#   compiled          compiled before the crash; its execution never submitted
#   compiling         its compile accepted at the crash, waiting for a free thread
# While the host is dead, run-b's gate opens: run-b finishes and a queued plate starts.


def _plans(markers: Path, gates: Path) -> dict[str, PipelineSpec]:
    mark = ("mark", {"directory": str(markers)})

    def gated(gate: str) -> PipelineSpec:
        wait = ("wait_for_file", {"path": str(gates / gate)})
        return spec(mark, wait, ("count", {"n": 3}), "finish")

    return {
        "done": spec(mark, "finish"),
        "run-a": gated("open"),
        "run-b": gated("open-b"),
        "victim": spec(mark, "wait_for_cancel"),
        "queued-a": gated("open"),
        "queued-b": gated("open"),
        "compiled": spec(mark, "finish"),
        "compiling": spec(mark, "finish"),
    }


def _ids(plate: str) -> tuple[str, str]:
    index = list(_plans(Path(), Path())).index(plate)
    return f"{BATCH}.{index}.c", f"{BATCH}.{index}.x"


def _record(fact: Fact) -> dict[str, Any]:
    return {
        "fact": type(fact).__name__,
        "sid": _sid(fact),
        "plate": getattr(fact, "plate_id", None),
        "artifact": getattr(fact, "artifact_id", None),
    }


async def _host(config: dict[str, Any]) -> None:
    """Start a batch on the cluster at ``config["scheduler"]``, say "ready", wait to be killed."""
    journal = open(config["journal"], "a", encoding="utf-8", buffering=1)  # noqa: SIM115
    lock = threading.Lock()

    def write(record: dict[str, Any]) -> None:
        with lock:
            journal.write(json.dumps(record) + "\n")  # a line per write(2): survives SIGKILL

    facts = Facts()

    def sink(fact: Fact) -> None:
        write(_record(fact))
        facts(fact)

    plans = _plans(Path(config["markers"]), Path(config["gates"]))
    engine = DaskEngine(
        config["scheduler"], allowed_modules=ALLOWED, output_dir=config["out"], **LIVENESS
    )
    await engine.start(sink)
    write({"identity": engine.identity()})

    async def compile_(plate: str) -> None:
        await engine.submit_compile(_ids(plate)[0], job(plate, plans[plate]))

    async def execute(plate: str) -> None:
        (artifact,) = [
            f.artifact_id for f in facts.of(_ids(plate)[0]) if isinstance(f, CompileSucceeded)
        ]
        await engine.submit_execution(_ids(plate)[1], job(plate, plans[plate]), artifact)

    def have(kind: type[Fact], plates: list[str], phase: int) -> Callable[[list[Fact]], bool]:
        wanted = {_ids(p)[phase] for p in plates}
        return lambda fs: wanted <= {_sid(f) for f in fs if isinstance(f, kind)}

    first = [p for p in plans if p != "compiling"]
    await asyncio.gather(*(compile_(p) for p in first))
    await facts.wait_for(have(CompileSucceeded, first, 0), "every compile")
    await execute("done")
    await facts.wait_for(have(ExecutionSucceeded, ["done"], 1), "the first plate")
    running = ["run-a", "run-b", "victim"]
    await asyncio.gather(*(execute(p) for p in running))
    await facts.wait_for(have(ExecutionStarted, running, 1), "three running plates")
    await asyncio.gather(*(execute(p) for p in ("queued-a", "queued-b")))
    await compile_("compiling")
    print("ready", flush=True)
    # Killed here: the loop keeps serving the client until then, as a live host's would.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def _read_journal(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    identity: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "identity" in record:
            identity = record["identity"]
        else:
            records.append(record)
    return identity, records


@asynccontextmanager
async def _host_process(config: dict[str, Any], tmp_path: Path) -> AsyncIterator[Any]:
    config_path = tmp_path / "host.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    )
    host = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        str(config_path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        yield host
    finally:
        if host.returncode is None:
            host.kill()
        await asyncio.wait_for(host.wait(), TIMEOUT)


# --- the tests ---------------------------------------------------------------------------------


def test_a_host_killed_mid_batch_is_taken_over_and_every_plate_runs_once(tmp_path: Path) -> None:
    markers, gates, journal = tmp_path / "markers", tmp_path / "gates", tmp_path / "journal"
    markers.mkdir()
    gates.mkdir()
    plans = _plans(markers, gates)
    ghost = Submission("ghost", "execute", f"{BATCH}.9.x")  # never submitted

    async def body() -> None:
        async with cluster(threads=3) as made:
            scheduler = made.scheduler
            assert scheduler is not None
            config = {
                "scheduler": made.scheduler_address,
                "journal": str(journal),
                "markers": str(markers),
                "gates": str(gates),
                "out": str(tmp_path / "out"),
            }
            async with _host_process(config, tmp_path) as host:
                assert host.stdout is not None
                line = await asyncio.wait_for(host.stdout.readline(), TIMEOUT)
                assert line == b"ready\n", line
                host.kill()
                await asyncio.wait_for(host.wait(), TIMEOUT)
            # The scheduler let the dead client go; what it published stayed, and runs on.
            await _until(lambda: not _clients(made), "the scheduler to drop the dead client")
            identity, records = _read_journal(journal)
            assert identity["survives"] is True
            made_ids = {r["sid"]: r["plate"] for r in records if r["fact"].endswith("Accepted")}
            settled = [r for r in records if r["fact"] in {t.__name__ for t in TERMINAL_FACTS}]
            unsettled = [
                Submission(plate, "compile" if sid.endswith(".c") else "execute", sid)
                for sid, plate in made_ids.items()
                if sid not in {r["sid"] for r in settled}
            ]
            assert {s.plate_id for s in unsettled} == set(plans) - {"done", "compiled"}
            # Kept: every unsettled submission, and the artifacts still in use.
            in_use = [p for p in plans if p != "done"]
            assert _kept(made) == {
                task_key(s.phase, s.submission_id, s.plate_id) for s in unsettled
            } | {task_key("compile", _ids(p)[0], p) for p in in_use}
            (gates / "open-b").touch()
            run_b = _ids("run-b")[1]
            await _until(
                lambda: scheduler.tasks[task_key("execute", run_b, "run-b")].state == "memory",
                "run-b to finish while its host is dead",
            )
            # Its thread went to one of the queued plates (Dask picks which).
            await _until(
                lambda: any((markers / p).exists() for p in ("queued-a", "queued-b")),
                "a queued plate to start",
            )
            started = "queued-a" if (markers / "queued-a").exists() else "queued-b"
            waiting = ({"queued-a", "queued-b"} - {started}).pop()

            facts = Facts()
            engine = DaskEngine(
                made.scheduler_address,
                allowed_modules=ALLOWED,
                output_dir=str(tmp_path / "out"),
                **LIVENESS,
            )
            engine.adopt(identity)
            await engine.start(facts)
            try:
                recovered = await engine.recover([*unsettled, ghost])
                assert recovered.unknown == (ghost,)
                assert recovered.never_ran == frozenset()
                where = {_sid(f): type(f) for f in recovered.facts}
                assert where == {
                    _ids("run-a")[1]: ExecutionStarted,
                    run_b: ExecutionSucceeded,
                    _ids("victim")[1]: ExecutionStarted,
                    _ids(started)[1]: ExecutionStarted,
                    _ids(waiting)[1]: ExecutionAccepted,
                    _ids("compiling")[0]: CompileAccepted,
                }
                (finished,) = [f for f in recovered.facts if _sid(f) == run_b]
                assert isinstance(finished, ExecutionSucceeded)
                assert finished.result == {"plate": "run-b", "ok": True}  # fetched
                info = await engine.server_info()
                assert (info["running"], info["queued"]) == (3, 2)

                # Cancel reaches a running execution the dead host submitted.
                victim = _ids("victim")[1]
                await engine.cancel(Submission("victim", "execute", victim))
                assert isinstance(await facts.terminal(victim), ExecutionCancelled)

                # The plate compiled before the crash still has its artifact here.
                (artifact,) = [
                    r["artifact"]
                    for r in records
                    if r["sid"] == _ids("compiled")[0] and r["fact"] == "CompileSucceeded"
                ]
                compiled = _ids("compiled")[1]
                await engine.submit_execution(
                    compiled, job("compiled", plans["compiled"]), artifact
                )

                (gates / "open").touch()
                compiling = _ids("compiling")
                done = await facts.terminal(compiling[0])
                assert isinstance(done, CompileSucceeded), done
                await engine.submit_execution(
                    compiling[1], job("compiling", plans["compiling"]), done.artifact_id
                )
                later = [_ids(p)[1] for p in ("run-a", "queued-a", "queued-b")]
                for sid in [*later, compiled, compiling[1]]:
                    outcome = await facts.terminal(sid)
                    assert isinstance(outcome, ExecutionSucceeded), outcome
                # Progress of adopted executions reaches the new sink.
                assert any(isinstance(f, ExecutionProgress) for f in facts.of(_ids("run-a")[1]))

                # Settled: nothing of the batch stays published, no task stays on the cluster.
                await _until(lambda: not _published(made), "every dataset to be unpublished")
                await _until(lambda: not scheduler.tasks, "the scheduler to forget every task")
            finally:
                await engine.close()
            assert not _published(made)

            # Exactly one terminal fact per submission, across both processes.
            terminals: dict[str, int] = {}
            for sid in [r["sid"] for r in settled] + [
                _sid(f) for f in [*recovered.facts, *facts.all] if isinstance(f, TERMINAL_FACTS)
            ]:
                assert sid is not None
                terminals[sid] = terminals.get(sid, 0) + 1
            everything = {sid for p in plans for sid in _ids(p)}
            assert terminals == dict.fromkeys(everything, 1)

    run(body)
    # And every plate's work ran exactly once, on disk.
    assert {p.name: p.read_text().count("\n") for p in markers.iterdir()} == dict.fromkeys(plans, 1)


def test_a_normal_run_leaves_nothing_published(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gated = spec(("wait_for_file", {"path": str(gate)}), "finish")

    async def body() -> None:
        async with cluster(threads=1) as made:
            facts = Facts()
            engine = DaskEngine(
                made.scheduler_address, allowed_modules=ALLOWED, output_dir=str(tmp_path)
            )
            await engine.start(facts)
            try:
                bad = PipelineSpec(steps=(StepSpec(function="os:system"),))
                await engine.submit_compile("n.2.c", job("bad", bad))
                artifacts = {}
                for plate, pipeline, sid in (("a", gated, "n.0.c"), ("b", spec("finish"), "n.1.c")):
                    await engine.submit_compile(sid, job(plate, pipeline))
                    done = await facts.terminal(sid)
                    assert isinstance(done, CompileSucceeded), done
                    artifacts[plate] = done.artifact_id
                assert isinstance(await facts.terminal("n.2.c"), CompileFailed)
                await engine.submit_execution("n.0.x", job("a", gated), artifacts["a"])
                await facts.wait_for(
                    lambda fs: any(isinstance(f, ExecutionStarted) for f in fs), "a running"
                )
                await engine.submit_execution("n.1.x", job("b", spec("finish")), artifacts["b"])
                # Pending work is published, under the engine's namespace.
                namespace = engine.identity()["namespace"]
                assert isinstance(namespace, str)
                names = list(_published(made))
                assert len(names) == 1
                assert names[0].startswith(f"{namespace}/")
                assert _kept(made) == {
                    task_key("compile", "n.0.c", "a"),
                    task_key("compile", "n.1.c", "b"),
                    task_key("execute", "n.0.x", "a"),
                    task_key("execute", "n.1.x", "b"),
                }
                # A queued execution is still cancelled (nobody else wants its key).
                await engine.cancel(Submission("b", "execute", "n.1.x"))
                assert isinstance(await facts.terminal("n.1.x"), ExecutionCancelled)
                gate.touch()
                assert isinstance(await facts.terminal("n.0.x"), ExecutionSucceeded)
                await _until(lambda: not _published(made), "every dataset to be unpublished")
                # The scheduler keeps a pseudo-client per dataset name for good: the
                # engine reuses its names (a slot holds up to 32 submissions).
                scheduler = made.scheduler
                assert scheduler is not None
                assert [c for c in scheduler.clients if c.startswith("published-")] == [
                    f"published-{name}" for name in names
                ]
            finally:
                await engine.close()
            assert not _published(made)

    run(body)


def test_adopt_refuses_what_it_cannot_take_over(tmp_path: Path) -> None:
    here = DaskEngine("tcp://127.0.0.1:8786", output_dir=str(tmp_path))
    good = {
        "engine": "dask",
        "scheduler": "tcp://127.0.0.1:8786",
        "namespace": "plateflow-0123456789ab",
        "survives": True,
    }
    with pytest.raises(UsageError, match="not the identity of a dask engine"):
        here.adopt({})
    with pytest.raises(UsageError, match="not the identity of a dask engine"):
        here.adopt({"engine": "zmq", "server": "tcp://127.0.0.1:5555"})
    with pytest.raises(UsageError, match="namespace"):
        here.adopt({**good, "namespace": "../../etc"})
    with pytest.raises(UsageError, match=r"not on this engine's tcp://127\.0\.0\.1:8786"):
        here.adopt({**good, "scheduler": "tcp://10.0.0.5:8786"})
    with pytest.raises(UsageError, match="LocalCluster of its own"):
        DaskEngine(output_dir=str(tmp_path)).adopt(good)
    here.adopt({**good, "scheduler": "127.0.0.1:8786"})  # the same address, spelt without tcp://

    async def body() -> None:
        facts = Facts()
        # An engine that starts its own cluster says nothing survives it.
        own = DaskEngine(n_workers=1, processes=False, output_dir=str(tmp_path))
        await own.start(facts)
        try:
            identity = own.identity()
            assert identity["survives"] is False
            assert identity["scheduler"] == own.scheduler_address
            with pytest.raises(UsageError, match="before start"):
                own.adopt(identity)
        finally:
            await own.close()
        # Adopting such an identity is accepted and finds nothing.
        async with cluster(threads=1) as made:
            later = DaskEngine(made.scheduler_address, output_dir=str(tmp_path))
            later.adopt(identity)
            await later.start(facts)
            try:
                lost = [Submission("p", "execute", "b.0.x"), Submission("q", "compile", "b.1.c")]
                recovered = await later.recover(lost)
                assert recovered.facts == ()
                assert recovered.unknown == tuple(lost)
                assert recovered.never_ran == frozenset()
            finally:
                await later.close()

    run(body)


if __name__ == "__main__":
    asyncio.run(_host(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))))
