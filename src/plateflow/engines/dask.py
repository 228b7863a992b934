"""The Dask engine: compiles and executes plates as ``dask.distributed`` futures.

Theory of operation: every submission is one Dask task with a key the batch
decides (``("plateflow-compile", job_id, plate_id)`` and
``("plateflow-execute", execution_id, plate_id)``; the ids already name the
batch and the plate), so a task on the dashboard or in a scheduler log says
which plate of which batch it is. The execute task takes the plate's compile
future as its argument: the compiled pipeline is a task dependency, moved
between workers by Dask (and recomputed by Dask if the worker holding it
dies before the execution ran), never fetched by the client.

Facts come from two Dask callbacks and nothing polls. A running task reports
``started``, throttled ``progress`` and the compile outcome as *structured
events* (``Worker.log_event`` on one topic per engine), which the scheduler
forwards to this client's ``subscribe_topic`` handler, on the client's event
loop, in the order the task sent them. The terminal fact of an execution (its
result) and every abnormal end (an error, a cancelled future, a lost worker)
come from ``Future.add_done_callback``. Dask runs those callbacks on one
thread of its own ("Dask-Callback-Thread", shared by every future in the
process), so a callback must not block and must not use the client's
blocking API (Dask's issues #647 and #789); ours reads ``future.status``,
pushes a fact when that is all it needs, and otherwise hands the future back
to the client's loop, where the result is awaited. The sink is thread-safe, so
facts may be pushed from either thread; the engine's bookkeeping is guarded by
one lock, and the first terminal fact of a submission wins.

Cancel is cooperative, through the step context. Dask never interrupts a
running task (a thread cannot be killed), and isolating every execution in a
child process the task could stop would cost a process start per plate and
fails outright on the usual Dask deployment, whose worker processes are
daemonic and may not have children. So: a queued execution is cancelled by
Dask and never runs; a running one is asked to stop through ``client.run`` on
the worker that runs it (it announced its address when it started), which
makes ``ctx.cancelled`` true there; the step stops at its next
``ctx.check_cancelled()``, the task returns "cancelled", and only then is
``ExecutionCancelled`` pushed, so a confirmed cancel means the work really
stopped. A step that never looks keeps its worker thread until it returns;
the service settles the plate after its cancel grace (``cancel_unconfirmed``).

Loss: the client lost its connection to the scheduler when Dask cancels our
futures without our asking (it does so the moment the connection drops); a
watchdog also asks the scheduler for its identity every ``liveness_interval``
seconds and gives it ``liveness_timeout`` seconds to answer, which catches a
scheduler that hangs or a network that silently drops. Either way the engine
pushes :class:`EngineLost` once, pushes nothing after it, and raises
:class:`EngineError` from every later call. The bound: loss is pushed within
``liveness_interval + liveness_timeout`` seconds (4 s by default) of the
scheduler's last answer, and at once when the connection visibly closes. A
worker that dies fails the executions it was running (the scheduler's
``remove-worker`` event names it; on a cluster this engine started, Dask is
also told not to retry such a task), and no other plate is touched.

Surviving the host: on a scheduler given by address, the engine keeps every
submission it holds published on the scheduler (``_dask_keep``), so its work
outlives its client, under a namespace (the event topic) that ``identity()``
names. A new engine that ``adopt``s that identity subscribes to the same topic
(progress of the old work reaches it) and ``recover`` fetches the published
futures, asks the scheduler which have ended and the workers which run, and
tracks them as its own. Facts of a submission are held back until its
publication landed and its Accepted fact is pushed, and, while ``recover``
runs, left to its answer. A LocalCluster the engine started dies with it:
nothing is published there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from typing import Any, Final, Literal, final

import dask
from distributed import Client, KilledWorker, LocalCluster, get_worker
from pydantic import JsonValue

from plateflow.core.decoding import valid_text
from plateflow.core.facts import (
    CompileAccepted,
    CompileRejected,
    CompileSucceeded,
    EngineLost,
    ExecutionAccepted,
    ExecutionProgress,
    ExecutionRejected,
    ExecutionStarted,
    ExecutionSucceeded,
    Fact,
)
from plateflow.engines import _dask_keep as keep
from plateflow.engines._dask_keep import Keeper, Kept
from plateflow.engines.base import (
    Engine,
    EngineError,
    FactSink,
    Recovered,
    Submission,
    cancelled_fact,
    failed_fact,
    status_fact,
)
from plateflow.errors import UsageError
from plateflow.jobs import CompileJob
from plateflow.pipeline.run import (
    DEFAULT_ALLOWED_MODULES,
    CompiledPipeline,
    PipelineError,
    StepCancelled,
    StepContext,
    compile_pipeline,
    execute_pipeline,
)
from plateflow.pipeline.spec import PipelineSpec

__all__ = ["DaskEngine"]

# distributed is annotated only in part (Client.cancel, Future.release and friends are
# not): the client-side objects are typed as Any at this one boundary.
_Client: Any = Client
_LocalCluster: Any = LocalCluster
_DaskFuture = Any

_log = logging.getLogger(__name__)

_Phase = Literal["compile", "execute"]
_STOP_TTL: Final = 3600.0
"""How long a worker remembers a stop request for an execution it never ran."""


# --- on the workers ---------------------------------------------------------------------
#
# These functions run in Dask worker processes (or threads, on an in-process cluster).
# They are module-level so that Dask pickles them by reference: every worker needs
# plateflow installed, and the step modules importable, exactly as the local engine's.

_stop_lock = threading.Lock()
_stop_requests: dict[str, float] = {}
"""Executions asked to stop on this worker: id -> when (monotonic)."""
_running: dict[str, tuple[str, int]] = {}
"""Executions running in this process: id -> (worker address, pid), for a resuming engine."""


def _request_stop(execution_id: str) -> bool:
    """Ask an execution on this worker to stop (sent by ``client.run``)."""
    now = time.monotonic()
    with _stop_lock:
        for stale in [k for k, t in _stop_requests.items() if now - t > _STOP_TTL]:
            del _stop_requests[stale]
        _stop_requests[execution_id] = now
    return True


def _stop_requested(execution_id: str) -> bool:
    return execution_id in _stop_requests


def _forget_run(execution_id: str) -> None:
    with _stop_lock:
        _stop_requests.pop(execution_id, None)
        _running.pop(execution_id, None)


def _running_here(execution_ids: Collection[str]) -> dict[str, tuple[str, int]]:
    """Which of these executions run here: on which worker, in which process (``client.run``)."""
    with _stop_lock:
        return {sid: _running[sid] for sid in execution_ids if sid in _running}


def _unwanted(worker: Any, key: object) -> bool:
    """Whether the cluster no longer wants this task to run.

    True when the worker is shutting down (its scheduler is gone, or its
    cluster is closing), or when the scheduler released the key while the
    task ran (its client cancelled it or went away): the worker's own state
    machine then holds the task as ``cancelled``. Best effort, from the
    worker's internals; any surprise there counts as "still wanted".
    """
    status = getattr(getattr(worker, "status", None), "name", "")
    if status in ("closing", "closed", "failed"):
        return True
    try:
        task = worker.state.tasks.get(key)
    except AttributeError:
        return False
    return task is None or getattr(task, "state", None) == "cancelled"


def _describe(exc: BaseException) -> str:
    """``Type: message (at file:line in function)``; plateflow's own errors keep their text."""
    if type(exc).__module__.startswith("plateflow.") and str(exc):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    origin = exc
    while origin.__cause__ is not None:
        origin = origin.__cause__
    frames = traceback.extract_tb(origin.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {os.path.basename(last.filename)}:{last.lineno} in {last.name})"
    return valid_text(text)


