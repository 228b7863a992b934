"""Resume: a batch taken over from its journal file by a new service after a "crash".

The engine here keeps its work in a ``World`` that outlives the service, the way
a server or a cluster outlives a host process: the first service is abandoned
mid-batch (its journal file copied at that moment, which is what a SIGKILL
leaves), a second service with a fresh engine on the same world resumes from
the copy. Tests with real processes and real signals are in test_crash_resume.py.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import JsonValue

from helpers import spec
from plateflow import BaseBatchHost, BatchHost, Plate
from plateflow.core import (
    BatchState,
    BatchSummary,
    CompileAccepted,
    CompileSucceeded,
    Disposition,
    ExecutionAccepted,
    ExecutionCancelled,
    ExecutionStarted,
    ExecutionSucceeded,
    Fact,
    Journal,
    PlateOutcome,
    Reason,
    ResumedBatch,
    replay,
)
from plateflow.engines.base import Engine, EngineError, FactSink, Recovered, Submission
from plateflow.errors import JournalWarning, UsageError
from plateflow.jobs import CompileJob
from plateflow.service import BatchWorkflowService
from plateflow.testing import RecordingHost

PIPELINE = spec("finish")
WAIT = 10.0


def _bounded(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop, bounded in time."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 60))

    return run


class World:
    """What runs outside the host: submissions, their terminal facts, who listens."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        """Every submission id ever submitted, in order (a resubmission appears twice)."""
        self.running: dict[str, Submission] = {}
        self.finished: dict[str, Fact] = {}
        self.listener: WorldEngine | None = None
        self.cancels: list[str] = []
        """Every cancel that reached the world, in order."""
        self.confirm_cancels = False

    def finish(self, submission_id: str) -> None:
        """The work of one running submission ends well; its listener hears if any."""
        sub = self.running.pop(submission_id)
        fact: Fact
        if sub.phase == "compile":
            fact = CompileSucceeded(
                plate_id=sub.plate_id, job_id=sub.submission_id, artifact_id="a"
            )
        else:
            fact = ExecutionSucceeded(
                plate_id=sub.plate_id, execution_id=sub.submission_id, result={"ok": 1}
            )
        self.finished[submission_id] = fact
        if self.listener is not None:
            self.listener.push(fact)

    def running_ids(self, phase: str) -> list[str]:
        return [sid for sid, sub in self.running.items() if sub.phase == phase]


class WorldEngine(Engine):
    name = "world"

    def __init__(self, world: World, *, auto_compile: bool = True) -> None:
        self.world = world
        self.auto_compile = auto_compile
        self.sink: FactSink | None = None
        self.adopted: dict[str, JsonValue] | None = None
        self.crashed = False

    def push(self, fact: Fact) -> None:
        if self.sink is not None and not self.crashed:
            self.sink(fact)

    def crash(self) -> None:
        """The host process is gone: nothing more reaches it, nothing it says arrives."""
        self.crashed = True
        self.world.listener = None

    async def start(self, sink: FactSink) -> None:
        self.sink = sink
        self.world.listener = self

    async def submit_compile(self, job_id: str, job: CompileJob) -> None:
        self._check()
        self.world.submitted.append(job_id)
        self.world.running[job_id] = Submission(job.plate_id, "compile", job_id)
        self.push(CompileAccepted(plate_id=job.plate_id, job_id=job_id))
        if self.auto_compile:
            self.world.finish(job_id)

    async def submit_execution(self, execution_id: str, job: CompileJob, artifact_id: str) -> None:
        self._check()
        self.world.submitted.append(execution_id)
        self.world.running[execution_id] = Submission(job.plate_id, "execute", execution_id)
        self.push(ExecutionAccepted(plate_id=job.plate_id, execution_id=execution_id))

    async def cancel(self, submission: Submission) -> None:
        self._check()
        self.world.cancels.append(submission.submission_id)
        if self.world.confirm_cancels and self.world.running.pop(submission.submission_id, None):
            self.push(
                ExecutionCancelled(
                    plate_id=submission.plate_id, execution_id=submission.submission_id
                )
            )

    async def status(self, submissions: Sequence[Submission]) -> list[Fact]:
        self._check()
        return [
            self.world.finished[s.submission_id]
            for s in submissions
            if s.submission_id in self.world.finished
        ]

    async def server_info(self) -> dict[str, JsonValue]:
        self._check()
        return {}

    async def close(self) -> None:
        pass

    def identity(self) -> dict[str, JsonValue]:
        return {"world": id(self.world)}

    def adopt(self, identity: dict[str, JsonValue]) -> None:
        if identity != {"world": id(self.world)}:
            raise UsageError(f"not this world: {identity}")
        self.adopted = identity

    async def recover(self, submissions: Sequence[Submission]) -> Recovered:
        facts: list[Fact] = []
        unknown: list[Submission] = []
        for sub in submissions:
            sid = sub.submission_id
            if sid in self.world.finished:
                facts.append(self.world.finished[sid])
            elif sid in self.world.running:
                facts.append(ExecutionStarted(plate_id=sub.plate_id, execution_id=sid))
            else:
                unknown.append(sub)
        return Recovered(tuple(facts), tuple(unknown), frozenset(s.submission_id for s in unknown))

    def _check(self) -> None:
        if self.crashed:
            raise EngineError("the host is gone")


def _plates(n: int) -> list[Plate]:
    return [Plate(f"p{i}", f"/data/p{i}") for i in range(n)]


async def _until(predicate: object, what: str) -> None:
    """Let the loop run until ``predicate()`` holds (bounded)."""
    assert callable(predicate)
    deadline = asyncio.get_running_loop().time() + WAIT
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def _started(
    world: World,
    n: int,
    *,
    host: BatchHost | None = None,
    engine: WorldEngine | None = None,
    journal: Path | None = None,
    **options: Any,
) -> tuple[BatchWorkflowService, asyncio.Task[Any]]:
    """A service running an ``n``-plate batch on ``world``, every execution submitted."""
    service = BatchWorkflowService(
        host or RecordingHost(), engine or WorldEngine(world), status_interval=30.0, **options
    )
    task = asyncio.get_running_loop().create_task(
        service.run_plates(_plates(n), pipeline=PIPELINE, journal=journal)
    )
    await _until(lambda: len(world.running_ids("execute")) == n, "every execution submitted")
    return service, task


async def _finished(
    world: World, service: BatchWorkflowService, task: asyncio.Task[Any]
) -> BatchSummary:
    """Let every running execution succeed; the batch's summary once the service closed."""
    for sid in world.running_ids("execute"):
        world.finish(sid)
    summary: BatchSummary = await asyncio.wait_for(task, WAIT)
    await service.close()
    return summary


