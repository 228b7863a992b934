"""The local engine: compiles and executes plates in worker processes on this machine.

Theory of operation: submissions (compile jobs and executions) wait in one
FIFO queue and run in a pool of at most ``max_workers`` worker processes,
started when work needs them and reused for one submission after another
(starting and ending a process costs far more than a no-op plate). One
*watcher* thread owns the pool: it starts workers, hands each idle one the
next submission, reads their reports, notices when they exit and pushes the
facts. It blocks in :func:`multiprocessing.connection.wait` on every worker's
pipe and process sentinel plus a self-pipe that the event-loop side writes to
when it has news (a submission, a cancel, close), so it sleeps until
something happens and never polls. However many plates there are, the engine
adds exactly one thread.

The caller's thread (the service's event loop) pushes only the facts it can
decide at once: ``*Accepted`` and ``*Rejected`` on submit, and ``*Cancelled``
for a submission cancelled while still queued. Everything that depends on a
worker is pushed by the watcher, so the facts of one submission arrive in
order: Accepted, Started, Progress..., then exactly one terminal fact.

A worker talks to the watcher over one pipe with small JSON messages (never
pickle): the watcher sends ``job`` messages, each with a fresh job number;
the worker answers ``started``, ``progress`` (all but the last step's
completion, which the result implies), then one of ``compiled``,
``succeeded``, ``failed``, ``cancelled``, all carrying that number, so a late
report about an earlier job is recognised and dropped. The *first* terminal
report wins. A worker that exits while it holds a submission crashed: that
submission fails with the exit code (negative signal number when a signal
killed it), and a fresh worker takes the next one. Cancel writes the job
number into the worker's shared cancel flag (the step sees ``ctx.cancelled``);
a step that stops in time leaves its worker reusable; a worker still busy
``cancel_grace`` seconds later is terminated, and killed after another
``cancel_grace``. Only that one worker is touched. Reuse means module-level
state a step leaves behind is seen by later plates in that worker; steps
should not keep any (``max_jobs_per_worker`` bounds what leaks).

Workers are started with ``forkserver`` by default (with this module
preloaded, a worker is ready in ~10 ms instead of ~350 ms for ``spawn``);
``fork`` is refused because the parent runs threads. Workers are daemonic, so
a step cannot start processes of its own.

Every worker has an owner, the engine's process, and watches it from a
thread (``OwnerWatch``: the parent's sentinel, which the kernel closes however
that process dies). When the owner is gone a worker starts nothing new and
exits; with a *ledger* it first finishes and records the step it is running.
The ledger (:mod:`plateflow.engines._ledger`) is a directory where a worker
claims each submission before its step runs and records its terminal fact
after. A new engine in a new process adopts the ledger and recovers from it:
settled submissions from their records, ones a dead engine's worker still
runs by watching that process (the watcher waits on its pidfd too), and the
rest as never started.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import multiprocessing
import os
import secrets
import signal
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Collection, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any, Final, Literal, cast, final

from pydantic import JsonValue

from plateflow.core.decoding import decode_object, valid_text
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
from plateflow.engines._ledger import Ledger, LedgerError, Orphan, OwnerWatch, process_start
from plateflow.engines._wakeup import WakePipe
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
from plateflow.errors import DecodeError, UsageError
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

__all__ = ["LocalEngine"]

_log = logging.getLogger(__name__)

_Phase = Literal["compile", "execute"]
_DEFAULT_CONTEXT: Final = (
    "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
)
_PRELOAD: Final = ["plateflow.engines.local"]
DEFAULT_KEEP_FINISHED: Final = 100_000
"""Finished submissions a :class:`LocalEngine` remembers for status answers, by default."""
_COMPILED_CACHE: Final = 32
"""Compiled pipelines a worker keeps, by spec: a batch usually has one."""
_MAX_REPORT_BYTES: Final = 64 << 20
"""A worker report holds at most a result (16 MiB of JSON, checked by the worker)."""
_ORPHAN_POLL: Final = 0.25
"""Seconds between looks at an adopted worker where the system offers no pidfd."""


# --- the worker process ----------------------------------------------------------


_send_lock = threading.Lock()  # a step may report progress from threads of its own


def _send(conn: Connection, message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode("utf-8")
    # An orphan finishing its step has nobody to tell (its ledger will), so a
    # closed pipe must not fail the step that reports progress into it.
    with _send_lock, contextlib.suppress(OSError):
        conn.send_bytes(data)


def _describe(exc: BaseException) -> str:
    """``Type: message (at file:line in function)``, where the original error was raised.

    plateflow's own exceptions (e.g. the pipeline's wrapper naming the failed
    step) already read well, so they keep their message without the type; the
    location is taken from the innermost chained cause, i.e. the step's code.
    """
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


def _terminal_fact(
    submission: Submission, kind: str, message: dict[str, Any], cancel_requested: bool
) -> Fact | None:
    """The terminal fact a worker's report means (None: not a terminal report).

    The worker records it in the ledger and the engine pushes it, from the same rule.
    """
    plate_id, sid = submission.plate_id, submission.submission_id
    if kind == "compiled":
        artifact_id = str(message["artifact_id"])
        return CompileSucceeded(
            observed_at=time.time(), plate_id=plate_id, job_id=sid, artifact_id=artifact_id
        )
    if kind == "succeeded":
        result = message["result"]
        return ExecutionSucceeded(
            observed_at=time.time(), plate_id=plate_id, execution_id=sid, result=result
        )
    if kind == "failed":  # after a cancel request, most likely the cancel itself
        if cancel_requested:
            return cancelled_fact(submission)
        return failed_fact(submission, str(message["error"]))
    if kind == "cancelled":
        return cancelled_fact(submission)
    return None


@dataclasses.dataclass(slots=True)
class _WorkerSetup:
    """What a worker is started with, besides its pipe and cancel flag."""

    allowed_modules: tuple[str, ...]
    output_dir: str
    ledger_dir: str | None
    token: str
    """The engine's ledger token: a claim counts only while the ledger's owner has it."""


def _worker_main(conn: Connection, cancel_flag: Any, setup: _WorkerSetup) -> None:
    """Serve jobs from ``conn`` one at a time until told to exit or the pipe closes.

    A job is ``{"t": "job", "n": <job number>, ...}``; every report about it
    carries the same ``n``, so the parent can tell a late report about an
    earlier job from news about the current one. ``cancel_flag`` holds the
    number of the job the parent wants cancelled.
    """
    # Ctrl-C in a terminal reaches the whole process group; the parent decides
    # what to cancel, so a worker must not die of the user's keystroke.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ledger = None if setup.ledger_dir is None else Ledger(setup.ledger_dir)
    owner = OwnerWatch(finish_current=ledger is not None)
    owner.start()
    pid_start = process_start(os.getpid())
    compiled_by_spec: dict[str, CompiledPipeline] = {}
    while True:
        try:
            job = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if job.get("t") != "job" or not owner.begin():
            return
        try:
            if not _claim(conn, job, ledger, setup.token, pid_start):
                return
            report = _run_job(conn, job, cancel_flag, setup, compiled_by_spec)
            leave = bool(report.pop("exit", False))  # SystemExit, KeyboardInterrupt
            if ledger is not None:
                _record(ledger, job, report, cancelled=cancel_flag.value == report["n"])
            _send(conn, report)
            if leave:
                return
        finally:
            owner.end()


def _claim(
    conn: Connection, job: dict[str, Any], ledger: Ledger | None, token: str, start: str | None
) -> bool:
    """Claim the job in the ledger, then report ``started``; False: the ledger has a new owner."""
    n = int(job["n"])
    if ledger is not None:
        submission = Submission(job["plate_id"], job["phase"], job["sid"])
        try:
            claimed = ledger.claim(submission, token, start)
        except (OSError, LedgerError) as exc:
            error = f"cannot write the engine's ledger {ledger.path}: {exc}"
            _send(conn, {"t": "failed", "n": n, "error": valid_text(error)})
            return True
        if claimed == "fenced":
            return False
        if claimed == "taken":
            error = (
                f"the ledger {ledger.path} already holds {job['phase']} submission "
                f"{job['sid']!r} (an earlier engine's); submit it under a new id"
            )
            _send(conn, {"t": "failed", "n": n, "error": valid_text(error)})
            return True
    _send(conn, {"t": "started", "n": n, "pid": os.getpid()})
    return True


def _run_job(
    conn: Connection,
    job: dict[str, Any],
    cancel_flag: Any,
    setup: _WorkerSetup,
    compiled_by_spec: dict[str, CompiledPipeline],
) -> dict[str, Any]:
    """Compile or execute one job; return its terminal report (not yet sent)."""
    n = int(job["n"])
    try:
        compiled = compiled_by_spec.get(job["spec"])
        if compiled is None:
            compiled = compile_pipeline(
                PipelineSpec.model_validate_json(job["spec"]),
                allowed_modules=setup.allowed_modules,
            )
            if len(compiled_by_spec) >= _COMPILED_CACHE:
                compiled_by_spec.pop(next(iter(compiled_by_spec)))
            compiled_by_spec[job["spec"]] = compiled
        if job["phase"] == "compile":
            return {"t": "compiled", "n": n, "artifact_id": compiled.fingerprint}
        ctx = StepContext(
            plate_id=job["plate_id"],
            plate_path=job["plate_path"],
            output_dir=setup.output_dir,
            _report=_reporter(conn, n),
            _is_cancelled=_cancel_check(cancel_flag, n),
        )
        return {"t": "succeeded", "n": n, "result": execute_pipeline(compiled, ctx)}
    except StepCancelled:
        return {"t": "cancelled", "n": n}
    except PipelineError as exc:
        return {"t": "failed", "n": n, "error": valid_text(str(exc))}
    except Exception as exc:
        return {"t": "failed", "n": n, "error": _describe(exc)}
    except BaseException as exc:
        return {"t": "failed", "n": n, "error": _describe(exc), "exit": True}


def _record(ledger: Ledger, job: dict[str, Any], report: dict[str, Any], cancelled: bool) -> None:
    """Write the job's outcome (and a compiled pipeline) into the ledger, before reporting it."""
    submission = Submission(job["plate_id"], job["phase"], job["sid"])
    try:
        fact = _terminal_fact(submission, report["t"], report, cancelled)
        if fact is None:
            return
        if isinstance(fact, CompileSucceeded):
            ledger.save_artifact(fact.artifact_id, job["spec"])
        ledger.record(fact, exclusive=True)
    except (OSError, ValueError, LedgerError) as exc:
        # The report still reaches a live engine, which pushes it; only a crash of
        # that engine before then loses it (recovery then says the worker died).
        _log.error("could not record %s in the ledger: %s", submission, exc)