def _compile_task(spec_json: str, allowed: tuple[str, ...], topic: str, job_id: str) -> Any:
    """Resolve and check the pipeline; report the fingerprint; the result is the artifact."""
    worker = get_worker()
    try:
        compiled = compile_pipeline(
            PipelineSpec.model_validate_json(spec_json), allowed_modules=allowed
        )
    except Exception as exc:
        worker.log_event(topic, {"t": "compile_failed", "sid": job_id, "error": _describe(exc)})
        raise
    worker.log_event(topic, {"t": "compiled", "sid": job_id, "artifact": compiled.fingerprint})
    return compiled


@dataclasses.dataclass(frozen=True, slots=True)
class _Run:
    """What an execute task needs besides its artifact (pickled to the worker)."""

    topic: str
    execution_id: str
    key: tuple[str, str, str]
    plate_id: str
    plate_path: str
    output_dir: str
    progress_interval: float


def _execute_task(compiled: CompiledPipeline, run: _Run) -> dict[str, JsonValue]:
    """Run one plate's pipeline; the return value is the outcome, never an exception."""
    worker = get_worker()
    sid = run.execution_id
    with _stop_lock:
        _running[sid] = (worker.address, os.getpid())
    worker.log_event(
        run.topic, {"t": "started", "sid": sid, "worker": worker.address, "pid": os.getpid()}
    )
    last_sent, last_message = -float("inf"), None
    lock = threading.Lock()  # a step may report progress from threads of its own

    def report(done: int, total: int, message: str) -> None:
        nonlocal last_sent, last_message
        if done >= total:
            return  # the last step's completion: the result, right after, says as much
        now = time.monotonic()
        with lock:
            # The scheduler forwards every event it gets: repeats of one message are
            # coalesced to one per interval; a new message (a new phase) always goes.
            if message == last_message and now - last_sent < run.progress_interval:
                return
            last_sent, last_message = now, message
        event = {"t": "progress", "sid": sid, "done": done, "total": total, "message": message}
        worker.log_event(run.topic, event)

    def cancelled() -> bool:
        return _stop_requested(sid) or _unwanted(worker, run.key)

    try:
        os.makedirs(run.output_dir, exist_ok=True)
        ctx = StepContext(
            plate_id=run.plate_id,
            plate_path=run.plate_path,
            output_dir=run.output_dir,
            _report=report,
            _is_cancelled=cancelled,
        )
        if cancelled():
            return {"t": "cancelled"}
        result = execute_pipeline(compiled, ctx)
        return {"t": "succeeded", "result": result}
    except StepCancelled:
        return {"t": "cancelled"}
    except PipelineError as exc:
        return {"t": "failed", "error": valid_text(str(exc)), "stopping": cancelled()}
    except BaseException as exc:  # a step may raise anything, SystemExit included
        return {"t": "failed", "error": _describe(exc), "stopping": cancelled()}
    finally:
        _forget_run(sid)