async def _crash_mid_batch(
    tmp_path: Path, world: World, n: int, *, executions_before: int
) -> tuple[Path, BatchWorkflowService, asyncio.Task[object]]:
    """Run a batch with a journal until ``n`` executions were submitted; finish
    ``executions_before`` of them (reported), one more silently (done but never
    reported), then "crash": return a copy of the journal as the crash left it."""
    journal = tmp_path / "live.jsonl"
    host = RecordingHost()
    engine = WorldEngine(world)
    service, run = await _started(world, n, host=host, engine=engine, journal=journal)
    for sid in world.running_ids("execute")[:executions_before]:
        world.finish(sid)
    await _until(lambda: len(host.completed()) == executions_before, "the first plates reported")
    engine.crash()
    world.finish(world.running_ids("execute")[0])  # done while nobody listened
    crashed = tmp_path / "crashed.jsonl"
    shutil.copyfile(journal, crashed)
    return crashed, service, run


async def _bury(service: BatchWorkflowService, run: asyncio.Task[object]) -> None:
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    await service.close()


def _terminal_records(journal: Journal) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in journal:
        for change in record.changes:
            if change.plate_id is not None and change.note.startswith("settled:"):
                counts[change.plate_id] = counts.get(change.plate_id, 0) + 1
    return counts


