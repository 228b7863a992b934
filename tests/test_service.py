"""The service end to end: the seed's flows on real worker processes, the host contract.

Every batch runs on a real ``LocalEngine`` with the example plate-reader
pipeline on generated plates. Every wait is bounded by ``asyncio.wait_for``;
every engine a test starts is closed by the test (through the service).
"""

from __future__ import annotations

import asyncio
import io
import json
import multiprocessing
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from plateflow import Journal, replay, testing
from plateflow.core import (
    Batch,
    BatchState,
    BatchSummary,
    Disposition,
    PlateOutcome,
    PlateState,
    Reason,
)
from plateflow.core.facts import ExecutionStarted, ExecutionSucceeded, Fact
from plateflow.core.ids import IdFactory
from plateflow.engines.local import LocalEngine
from plateflow.errors import UsageError
from plateflow.examples.platereader import GeneratedPlate, demo_pipeline, generate_plates
from plateflow.pipeline.spec import PipelineSpec, StepSpec
from plateflow.runtime.dispatch import ThreadDispatcher
from plateflow.service import BatchWorkflowService, Plate, SyncBatchWorkflowService

T = TypeVar("T")
TIMEOUT = 60.0


class RecordingHost(testing.RecordingHost):
    """The kit's recording host, with a hook on plate-state callbacks for the scenarios."""

    def __init__(self) -> None:
        super().__init__(on_call=self._on_call)
        self.on_state: Callable[[str, PlateState], None] | None = None
        self.late_posted = False

    def _on_call(self, call: testing.Call) -> None:
        if call.name == "emit_orchestrator_state" and self.on_state is not None:
            self.on_state(*call.args)


@pytest.fixture
def plates(tmp_path: Path) -> list[GeneratedPlate]:
    return generate_plates(tmp_path / "plates", 4, seed=7, wells=96)


@pytest.fixture(autouse=True)
def _no_children_left() -> Iterator[None]:
    yield
    assert multiprocessing.active_children() == [], "a test left worker processes behind"


def _journal_text(batch: Batch) -> str:
    stream = io.StringIO()
    batch.journal.write(stream)
    return stream.getvalue()


def selection(generated: list[GeneratedPlate]) -> list[Plate]:
    return [Plate(g.plate_id, str(g.path)) for g in generated]


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(bounded())


async def with_service(
    host: RecordingHost,
    tmp_path: Path,
    body: Callable[[BatchWorkflowService], Awaitable[T]],
    **options: Any,
) -> T:
    engine = LocalEngine(max_workers=2, output_dir=str(tmp_path / "out"), cancel_grace=1.0)
    service = BatchWorkflowService(host, engine, **options)
    try:
        return await body(service)
    finally:
        await service.close()


def check_convergence(host: RecordingHost, plate_ids: list[str]) -> BatchSummary:
    """C2 and C3 as the host sees them; returns the one summary."""
    completed = [args[0] for args in host.names("on_plate_completed")]
    assert sorted(completed) == sorted(plate_ids), "C2: exactly one report per plate"
    names = [c.name for c in host.calls]
    assert names.count("on_all_plates_completed") == 1, "C3: one batch report"
    assert names.count("emit_execution_complete") == 1, "C3: one completion"
    last_plate = max(i for i, n in enumerate(names) if n == "on_plate_completed")
    assert names.index("on_all_plates_completed") > last_plate, "C3: after every plate"
    (summary,) = host.names("on_all_plates_completed")[0]
    assert isinstance(summary, BatchSummary)
    return summary


# --- the seed's flows -------------------------------------------------------------------