# --- in the client ----------------------------------------------------------------------


@dataclasses.dataclass(eq=False, slots=True)
class _Work:
    """One submission, from submit to its terminal fact. Guarded by ``DaskEngine._lock``."""

    phase: _Phase
    submission_id: str
    plate_id: str
    key: tuple[str, str, str]
    future: _DaskFuture | None = None
    artifact: tuple[str, str] | None = None
    """For an execution: the (plate, artifact) whose compile future it depends on."""
    started: bool = False
    worker: str | None = None
    pid: int | None = None
    cancel_requested: bool = False
    terminal: Fact | None = None
    held: list[Fact] | None = None
    """Facts waiting for the submission's acknowledgement (pushed right after it)."""
    adopting: bool = False
    """Being found again by :meth:`DaskEngine.recover`, whose answer reports it: push nothing."""


def _adopting(phase: _Phase, sid: str, kept: Kept) -> _Work:
    work = _Work(phase, sid, kept.plate_id, kept.future.key, future=kept.future, adopting=True)
    if phase == "execute" and kept.artifact is not None:
        work.artifact = (kept.plate_id, kept.artifact)
    return work


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


@final
class DaskEngine(Engine):
    """Compile and execute plates on a Dask cluster: an existing one, or a LocalCluster.

    With ``scheduler_address`` (e.g. ``"tcp://10.0.0.5:8786"``) the engine
    connects to that scheduler and at close closes only its own client.
    Without it, the engine starts a ``LocalCluster`` (``n_workers`` workers,
    default one per CPU, each with ``threads_per_worker`` threads; worker
    processes unless ``processes=False``; more options in ``cluster_options``,
    e.g. ``{"dashboard_address": ":8787"}``) and closes it at close.

    Step functions resolve only from ``allowed_modules``, on the workers. Steps
    write into ``output_dir`` (default: a fresh temporary directory on this
    machine, removed at close if still empty; on a cluster of several machines
    give a path every worker can reach). Progress reports that repeat the
    previous message are sent at most once per ``progress_interval`` seconds
    per execution. Scheduler loss is pushed as
    :class:`EngineLost` within ``liveness_interval + liveness_timeout`` seconds.
    """

    name = "dask"

    def __init__(
        self,
        scheduler_address: str | None = None,
        *,
        n_workers: int | None = None,
        threads_per_worker: int = 1,
        processes: bool = True,
        cluster_options: Mapping[str, Any] | None = None,
        allowed_modules: Collection[str] = DEFAULT_ALLOWED_MODULES,
        output_dir: str | None = None,
        connect_timeout: float = 10.0,
        liveness_interval: float = 1.0,
        liveness_timeout: float = 3.0,
        progress_interval: float = 0.05,
    ) -> None:
        for label, value in (
            ("connect_timeout", connect_timeout),
            ("liveness_interval", liveness_interval),
            ("liveness_timeout", liveness_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{label} must be a positive number of seconds, got {value}")
        if progress_interval < 0:
            raise ValueError(f"progress_interval must not be negative, got {progress_interval}")
        if n_workers is not None and n_workers < 1:
            raise ValueError(f"n_workers must be at least 1, got {n_workers}")
        if threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be at least 1, got {threads_per_worker}")
        if scheduler_address is not None and (n_workers is not None or cluster_options):
            raise ValueError(
                "n_workers and cluster_options configure the LocalCluster this engine starts; "
                "they cannot apply to an existing scheduler"
            )
        self._address = scheduler_address
        self._owns_cluster = scheduler_address is None
        self._n_workers = n_workers or os.cpu_count() or 1
        self._threads = threads_per_worker
        self._processes = processes
        self._cluster_options = dict(cluster_options or {})
        self._allowed_modules = tuple(allowed_modules)
        self._output_dir = output_dir
        self._made_output_dir = False
        self._connect_timeout = float(connect_timeout)
        self._liveness_interval = float(liveness_interval)
        self._liveness_timeout = float(liveness_timeout)
        self._progress_interval = float(progress_interval)

        self._lock = threading.Lock()
        self._works: dict[tuple[_Phase, str], _Work] = {}
        self._artifacts: dict[tuple[str, str], tuple[_DaskFuture, str]] = {}
        """Compile futures that succeeded, and their job ids, by (plate, artifact id)."""
        self._topic = f"plateflow-{uuid.uuid4().hex[:12]}"
        """Names this engine's events and its published submissions (see ``_dask_keep``)."""
        self._keeper: Keeper | None = None
        self._adopted = False

        self._sink: FactSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._cluster: Any = None
        self._watchdog: asyncio.Task[None] | None = None
        self._check_now: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._lost: str | None = None

    # --- the Engine interface ------------------------------------------------------------

    @property
    def scheduler_address(self) -> str | None:
        """The scheduler in use (known once started)."""
        return self._address

    @property
    def output_dir(self) -> str | None:
        """Where steps write (known once started)."""
        return self._output_dir

    async def start(self, sink: FactSink) -> None:
        """Start a LocalCluster (when no address was given), connect, subscribe to events.

        Raises :class:`EngineError` when the cluster cannot be started or the
        scheduler cannot be reached within ``connect_timeout`` seconds.
        """
        if self._closed:
            raise EngineError("the dask engine is closed; make a new one")
        if self._client is not None:
            raise EngineError("the dask engine is already started")
        self._loop = asyncio.get_running_loop()
        self._sink = sink
        if self._output_dir is None:
            self._output_dir = tempfile.mkdtemp(prefix="plateflow-dask-")
            self._made_output_dir = True
        address = self._address
        if address is None:
            options: dict[str, Any] = {
                "n_workers": self._n_workers,
                "threads_per_worker": self._threads,
                "processes": self._processes,
                "dashboard_address": None,
            }
            options.update(self._cluster_options)
            try:
                # A task whose worker dies fails at once instead of being retried
                # elsewhere: a plate is executed at most once (read when the
                # in-process scheduler is made, so the setting stays local).
                with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                    self._cluster = await _LocalCluster(asynchronous=True, **options)
            except Exception as exc:
                raise EngineError(f"cannot start a dask LocalCluster: {exc}") from exc
            address = self._cluster.scheduler_address
        try:
            self._client = await asyncio.wait_for(
                _Client(
                    address,
                    asynchronous=True,
                    set_as_default=False,
                    timeout=self._connect_timeout,
                    name=self._topic,
                ),
                self._connect_timeout + 1.0,
            )
        except Exception as exc:
            await self._close_cluster()
            raise EngineError(f"cannot connect to the dask scheduler at {address}: {exc}") from exc
        self._address = address
        if not self._owns_cluster and not keep.supported():
            _log.warning("dask engine: this distributed cannot keep work alive past its host")
        self._keeper = Keeper(
            self._client,
            self._topic,
            enabled=self._survives(),
            timeout=self._liveness_timeout,
            on_trouble=self._wake_watchdog,
        )
        self._client.subscribe_topic(self._topic, self._on_task_event)
        self._client.subscribe_topic("all", self._on_cluster_event)
        self._check_now = asyncio.Event()
        self._watchdog = asyncio.create_task(self._watch(), name="plateflow-dask-watchdog")

    async def submit_compile(self, job_id: str, job: CompileJob) -> None:
        client = self._usable()
        key = keep.task_key("compile", job_id, job.plate_id)
        work = _Work("compile", job_id, job.plate_id, key, held=[])
        with self._lock:
            duplicate = ("compile", job_id) in self._works
            if not duplicate:
                self._works[("compile", job_id)] = work
        if duplicate:
            self._push(
                CompileRejected(
                    observed_at=time.time(),
                    plate_id=job.plate_id,
                    job_id=job_id,
                    error=f"duplicate compile id {job_id!r}",
                )
            )
            return
        future = self._submit(
            client,
            work,
            _compile_task,
            job.pipeline.model_dump_json(),
            self._allowed_modules,
            self._topic,
            job_id,
        )
        await self._acknowledge(
            work,
            future,
            None,
            CompileAccepted(observed_at=time.time(), plate_id=job.plate_id, job_id=job_id),
        )

    async def submit_execution(self, execution_id: str, job: CompileJob, artifact_id: str) -> None:
        client = self._usable()
        key = keep.task_key("execute", execution_id, job.plate_id)
        work = _Work("execute", execution_id, job.plate_id, key, held=[])
        error: str | None = None
        with self._lock:
            artifact = self._artifacts.get((job.plate_id, artifact_id))
            if ("execute", execution_id) in self._works:
                error = f"duplicate execution id {execution_id!r}"
            elif artifact is None:
                error = (
                    f"unknown compile artifact {artifact_id!r} for plate {job.plate_id!r}: "
                    "compile the plate on this engine first"
                )
            else:
                work.artifact = (job.plate_id, artifact_id)
                self._works[("execute", execution_id)] = work
        if error is not None:
            self._push(
                ExecutionRejected(
                    observed_at=time.time(),
                    plate_id=job.plate_id,
                    execution_id=execution_id,
                    error=error,
                )
            )
            return
        assert self._output_dir is not None  # set by start
        assert artifact is not None
        run = _Run(
            topic=self._topic,
            execution_id=execution_id,
            key=key,
            plate_id=job.plate_id,
            plate_path=job.plate_path,
            output_dir=self._output_dir,
            progress_interval=self._progress_interval,
        )
        future = self._submit(client, work, _execute_task, artifact[0], run)
        await self._acknowledge(
            work,
            future,
            artifact_id,
            ExecutionAccepted(
                observed_at=time.time(), plate_id=job.plate_id, execution_id=execution_id
            ),
        )

    async def cancel(self, submission: Submission) -> None:
        client = self._usable()
        with self._lock:
            work = self._works.get((submission.phase, submission.submission_id))
            if work is None or work.terminal is not None or work.future is None:
                return
            work.cancel_requested = True
            future, started, worker = work.future, work.started, work.worker
        if work.phase == "execute" and started and worker is not None:
            # Running: ask the step to stop where it runs; the task's own "cancelled"
            # outcome confirms it. The key stays in Dask's hands until the step returns,
            # so the scheduler never counts a busy thread as free.
            await self._call(
                client.run(_request_stop, work.submission_id, workers=[worker], on_error="ignore"),
                f"cancel of {work.submission_id}",
            )
        else:
            # Not started (or a compile): Dask drops it; the done callback confirms. Should it
            # have started meanwhile, its worker sees the key released (ctx.cancelled). The
            # scheduler cancels only a key nobody else wants: unpublish it first.
            keeper = self._keeper
            assert keeper is not None  # set by start
            await keeper.drop([(work.phase, work.submission_id)])
            await self._call(client.cancel([future]), f"cancel of {work.submission_id}")

    async def status(self, submissions: Sequence[Submission]) -> list[Fact]:
        facts: list[Fact] = []
        with self._lock:
            for submission in submissions:
                work = self._works.get((submission.phase, submission.submission_id))
                if work is not None:  # the engine's own record says which plate
                    known = Submission(work.plate_id, work.phase, work.submission_id)
                    facts.append(status_fact(known, terminal=work.terminal, started=work.started))
        return facts

    async def server_info(self) -> dict[str, JsonValue]:
        client = self._client
        workers: JsonValue = None
        threads: JsonValue = None
        if client is not None and self._lost is None and not self._closed:
            # The client's cached copy (refreshed by Dask every few seconds): no round trip.
            info = client.scheduler_info()
            if isinstance(info, dict):
                workers = _int_or_none(info.get("n_workers"))
                threads = _int_or_none(info.get("total_threads"))
        with self._lock:
            pending = [w for w in self._works.values() if w.terminal is None]
            running: list[JsonValue] = [
                {
                    "plate_id": w.plate_id,
                    "phase": w.phase,
                    "submission_id": w.submission_id,
                    "worker": w.worker,
                    "pid": w.pid,
                    "cancelling": w.cancel_requested,
                }
                for w in pending
                if w.started
            ]
            queued = sum(1 for w in pending if not w.started)
            artifacts = len(self._artifacts)
        return {
            "engine": self.name,
            "scheduler": self._address,
            "local_cluster": self._cluster is not None,
            "workers": workers,
            "threads": threads,
            "running": len(running),
            "queued": queued,
            "artifacts": artifacts,
            "output_dir": self._output_dir,
            "running_submissions": running,
            "closed": self._closed,
            "lost": self._lost,
        }

    async def close(self) -> None:
        """Stop every submission, close the client, and the LocalCluster if this engine made it.

        Every submission without a terminal fact gets its ``*Cancelled`` fact
        here: nothing is pushed after close returns.
        """
        if self._closed:
            return
        self._closed = True
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        facts: list[Fact] = []
        running: list[_Work] = []
        futures: list[_DaskFuture] = []
        with self._lock:
            for work in self._works.values():
                if work.terminal is None:
                    work.cancel_requested = True
                    work.terminal = self._cancelled(work)
                    facts.append(work.terminal)
                    if work.started and work.worker is not None:
                        running.append(work)
                if work.future is not None:
                    futures.append(work.future)
                    work.future = None
            futures.extend(future for future, _ in self._artifacts.values())
            self._artifacts.clear()
        for fact in facts:
            self._push(fact)
        self._sink = None
        client, keeper = self._client, self._keeper
        if keeper is not None and client.status == "running":
            # Also after a loss, once Dask reconnected: what this engine published must not
            # outlive it (the scheduler cancels only keys nobody else wants: clear first).
            await keeper.clear()
        if client is not None and self._lost is None:
            for work in running:
                assert work.worker is not None
                await self._call(
                    client.run(
                        _request_stop, work.submission_id, workers=[work.worker], on_error="ignore"
                    ),
                    "stop at close",
                    quiet=True,
                )
            if futures:
                await self._call(client.cancel(futures), "cancel at close", quiet=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        futures.clear()
        if client is not None:
            # Unsubscribe first: the scheduler would otherwise try to tell this client,
            # on the "all" topic, that it went away, over a stream already closed.
            for topic in (self._topic, "all"):
                with contextlib.suppress(Exception):
                    client.unsubscribe_topic(topic)
            # unsubscribe_topic only schedules its message on the loop: let it go out
            # ahead of the client's close on the same stream.
            await asyncio.sleep(0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), self._connect_timeout)
        await self._close_cluster()
        if self._made_output_dir and self._output_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._output_dir)  # only if no step wrote anything

    def __repr__(self) -> str:
        with self._lock:
            pending = sum(1 for w in self._works.values() if w.terminal is None)
        state = (
            "closed"
            if self._closed
            else "lost"
            if self._lost
            else "started"
            if self._client
            else "new"
        )
        where = self._address or "LocalCluster (not started)"
        return f"<DaskEngine {state} scheduler={where} pending={pending}>"

    # --- surviving a host restart -------------------------------------------------------------

    def identity(self) -> dict[str, JsonValue]:
        """The scheduler and the namespace this engine's work can be found under.

        ``survives`` is false for an engine that started its own LocalCluster:
        that cluster, and all work on it, ends with this process (and with a
        distributed too old to keep work alive safely; see ``_dask_keep``).
        """
        return keep.identity(self._address, self._topic, survives=self._survives())

    def _survives(self) -> bool:
        return not self._owns_cluster and keep.supported()

    def adopt(self, identity: dict[str, JsonValue]) -> None:
        if self._client is not None or self._closed:
            raise UsageError("adopt() must come before start() on a new DaskEngine")
        namespace = keep.adoptable(identity, None if self._owns_cluster else self._address)
        if namespace is not None:  # else its cluster died with it: nothing to take over
            self._topic = namespace
        self._adopted = namespace is not None

    async def recover(self, submissions: Sequence[Submission]) -> Recovered:
        """Find the adopted namespace's published submissions; track them as this engine's own.

        Call once, with every unsettled submission. Each one found is reported
        where it is now and its later facts reach the sink; the rest are
        ``unknown``, and ``never_ran`` stays empty (Dask keeps no record of a key
        it forgot; see docs/dask.md). Compiles nobody asked about that succeeded
        are kept as artifacts, so a plate compiled before the crash can still be
        executed; everything else of the namespace nobody asked about is let go.
        """
        client = self._usable()
        keeper = self._keeper
        assert keeper is not None  # set by start
        asked = list(dict.fromkeys(submissions))
        if not self._adopted:
            return Recovered(unknown=tuple(asked))
        wanted = {(s.phase, s.submission_id): s.plate_id for s in asked}
        try:
            found = await keeper.recover(self._connect_timeout)
            states: Mapping[Any, str] = {}
            keys = [kept.future.key for kept in found.values()]
            if keys:
                states = await asyncio.wait_for(
                    client.scheduler.get_task_status(keys=keys), self._liveness_timeout
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise EngineError(
                f"cannot look for the adopted work on {self._address}: {exc}"
            ) from exc
        with self._lock:  # (what this engine tracks already is its own, not adopted)
            works = [
                _adopting(p, sid, k) for (p, sid), k in found.items() if (p, sid) not in self._works
            ]
        for work in works:
            if wanted.get((work.phase, work.submission_id), work.plate_id) != work.plate_id:
                wanted.pop((work.phase, work.submission_id))  # not that plate's: unknown
        # Compiles first (every one found: a plate's artifact may be one nobody asked about),
        # so that an execution found finished can release its plate's artifact.
        for phase in ("compile", "execute"):
            mine = [
                w
                for w in works
                if w.phase == phase and (phase == "compile" or (phase, w.submission_id) in wanted)
            ]
            with self._lock:
                for work in mine:
                    self._works[(work.phase, work.submission_id)] = work
            for work in mine:
                if work.future is not None:
                    work.future.add_done_callback(partial(self._on_done, work))
            sids = [w.submission_id for w in mine if w.phase == "execute"]
            running = await keep.running(client, _running_here, sids, self._liveness_timeout)
            with self._lock:  # which have started, and where (for cancel)
                for work in mine:
                    where = running.get(work.submission_id)
                    if where is not None and not work.started:
                        work.started, (work.worker, work.pid) = True, where
            done = [w for w in mine if states.get(w.key) in ("memory", "erred")]
            if done:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.gather(*(self._conclude_found(w) for w in done)),
                        self._connect_timeout,
                    )
        return self._recovered(asked, works, wanted)

    def _recovered(
        self, asked: list[Submission], works: list[_Work], wanted: Mapping[tuple[_Phase, str], str]
    ) -> Recovered:
        facts: list[Fact] = []
        unknown: list[Submission] = []
        release: list[_DaskFuture] = []
        unpublish: list[tuple[_Phase, str]] = []
        with self._lock:
            for work in works:
                work.adopting = False
                if (work.phase, work.submission_id) in wanted or isinstance(
                    work.terminal, CompileSucceeded
                ):
                    continue
                # Nobody asked about it: let it go (Dask then drops it, or stops it at the
                # step's next look at ctx.cancelled); quietly: its callbacks ignore it.
                if self._works.get((work.phase, work.submission_id)) is work:
                    del self._works[(work.phase, work.submission_id)]
                if work.terminal is None:
                    work.terminal = self._cancelled(work)
                unpublish.append((work.phase, work.submission_id))
                if work.future is not None:
                    release.append(work.future)
                    work.future = None
            for sub in asked:
                mine = self._works.get((sub.phase, sub.submission_id))
                if mine is None or mine.plate_id != sub.plate_id:
                    unknown.append(sub)
                else:
                    known = Submission(mine.plate_id, mine.phase, mine.submission_id)
                    facts.append(status_fact(known, terminal=mine.terminal, started=mine.started))
        self._let_go(unpublish, release)
        return Recovered(facts=tuple(facts), unknown=tuple(unknown))

    async def _conclude_found(self, work: _Work) -> None:
        future = work.future
        if future is None:
            return
        await future.exception()  # waits until the scheduler's report arrived
        if future.status in ("finished", "error"):
            await self._conclude(work, future)

    # --- submitting --------------------------------------------------------------------------

    def _usable(self) -> Any:
        if self._closed:
            raise EngineError("the dask engine is closed")
        if self._lost is not None:
            raise EngineError(f"the dask scheduler is lost: {self._lost}")
        if self._client is None:
            raise EngineError("the dask engine is not started; call start(sink) first")
        return self._client

    def _submit(
        self, client: Any, work: _Work, function: Callable[..., Any], *args: Any
    ) -> _DaskFuture | None:
        try:
            future: _DaskFuture = client.submit(function, *args, key=work.key, pure=False)
        except Exception as exc:  # the client is closing or disconnected: not this plate's fault
            with self._lock:
                self._works.pop((work.phase, work.submission_id), None)
            raise EngineError(f"dask refused the submission: {exc}") from exc
        with self._lock:
            work.future = future
        future.add_done_callback(partial(self._on_done, work))
        return future

    async def _acknowledge(
        self, work: _Work, future: _DaskFuture, artifact: str | None, accepted: Fact
    ) -> None:
        """Publish the submission, then push its Accepted fact and what it held back meanwhile.

        Published first, so that whatever the host hears was accepted can be found
        again after a crash; held back, so that the facts still come in order.
        """
        keeper = self._keeper
        assert keeper is not None  # set by start
        try:
            await keeper.keep(work.phase, work.submission_id, future, artifact)
        finally:
            with self._lock:  # pushed under the lock: nothing of this work overtakes them
                held, work.held = work.held or [], None
                for fact in (accepted, *held):
                    self._push(fact)

    async def _call(self, awaitable: Any, what: str, *, quiet: bool = False) -> None:
        """Await one client call within the liveness timeout; a failure is logged, not raised.

        A cancel that does not reach the scheduler is settled by the service's
        cancel grace; a scheduler that stopped answering is the watchdog's to report.
        """
        try:
            await asyncio.wait_for(awaitable, self._liveness_timeout)
        except Exception as exc:
            if not quiet:
                _log.warning("dask engine: %s failed: %s", what, exc)
            self._wake_watchdog()

    # --- facts out ---------------------------------------------------------------------------

    def _push(self, fact: Fact) -> None:
        sink = self._sink
        if sink is None:
            return
        try:
            sink(fact)
        except Exception:  # the sink must not raise; if it does, the engine carries on
            _log.exception("the fact sink raised on %r", fact)

    def _emits(self, work: _Work, fact: Fact) -> bool:
        """Whether a fact of this work is pushed now (the caller holds the lock)."""
        if work.adopting:
            return False
        if work.held is not None:
            work.held.append(fact)
            return False
        return True

    def _settle(self, work: _Work, fact: Fact) -> None:
        """Record the one terminal fact of a submission (first wins) and push it."""
        release: list[_DaskFuture] = []
        unpublish: list[tuple[_Phase, str]] = []
        with self._lock:
            if work.terminal is not None or self._lost is not None:
                return
            work.terminal = fact
            if work.phase == "execute":
                # The plate is done with its artifact: let Dask forget both tasks.
                if work.future is not None:
                    release.append(work.future)
                    unpublish.append(("execute", work.submission_id))
                    work.future = None
                if work.artifact is not None:
                    artifact = self._artifacts.pop(work.artifact, None)
                    if artifact is not None:
                        release.append(artifact[0])
                        unpublish.append(("compile", artifact[1]))
            elif not isinstance(fact, CompileSucceeded) and work.future is not None:
                release.append(work.future)
                unpublish.append(("compile", work.submission_id))
                work.future = None
            push = self._emits(work, fact)
        if push:
            self._push(fact)
        if release:
            self._on_loop(self._let_go, unpublish, release)

    def _let_go(self, submissions: list[tuple[_Phase, str]], futures: list[_DaskFuture]) -> None:
        """Stop keeping these published, then let Dask forget them (on the client's loop)."""
        keeper = self._keeper
        if keeper is not None and not self._closed:
            keeper.drop(submissions, futures)

    @staticmethod
    def _cancelled(work: _Work) -> Fact:
        return cancelled_fact(Submission(work.plate_id, work.phase, work.submission_id))

    @staticmethod
    def _failed(work: _Work, error: str) -> Fact:
        return failed_fact(Submission(work.plate_id, work.phase, work.submission_id), error)

    # --- Dask callbacks ------------------------------------------------------------------------

    def _on_task_event(self, event: tuple[float, Any]) -> None:
        """A task's report (``subscribe_topic`` handler: runs on the client's loop)."""
        _, message = event
        if not isinstance(message, dict) or self._lost is not None:
            return
        kind, sid = message.get("t"), message.get("sid")
        phase: _Phase = "compile" if kind in ("compiled", "compile_failed") else "execute"
        with self._lock:
            work = self._works.get((phase, str(sid)))
            if work is None or work.terminal is not None:
                return
            if kind == "started":
                if work.started:  # a resumed engine may have learnt it already
                    return
                work.started = True
                work.worker = str(message.get("worker"))
                pid = message.get("pid")
                work.pid = pid if isinstance(pid, int) else None
        fact: Fact | None = None
        try:
            if kind == "started":
                fact = ExecutionStarted(
                    observed_at=time.time(), plate_id=work.plate_id, execution_id=work.submission_id
                )
            elif kind == "progress":
                fact = ExecutionProgress(
                    observed_at=time.time(),
                    plate_id=work.plate_id,
                    execution_id=work.submission_id,
                    done=message["done"],
                    total=message["total"],
                    message=str(message.get("message", "")),
                )
            elif kind == "compiled":
                artifact_id = str(message["artifact"])
                self._compiled(work, artifact_id)
                return
            elif kind == "compile_failed":
                self._settle(work, self._failed(work, str(message.get("error", ""))))
                return
        except (ValueError, KeyError, TypeError) as exc:
            _log.warning("dropped a malformed event from a dask task: %r (%s)", message, exc)
            return
        if fact is None:
            return
        with self._lock:
            push = work.terminal is None and self._emits(work, fact)
        if push:
            self._push(fact)

    def _compiled(self, work: _Work, artifact_id: str) -> None:
        with self._lock:
            future = work.future
            if future is None or work.terminal is not None:
                return
            previous = self._artifacts.get((work.plate_id, artifact_id))
            self._artifacts[(work.plate_id, artifact_id)] = (future, work.submission_id)
        if previous is not None and previous[0] is not future:
            self._on_loop(self._let_go, [("compile", previous[1])], [previous[0]])
        self._settle(
            work,
            CompileSucceeded(
                observed_at=time.time(),
                plate_id=work.plate_id,
                job_id=work.submission_id,
                artifact_id=artifact_id,
            ),
        )

    def _on_cluster_event(self, event: tuple[float, Any]) -> None:
        """The scheduler's "all" topic (client's loop): a removed worker fails what it ran."""
        _, message = event
        if not isinstance(message, dict) or message.get("action") != "remove-worker":
            return
        worker = message.get("worker")
        expected = bool(message.get("expected"))
        with self._lock:
            victims = [
                w
                for w in self._works.values()
                if w.phase == "execute" and w.terminal is None and w.started and w.worker == worker
            ]
        for work in victims:
            how = "retired" if expected else "lost"
            self._settle(
                work,
                self._failed(
                    work,
                    f"the dask worker {worker} running this execution was {how} "
                    "(worker process died or was removed from the cluster)",
                ),
            )

    def _on_done(self, work: _Work, future: _DaskFuture) -> None:
        """``add_done_callback``: runs on Dask's callback thread; must not block."""
        status = future.status
        with self._lock:
            if work.terminal is not None or self._lost is not None:
                return
            requested = work.cancel_requested
        if status == "cancelled":
            if requested:
                self._settle(work, self._cancelled(work))
            else:
                # Dask cancels every future when the connection to the scheduler drops;
                # decide on the loop, where the client's state can be read safely.
                self._on_loop(self._cancelled_by_dask, work)
        else:
            self._on_loop(self._conclude_soon, work, future)

    def _on_loop(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
            loop.call_soon_threadsafe(callback, *args)

    def _conclude_soon(self, work: _Work, future: _DaskFuture) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._conclude(work, future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _conclude(self, work: _Work, future: _DaskFuture) -> None:
        """A finished or failed task: fetch what the terminal fact needs, on the client's loop."""
        try:
            if future.status == "error":
                exc = await future.exception()
                if isinstance(exc, KilledWorker):
                    error = f"the dask worker running this {work.phase} was lost: {exc}"
                else:
                    error = f"the dask task failed: {_describe(exc)}"
                self._settle(work, self._failed(work, error))
                return
            value = await future.result()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the result could not be fetched (e.g. its worker died)
            self._settle(work, self._failed(work, f"cannot fetch the result from dask: {exc}"))
            return
        if work.phase == "compile":
            if isinstance(value, CompiledPipeline):  # its event was missed: the result says it
                self._compiled(work, value.fingerprint)
            return
        self._settle(work, self._outcome(work, value))

    def _outcome(self, work: _Work, value: Any) -> Fact:
        kind = value.get("t") if isinstance(value, dict) else None
        with self._lock:
            requested = work.cancel_requested
        if kind == "succeeded":
            return ExecutionSucceeded(
                observed_at=time.time(),
                plate_id=work.plate_id,
                execution_id=work.submission_id,
                result=value["result"],
            )
        if kind == "cancelled" or (kind == "failed" and requested):
            if requested:
                return self._cancelled(work)
            return self._failed(work, "the cluster released the task while it ran")
        if kind == "failed":
            return self._failed(work, str(value.get("error", "")))
        return self._failed(work, f"the dask task returned an unexpected value: {value!r:.200}")

    def _cancelled_by_dask(self, work: _Work) -> None:
        client = self._client
        if self._closed or client is None:
            return
        if client.status != "running":
            self._declare_lost(f"the connection to the dask scheduler at {self._address} was lost")
            return
        self._settle(work, self._failed(work, "the task was cancelled on the dask cluster"))

    # --- liveness --------------------------------------------------------------------------------

    def _wake_watchdog(self) -> None:
        if self._check_now is not None:
            self._check_now.set()

    async def _watch(self) -> None:
        client = self._client
        check_now = self._check_now
        assert client is not None
        assert check_now is not None
        while self._lost is None and not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(check_now.wait(), self._liveness_interval)
            check_now.clear()
            if client.status != "running":
                self._declare_lost(
                    f"the connection to the dask scheduler at {self._address} was lost "
                    f"(client {client.status})"
                )
                return
            try:
                await asyncio.wait_for(
                    client.scheduler.identity(n_workers=0), self._liveness_timeout
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                what = "did not answer" if isinstance(exc, TimeoutError) else f"failed: {exc}"
                self._declare_lost(
                    f"the dask scheduler at {self._address} {what} "
                    f"(liveness check, {self._liveness_timeout:g} s)"
                )
                return

    def _declare_lost(self, reason: str) -> None:
        """Push EngineLost once; nothing is pushed after it."""
        with self._lock:
            if self._lost is not None or self._closed:
                return
            self._lost = reason
        _log.warning("dask engine lost: %s", reason)
        sink = self._sink
        self._push(EngineLost(observed_at=time.time(), reason=reason))
        if sink is not None:
            self._sink = None

    async def _close_cluster(self) -> None:
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(cluster.close(), 30.0)