@_bounded
async def test_a_resumed_batch_reports_every_plate_once_across_the_crash(tmp_path: Path) -> None:
    world = World()
    crashed, first, run = await _crash_mid_batch(tmp_path, world, 5, executions_before=2)
    host = RecordingHost()
    engine = WorldEngine(world)
    service = BatchWorkflowService(host, engine, status_interval=30.0)
    task = asyncio.get_running_loop().create_task(service.resume(crashed))
    await _until(lambda: len(host.completed()) == 1, "the silently finished plate")
    for sid in list(world.running_ids("execute")):
        world.finish(sid)
    summary = await asyncio.wait_for(task, WAIT)
    await service.close()
    await _bury(first, run)

    assert engine.adopted == {"world": id(world)}
    (resumed,) = host.names("on_resumed")
    info = resumed[0]
    assert isinstance(info, ResumedBatch)
    assert [s.plate_id for s in info.settled] == ["p0", "p1"]
    assert {s.outcome for s in info.settled} == {PlateOutcome.COMPLETED}
    assert info.settled[0].result == {"ok": 1}
    assert info.unsettled == ("p2", "p3", "p4")
    assert info.journal == str(crashed)
    # Every plate exactly once: before the crash (on_resumed) or after it.
    assert sorted(host.completed()) == ["p2", "p3", "p4"]
    assert len(host.names("on_plate_completed")) == 3
    assert len(host.names("on_all_plates_completed")) == 1
    assert host.calls[0].name == "emit_progress_started"
    assert host.calls[1].name == "on_resumed"
    assert summary.outcome is BatchState.COMPLETED
    assert {s.plate_id for s in summary.plates} == {f"p{i}" for i in range(5)}
    # Nothing ran twice; the journal, crash and all, has one terminal record per plate.
    assert len(world.submitted) == len(set(world.submitted)) == 10
    final = Journal.load(crashed)
    assert _terminal_records(final) == {f"p{i}": 1 for i in range(5)}
    assert [r.seq for r in final] == list(range(len(final)))
    kinds = [r.fact.kind for r in final]
    assert kinds.count("batch_resumed") == 1
    assert replay(final).snapshot() == service.batch.snapshot()  # type: ignore[union-attr]
    # The host's stores were rebuilt for the plates that settled before the crash.
    assert host.plate_execution_states["p0"] == "completed"


@pytest.mark.parametrize("resubmit", [False, True])
@_bounded
async def test_work_the_engine_lost_fails_or_is_resubmitted(tmp_path: Path, resubmit: bool) -> None:
    world = World()
    crashed, first, run = await _crash_mid_batch(tmp_path, world, 3, executions_before=1)
    lost = world.running_ids("execute")[0]
    del world.running[lost]  # the engine forgot it (its server was replaced)
    host = RecordingHost()
    service = BatchWorkflowService(host, WorldEngine(world), status_interval=30.0)
    task = asyncio.get_running_loop().create_task(service.resume(crashed, resubmit_lost=resubmit))
    if resubmit:
        await _until(lambda: lost in world.running, "the lost execution resubmitted")
        world.finish(lost)
    summary = await asyncio.wait_for(task, WAIT)
    await service.close()
    await _bury(first, run)

    reasons = {s.plate_id: s.reason for s in summary.plates}
    assert reasons["p2"] is (Reason.SUCCEEDED if resubmit else Reason.LOST_IN_RESTART)
    assert world.submitted.count(lost) == (2 if resubmit else 1)
    (record,) = [r for r in Journal.load(crashed) if r.fact.kind == "submission_lost"]
    assert record.disposition is Disposition.APPLIED
    assert "it never started" in record.detail
    assert ("resubmitted" in record.detail) is resubmit
    if not resubmit:
        (error,) = [c.args[2] for c in host.calls_to("on_plate_completed") if c.args[0] == "p2"]
        assert f"the engine lost execute {lost!r} in a restart" in str(error)