def _cancel_check(cancel_flag: Any, n: int) -> Callable[[], bool]:
    return lambda: bool(cancel_flag.value == n)


def _reporter(conn: Connection, n: int) -> Callable[[int, int, str], None]:
    def report(done: int, total: int, message: str) -> None:
        if done >= total:
            # Only the runner's report after the last step gets here (a step's own
            # reports stop short of its share's end), right before the result, which
            # says as much: one message and one fact per plate fewer.
            return
        _send(conn, {"t": "progress", "n": n, "done": done, "total": total, "message": message})

    return report


# --- the parent's bookkeeping -------------------------------------------------------


@dataclasses.dataclass(eq=False, slots=True)
class _Work:
    """One submission, from queued to settled. Guarded by ``LocalEngine._lock``."""

    phase: _Phase
    submission_id: str
    plate_id: str
    plate_path: str
    spec_json: str
    state: Literal["queued", "running", "finished"] = "queued"
    n: int = 0
    """The job number it was sent to a worker under (0 until then)."""
    worker: _Worker | None = None
    """The worker running it, while it runs."""
    started: bool = False
    """The worker reported in (``ExecutionStarted`` was pushed)."""
    cancel_requested: bool = False
    terminal: Fact | None = None
    """The one terminal fact, once decided; later reports are dropped."""
    orphan: Orphan | None = None
    """For a submission adopted from a dead engine's ledger: the worker still running it."""


