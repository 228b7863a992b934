"""BatchWorkflowService: runs the core on one event loop, talks to engine and host.

Theory of operation: the service owns nothing but plumbing. Every fact —
from the engine's sink (any thread), from a host's ``cancel`` (any thread),
from a timer or a failed callback — is posted into the service's asyncio
loop and handed to the batch there, one at a time (C6). The batch answers
with decisions; the service carries them out in order: engine calls become
tasks on the loop, host callbacks and store writes go through the host's
dispatcher (C4: after the batch committed and journaled the change). A host
callback that raises is caught where it ran and posted back as a
``HostCallbackFailed`` fact, never handled re-entrantly (C5).

Bounded waits (C7): a cancel the engine does not confirm within
``cancel_grace`` seconds is settled by a ``CancelTimedOut`` fact; an engine
whose submit calls fail with ``EngineError`` is treated as lost; the one
status poller reconciles lost pushes. The seed's flows, step by step, are
in :meth:`compile_plates` and :meth:`run_plates`.

Durability: given a ``journal`` path, a batch writes each record to it as the
batch commits it, before any callback about it runs
(:mod:`plateflow.runtime.journal_file`). The header carries what a new process needs to go on: the
jobs and the engine's identity. :meth:`resume` rebuilds the batch from such a
file by replay, lets the engine :meth:`~plateflow.engines.base.Engine.adopt`
and :meth:`~plateflow.engines.base.Engine.recover` its work, tells the host
once what settled before (``on_resumed``) and reports the rest as usual.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar, final

from pydantic import JsonValue, ValidationError

from plateflow.core import (
    Batch,
    BatchChanged,
    BatchMode,
    BatchResumed,
    BatchSnapshot,
    BatchStarted,
    BatchState,
    BatchSummary,
    CancelRequested,
    CancelSubmission,
    CancelTimedOut,
    CompileFailurePolicy,
    CompileRejected,
    Decision,
    EngineLost,
    ExecutionRejected,
    Fact,
    HostCallbackFailed,
    Journal,
    PlateChanged,
    PlateOutcome,
    PlateState,
    ProgressRecorded,
    ReportBatch,
    ReportError,
    ReportPlate,
    ResumedBatch,
    SettledPlate,
    SubmissionLost,
    SubmitCompile,
    SubmitExecution,
    replay,
)
from plateflow.core.ids import IdFactory
from plateflow.engines.base import Engine, EngineError, Submission
from plateflow.errors import JournalError, UsageError
from plateflow.host import HOST_CALLBACKS, BatchHost
from plateflow.jobs import CompileJob, plate_id_problem
from plateflow.pipeline.spec import PipelineSpec
from plateflow.runtime.dispatch import Dispatcher, inline_dispatcher
from plateflow.runtime.journal_file import JournalFile
from plateflow.runtime.progress import CoalescingProgressEmitter, ProgressProjection
from plateflow.runtime.snapshot_poller import IntervalSnapshotPoller
from plateflow.runtime.status_poller import ExecutionStatusPoller
from plateflow.runtime.submit_wait import BatchSubmitWaitEngine, JobCancelled

__all__ = ["BatchWorkflowService", "Plate", "SyncBatchWorkflowService"]

_DRAIN_PER_TURN = 256
"""Facts handled per turn of the loop before other tasks get a turn."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Plate:
    """A selected plate: its id, where its data is, and optionally its own pipeline."""

    plate_id: str
    path: str
    pipeline: PipelineSpec | None = None


def _selected(plates: Sequence[Plate]) -> list[str]:
    """The plate ids of a selection, in order; a selection that is not one raises."""
    if isinstance(plates, str | bytes) or not isinstance(plates, Sequence):
        raise UsageError(f"plates must be a sequence of Plate, got {type(plates).__name__}")
    ids: list[str] = []
    for index, plate in enumerate(plates):
        if not isinstance(plate, Plate):
            raise UsageError(f"plates[{index}] is a {type(plate).__name__}, not a Plate")
        if not isinstance(plate.plate_id, str):
            raise UsageError(
                f"plates[{index}].plate_id is a {type(plate.plate_id).__name__}, not a string"
            )
        if not plate.plate_id:
            raise UsageError(f"plates[{index}].plate_id is empty; a plate needs an id")
        ids.append(plate.plate_id)
    if len(set(ids)) != len(ids):
        raise UsageError("a plate was selected twice; plate ids must be unique in a batch")
    return ids