@_bounded
async def test_resuming_a_settled_batch_tells_the_host_and_settles_at_once(
    tmp_path: Path,
) -> None:
    world = World()
    journal = tmp_path / "done.jsonl"
    await _finished(world, *await _started(world, 2, journal=journal))

    host = RecordingHost()
    again = BatchWorkflowService(host, WorldEngine(world))
    summary = await asyncio.wait_for(again.resume(journal), WAIT)
    await again.close()
    assert summary.outcome is BatchState.COMPLETED
    assert [c.name for c in host.calls if c.name.startswith("on_")] == [
        "on_resumed",
        "on_all_plates_completed",
    ]
    assert len(host.names("emit_execution_complete")) == 1


@_bounded
async def test_a_resume_refuses_what_it_cannot_resume(tmp_path: Path) -> None:
    world = World()
    plain = tmp_path / "saved.jsonl"
    from helpers import make_batch  # a journal saved at the end, without resume context

    make_batch().journal.save(plain)
    service = BatchWorkflowService(RecordingHost(), WorldEngine(world))
    with pytest.raises(UsageError, match="cannot be resumed: its header holds no jobs"):
        await service.resume(plain)

    crashed, first, run = await _crash_mid_batch(tmp_path, world, 2, executions_before=0)

    class Other(WorldEngine):
        name = "other"

    with pytest.raises(UsageError, match="'world' engine; this service's engine is 'other'"):
        await BatchWorkflowService(RecordingHost(), Other(world)).resume(crashed)
    started = WorldEngine(world)
    service = BatchWorkflowService(RecordingHost(), started)
    await _bury(*(await _one_batch(service, tmp_path, world)))
    with pytest.raises(UsageError, match="the service is closed"):
        await service.resume(crashed)
    fresh = BatchWorkflowService(RecordingHost(), WorldEngine(World()))
    with pytest.raises(UsageError, match="not this world"):
        await fresh.resume(crashed)
    await fresh.close()
    await _bury(first, run)


async def _one_batch(
    service: BatchWorkflowService, tmp_path: Path, world: World
) -> tuple[BatchWorkflowService, asyncio.Task[object]]:
    task: asyncio.Task[object] = asyncio.get_running_loop().create_task(
        service.run_plates(_plates(1), pipeline=PIPELINE)
    )
    await _until(lambda: bool(world.running_ids("execute")), "an execution")
    return service, task


@_bounded
async def test_a_torn_last_line_is_cut_before_the_resumed_batch_appends(tmp_path: Path) -> None:
    world = World()
    crashed, first, run = await _crash_mid_batch(tmp_path, world, 2, executions_before=1)
    whole = crashed.read_bytes()
    crashed.write_bytes(whole + b'{"type": "record", "seq": 99, "ti')  # the write a kill cut
    host = RecordingHost()
    service = BatchWorkflowService(host, WorldEngine(world), status_interval=30.0)
    task = asyncio.get_running_loop().create_task(service.resume(crashed))
    with pytest.warns(JournalWarning, match=r"crashed.jsonl:\d+: dropped the last line"):
        await _until(lambda: len(host.completed()) == 1, "the silently finished plate")
    await asyncio.wait_for(task, WAIT)
    await service.close()
    await _bury(first, run)
    final = Journal.load(crashed)
    assert final.torn is None
    assert crashed.read_bytes().startswith(whole)
    assert _terminal_records(final) == {"p0": 1, "p1": 1}