def test_compile_only_writes_compiled_data_and_rests_plates_in_compiled(
    tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    host = RecordingHost()

    async def body(service: BatchWorkflowService) -> BatchSummary:
        return await service.compile_plates(selection(plates), pipeline=demo_pipeline())

    summary = run(with_service(host, tmp_path, body))
    ids = [p.plate_id for p in plates]
    assert summary.outcome is BatchState.COMPLETED
    assert summary.counts == {PlateOutcome.COMPILED: 4}
    assert check_convergence(host, ids) == summary
    artifacts = set(host.plate_compiled_data.values())
    assert len(artifacts) == 1, "one pipeline, one content-addressed artifact"
    assert host.plate_execution_states == dict.fromkeys(ids, PlateState.COMPILED)
    assert host.plate_execution_ids == {}
    assert host.names("emit_progress_started") == [(4,)]
    (final,) = host.names("emit_progress_finished")[0]
    assert final.fraction == 1.0


def test_run_batch_executes_every_plate_and_finds_the_planted_hits(
    tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    host = RecordingHost()
    # The barrier, from the host's side: no plate executes before every plate compiled.
    order: list[tuple[str, PlateState]] = []
    host.on_state = lambda plate, state: order.append((plate, state))

    batches: list[Batch] = []

    async def body(service: BatchWorkflowService) -> BatchSummary:
        summary = await service.run_plates(selection(plates), pipeline=demo_pipeline())
        assert service.batch is not None
        batches.append(service.batch)
        return summary

    summary = run(with_service(host, tmp_path, body))
    ids = [p.plate_id for p in plates]
    assert summary.outcome is BatchState.COMPLETED
    assert check_convergence(host, ids) == summary
    # The journal explains the run: replayed, it reaches the very same states.
    (batch,) = batches
    assert replay(Journal.read(io.StringIO(_journal_text(batch)))).snapshot() == batch.snapshot()
    first_executing = next(i for i, (_, s) in enumerate(order) if s is PlateState.EXECUTING)
    compiled = {p for p, s in order[:first_executing] if s is PlateState.COMPILED}
    assert compiled == set(ids), "barrier: every plate compiled before any executes"
    for generated in plates:
        ((plate_id, outcome, result),) = [
            args for args in host.names("on_plate_completed") if args[0] == generated.plate_id
        ]
        assert outcome is PlateOutcome.COMPLETED
        assert isinstance(result, dict)
        found = {hit["well"] for hit in result["hits"]}  # type: ignore[index,union-attr]
        assert set(generated.planted_hits) <= found, f"{plate_id}: planted hits found"
        report = json.loads(Path(str(result["report"])).read_text(encoding="utf-8"))
        assert report["plate_id"] == plate_id
    assert set(host.plate_execution_ids) == set(ids)
    assert host.plate_execution_states == dict.fromkeys(ids, PlateState.COMPLETED)
    assert host.progress_tracker is not None
    assert host.progress_tracker.fraction == 1.0
    statuses = [args[0] for args in host.names("emit_status")]
    assert any(m.startswith("engine local: ") for m in statuses), "server status emitted"


def _broken(plate: GeneratedPlate) -> Plate:
    bad = PipelineSpec(steps=(StepSpec(function="plateflow.examples.platereader:no_such_step"),))
    return Plate(plate.plate_id, str(plate.path), pipeline=bad)


def test_compile_failure_with_abort_executes_nothing(
    tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    host = RecordingHost()
    chosen = [*selection(plates[:2]), _broken(plates[2])]

    async def body(service: BatchWorkflowService) -> BatchSummary:
        return await service.run_plates(chosen, pipeline=demo_pipeline())

    summary = run(with_service(host, tmp_path, body))
    assert summary.outcome is BatchState.FAILED
    reasons = {s.plate_id: s.reason for s in summary.plates}
    assert reasons[plates[2].plate_id] is Reason.COMPILE_FAILED
    assert {reasons[p.plate_id] for p in plates[:2]} <= {Reason.BATCH_ABORTED}
    assert host.plate_execution_ids == {}, "abort: nothing was executed"
    check_convergence(host, [p.plate_id for p in chosen])


def test_compile_failure_with_continue_executes_the_rest(
    tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    host = RecordingHost()
    chosen = [*selection(plates[:2]), _broken(plates[2])]

    async def body(service: BatchWorkflowService) -> BatchSummary:
        return await service.run_plates(chosen, pipeline=demo_pipeline())

    summary = run(with_service(host, tmp_path, body, policy="continue"))
    assert summary.counts == {PlateOutcome.COMPLETED: 2, PlateOutcome.FAILED: 1}
    assert set(host.plate_execution_ids) == {p.plate_id for p in plates[:2]}
    (failure,) = [a for a in host.names("on_plate_completed") if a[1] is PlateOutcome.FAILED]
    assert "no_such_step" in str(failure[2])


def test_a_bad_plate_file_fails_only_that_plate(
    tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    plates[1].path.write_text("well,role,signal\nA01,sample,lots\n", encoding="utf-8")
    host = RecordingHost()

    async def body(service: BatchWorkflowService) -> BatchSummary:
        return await service.run_plates(selection(plates), pipeline=demo_pipeline())

    summary = run(with_service(host, tmp_path, body))
    reasons = {s.plate_id: s.reason for s in summary.plates}
    assert reasons.pop(plates[1].plate_id) is Reason.EXECUTION_FAILED
    assert set(reasons.values()) == {Reason.SUCCEEDED}
    (failure,) = [a for a in host.names("on_plate_completed") if a[0] == plates[1].plate_id]
    assert "line 2" in json.dumps(failure[2])


# --- cancel and crashes --------------------------------------------------------------------


def test_cancel_one_plate_mid_run(tmp_path: Path, plates: list[GeneratedPlate]) -> None:
    host = RecordingHost()
    slow = demo_pipeline(pause_seconds=30.0)
    target = plates[0].plate_id

    async def body(service: BatchWorkflowService) -> BatchSummary:
        def on_state(plate: str, state: PlateState) -> None:
            if plate == target and state is PlateState.EXECUTING:
                service.cancel(target)

        host.on_state = on_state
        chosen = [Plate(target, str(plates[0].path), pipeline=slow), *selection(plates[1:])]
        return await service.run_plates(chosen, pipeline=demo_pipeline())

    summary = run(with_service(host, tmp_path, body, cancel_grace=20.0))
    outcomes = {s.plate_id: (s.outcome, s.reason) for s in summary.plates}
    assert outcomes.pop(target) == (PlateOutcome.CANCELLED, Reason.CANCEL_REQUESTED)
    assert set(outcomes.values()) == {(PlateOutcome.COMPLETED, Reason.SUCCEEDED)}
    assert summary.outcome is BatchState.CANCELLED


def test_cancel_the_batch(tmp_path: Path, plates: list[GeneratedPlate]) -> None:
    host = RecordingHost()

    async def body(service: BatchWorkflowService) -> BatchSummary:
        host.on_state = lambda plate, state: (
            service.cancel() if state is PlateState.EXECUTING else None
        )
        return await service.run_plates(
            selection(plates), pipeline=demo_pipeline(pause_seconds=30.0)
        )

    summary = run(with_service(host, tmp_path, body, cancel_grace=20.0))
    assert summary.outcome is BatchState.CANCELLED
    assert summary.counts == {PlateOutcome.CANCELLED: 4}
    assert BatchState.CANCELLING in [args[0] for args in host.names("update_button_states")]
    check_convergence(host, [p.plate_id for p in plates])


class StartSpyEngine(LocalEngine):
    """A real local engine whose sink also tells the test when a plate's worker started."""

    def __init__(self, plate_id: str, **options: Any) -> None:
        super().__init__(**options)
        self.started = threading.Event()
        self._plate_id = plate_id

    async def start(self, sink: Callable[[Fact], None]) -> None:
        def spy(fact: Fact) -> None:
            sink(fact)
            if isinstance(fact, ExecutionStarted) and fact.plate_id == self._plate_id:
                self.started.set()

        await super().start(spy)


def test_a_worker_killed_with_sigkill_fails_its_plate_with_the_exit_code(
    tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    host = RecordingHost()
    victim = plates[0].plate_id
    engine = StartSpyEngine(victim, max_workers=2, output_dir=str(tmp_path / "out"))

    async def scenario() -> BatchSummary:
        service = BatchWorkflowService(host, engine)

        async def kill_when_started() -> None:
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, engine.started.wait, TIMEOUT)
            info = await engine.server_info()
            running = info["running_submissions"]
            assert isinstance(running, list)
            (pid,) = [r["pid"] for r in running if isinstance(r, dict) and r["plate_id"] == victim]
            os.kill(int(str(pid)), signal.SIGKILL)

        chosen = [
            Plate(victim, str(plates[0].path), pipeline=demo_pipeline(pause_seconds=30.0)),
            *selection(plates[1:]),
        ]
        try:
            killer = asyncio.create_task(kill_when_started())
            summary = await service.run_plates(chosen, pipeline=demo_pipeline())
            await killer
            return summary
        finally:
            await service.close()

    summary = run(scenario())
    outcomes = {s.plate_id: s.reason for s in summary.plates}
    assert outcomes.pop(victim) is Reason.EXECUTION_FAILED
    assert set(outcomes.values()) == {Reason.SUCCEEDED}
    (failure,) = [a for a in host.names("on_plate_completed") if a[0] == victim]
    assert isinstance(failure[2], dict)
    assert failure[2]["exit_code"] == -signal.SIGKILL


# --- the host contract ----------------------------------------------------------------------


def test_a_host_that_does_not_subclass_batchhost_is_refused_by_name() -> None:
    class DuckHost:
        def emit_status(self, message: str) -> None:
            pass

    with pytest.raises(TypeError, match="BatchHost subclass") as info:
        BatchWorkflowService(DuckHost(), LocalEngine())  # type: ignore[arg-type]
    assert "on_plate_completed" in str(info.value)
    assert "emit_status," not in str(info.value), "only what is missing is named"


def test_c5_a_raising_host_callback_is_reported_and_the_batch_still_converges(
    tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    host = RecordingHost()
    host.raise_in = {"on_plate_completed", "emit_orchestrator_state"}

    async def body(service: BatchWorkflowService) -> BatchSummary:
        return await service.run_plates(selection(plates), pipeline=demo_pipeline())

    summary = run(with_service(host, tmp_path, body))
    assert summary.outcome is BatchState.COMPLETED
    check_convergence(host, [p.plate_id for p in plates])
    errors = host.names("emit_error")
    assert any(
        code == "host_callback_failed" and "on_plate_completed" in m for m, code, _ in errors
    )
    service_journal_kinds = {a[1] for a in errors}
    assert service_journal_kinds == {"host_callback_failed"}


def test_c6_callbacks_and_store_writes_arrive_on_the_dispatchers_thread(
    tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    host = RecordingHost()
    seen_store_threads: set[int] = set()

    class WatchedDict(dict[str, Any]):
        def __setitem__(self, key: str, value: Any) -> None:
            seen_store_threads.add(threading.get_ident())
            super().__setitem__(key, value)

    host.plate_execution_states = WatchedDict()
    dispatcher = ThreadDispatcher(name="gui")
    try:

        async def body(service: BatchWorkflowService) -> BatchSummary:
            return await service.run_plates(selection(plates[:2]), pipeline=demo_pipeline())

        run(with_service(host, tmp_path, body, dispatcher=dispatcher))
    finally:
        assert dispatcher.close(timeout=10.0)
    assert host.threads == {dispatcher.thread_id}
    assert seen_store_threads == {dispatcher.thread_id}
    check_convergence(host, [p.plate_id for p in plates[:2]])


def test_the_synchronous_facade_runs_a_batch_from_a_plain_thread(
    tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    host = RecordingHost()
    engine = LocalEngine(max_workers=2, output_dir=str(tmp_path / "out"))
    with SyncBatchWorkflowService(host, engine) as service:
        summary = service.run_plates(selection(plates[:2]), pipeline=demo_pipeline())
        assert summary.outcome is BatchState.COMPLETED
        assert service.service.batch is not None
        assert service.service.batch.settled
    check_convergence(host, [p.plate_id for p in plates[:2]])


def test_a_second_batch_while_one_runs_is_refused(
    tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    host = RecordingHost()

    async def body(service: BatchWorkflowService) -> str:
        started = asyncio.Event()  # the first plate moved: the batch is running
        host.on_state = lambda plate, state: started.set()
        first = asyncio.create_task(
            service.run_plates(selection(plates), pipeline=demo_pipeline(pause_seconds=30.0))
        )
        await started.wait()
        with pytest.raises(UsageError, match=r"still (compiling|executing)") as info:
            await service.run_plates(selection(plates), pipeline=demo_pipeline())
        service.cancel()
        await first
        return str(info.value)

    message = run(with_service(host, tmp_path, body, cancel_grace=20.0))
    assert "cancel it" in message


def test_two_batches_in_a_row_and_late_facts_from_the_first_are_not_the_seconds_business(
    tmp_path: Path, plates: list[GeneratedPlate]
) -> None:
    host = RecordingHost()
    chosen = selection(plates[:2])

    old: list[str] = []

    async def body(service: BatchWorkflowService) -> tuple[BatchSummary, BatchSummary, Batch]:
        first = await service.run_plates(chosen, pipeline=demo_pipeline())
        old_execution = host.plate_execution_ids[chosen[0].plate_id]
        old.append(old_execution)
        late = ExecutionSucceeded(plate_id=chosen[0].plate_id, execution_id=old_execution)

        def on_state(plate: str, state: PlateState) -> None:
            if not host.late_posted:
                host.late_posted = True
                service.post(late)  # as if the engine re-sent it during the second batch

        host.on_state = on_state
        second = await service.run_plates(chosen, pipeline=demo_pipeline())
        assert service.batch is not None
        return first, second, service.batch

    first, second, batch = run(with_service(host, tmp_path, body))
    assert first.outcome is second.outcome is BatchState.COMPLETED
    assert first.batch_id != second.batch_id
    assert host.names("emit_error") == []
    assert host.late_posted, "the late fact was really posted"
    # The core judged it (the service no longer filters by id): journaled, stale, harmless.
    (late,) = [r for r in batch.journal if getattr(r.fact, "execution_id", None) == old[0]]
    assert late.disposition is Disposition.IGNORED_STALE
    assert late.changes == ()
    assert len(host.names("on_all_plates_completed")) == 2
    assert len(host.names("on_plate_completed")) == 4


def test_ids_come_from_the_injected_factory(tmp_path: Path, plates: list[GeneratedPlate]) -> None:
    """Batch ids and the stimulus ids of the service's own facts are the factory's."""
    host = RecordingHost()
    chosen = selection(plates[:2])

    async def body(service: BatchWorkflowService) -> Batch:
        await service.run_plates(chosen, pipeline=demo_pipeline())
        batch = service.batch
        assert batch is not None
        heard = asyncio.Event()
        batch.journal.listen(lambda r: heard.set() if r.fact.kind == "cancel_requested" else None)
        service.cancel()  # after the batch settled: journaled as stale, with a factory id
        await asyncio.wait_for(heard.wait(), TIMEOUT)
        return batch

    batch = run(with_service(host, tmp_path, body, ids=IdFactory("t")))
    assert batch.batch_id == "t.1"
    made_here = [
        r.fact for r in batch.journal if r.fact.kind in ("batch_started", "cancel_requested")
    ]
    assert [f.stimulus_id for f in made_here] == ["t.2", "t.3"]
    engine_made = {r.fact.stimulus_id for r in batch.journal} - {"t.2", "t.3"}
    assert engine_made, "the engine's facts are journaled too"
    assert not any(s.startswith("t.") for s in engine_made), "an engine has its own ids"
    assert len(engine_made) == len(batch.journal) - 2, "every stimulus id is unique"


def test_two_id_factories_never_hand_out_the_same_id() -> None:
    first, second = IdFactory(), IdFactory()
    ids = {first() for _ in range(100)} | {second() for _ in range(100)}
    assert len(ids) == 200
    with pytest.raises(ValueError, match="non-empty"):
        IdFactory("")