def _jobs(
    plates: Sequence[Plate], pipeline: PipelineSpec | None, config: dict[str, JsonValue]
) -> tuple[dict[str, CompileJob], dict[str, str]]:
    """The compile job of every plate whose id passes the door, and why the others do not."""
    refused = {
        p.plate_id: problem for p in plates if (problem := plate_id_problem(p.plate_id)) is not None
    }
    jobs = {}
    for p in plates:
        if p.plate_id in refused:
            continue
        spec = p.pipeline or pipeline
        if spec is None:  # pragma: no cover - a resumed plate always carries its pipeline
            raise UsageError(f"plate {p.plate_id!r} has no pipeline")
        jobs[p.plate_id] = CompileJob(
            plate_id=p.plate_id, plate_path=p.path, pipeline=spec, config=config
        )
    return jobs, refused


def _jobs_context(
    plates: Sequence[Plate], pipeline: PipelineSpec, config: dict[str, JsonValue]
) -> dict[str, JsonValue]:
    """The jobs as the journal's header keeps them: each distinct pipeline once."""
    pipelines: list[JsonValue] = []
    index: dict[int, int] = {}
    rows: list[JsonValue] = []
    for p in plates:
        spec = p.pipeline or pipeline
        if id(spec) not in index:
            index[id(spec)] = len(pipelines)
            pipelines.append(spec.model_dump(mode="json"))
        rows.append([p.plate_id, p.path, index[id(spec)]])
    return {"pipelines": pipelines, "config": dict(config), "plates": rows}


def _resume_context(
    journal: Journal, where: str, engine_name: str
) -> tuple[dict[str, JsonValue], list[Plate], dict[str, JsonValue]]:
    """The engine identity, plates and config a journal's header keeps for a resume."""
    context = journal.header.context
    jobs, engine = context.get("jobs"), context.get("engine")
    if not isinstance(jobs, dict) or not isinstance(engine, dict):
        raise UsageError(
            f"{where} cannot be resumed: its header holds no jobs and engine (it was not "
            "written as the batch ran: pass journal= to run_plates, or use plateflow run)"
        )
    name, identity = engine.get("name"), engine.get("identity", {})
    if name != engine_name:
        raise UsageError(
            f"{where} was written by a batch on the {name!r} engine; this service's engine is "
            f"{engine_name!r}: resume on the same kind of engine"
        )
    try:
        specs = [PipelineSpec.model_validate(raw) for raw in _list(jobs.get("pipelines"))]
        config = jobs.get("config", {})
        if not isinstance(config, dict) or not isinstance(identity, dict):
            raise TypeError("config and identity must be objects")
        plates = []
        for row in _list(jobs.get("plates")):
            plate_id, path, which = _list(row)
            if not (isinstance(plate_id, str) and isinstance(path, str) and type(which) is int):
                raise TypeError(f"a plate must be [id, path, pipeline index], got {row!r}")
            plates.append(Plate(plate_id, path, specs[which]))
    except (ValidationError, TypeError, ValueError, IndexError) as exc:
        raise JournalError(f"{where}:1: the header's resume context is not valid: {exc}") from None
    if [p.plate_id for p in plates] != list(journal.header.plate_ids):
        raise JournalError(f"{where}:1: the header's jobs do not match its plate ids")
    return identity, plates, config


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _check_host(host: object) -> BatchHost:
    if isinstance(host, BatchHost):
        return host
    missing = [name for name in HOST_CALLBACKS if not callable(getattr(host, name, None))]
    lacks = f"; it also lacks {', '.join(missing)}" if missing else ""
    raise TypeError(
        f"host must be an instance of a plateflow.BatchHost subclass, got "
        f"{type(host).__module__}.{type(host).__qualname__}{lacks}. The contract is "
        "nominal: subclass BatchHost (or BaseBatchHost, which has every callback as a no-op)"
    )