@_bounded
async def test_the_journal_file_holds_each_record_before_the_host_hears_of_it(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "live.jsonl"
    seen: list[tuple[str, int]] = []

    class Reading(BaseBatchHost):
        def on_plate_completed(
            self, plate_id: str, outcome: PlateOutcome, result: JsonValue
        ) -> None:
            lines = journal.read_bytes().splitlines()
            settled = [
                line for line in lines if f'"{plate_id}", "executing", "completed"'.encode() in line
            ]
            seen.append((plate_id, len(settled)))

    world = World()
    service, task = await _started(world, 3, host=Reading(), journal=journal)
    await _finished(world, service, task)
    assert sorted(seen) == [("p0", 1), ("p1", 1), ("p2", 1)]
    assert len(Journal.load(journal)) == len(service.batch.journal)  # type: ignore[union-attr]


@_bounded
async def test_a_journal_that_cannot_be_written_stops_nothing_but_is_reported(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "gone" / "live.jsonl"
    service = BatchWorkflowService(RecordingHost(), WorldEngine(World()))
    with pytest.raises(UsageError, match="cannot write the journal"):
        await service.run_plates(_plates(1), pipeline=PIPELINE, journal=journal)
    await service.close()

    service = BatchWorkflowService(RecordingHost(), WorldEngine(World()))
    with pytest.raises(UsageError, match=r"journal_context must be JSON: .*set"):
        await service.run_plates(
            _plates(1), pipeline=PIPELINE, journal=tmp_path / "j.jsonl", journal_context={"a": {1}}
        )
    await service.close()
    assert not (tmp_path / "j.jsonl").exists()

    full = Path("/dev/full")  # every write fails: no space left on the device
    service = BatchWorkflowService(RecordingHost(), WorldEngine(World()))
    with pytest.raises(UsageError, match="cannot write the journal /dev/full: No space left"):
        await service.run_plates(_plates(1), pipeline=PIPELINE, journal=full)
    await service.close()

    host = RecordingHost()
    world = World()
    service, task = await _started(world, 2, host=host, journal=tmp_path / "cut.jsonl")
    # The file's descriptor goes away under the batch (as on a yanked disk).
    os.close(service._journal_file._stream.fileno())  # type: ignore[union-attr]
    summary = await _finished(world, service, task)
    assert summary.outcome is BatchState.COMPLETED
    errors = [c for c in host.calls_to("emit_error") if c.args[1] == "journal_write_failed"]
    assert len(errors) == 1
    assert "could not write the journal" in errors[0].args[0]
    assert len(Journal.load(tmp_path / "cut.jsonl")) < len(service.batch.journal)  # type: ignore[union-attr]


@_bounded
async def test_a_cancel_pending_at_the_crash_is_sent_again_and_settles_the_plate(
    tmp_path: Path,
) -> None:
    world = World()
    journal = tmp_path / "live.jsonl"
    engine = WorldEngine(world)
    service, run = await _started(world, 3, engine=engine, journal=journal)
    lost = world.running_ids("execute")[2]
    service.cancel("p1")
    service.cancel("p2")
    await _until(lambda: len(world.cancels) == 2, "both cancels reached the engine")
    engine.crash()  # neither cancel was confirmed
    crashed = tmp_path / "crashed.jsonl"
    shutil.copyfile(journal, crashed)
    del world.running[lost]  # and the engine forgot p2's execution meanwhile

    world.confirm_cancels = True
    host = RecordingHost()
    again = BatchWorkflowService(host, WorldEngine(world), status_interval=30.0)
    task = asyncio.get_running_loop().create_task(again.resume(crashed))
    await _until(lambda: "p1" in host.completed(), "p1's cancel confirmed")
    world.finish(world.running_ids("execute")[0])
    summary = await asyncio.wait_for(task, WAIT)
    await again.close()
    await _bury(service, run)

    assert world.cancels[2:] == [world.cancels[0]], "p1's cancel, sent again; p2's was lost"
    reasons = {s.plate_id: s.reason for s in summary.plates}
    assert reasons == {
        "p0": Reason.SUCCEEDED,
        "p1": Reason.CANCEL_REQUESTED,
        "p2": Reason.CANCEL_REQUESTED,  # its work is gone: that confirms the cancel
    }
    assert summary.outcome is BatchState.CANCELLED


@_bounded
async def test_a_journal_cut_before_the_batch_started_starts_it_on_resume(
    tmp_path: Path,
) -> None:
    world = World()
    journal = tmp_path / "live.jsonl"
    service, run = await _started(world, 2, journal=journal)
    header_only = tmp_path / "header.jsonl"
    header_only.write_bytes(journal.read_bytes().splitlines(keepends=True)[0])
    world.confirm_cancels = True
    await _bury(service, run)
    world.running.clear()  # as if the host had died before submitting anything
    world.finished.clear()

    host = RecordingHost()
    again = BatchWorkflowService(host, WorldEngine(world), status_interval=30.0)
    task = asyncio.get_running_loop().create_task(again.resume(header_only))
    await _until(lambda: len(world.running_ids("execute")) == 2, "the batch started again")
    summary = await _finished(world, again, task)
    assert summary.outcome is BatchState.COMPLETED
    (resumed,) = host.names("on_resumed")
    assert resumed[0].settled == ()
    assert resumed[0].unsettled == ("p0", "p1")
    kinds = [r.fact.kind for r in Journal.load(header_only)]
    assert kinds[:2] == ["batch_resumed", "batch_started"]


def test_outstanding_names_each_unsettled_plates_current_submission() -> None:
    from helpers import execution, feed, job, make_batch
    from plateflow.core import BatchStarted as Start
    from plateflow.core import CancelRequested, CompileAccepted, CompileSucceeded

    batch = make_batch(4)
    assert batch.outstanding() == ()  # nothing submitted before the start
    feed(batch, [Start(), CompileAccepted(plate_id="p1", job_id=job(batch, "p1"))])
    assert batch.outstanding() == tuple(
        (p, "compile", job(batch, p)) for p in ("p0", "p1", "p2", "p3")
    )
    feed(
        batch,
        [
            CompileSucceeded(plate_id=p, job_id=job(batch, p), artifact_id="a")
            for p in ("p0", "p1", "p2")
        ],
    )
    # Compiled plates wait at the barrier with no submission of their own.
    assert batch.outstanding() == (("p3", "compile", job(batch, "p3")),)
    feed(
        batch,
        [
            CompileSucceeded(plate_id="p3", job_id=job(batch, "p3"), artifact_id="a"),
            CancelRequested(plate_id="p0"),
            ExecutionAccepted(plate_id="p1", execution_id=execution(batch, "p1")),
            ExecutionSucceeded(plate_id="p2", execution_id=execution(batch, "p2")),
        ],
    )
    # Submitted (compiled), accepted (executing), being cancelled: all still current;
    # the settled plate has none.
    assert batch.outstanding() == (
        ("p0", "execute", execution(batch, "p0")),
        ("p1", "execute", execution(batch, "p1")),
        ("p3", "execute", execution(batch, "p3")),
    )


def test_a_resubmitted_execution_starts_and_progresses_afresh() -> None:
    from helpers import execution, feed, job, make_batch
    from plateflow.core import BatchStarted as Start
    from plateflow.core import CompileSucceeded, ExecutionProgress, SubmissionLost, SubmitExecution

    batch = make_batch(1)
    x = execution(batch, "p0")
    feed(
        batch,
        [
            Start(),
            CompileSucceeded(plate_id="p0", job_id=job(batch, "p0"), artifact_id="a"),
            ExecutionStarted(plate_id="p0", execution_id=x),
            ExecutionProgress(plate_id="p0", execution_id=x, done=2, total=3),
        ],
    )
    decisions = batch.handle(
        SubmissionLost(plate_id="p0", phase="execute", submission_id=x, resubmit=True)
    )
    assert [d for d in decisions if isinstance(d, SubmitExecution)] == [
        SubmitExecution("p0", x, "a", batch.journal[-1].fact.stimulus_id)
    ]
    feed(
        batch,
        [
            ExecutionStarted(plate_id="p0", execution_id=x),
            ExecutionProgress(plate_id="p0", execution_id=x, done=1, total=3),
        ],
    )
    assert [r.disposition for r in batch.journal.records[-2:]] == [Disposition.APPLIED] * 2
    plate = batch.snapshot().plate("p0")
    assert (plate.done, plate.total) == (1, 3)
