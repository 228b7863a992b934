"""One test per planted bug that the whole suite used to let through (issue 13).

A mutation run planted 47 realistic bugs in the core, the service and the
diagram generator, one at a time; nine survived every test. Each test below is
named for the bug it pins and fails with that bug planted (checked by planting
it again).
"""

from __future__ import annotations

import asyncio
import collections
import re
from typing import Any

import pytest

from helpers import feed, job, make_batch
from plateflow.core import (
    BATCH_TABLE,
    PLATE_TABLE,
    BatchStarted,
    CancelRequested,
    CompileSucceeded,
    Fact,
    HostCallbackFailed,
    Journal,
    PlateEvent,
    PlateState,
    Reason,
    SubmitExecution,
    replay,
)
from plateflow.core.machines import TableMachine
from plateflow.engines.base import EngineError
from plateflow.errors import ConvergenceViolation, InvalidTransition, JournalError
from plateflow.jobs import CompileJob
from plateflow.service import BatchWorkflowService
from plateflow.statecharts import escape_id, to_dot
from plateflow.testing import RecordingHost
from test_resume import (
    PIPELINE,
    WAIT,
    World,
    WorldEngine,
    _bounded,
    _finished,
    _plates,
    _started,
    _until,
)

# --- the core ------------------------------------------------------------------------------


def test_a_plate_settled_before_the_start_still_lets_the_compile_barrier_open() -> None:
    """Bug: the awaiting-compile count was not decremented for a plate that settled while
    the batch was idle, so the others compiled and then waited for ever."""
    batch = make_batch(2)
    feed(batch, [CancelRequested(plate_id="p0"), BatchStarted()])
    decisions = batch.handle(
        CompileSucceeded(plate_id="p1", job_id=job(batch, "p1"), artifact_id="a1")
    )
    assert [d.plate_id for d in decisions if isinstance(d, SubmitExecution)] == ["p1"]
    assert batch.state == "executing"


def _journal_with_a_failed_callback() -> Journal:
    batch = make_batch(2)
    feed(
        batch,
        [
            BatchStarted(),
            HostCallbackFailed(callback="on_plate_completed", plate_id="p0", error="boom"),
            CompileSucceeded(plate_id="p0", job_id=job(batch, "p0"), artifact_id="a0"),
        ],
    )
    return batch.journal


def test_replay_feeds_host_callback_failures_too_and_rebuilds_the_same_journal() -> None:
    """Bug: replay skipped ``HostCallbackFailed`` records; snapshots alone never showed it."""
    journal = _journal_with_a_failed_callback()
    again = replay(journal).journal
    assert len(again) == len(journal)
    assert [(r.fact, r.disposition, r.detail, r.changes) for r in again] == [
        (r.fact, r.disposition, r.detail, r.changes) for r in journal
    ]


def test_replay_refuses_a_record_whose_changes_were_edited() -> None:
    """Bug: replay compared each record's disposition only, not the changes it caused."""
    journal = _journal_with_a_failed_callback()
    records = list(journal.records)
    edited = records[-1]._replace(changes=records[-1].changes[:-1])
    with pytest.raises(JournalError, match="replayed as applied with 2 change"):
        replay(Journal(journal.header, [*records[:-1], edited]))


def test_a_convergence_that_raised_leaves_no_later_move_allowed_to_converge() -> None:
    """Bug: ``TableMachine.converge`` without try/finally: after a convergence that raised,
    the next ordinary ``fire`` could take a terminal row unguarded (C1)."""
    machine: TableMachine[PlateState, PlateEvent] = TableMachine(
        "plate", PLATE_TABLE, PlateState, PlateState.IDLE
    )
    with pytest.raises(InvalidTransition):  # completed is not reachable from idle
        machine.converge("p0", PlateState.IDLE, PlateEvent.CONVERGE_COMPLETED, "s1")
    with pytest.raises(ConvergenceViolation):
        machine.fire("p0", PlateState.IDLE, PlateEvent.CONVERGE_FAILED, "s2")


# --- the diagrams ---------------------------------------------------------------------------


@pytest.mark.parametrize("table", [PLATE_TABLE, BATCH_TABLE], ids=["plate", "batch"])
def test_dot_draws_every_edge_to_the_state_its_row_names(table: Any) -> None:
    """Bug: DOT drew the convergence edges as self-loops; DOT targets were never compared
    with the table."""
    dot = to_dot(table)
    drawn = re.findall(r'^    "([^"]+)" -> "([^"]+)"', dot, re.M)
    expected = [(escape_id(r.source.value), escape_id((r.dest or r.source).value)) for r in table]
    assert [edge for edge in drawn if edge[0] != "_start"] == expected