@final
class BatchWorkflowService:
    """Compile-only and run batches for one host on one engine, one batch at a time.

    Create it inside a running asyncio loop (or use
    :class:`SyncBatchWorkflowService` from plain threads). ``dispatcher``
    decides where host callbacks run; the default runs them on the loop.
    """

    def __init__(
        self,
        host: BatchHost,
        engine: Engine,
        *,
        dispatcher: Dispatcher = inline_dispatcher,
        policy: CompileFailurePolicy = CompileFailurePolicy.ABORT,
        cancel_grace: float = 10.0,
        status_interval: float = 1.0,
        progress_interval: float = 0.1,
        clock: Callable[[], float] = time.time,
        ids: Callable[[], str] | None = None,
        journal_fsync: bool = False,
    ) -> None:
        self._host = _check_host(host)
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be a plateflow Engine, got {type(engine).__qualname__}")
        self._engine = engine
        self._dispatcher = dispatcher
        self.policy = CompileFailurePolicy(policy)
        self._cancel_grace = cancel_grace
        self._progress_interval = progress_interval
        self._clock = clock
        self._ids = IdFactory() if ids is None else ids
        self._journal_fsync = bool(journal_fsync)
        self._journal_file: JournalFile | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: collections.deque[Fact] = collections.deque()
        self._drain_scheduled = False
        self._engine_started = False
        self._batch: Batch | None = None
        self._jobs: dict[str, CompileJob] = {}
        self._refused: dict[str, str] = {}
        """Plates of the current batch whose id breaks the rule, and why."""
        self._settled: asyncio.Event | None = None
        self._summary: BatchSummary | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._closed = False
        self._projection: ProgressProjection | None = None
        self._emitter: CoalescingProgressEmitter | None = None
        self._poller = ExecutionStatusPoller(
            query=self._engine.status,
            sink=self.post,
            interval=status_interval,
            timeout=max(status_interval, 1.0) * 5,
        )
        self._phases: dict[str, tuple[BatchSubmitWaitEngine[tuple[str, str]], tuple[str, str]]] = {}
        self._server: IntervalSnapshotPoller[dict[str, JsonValue]] = IntervalSnapshotPoller(
            self._engine.server_info,
            self._on_server_info,
            interval=status_interval,
            timeout=max(status_interval, 1.0) * 5,
            on_error=lambda exc: None,  # a slow or failing snapshot only delays the next
        )

    # --- public API ------------------------------------------------------------------

    @property
    def server_info(self) -> dict[str, JsonValue] | None:
        """The latest engine snapshot taken while a batch ran (None before any)."""
        return self._server.latest

    @property
    def batch(self) -> Batch | None:
        """The current (or last) batch: its state, snapshot and journal."""
        return self._batch

    async def compile_plates(
        self,
        plates: Sequence[Plate],
        *,
        pipeline: PipelineSpec,
        config: dict[str, JsonValue] | None = None,
        journal: str | os.PathLike[str] | None = None,
        journal_context: Mapping[str, JsonValue] | None = None,
    ) -> BatchSummary:
        """Compile every plate; plates rest in ``compiled``. Returns the batch summary.

        ``journal`` and ``journal_context``: as for :meth:`run_plates`.
        """
        return await self._run_batch(
            plates, pipeline, config or {}, BatchMode.COMPILE_ONLY, journal, journal_context
        )

    async def run_plates(
        self,
        plates: Sequence[Plate],
        *,
        pipeline: PipelineSpec,
        config: dict[str, JsonValue] | None = None,
        journal: str | os.PathLike[str] | None = None,
        journal_context: Mapping[str, JsonValue] | None = None,
    ) -> BatchSummary:
        """Compile every plate, then execute every plate that compiled.

        With ``journal`` (a file path, replaced if it exists) every record is
        written and flushed there as the batch commits it, before the host
        hears of it, so that :meth:`resume` can take the batch over after a
        crash; ``journal_context`` (JSON) is kept in its header for the host's
        own use (``Journal.load(path).header.context["app"]``). Raises
        :class:`UsageError` when the file cannot be created.
        """
        return await self._run_batch(
            plates, pipeline, config or {}, BatchMode.RUN, journal, journal_context
        )

    async def resume(
        self, journal: str | os.PathLike[str], *, resubmit_lost: bool = False
    ) -> BatchSummary:
        """Take over the batch a crashed process was running, from its journal file.

        The journal must have been written as the batch ran (``journal=`` of
        :meth:`run_plates` / :meth:`compile_plates`, or ``plateflow run``). The
        batch is rebuilt by replay; this service's engine (of the same kind,
        not started yet) adopts the journal's engine identity and recovers
        every unsettled submission. The host gets ``on_resumed`` once, with the
        plates settled before the restart, then ``on_plate_completed`` once per
        other plate and the batch callbacks once. A submission the engine no
        longer knows settles its plate ``failed`` (``lost_in_restart``), or is
        submitted again with ``resubmit_lost`` (which can run work twice when
        the engine cannot tell that it never ran; see docs/crashes.md). New
        records are appended to the same file. Returns the batch's summary.
        """
        if self._closed:
            raise UsageError("the service is closed")
        if self._batch is not None and not self._batch.settled:
            raise UsageError(f"batch {self._batch.batch_id} is still {self._batch.state.value}")
        if self._engine_started:
            raise UsageError(
                "resume needs an engine that has not started yet (it must adopt the crashed "
                "process's work before it starts): make a new service and engine to resume"
            )
        path = Path(journal)
        loaded = Journal.load(path)
        identity, plates, config = _resume_context(loaded, str(path), self._engine.name)
        batch = replay(loaded, then=self._clock)
        self._loop = asyncio.get_running_loop()
        self._engine.adopt(identity)
        await self._engine.start(self.post)
        self._engine_started = True
        jobs, refused = _jobs(plates, None, config)
        try:
            journal_file = JournalFile.reopen(
                path, loaded, fsync=self._journal_fsync, on_error=self._journal_failed
            )
        except OSError as exc:
            raise UsageError(
                f"cannot append to the journal {path}: {exc.strerror or exc}"
            ) from None
        snapshot = batch.snapshot()
        self._begin(batch, jobs, refused, journal_file)
        assert self._projection is not None
        for plate in snapshot.plates:
            self._projection.set_state(plate.plate_id, plate.state)
            if plate.total:
                self._projection.record(plate.plate_id, plate.done, plate.total)
        settled = batch.settled_plates()
        resumed = ResumedBatch(
            batch_id=batch.batch_id,
            mode=batch.mode,
            state=batch.state,
            settled=settled,
            unsettled=tuple(p.plate_id for p in snapshot.plates if p.outcome is None),
            journal=str(path),
            records=len(loaded),
        )
        self._to_host(
            "emit_progress_started",
            len(batch.plate_ids),
            store=partial(self._restore_stores, snapshot, settled),
        )
        self._to_host("on_resumed", resumed)
        self._handle(
            BatchResumed(
                stimulus_id=self._ids(),
                note=f"{len(settled)} of {len(batch.plate_ids)} plates had settled; "
                f"{'resubmitting' if resubmit_lost else 'failing'} lost submissions",
            )
        )
        if batch.settled:
            self._finish(batch.summary())
        elif batch.state is BatchState.IDLE:
            # The crash came before the start was journaled.
            self._handle(BatchStarted(stimulus_id=self._ids()))
        else:
            self._spawn(self._reattach(batch, resubmit_lost))
        return await self._until_settled()

    def cancel(self, plate_id: str | None = None) -> None:
        """Cancel one plate, or the whole batch. Safe to call from any thread."""
        batch = self._batch
        if plate_id is not None and batch is not None and plate_id not in batch.plate_ids:
            raise UsageError(f"cannot cancel {plate_id!r}: it is not in the current batch")
        self.post(CancelRequested(stimulus_id=self._ids(), plate_id=plate_id))

    def post(self, fact: Fact) -> None:
        """Hand a fact to the batch from any thread (the engines' sink).

        Facts queue in arrival order; one wake-up of the loop drains however
        many arrived meanwhile, so a burst costs one wake-up, not one each.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        self._inbox.append(fact)
        if self._drain_scheduled:
            return  # the scheduled drain will take this fact too
        self._drain_scheduled = True
        try:
            loop.call_soon_threadsafe(self._drain_inbox)
        except RuntimeError:  # the loop closed between the check and the call
            return

    def _drain_inbox(self) -> None:
        """Runs on the loop: handle queued facts, a bounded number per turn of the loop."""
        inbox = self._inbox
        try:
            for _ in range(_DRAIN_PER_TURN):
                if not inbox:
                    break
                self._handle(inbox.popleft())
        finally:
            # Cleared before looking again: a fact posted after this line schedules its
            # own drain, one posted before it is seen below.
            self._drain_scheduled = False
            if inbox and self._loop is not None and not self._loop.is_closed():
                self._drain_scheduled = True
                self._loop.call_soon(self._drain_inbox)

    async def close(self) -> None:
        """Cancel a running batch (waiting up to the cancel grace), then close the engine."""
        if self._closed:
            return
        self._closed = True
        batch, settled = self._batch, self._settled
        if batch is not None and settled is not None and not batch.settled:
            self._handle(CancelRequested(stimulus_id=self._ids()))
            try:
                await asyncio.wait_for(settled.wait(), self._cancel_grace + 1.0)
            except TimeoutError:
                self._handle(
                    EngineLost(
                        stimulus_id=self._ids(), reason="service closed before the engine confirmed"
                    )
                )
        await self._poller.stop()
        for timer in self._timers.values():
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._engine_started:
            await self._engine.close()
        if self._journal_file is not None:
            self._journal_file.close()

    # --- the seed's flows ----------------------------------------------------------------

    async def _run_batch(
        self,
        plates: Sequence[Plate],
        pipeline: PipelineSpec,
        config: dict[str, JsonValue],
        mode: BatchMode,
        journal: str | os.PathLike[str] | None,
        journal_context: Mapping[str, JsonValue] | None,
    ) -> BatchSummary:
        if self._closed:
            raise UsageError("the service is closed")
        if self._batch is not None and not self._batch.settled:
            raise UsageError(
                f"batch {self._batch.batch_id} is still {self._batch.state.value}; "
                "wait for it or cancel it before starting another"
            )
        selected = _selected(plates)
        self._loop = asyncio.get_running_loop()
        if not self._engine_started:
            await self._engine.start(self.post)
            self._engine_started = True
        # The door: one plate-id rule for every engine. A plate that breaks it is
        # rejected at its submission (a fact like any engine's refusal), never sent.
        # Build a CompileJob for every other plate (the seed's step 2 / 3).
        jobs, refused = _jobs(plates, pipeline, config)
        context: dict[str, JsonValue] | None = None
        if journal is not None:
            context = {
                "jobs": _jobs_context(plates, pipeline, config),
                "engine": {"name": self._engine.name, "identity": self._engine.identity()},
                "app": dict(journal_context or {}),
            }
        batch = Batch(
            self._ids(),
            selected,
            mode=mode,
            policy=self.policy,
            clock=self._clock,
            context=context,
        )
        journal_file = None
        if journal is not None:
            try:
                journal_file = JournalFile.create(
                    journal,
                    batch.journal.header,
                    fsync=self._journal_fsync,
                    on_error=self._journal_failed,
                )
            except OSError as exc:
                raise UsageError(
                    f"cannot write the journal {journal}: {exc.strerror or exc}"
                ) from None
            except (TypeError, ValueError) as exc:  # the host's context is not JSON
                raise UsageError(f"journal_context must be JSON: {exc}") from None
        self._begin(batch, jobs, refused, journal_file)
        self._to_host(
            "emit_progress_started", len(selected), store=partial(self._reset_stores, selected)
        )
        self._handle(BatchStarted(stimulus_id=self._ids()))
        return await self._until_settled()

    def _begin(
        self,
        batch: Batch,
        jobs: dict[str, CompileJob],
        refused: dict[str, str],
        journal_file: JournalFile | None,
    ) -> None:
        """Make ``batch`` the current one: its jobs, journal file, progress and phases."""
        if self._journal_file is not None:
            self._journal_file.close()
        self._journal_file = journal_file
        if journal_file is not None:
            batch.journal.listen(journal_file.append)
        self._batch, self._jobs, self._refused, self._summary = batch, jobs, refused, None
        self._settled = asyncio.Event()
        # Reset progress and execution state; mark every plate queued at once.
        self._projection = ProgressProjection(batch.plate_ids, mode=batch.mode, clock=self._clock)
        self._emitter = CoalescingProgressEmitter(
            self._projection,
            lambda snap: self._to_host(
                "emit_progress_updated", snap, store=partial(self._store_progress, snap)
            ),
            interval=self._progress_interval,
        )
        self._phases = {}

    async def _until_settled(self) -> BatchSummary:
        assert self._settled is not None
        self._server.start()
        try:
            await self._settled.wait()
        finally:
            await self._server.stop()
        assert self._summary is not None  # set with the event
        return self._summary

    async def _reattach(self, batch: Batch, resubmit_lost: bool) -> None:
        """Resume: ask the engine about every unsettled submission, then go on with them."""
        wanted = [Submission(p, phase, sid) for p, phase, sid in batch.outstanding()]
        if not wanted:
            return
        try:
            recovered = await self._engine.recover(wanted)
        except EngineError as exc:
            self.post(
                EngineLost(
                    stimulus_id=self._ids(),
                    reason=f"{self._engine.name}: cannot recover the work: {exc}",
                )
            )
            return
        unknown = {s.submission_id for s in recovered.unknown}
        snapshot = batch.snapshot()
        known: list[SubmitCompile | SubmitExecution] = []
        for sub in wanted:
            if sub.submission_id in unknown:
                continue
            if sub.phase == "compile":
                known.append(SubmitCompile(sub.plate_id, sub.submission_id, ""))
            else:
                artifact = snapshot.plate(sub.plate_id).artifact_id or ""
                known.append(SubmitExecution(sub.plate_id, sub.submission_id, artifact, ""))
        if known:
            self._submit_all(known, submitted=True)
        for fact in recovered.facts:
            self.post(fact)
        for sub in recovered.unknown:
            self.post(
                SubmissionLost(
                    stimulus_id=self._ids(),
                    plate_id=sub.plate_id,
                    phase=sub.phase,
                    submission_id=sub.submission_id,
                    resubmit=resubmit_lost,
                    never_ran=sub.submission_id in recovered.never_ran,
                )
            )
        for sub in wanted:  # a cancel asked for before the crash is asked for again
            plate = snapshot.plate(sub.plate_id)
            if plate.cancel_requested and sub.submission_id not in unknown:
                self._spawn(self._cancel(sub))
                self._arm_cancel_timer(sub.plate_id)

    def _journal_failed(self, reason: str) -> None:
        """The journal file stopped growing: tell the host (after the current fact)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon(
                partial(self._to_host, "emit_error", reason, code="journal_write_failed")
            )

    # --- facts in, decisions out -------------------------------------------------------------

    def _handle(self, fact: Fact) -> None:
        """Runs on the loop only: one fact into the batch, then its decisions out."""
        batch = self._batch
        if batch is None:
            return
        # Every fact is the batch's to judge, and journaled: a late fact about an earlier
        # batch's submission is found stale by the core's fact table, not filtered here.
        submission_id = getattr(fact, "job_id", None) or getattr(fact, "execution_id", None)
        if submission_id is not None:
            self._poller.heard(submission_id, type(fact))  # a no-op for ids it does not track
        submissions: list[SubmitCompile | SubmitExecution] = []
        for decision in batch.handle(fact):
            if isinstance(decision, SubmitCompile | SubmitExecution):
                submissions.append(decision)
            else:
                self._carry_out(decision)
        if submissions:
            self._submit_all(submissions)

    def _carry_out(self, d: Decision) -> None:
        if isinstance(d, CancelSubmission):
            self._spawn(self._cancel(Submission(d.plate_id, d.phase, d.submission_id)))
            self._arm_cancel_timer(d.plate_id)
        elif isinstance(d, PlateChanged):
            if d.new is PlateState.COMPILED:
                self._job_done(d.plate_id, "compiled")
            if self._emitter is not None:
                self._emitter.apply(d)
            self._to_host(
                "emit_orchestrator_state",
                d.plate_id,
                d.new,
                store=partial(self._store_state, d.plate_id, d.new),
            )
        elif isinstance(d, BatchChanged):
            self._to_host("update_button_states", d.new)
            self._to_host("emit_status", f"batch {self._batch_id()}: {d.new.value}")
        elif isinstance(d, ProgressRecorded):
            if self._emitter is not None:
                self._emitter.apply(d)
        elif isinstance(d, ReportPlate):
            self._job_done(d.plate_id, d.outcome.value)
            timer = self._timers.pop(d.plate_id, None)
            if timer is not None:
                timer.cancel()
            if d.outcome is PlateOutcome.COMPILED:
                self._to_host(
                    "update_item_list", store=partial(self._store_compiled, d.plate_id, d.result)
                )
            self._to_host("on_plate_completed", d.plate_id, d.outcome, d.result)
        elif isinstance(d, ReportBatch):
            self._finish(d.summary)
        elif isinstance(d, ReportError):
            self._to_host("emit_error", d.message, code=str(d.code), plate_id=d.plate_id)

    def _finish(self, summary: BatchSummary) -> None:
        for plate_id in list(self._phases):  # every plate settled: no phase waits any more
            self._job_done(plate_id, "settled")
        final = None
        if self._emitter is not None and self._projection is not None:
            self._emitter.close()
            final = self._projection.snapshot()
        self._to_host("update_item_list")
        self._to_host("on_all_plates_completed", summary)
        self._to_host("emit_execution_complete", summary)
        if final is not None:
            self._to_host(
                "emit_progress_finished", final, store=partial(self._store_progress, final)
            )
        self._summary = summary
        if self._settled is not None:
            self._settled.set()

    # --- engine side -------------------------------------------------------------------------

    def _submit_all(
        self, decisions: list[SubmitCompile | SubmitExecution], *, submitted: bool = False
    ) -> None:
        """Submit every job of a phase, then wait for all of them (the seed's step 3/4).

        The batch decides what is submitted and when a phase is over; the
        submit/wait engine carries the submissions out concurrently and
        resolves each job when the batch reports the plate compiled or settled.
        ``submitted``: a resumed batch's submissions the engine recovered, which
        are waited for but not sent again.
        """
        by_key: dict[tuple[str, str], SubmitCompile | SubmitExecution] = {}
        for d in decisions:
            if isinstance(d, SubmitCompile):
                key, submission = (
                    (d.plate_id, d.job_id),
                    Submission(d.plate_id, "compile", d.job_id),
                )
            else:
                key = (d.plate_id, d.execution_id)
                submission = Submission(d.plate_id, "execute", d.execution_id)
                self._to_host(
                    "update_item_list",
                    store=partial(self._store_execution, d.plate_id, d.execution_id, d.artifact_id),
                )
            by_key[key] = d
            self._poller.track(submission)

        async def submit(key: tuple[str, str]) -> None:
            if submitted:
                return
            d = by_key[key]
            problem = self._refused.get(d.plate_id)
            if problem is not None and isinstance(d, SubmitCompile):
                self.post(
                    CompileRejected(
                        stimulus_id=self._ids(),
                        plate_id=d.plate_id,
                        job_id=d.job_id,
                        error=f"plateflow refused this plate id: {problem}",
                    )
                )
                return
            job = self._jobs[d.plate_id]
            if isinstance(d, SubmitCompile):
                await self._engine.submit_compile(d.job_id, job)
            else:
                await self._engine.submit_execution(d.execution_id, job, d.artifact_id)

        async def cancel(key: tuple[str, str]) -> None:
            d = by_key[key]
            phase: Literal["compile", "execute"] = (
                "compile" if isinstance(d, SubmitCompile) else "execute"
            )
            await self._cancel(Submission(d.plate_id, phase, key[1]))

        def refused(key: tuple[str, str], error: BaseException) -> None:
            if not isinstance(error, JobCancelled):  # a submit call raised
                self.post(self._refusal(by_key[key], error))

        phase = BatchSubmitWaitEngine(submit, cancel, fail_fast=False, on_error=refused)
        for key in by_key:
            self._phases[key[0]] = (phase, key)
        self._spawn(self._wait_phase(phase, list(by_key)))

    async def _wait_phase(
        self, phase: BatchSubmitWaitEngine[tuple[str, str]], keys: list[tuple[str, str]]
    ) -> None:
        await phase.run(keys)

    def _job_done(self, plate_id: str, how: str) -> None:
        entry = self._phases.pop(plate_id, None)
        if entry is not None:
            phase, key = entry
            phase.complete(key, how)
            self._poller.untrack(key[1])

    def _refusal(self, d: SubmitCompile | SubmitExecution, error: BaseException) -> Fact:
        if isinstance(error, EngineError):
            return EngineLost(stimulus_id=self._ids(), reason=f"{self._engine.name}: {error}")
        message = f"{type(error).__name__}: {error}"
        if isinstance(d, SubmitCompile):
            return CompileRejected(
                stimulus_id=self._ids(), plate_id=d.plate_id, job_id=d.job_id, error=message
            )
        return ExecutionRejected(
            stimulus_id=self._ids(), plate_id=d.plate_id, execution_id=d.execution_id, error=message
        )

    async def _cancel(self, submission: Submission) -> None:
        try:
            await self._engine.cancel(submission)
        except EngineError as exc:
            self.post(EngineLost(stimulus_id=self._ids(), reason=f"{self._engine.name}: {exc}"))
        except Exception as exc:  # the timer settles the plate if nothing confirms
            self._to_host(
                "emit_error",
                f"cancel of {submission.submission_id} failed: {type(exc).__name__}: {exc}",
                code="cancel_failed",
                plate_id=submission.plate_id,
            )

    def _on_server_info(self, info: dict[str, JsonValue]) -> None:
        """Server-status emission (the seed's third duty): only when the snapshot changed."""
        counts = ", ".join(
            f"{info[key]} {key}" for key in ("running", "queued") if isinstance(info.get(key), int)
        )
        self._to_host("emit_status", f"engine {self._engine.name}: {counts or 'up'}")

    def _arm_cancel_timer(self, plate_id: str) -> None:
        loop = self._loop
        if loop is None or plate_id in self._timers:
            return
        self._timers[plate_id] = loop.call_later(
            self._cancel_grace,
            self._handle,
            CancelTimedOut(stimulus_id=self._ids(), plate_id=plate_id),
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _batch_id(self) -> str:
        return self._batch.batch_id if self._batch is not None else "-"

    # --- host side ---------------------------------------------------------------------------

    def _to_host(
        self,
        callback: str,
        *args: Any,
        store: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write a store, then call one host callback, on the dispatcher's thread (C4-C6)."""
        host = self._host
        plate_id = args[0] if args and isinstance(args[0], str) else kwargs.get("plate_id")

        def deliver() -> None:
            try:
                if store is not None:
                    store()
                getattr(host, callback)(*args, **kwargs)
            except Exception as exc:  # C5: report, never stop
                self.post(
                    HostCallbackFailed(
                        stimulus_id=self._ids(),
                        callback=callback,
                        plate_id=plate_id,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                )

        self._dispatcher(deliver)

    def _reset_stores(self, plate_ids: list[str]) -> None:
        host = self._host
        for plate_id in plate_ids:
            host.plate_compiled_data.pop(plate_id, None)
            host.plate_execution_ids.pop(plate_id, None)
            host.plate_execution_states.pop(plate_id, None)
        host.progress_tracker = None

    def _restore_stores(self, snapshot: BatchSnapshot, settled: Sequence[SettledPlate]) -> None:
        """A resumed batch's stores: every plate's state and ids as the journal left them."""
        self._reset_stores([plate.plate_id for plate in snapshot.plates])
        host = self._host
        for plate in snapshot.plates:
            host.plate_execution_states[plate.plate_id] = plate.state
            if plate.artifact_id is not None:
                host.plate_compiled_data[plate.plate_id] = plate.artifact_id
            if plate.execution_id is not None:
                host.plate_execution_ids[plate.plate_id] = plate.execution_id
        for report in settled:
            if report.outcome is PlateOutcome.COMPILED:
                host.plate_compiled_data[report.plate_id] = report.result

    def _store_state(self, plate_id: str, state: Any) -> None:
        self._host.plate_execution_states[plate_id] = state

    def _store_compiled(self, plate_id: str, artifact: JsonValue) -> None:
        self._host.plate_compiled_data[plate_id] = artifact

    def _store_execution(self, plate_id: str, execution_id: str, artifact_id: str) -> None:
        self._host.plate_execution_ids[plate_id] = execution_id
        self._host.plate_compiled_data[plate_id] = artifact_id

    def _store_progress(self, snapshot: Any) -> None:
        self._host.progress_tracker = snapshot


@final
class SyncBatchWorkflowService:
    """The synchronous facade: the service on a private event-loop thread.

    For scripts and hosts without asyncio. Calls block until the batch
    settles; ``cancel`` may be called from any thread meanwhile. Use it as a
    context manager, or call :meth:`close`.
    """

    def __init__(self, host: BatchHost, engine: Engine, **options: Any) -> None:
        _check_host(host)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="plateflow-service", daemon=True
        )
        self._thread.start()
        self._service: BatchWorkflowService = self._call(self._make(host, engine, options))

    @staticmethod
    async def _make(
        host: BatchHost, engine: Engine, options: dict[str, Any]
    ) -> BatchWorkflowService:
        return BatchWorkflowService(host, engine, **options)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    @property
    def service(self) -> BatchWorkflowService:
        return self._service

    def compile_plates(
        self,
        plates: Sequence[Plate],
        *,
        pipeline: PipelineSpec,
        config: dict[str, JsonValue] | None = None,
        journal: str | os.PathLike[str] | None = None,
        journal_context: Mapping[str, JsonValue] | None = None,
    ) -> BatchSummary:
        return self._call(
            self._service.compile_plates(
                plates,
                pipeline=pipeline,
                config=config,
                journal=journal,
                journal_context=journal_context,
            )
        )

    def run_plates(
        self,
        plates: Sequence[Plate],
        *,
        pipeline: PipelineSpec,
        config: dict[str, JsonValue] | None = None,
        journal: str | os.PathLike[str] | None = None,
        journal_context: Mapping[str, JsonValue] | None = None,
    ) -> BatchSummary:
        return self._call(
            self._service.run_plates(
                plates,
                pipeline=pipeline,
                config=config,
                journal=journal,
                journal_context=journal_context,
            )
        )

    def resume(
        self, journal: str | os.PathLike[str], *, resubmit_lost: bool = False
    ) -> BatchSummary:
        """:meth:`BatchWorkflowService.resume`, blocking until the batch settles."""
        return self._call(self._service.resume(journal, resubmit_lost=resubmit_lost))

    def cancel(self, plate_id: str | None = None) -> None:
        self._service.cancel(plate_id)

    def close(self, timeout: float = 30.0) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self._service.close(), timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self._loop.close()

    def __enter__(self) -> SyncBatchWorkflowService:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