@dataclasses.dataclass(eq=False, slots=True)
class _Worker:
    """One long-lived worker process. Guarded by ``LocalEngine._lock``."""

    process: BaseProcess
    conn: Connection
    cancel_flag: Any
    """Shared memory: the job number the worker should treat as cancelled."""
    pid: int | None
    work: _Work | None = None
    """The submission it runs now; None when idle."""
    jobs: int = 0
    retiring: bool = False
    """Told to exit (close, recycling) or being stopped; gets no more work."""
    deadline: float | None = None
    """When to escalate (terminate, then kill) a worker that should have stopped."""
    escalation: int = 0
    """0: asked nicely; 1: terminated; 2: killed."""


def _submission(work: _Work) -> Submission:
    return Submission(work.plate_id, work.phase, work.submission_id)


def _crash_message(exit_code: int | None) -> str:
    if exit_code is None:
        return "worker process crashed (exit code unknown)"
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"worker process crashed: killed by {name} (exit code {exit_code})"
    return f"worker process crashed: exited with code {exit_code} without reporting a result"


@final
class LocalEngine(Engine):
    """Compile and execute plates in worker processes on this machine, no server.

    ``max_workers`` processes at most run at once (default: the CPU count);
    further submissions wait in FIFO order. Step functions resolve only from
    ``allowed_modules``. Steps write into ``output_dir`` (default: a fresh
    temporary directory, removed at close if still empty). Worker processes
    are started when work needs them and then reused; ``max_jobs_per_worker``
    (default: no limit) retires a worker after that many submissions, for
    steps that leak. A cancelled submission's step gets ``cancel_grace``
    seconds to stop by itself (its worker is then reused) before its worker is
    terminated, then as long again before it is killed. ``mp_context`` is
    ``"forkserver"`` (default where available) or ``"spawn"``.

    A finished submission is remembered, to answer ``status`` with its terminal
    fact again, until ``keep_finished`` newer ones have finished (default
    :data:`DEFAULT_KEEP_FINISHED`, about 2 KB each for a small result; None:
    for as long as the engine runs). A long-lived server's memory stays bounded
    by it; a forgotten submission is unknown to ``status``, and its id may be
    submitted again.

    ``ledger_dir`` (default None: none) is a directory where workers record each
    submission they start and its outcome, so that after a crash of this
    process a new engine can :meth:`adopt` it and :meth:`recover` what happened
    (see :mod:`plateflow.engines._ledger`). With a ledger, a worker whose host
    died finishes its current step and records it before it exits; without
    one it exits at once. A normal :meth:`close` empties the ledger.
    """

    name = "local"

    def __init__(
        self,
        *,
        max_workers: int | None = None,
        allowed_modules: Collection[str] = DEFAULT_ALLOWED_MODULES,
        output_dir: str | None = None,
        cancel_grace: float = 2.0,
        mp_context: str = _DEFAULT_CONTEXT,
        max_jobs_per_worker: int | None = None,
        keep_finished: int | None = DEFAULT_KEEP_FINISHED,
        ledger_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        workers = (os.cpu_count() or 1) if max_workers is None else max_workers
        if workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        if max_jobs_per_worker is not None and max_jobs_per_worker < 1:
            raise ValueError(
                f"max_jobs_per_worker must be at least 1 (or None), got {max_jobs_per_worker}"
            )
        if keep_finished is not None and (type(keep_finished) is not int or keep_finished < 1):
            raise ValueError(f"keep_finished must be at least 1 (or None), got {keep_finished!r}")
        if not cancel_grace > 0:
            raise ValueError(
                f"cancel_grace must be a positive number of seconds, got {cancel_grace}"
            )
        if mp_context == "fork":
            raise ValueError(
                "mp_context 'fork' is unsafe here (the engine runs a watcher thread); "
                "use 'forkserver' or 'spawn'"
            )
        if mp_context not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"mp_context {mp_context!r} is not available on this platform; "
                f"choose from {[m for m in multiprocessing.get_all_start_methods() if m != 'fork']}"
            )
        self._max_workers = workers
        self._max_jobs = max_jobs_per_worker
        self._allowed_modules = tuple(allowed_modules)
        self._output_dir = output_dir
        self._made_output_dir = False
        self._cancel_grace = float(cancel_grace)
        self._mp_name = mp_context
        self._ctx: BaseContext = multiprocessing.get_context(mp_context)

        self._lock = threading.Lock()
        self._works: dict[tuple[_Phase, str], _Work] = {}
        self._queue: deque[_Work] = deque()
        self._workers: list[_Worker] = []
        """Worker processes started and not yet reaped."""
        self._starting = 0
        """Worker processes being started (outside the lock)."""
        self._job_numbers = itertools.count(1)
        self._artifacts: dict[str, str] = {}
        self._keep_finished = keep_finished
        self._finished: deque[tuple[_Phase, str]] = deque()
        """Finished submissions, oldest first (only with ``keep_finished``)."""
        self._forgotten = 0
        """Compiled pipelines by fingerprint: the spec as JSON."""

        self._ledger = None if ledger_dir is None else Ledger(os.fspath(ledger_dir))
        self._adopting = False
        self._vouches = False
        """Whether a submission missing from the ledger certainly never started."""
        self._token = secrets.token_hex(8)
        self._orphans: list[_Work] = []
        """Adopted submissions that a dead engine's worker still runs."""

        self._sink: FactSink | None = None
        self._thread: threading.Thread | None = None
        self._wakeup: WakePipe | None = None
        self._closing = False
        self._closed = False
        self._broken: str | None = None

    # --- the Engine interface ---------------------------------------------------

    @property
    def output_dir(self) -> str | None:
        """Where steps write (known once started)."""
        return self._output_dir

    @property
    def max_workers(self) -> int:
        """How many submissions run at once, at most (one worker process each)."""
        return self._max_workers

    async def start(self, sink: FactSink) -> None:
        if self._closed:
            raise EngineError("the local engine is closed; make a new one")
        if self._thread is not None:
            raise EngineError("the local engine is already started")
        if self._output_dir is None:
            self._output_dir = tempfile.mkdtemp(prefix="plateflow-local-")
            self._made_output_dir = True
        else:
            try:
                os.makedirs(self._output_dir, exist_ok=True)
            except OSError as exc:
                raise EngineError(f"cannot create output_dir {self._output_dir!r}: {exc}") from exc
        if self._ledger is not None:
            vouches = self._ledger.open(self._token, adopting=self._adopting)
            self._vouches = vouches and self._adopting
        if self._mp_name == "forkserver":
            # Only takes effect if this interpreter's fork server is not running yet.
            self._ctx.set_forkserver_preload(_PRELOAD)
        self._sink = sink
        self._wakeup = WakePipe()
        self._thread = threading.Thread(
            target=self._watch, name="plateflow-local-engine", daemon=True
        )
        self._thread.start()

    def identity(self) -> dict[str, JsonValue]:
        """``{"ledger_dir": <absolute path>}``, or ``{}`` without a ledger (nothing survives)."""
        return {} if self._ledger is None else {"ledger_dir": self._ledger.path}

    def adopt(self, identity: dict[str, JsonValue]) -> None:
        """Before :meth:`start`: take over the ledger a crashed process's local engine left.

        Raises :class:`~plateflow.errors.UsageError` if ``identity`` is not a local
        engine's with a ledger, the directory is missing, or a live engine holds it.
        """
        if self._thread is not None or self._closed:
            raise UsageError("adopt() must be called before start(), on a new LocalEngine")
        self._ledger = Ledger.adoptable(identity)
        self._adopting = True

    async def recover(self, submissions: Sequence[Submission]) -> Recovered:
        return self.recover_now(submissions)

    async def submit_compile(self, job_id: str, job: CompileJob) -> None:
        self.submit_compile_now(job_id, job)

    async def submit_execution(self, execution_id: str, job: CompileJob, artifact_id: str) -> None:
        self.submit_execution_now(execution_id, job, artifact_id)

    async def cancel(self, submission: Submission) -> None:
        self.cancel_now(submission)

    async def status(self, submissions: Sequence[Submission]) -> list[Fact]:
        return self.status_now(submissions)

    async def server_info(self) -> dict[str, JsonValue]:
        return self.info_now()

    # --- the same, synchronous: none of them blocks ---------------------------------

    def submit_compile_now(self, job_id: str, job: CompileJob) -> None:
        """:meth:`submit_compile` for callers without an event loop (the embedded server)."""
        self._check_usable()
        work = _Work(
            phase="compile",
            submission_id=job_id,
            plate_id=job.plate_id,
            plate_path=job.plate_path,
            spec_json=job.pipeline.model_dump_json(),
        )
        with self._lock:
            duplicate = ("compile", job_id) in self._works
        if duplicate:
            self._push(
                CompileRejected(
                    observed_at=time.time(),
                    plate_id=job.plate_id,
                    job_id=job_id,
                    error=f"duplicate compile submission id {job_id!r}",
                )
            )
            return
        self._push(CompileAccepted(observed_at=time.time(), plate_id=job.plate_id, job_id=job_id))
        self._enqueue(work)

    def submit_execution_now(self, execution_id: str, job: CompileJob, artifact_id: str) -> None:
        """:meth:`submit_execution` without an event loop."""
        self._check_usable()
        with self._lock:
            duplicate = ("execute", execution_id) in self._works
            spec_json = self._artifacts.get(artifact_id)
        if spec_json is None and not duplicate and self._ledger is not None:
            spec_json = self._ledger.artifact(artifact_id)  # compiled by an engine that died
            if spec_json is not None:
                with self._lock:
                    self._artifacts[artifact_id] = spec_json
        if duplicate or spec_json is None:
            error = (
                f"duplicate execution id {execution_id!r}"
                if duplicate
                else f"unknown compile artifact {artifact_id!r}: this engine has not compiled "
                "it (compile the plate on this engine first)"
            )
            self._push(
                ExecutionRejected(
                    observed_at=time.time(),
                    plate_id=job.plate_id,
                    execution_id=execution_id,
                    error=error,
                )
            )
            return
        self._push(
            ExecutionAccepted(
                observed_at=time.time(), plate_id=job.plate_id, execution_id=execution_id
            )
        )
        self._enqueue(
            _Work(
                phase="execute",
                submission_id=execution_id,
                plate_id=job.plate_id,
                plate_path=job.plate_path,
                spec_json=spec_json,
            )
        )

    def cancel_now(self, submission: Submission) -> None:
        """:meth:`cancel` without an event loop."""
        fact: Fact | None = None
        with self._lock:
            work = self._works.get((submission.phase, submission.submission_id))
            if work is None or work.terminal is not None or work.cancel_requested:
                return
            if work.orphan is not None:
                work.cancel_requested = True
                if not work.orphan.kill():
                    _log.warning("cannot stop pid %s: its identity cannot be checked here", work)
            elif work.state == "queued":
                self._queue.remove(work)
                work.state = "finished"
                fact = work.terminal = self._cancelled(work)
                self._remember(work)
            else:
                self._stop(work)
        if fact is not None:
            self._push(fact)
        else:
            self._wake()

    def status_now(self, submissions: Sequence[Submission]) -> list[Fact]:
        """:meth:`status` without an event loop."""
        facts: list[Fact] = []
        with self._lock:
            for submission in submissions:
                work = self._works.get((submission.phase, submission.submission_id))
                if work is not None:  # the engine's own record says which plate
                    known = Submission(work.plate_id, work.phase, work.submission_id)
                    facts.append(status_fact(known, terminal=work.terminal, started=work.started))
        return facts

    def recover_now(self, submissions: Sequence[Submission]) -> Recovered:
        """:meth:`recover` without an event loop: what the adopted ledger says of each.

        Its outcome, if recorded; started, if a worker of a dead engine still runs
        it (then watched, its outcome pushed when that worker ends); otherwise
        ``unknown``, and in ``never_ran`` if the ledger vouches for it.
        """
        self._check_usable()
        facts: list[Fact] = []
        unknown: list[Submission] = []
        for submission in submissions:
            with self._lock:
                work = self._works.get((submission.phase, submission.submission_id))
                if work is not None:
                    known = _submission(work)
                    facts.append(status_fact(known, terminal=work.terminal, started=work.started))
                    continue
            found = None if self._ledger is None else self._ledger.look_up(submission)
            if found is None:
                unknown.append(submission)
                continue
            work = _Work(submission.phase, submission.submission_id, submission.plate_id, "", "")
            work.started, work.state = True, "finished"
            if isinstance(found, tuple):
                work.plate_id, work.orphan, work.state = found[0].plate_id, found[1], "running"
            else:
                work.terminal = found
            with self._lock:
                self._works[(work.phase, work.submission_id)] = work
                if work.orphan is not None:
                    self._orphans.append(work)
                else:
                    self._remember(work)
            facts.append(status_fact(_submission(work), terminal=work.terminal, started=True))
        self._wake()
        never_ran = frozenset(s.submission_id for s in unknown) if self._vouches else frozenset()
        return Recovered(facts=tuple(facts), unknown=tuple(unknown), never_ran=never_ran)

    def knows(self, phase: Literal["compile", "execute"], submission_id: str) -> bool:
        """Whether a submission of this id is queued, running or remembered as finished."""
        with self._lock:
            return (phase, submission_id) in self._works

    def info_now(self) -> dict[str, JsonValue]:
        """:meth:`server_info` without an event loop."""
        with self._lock:
            running: list[JsonValue] = [
                {
                    "plate_id": w.work.plate_id,
                    "phase": w.work.phase,
                    "submission_id": w.work.submission_id,
                    "pid": w.pid,
                    "cancelling": w.work.cancel_requested,
                }
                for w in self._workers
                if w.work is not None and w.work.terminal is None
            ]
            return {
                "engine": self.name,
                "mp_context": self._mp_name,
                "workers": self._max_workers,
                "processes": len(self._workers),
                "idle": sum(1 for w in self._workers if w.work is None and not w.retiring),
                "running": len(running),
                "queued": len(self._queue),
                "artifacts": len(self._artifacts),
                "remembered": len(self._works),
                "keep_finished": self._keep_finished,
                "forgotten": self._forgotten,
                "output_dir": self._output_dir,
                "ledger_dir": None if self._ledger is None else self._ledger.path,
                "adopted_running": len(self._orphans),
                "running_submissions": running,
                "closed": self._closed,
                "broken": self._broken,
            }

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        facts: list[Fact] = []
        with self._lock:
            self._closing = True
            for work in self._queue:
                work.state = "finished"
                work.terminal = self._cancelled(work)
                facts.append(work.terminal)
            self._queue.clear()
            for worker in self._workers:
                running = worker.work
                if running is not None and not (running.terminal or running.cancel_requested):
                    self._stop(running)
            for work in list(self._orphans):
                work.cancel_requested = True
                if work.orphan is not None and not work.orphan.kill():
                    self._orphans.remove(work)  # unverifiable here: left to finish alone
                    work.orphan.close()
                    work.orphan, work.state = None, "finished"
                    error = "the engine closed while a dead engine's worker ran it (not stopped)"
                    work.terminal = self._failed(work, error)
                    facts.append(work.terminal)
        for fact in facts:
            self._push(fact)
        thread = self._thread
        if thread is not None:
            self._wake()
            await asyncio.to_thread(thread.join)
            if self._wakeup is not None:
                self._wakeup.close()
        if self._ledger is not None and thread is not None:
            self._ledger.end(self._token)
        if self._made_output_dir and self._output_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._output_dir)  # only if no step wrote anything

    def __repr__(self) -> str:
        with self._lock:
            live, queued = len(self._workers), len(self._queue)
        state = "closed" if self._closed else "started" if self._thread else "new"
        return (
            f"<LocalEngine {state} workers={self._max_workers} processes={live} "
            f"queued={queued} artifacts={len(self._artifacts)} mp={self._mp_name}>"
        )

    # --- caller side helpers ------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise EngineError("the local engine is closed")
        if self._thread is None:
            raise EngineError("the local engine is not started; call start(sink) first")
        if self._broken is not None:
            raise EngineError(f"the local engine is broken: {self._broken}")

    def _enqueue(self, work: _Work) -> None:
        with self._lock:
            self._works[(work.phase, work.submission_id)] = work
            self._queue.append(work)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.wake()

    def _push(self, fact: Fact) -> None:
        sink = self._sink
        if sink is None:
            return
        try:
            sink(fact)
        except Exception:  # the sink must not raise; if it does, the engine carries on
            _log.exception("the fact sink raised on %r", fact)

    def _stop(self, work: _Work) -> None:
        """Ask a running submission's step to stop; escalate at the deadline. Holds the lock."""
        work.cancel_requested = True
        worker = work.worker
        if worker is not None:
            worker.cancel_flag.value = work.n
            worker.deadline = time.monotonic() + self._cancel_grace
            worker.escalation = 0

    @staticmethod
    def _cancelled(work: _Work) -> Fact:
        return cancelled_fact(_submission(work))

    @staticmethod
    def _failed(work: _Work, error: str, exit_code: int | None = None) -> Fact:
        return failed_fact(_submission(work), error, exit_code)

    def _record(self, work: _Work, fact: Fact) -> None:
        """Make the ledger say ``fact``, what we push, of a submission a worker claimed."""
        if self._ledger is not None and work.started:
            try:
                self._ledger.record(fact, exclusive=False)
            except (OSError, LedgerError) as exc:
                _log.error("could not record %s in the ledger: %s", fact, exc)

    def _remember(self, work: _Work) -> None:
        """Under the lock: ``work`` just finished; forget the oldest beyond ``keep_finished``."""
        keep = self._keep_finished
        if keep is None:
            return
        finished = self._finished
        finished.append((work.phase, work.submission_id))
        while len(finished) > keep:
            key = finished.popleft()
            old = self._works.get(key)
            if old is not None and old.terminal is not None:
                del self._works[key]
                self._forgotten += 1

    # --- the watcher thread ------------------------------------------------------

    def _watch(self) -> None:
        try:
            self._watch_loop()
        except BaseException as exc:
            # A bug in the engine, not in a step: say so once, stop every worker.
            reason = f"local engine watcher crashed: {type(exc).__name__}: {exc}"
            _log.exception("%s", reason)
            self._broken = reason
            with self._lock:
                workers = list(self._workers)
            for worker in workers:
                with contextlib.suppress(Exception):
                    worker.process.kill()
                    worker.process.join(5)
            self._push(EngineLost(observed_at=time.time(), reason=reason))

    def _watch_loop(self) -> None:
        while True:
            self._assign()
            if self._closing:
                self._retire_idle()
            with self._lock:
                if self._closing and not (self._workers or self._starting or self._orphans):
                    return
                workers = list(self._workers)
                orphans = [(w, w.orphan) for w in self._orphans if w.orphan is not None]
                deadlines = [w.deadline for w in workers if w.deadline is not None]
            wakeup = self._wakeup
            assert wakeup is not None
            waitables: list[Any] = [wakeup.fileno()]
            for worker in workers:
                waitables.append(worker.conn)
                waitables.append(worker.process.sentinel)
            # A pidfd is readable once its process has ended; without one, look now and then.
            waitables.extend(orphan.fd for _, orphan in orphans if orphan.fd >= 0)
            if any(orphan.fd < 0 for _, orphan in orphans):
                deadlines.append(time.monotonic() + _ORPHAN_POLL)
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            ready = set(wait(waitables, timeout))
            for work, orphan in orphans:
                if not orphan.alive():
                    self._settle_orphan(work)

            if wakeup.fileno() in ready:
                wakeup.drain()
            for worker in workers:
                if worker.conn in ready:
                    self._read(worker)
                if worker.process.sentinel in ready:
                    self._reap(worker)
            self._escalate()

    def _settle_orphan(self, work: _Work) -> None:
        """An adopted submission's worker ended: push the outcome it recorded (or why none)."""
        with self._lock:
            orphan, work.orphan = work.orphan, None
            if orphan is None:
                return  # close() gave up on it meanwhile
            self._orphans.remove(work)
        assert self._ledger is not None
        orphan.close()
        fact = self._ledger.settle(_submission(work), orphan.pid, cancelled=work.cancel_requested)
        fact = status_fact(_submission(work), terminal=fact, started=True)  # a fresh stimulus
        with self._lock:
            work.terminal = fact
            work.state = "finished"
            self._remember(work)
        self._push(fact)

    def _assign(self) -> None:
        """Hand queued submissions to idle workers, starting workers as needed."""
        while True:
            with self._lock:
                if self._closing or not self._queue:
                    return
                idle = next((w for w in self._workers if w.work is None and not w.retiring), None)
                if idle is None:
                    if len(self._workers) + self._starting >= self._max_workers:
                        return
                    self._starting += 1
                else:
                    work = self._queue.popleft()
                    work.state = "running"
                    work.n = next(self._job_numbers)
                    work.worker = idle
                    idle.work = work
                    idle.jobs += 1
            if idle is None:
                self._spawn()
            else:
                self._send_job(idle, work)

    def _spawn(self) -> None:
        """Start one worker process (outside the lock); a failure fails the next submission."""
        reader, writer = self._ctx.Pipe(duplex=True)
        flag = self._ctx.Value("q", 0, lock=False)
        assert self._output_dir is not None
        setup = _WorkerSetup(
            allowed_modules=self._allowed_modules,
            output_dir=self._output_dir,
            ledger_dir=None if self._ledger is None else self._ledger.path,
            token=self._token,
        )
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker_main,
            name="plateflow-worker",
            args=(writer, flag, setup),
            daemon=True,
        )
        try:
            process.start()
        except Exception as exc:
            reader.close()
            error = f"could not start a worker process: {_describe(exc)}"
            with self._lock:
                self._starting -= 1
                work = self._queue.popleft() if self._queue else None
                if work is not None:
                    work.state = "finished"
                    work.terminal = self._failed(work, error)
                    self._remember(work)
            if work is not None and work.terminal is not None:
                self._push(work.terminal)
            return
        finally:
            writer.close()
        with self._lock:
            self._starting -= 1
            self._workers.append(
                _Worker(
                    process=cast(BaseProcess, process),
                    conn=reader,
                    cancel_flag=flag,
                    pid=process.pid,
                )
            )

    def _send_job(self, worker: _Worker, work: _Work) -> None:
        job = {
            "t": "job",
            "n": work.n,
            "phase": work.phase,
            "sid": work.submission_id,
            "spec": work.spec_json,
            "plate_id": work.plate_id,
            "plate_path": work.plate_path,
        }
        # If the worker is gone, its sentinel fires and _reap settles the submission.
        with contextlib.suppress(OSError):
            worker.conn.send_bytes(json.dumps(job, separators=(",", ":")).encode("utf-8"))

    def _retire_idle(self) -> None:
        """While closing: tell idle workers to exit (closing their pipe ends their loop)."""
        with self._lock:
            idle = [w for w in self._workers if w.work is None and not w.retiring]
            for worker in idle:
                worker.retiring = True
                worker.deadline = time.monotonic() + self._cancel_grace
        for worker in idle:
            with contextlib.suppress(OSError):
                worker.conn.send_bytes(b'{"t":"exit"}')

    def _read(self, worker: _Worker) -> None:
        """Handle every report the worker has written so far."""
        conn = worker.conn
        while True:
            try:
                if conn.closed or not conn.poll():
                    return
                raw = conn.recv_bytes()
            except (EOFError, OSError):
                return  # the worker is exiting: its sentinel decides what happened
            try:
                message = decode_object(raw, max_bytes=_MAX_REPORT_BYTES, what="a worker report")
                kind = message["t"]
                n = message["n"]
                if type(kind) is not str or type(n) is not int:
                    raise TypeError(f"t {kind!r:.20} and n {n!r:.20}")
            except (DecodeError, KeyError, TypeError) as exc:
                # Our own worker wrote it, so this is a bug: the job it was running
                # fails, saying so, rather than wait for a report that cannot come.
                _log.error("worker %s sent a report it cannot have meant: %s", worker.pid, exc)
                self._unreadable(worker, f"{type(exc).__name__}: {exc}")
                continue
            self._handle(worker, n, kind, message)

    def _unreadable(self, worker: _Worker, why: str) -> None:
        """Fail the job ``worker`` runs now: its report could not be read."""
        work = worker.work
        if work is not None:
            error = {"error": f"the worker's report could not be read: {why}"}
            self._handle(worker, work.n, "failed", error)

    def _handle(self, worker: _Worker, n: int, kind: str, message: dict[str, Any]) -> None:
        fact: Fact | None = None
        retire = record = False
        with self._lock:
            work = worker.work
            if work is None or work.n != n or work.terminal is not None:
                return  # about an earlier job, or after the first terminal report: too late
            if kind == "started":
                work.started = True
                if work.phase == "execute":
                    fact = ExecutionStarted(
                        observed_at=time.time(),
                        plate_id=work.plate_id,
                        execution_id=work.submission_id,
                    )
            elif kind == "progress":
                if work.phase == "execute":
                    try:
                        fact = ExecutionProgress(
                            observed_at=time.time(),
                            plate_id=work.plate_id,
                            execution_id=work.submission_id,
                            done=message["done"],
                            total=message["total"],
                            message=str(message.get("message", "")),
                        )
                    except (ValueError, KeyError) as exc:
                        _log.warning("dropped a malformed progress report from %s: %s", work, exc)
            else:
                fact = _terminal_fact(_submission(work), kind, message, work.cancel_requested)
                if fact is None:
                    _log.warning("worker %s sent an unknown report %r", worker.pid, kind)
                elif isinstance(fact, CompileSucceeded):
                    self._artifacts[fact.artifact_id] = work.spec_json
            if fact is not None and kind not in ("started", "progress"):
                # The worker recorded its own failure; we may push a cancel, or our message.
                record = kind == "failed"
                work.terminal = fact
                work.state = "finished"
                self._remember(work)
                work.worker = None
                worker.work = None
                if worker.escalation == 0:
                    # It has reported in time: free for the next submission, unless it is due
                    # to retire. (A worker already being terminated keeps its deadline.)
                    worker.deadline = None
                    if self._max_jobs is not None and worker.jobs >= self._max_jobs:
                        worker.retiring = retire = True
                        worker.deadline = time.monotonic() + self._cancel_grace
        if record and fact is not None:
            self._record(work, fact)
        if fact is not None:
            self._push(fact)
        if retire:
            with contextlib.suppress(OSError):
                worker.conn.send_bytes(b'{"t":"exit"}')

    def _reap(self, worker: _Worker) -> None:
        """The worker exited: collect what it wrote, then settle its submission."""
        self._read(worker)
        process = worker.process
        process.join()
        exit_code = process.exitcode
        process.close()
        worker.conn.close()
        fact: Fact | None = None
        with self._lock:
            self._workers.remove(worker)
            work = worker.work
            worker.work = None
            if work is not None and work.terminal is None:
                if work.cancel_requested:
                    fact = self._cancelled(work)
                else:
                    fact = self._failed(work, _crash_message(exit_code), exit_code)
                work.terminal = fact
                work.state = "finished"
                self._remember(work)
                work.worker = None
        if fact is not None and work is not None:
            self._record(work, fact)
            self._push(fact)

    def _escalate(self) -> None:
        """Terminate, then kill, workers that outstayed their deadline."""
        now = time.monotonic()
        with self._lock:
            due = [w for w in self._workers if w.deadline is not None and w.deadline <= now]
            for worker in due:
                worker.retiring = True  # whatever happens next, it is not reused
                if worker.escalation == 0:
                    _log.info("terminating worker %s", worker.pid)
                    worker.process.terminate()
                    worker.escalation = 1
                    worker.deadline = now + self._cancel_grace
                else:
                    _log.warning("killing worker %s", worker.pid)
                    worker.process.kill()
                    worker.escalation = 2
                    worker.deadline = None