# --- the service ----------------------------------------------------------------------------


async def _running(n: int = 1) -> tuple[BatchWorkflowService, World, asyncio.Task[Any]]:
    """A batch executing on a world, every fact so far handled: nothing else reaches the
    journal while the test looks."""
    world = World()
    host = RecordingHost()
    service, task = await _started(world, n, host=host)
    await _until(
        lambda: (
            [service.batch.plate_state(p) for p in host.plate_execution_states]  # type: ignore[union-attr]
            == [PlateState.EXECUTING] * n
            and not service._inbox
        ),
        "every plate executing",
    )
    return service, world, task


@_bounded
async def test_a_burst_of_more_facts_than_one_drain_takes_is_all_handled_without_another_post() -> (
    None
):
    """Bug: the drain did not reschedule itself past 256 facts: of 300 posted at once, 44
    waited in the inbox until something else was posted."""
    service, world, task = await _running()
    assert service.batch is not None
    before = len(service.batch.journal)
    for _ in range(300):
        service.post(HostCallbackFailed(callback="emit_error", error="noise"))
    await _until(lambda: len(service.batch.journal) == before + 300, "all 300 facts handled")  # type: ignore[union-attr]
    await _finished(world, service, task)


class _RacingInbox(collections.deque[Fact]):
    """An inbox that lets "another thread" post a fact at the worst moment: right after
    the drain's last look at it found it empty (the second empty look of one drain)."""

    def __init__(self, service: BatchWorkflowService, fact: Fact) -> None:
        super().__init__()
        self.service = service
        self.fact: Fact | None = fact
        self.empty_looks = 0
        self.armed = False

    def __bool__(self) -> bool:
        empty = len(self) == 0
        if empty and self.armed:
            self.empty_looks += 1
            if self.empty_looks == 2 and self.fact is not None:
                fact, self.fact = self.fact, None
                self.service.post(fact)
        return not empty


@_bounded
async def test_a_fact_posted_while_the_drain_finishes_is_not_left_in_the_inbox() -> None:
    """Bug: a lost wake-up: the drain looked at the inbox before clearing its "scheduled"
    flag, so a fact posted in between scheduled no drain and waited for the next post."""
    service, world, task = await _running()
    assert service.batch is not None
    inbox = _RacingInbox(service, HostCallbackFailed(callback="emit_error", error="late"))
    inbox.extend(service._inbox)
    service._inbox = inbox  # the test reaches in: the race is between two lines of code
    before = len(service.batch.journal)
    inbox.armed = True
    service.post(HostCallbackFailed(callback="emit_error", error="first"))
    await _until(lambda: len(service.batch.journal) == before + 2, "both facts handled")  # type: ignore[union-attr]
    assert inbox.fact is None, "the racing post happened"
    await _finished(world, service, task)


@_bounded
async def test_a_cancel_timer_that_fired_does_not_stop_a_later_batch_from_arming_its_own() -> None:
    """Bug: the cancel-timer entry was kept after it fired, so a later batch cancelling a
    plate of the same id, never confirmed, got no grace timer and never settled (C7)."""
    world = World()  # it never confirms a cancel
    host = RecordingHost()
    service = BatchWorkflowService(
        host, WorldEngine(world), status_interval=30.0, cancel_grace=0.05
    )
    for _ in range(2):
        task = asyncio.get_running_loop().create_task(
            service.run_plates(_plates(1), pipeline=PIPELINE)
        )
        await _until(lambda: bool(world.running_ids("execute")), "the execution submitted")
        service.cancel("p0")
        summary = await asyncio.wait_for(task, 5)
        assert [s.reason for s in summary.plates] == [Reason.CANCEL_UNCONFIRMED]
        world.running.clear()
    await service.close()


class _BrokenSubmit(WorldEngine):
    async def submit_compile(self, job_id: str, job: CompileJob) -> None:
        raise EngineError("the connection to the engine is gone")


@_bounded
async def test_an_engine_error_from_submit_is_engine_loss_not_one_plates_rejection() -> None:
    """Bug: an ``EngineError`` raised by ``submit`` was taken for that plate's rejection:
    under abort the others ended ``batch_aborted``, after the barrier they waited on a
    dead engine."""
    service = BatchWorkflowService(RecordingHost(), _BrokenSubmit(World()), status_interval=30.0)
    summary = await asyncio.wait_for(service.run_plates(_plates(3), pipeline=PIPELINE), WAIT)
    await service.close()
    assert {s.reason for s in summary.plates} == {Reason.ENGINE_LOST}
