"""The local engine: compiles and executes plates in worker processes on this machine.

Theory of operation: every submission (compile or execution) runs in its own
worker process, at most ``max_workers`` at once; the rest wait in one FIFO
queue. One *watcher* thread owns the workers: it starts them when a slot is
free, reads their reports, notices when they exit and pushes the facts. It
blocks in :func:`multiprocessing.connection.wait` on every worker's result
pipe and process sentinel plus a self-pipe that the event-loop side writes to
when it has news (a submission, a cancel, close), so it sleeps until
something happens and never polls. However many plates there are, the engine
adds exactly one thread.

The caller's thread (the service's event loop) pushes only the facts it can
decide at once: ``*Accepted`` and ``*Rejected`` on submit, and ``*Cancelled``
for a submission cancelled while still queued. Everything that depends on a
worker is pushed by the watcher, so the facts of one submission arrive in
order: Accepted, Started, Progress..., then exactly one terminal fact.

A worker reports over a one-way pipe with small JSON messages (never pickle):
``started``, ``progress``, then one of ``compiled``, ``succeeded``, ``failed``,
``cancelled``. The *first* terminal report wins; a worker that exits without
one crashed, and its submission fails with the exit code (negative signal
number when a signal killed it). Cancel sets the worker's cancellation event
(the step sees ``ctx.cancelled``); a worker still alive after ``cancel_grace``
seconds is terminated, and killed after another ``cancel_grace``. Only that
one worker is touched.

Workers are started with ``forkserver`` by default (with this module
preloaded, a worker is ready in ~10 ms instead of ~350 ms for ``spawn``);
``fork`` is refused because the parent runs threads. Workers are daemonic, so
a step cannot start processes of its own, and they exit by themselves if the
parent process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Collection, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as MpEvent
from typing import Any, Final, Literal, cast, final

from pydantic import JsonValue

from plateflow.core.facts import (
    CompileAccepted,
    CompileCancelled,
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
from plateflow.engines.base import Engine, EngineError, FactSink, Submission
from plateflow.jobs import CompileJob
from plateflow.pipeline.run import (
    DEFAULT_ALLOWED_MODULES,
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


# --- the worker process ----------------------------------------------------------


_send_lock = threading.Lock()  # a step may report progress from threads of its own


def _send(conn: Connection, message: dict[str, Any]) -> None:
    data = json.dumps(message, separators=(",", ":")).encode("utf-8")
    with _send_lock:
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
    return text


def _exit_when_parent_dies() -> None:
    """Exit at once when the engine's process is gone, so no worker outlives it."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        wait([sentinel])
        os._exit(70)

    threading.Thread(target=watch, name="plateflow-parent-watch", daemon=True).start()


def _worker_main(
    conn: Connection,
    cancel_event: MpEvent,
    phase: _Phase,
    spec_json: str,
    allowed_modules: tuple[str, ...],
    plate_id: str,
    plate_path: str,
    output_dir: str,
) -> None:
    """Compile (and for an execution, run) one pipeline; report over ``conn``."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides
    # what to cancel, so a worker must not die of the user's keystroke.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_when_parent_dies()
    _send(conn, {"t": "started", "pid": os.getpid()})
    try:
        compiled = compile_pipeline(
            PipelineSpec.model_validate_json(spec_json), allowed_modules=allowed_modules
        )
        if phase == "compile":
            _send(conn, {"t": "compiled", "artifact_id": compiled.fingerprint})
            return

        def report(done: int, total: int, message: str) -> None:
            _send(conn, {"t": "progress", "done": done, "total": total, "message": message})

        ctx = StepContext(
            plate_id=plate_id,
            plate_path=plate_path,
            output_dir=output_dir,
            _report=report,
            _is_cancelled=cancel_event.is_set,
        )
        result = execute_pipeline(compiled, ctx)
        _send(conn, {"t": "succeeded", "result": result})
    except StepCancelled:
        _send(conn, {"t": "cancelled"})
    except PipelineError as exc:
        _send(conn, {"t": "failed", "error": str(exc)})
    except BaseException as exc:  # a step may raise anything, SystemExit included
        _send(conn, {"t": "failed", "error": _describe(exc)})
    finally:
        conn.close()


# --- the parent's bookkeeping -------------------------------------------------------


@dataclasses.dataclass(eq=False, slots=True)
class _Work:
    """One submission, from queued to reaped. Guarded by ``LocalEngine._lock``."""

    phase: _Phase
    submission_id: str
    plate_id: str
    plate_path: str
    spec_json: str
    state: Literal["queued", "running", "finished"] = "queued"
    process: BaseProcess | None = None
    conn: Connection | None = None
    cancel_event: MpEvent | None = None
    pid: int | None = None
    started: bool = False
    """The worker reported in (``ExecutionStarted`` was pushed)."""
    cancel_requested: bool = False
    terminal: Fact | None = None
    """The one terminal fact, once decided; later reports are dropped."""
    deadline: float | None = None
    """When to escalate (terminate, then kill) a worker that should be gone."""
    escalation: int = 0
    """0: asked nicely (or reported); 1: terminated; 2: killed."""


def _fresh(fact: Fact) -> Fact:
    """The same fact with a new stimulus id: a status answer is a new observation."""
    values = {
        field.name: getattr(fact, field.name)
        for field in dataclasses.fields(cast(Any, fact))
        if field.name != "stimulus_id"
    }
    return type(fact)(**values)


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
    temporary directory, removed at close if still empty). A cancelled worker
    gets ``cancel_grace`` seconds to stop by itself before it is terminated,
    then as long again before it is killed. ``mp_context`` is ``"forkserver"``
    (default where available) or ``"spawn"``.
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
    ) -> None:
        workers = (os.cpu_count() or 1) if max_workers is None else max_workers
        if workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
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
        self._allowed_modules = tuple(allowed_modules)
        self._output_dir = output_dir
        self._made_output_dir = False
        self._cancel_grace = float(cancel_grace)
        self._mp_name = mp_context
        self._ctx: BaseContext = multiprocessing.get_context(mp_context)

        self._lock = threading.Lock()
        self._works: dict[tuple[_Phase, str], _Work] = {}
        self._queue: deque[_Work] = deque()
        self._live: list[_Work] = []
        """Works whose worker process exists (or is being started) and is not reaped."""
        self._artifacts: dict[str, str] = {}
        """Compiled pipelines by fingerprint: the spec as JSON."""

        self._sink: FactSink | None = None
        self._thread: threading.Thread | None = None
        self._wake_r = -1
        self._wake_w = -1
        self._closing = False
        self._closed = False
        self._broken: str | None = None

    # --- the Engine interface ---------------------------------------------------

    @property
    def output_dir(self) -> str | None:
        """Where steps write (known once started)."""
        return self._output_dir

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
        if self._mp_name == "forkserver":
            # Only takes effect if this interpreter's fork server is not running yet.
            self._ctx.set_forkserver_preload(_PRELOAD)
        self._sink = sink
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(
            target=self._watch, name="plateflow-local-engine", daemon=True
        )
        self._thread.start()

    async def submit_compile(self, job_id: str, job: CompileJob) -> None:
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
                    plate_id=job.plate_id,
                    job_id=job_id,
                    error=f"duplicate compile submission id {job_id!r}",
                )
            )
            return
        self._push(CompileAccepted(plate_id=job.plate_id, job_id=job_id))
        self._enqueue(work)

    async def submit_execution(self, execution_id: str, job: CompileJob, artifact_id: str) -> None:
        self._check_usable()
        with self._lock:
            duplicate = ("execute", execution_id) in self._works
            spec_json = self._artifacts.get(artifact_id)
        if duplicate or spec_json is None:
            error = (
                f"duplicate execution id {execution_id!r}"
                if duplicate
                else f"unknown compile artifact {artifact_id!r}: this engine has not compiled "
                "it (compile the plate on this engine first)"
            )
            self._push(
                ExecutionRejected(plate_id=job.plate_id, execution_id=execution_id, error=error)
            )
            return
        self._push(ExecutionAccepted(plate_id=job.plate_id, execution_id=execution_id))
        self._enqueue(
            _Work(
                phase="execute",
                submission_id=execution_id,
                plate_id=job.plate_id,
                plate_path=job.plate_path,
                spec_json=spec_json,
            )
        )

    async def cancel(self, submission: Submission) -> None:
        fact: Fact | None = None
        with self._lock:
            work = self._works.get((submission.phase, submission.submission_id))
            if work is None or work.terminal is not None or work.cancel_requested:
                return
            if work.state == "queued":
                self._queue.remove(work)
                work.state = "finished"
                fact = work.terminal = self._cancelled(work)
            else:
                self._request_stop(work)
        if fact is not None:
            self._push(fact)
        else:
            self._wake()

    async def status(self, submissions: Sequence[Submission]) -> list[Fact]:
        facts: list[Fact] = []
        with self._lock:
            for submission in submissions:
                work = self._works.get((submission.phase, submission.submission_id))
                if work is None:
                    continue
                if work.terminal is not None:
                    facts.append(_fresh(work.terminal))
                elif work.phase == "compile":
                    facts.append(CompileAccepted(plate_id=work.plate_id, job_id=work.submission_id))
                elif work.started:
                    facts.append(
                        ExecutionStarted(plate_id=work.plate_id, execution_id=work.submission_id)
                    )
                else:
                    facts.append(
                        ExecutionAccepted(plate_id=work.plate_id, execution_id=work.submission_id)
                    )
        return facts

    async def server_info(self) -> dict[str, JsonValue]:
        with self._lock:
            running: list[JsonValue] = [
                {
                    "plate_id": w.plate_id,
                    "phase": w.phase,
                    "submission_id": w.submission_id,
                    "pid": w.pid,
                    "cancelling": w.cancel_requested,
                }
                for w in self._live
                if w.terminal is None
            ]
            return {
                "engine": self.name,
                "mp_context": self._mp_name,
                "workers": self._max_workers,
                "processes": len(self._live),
                "running": len(running),
                "queued": len(self._queue),
                "artifacts": len(self._artifacts),
                "output_dir": self._output_dir,
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
            for work in self._live:
                if work.terminal is None and not work.cancel_requested:
                    self._request_stop(work)
        for fact in facts:
            self._push(fact)
        thread = self._thread
        if thread is not None:
            self._wake()
            await asyncio.to_thread(thread.join)
            wake_r, wake_w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1  # a closed fd number may be reused
            os.close(wake_r)
            os.close(wake_w)
        if self._made_output_dir and self._output_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._output_dir)  # only if no step wrote anything

    def __repr__(self) -> str:
        with self._lock:
            live, queued = len(self._live), len(self._queue)
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
        if self._wake_w < 0:
            return
        with contextlib.suppress(OSError):  # a full pipe is already a wake-up
            os.write(self._wake_w, b"!")

    def _push(self, fact: Fact) -> None:
        sink = self._sink
        if sink is None:
            return
        try:
            sink(fact)
        except Exception:  # the sink must not raise; if it does, the engine carries on
            _log.exception("the fact sink raised on %r", fact)

    def _request_stop(self, work: _Work) -> None:
        """Ask a running worker to stop; escalate at the deadline. Holds the lock."""
        work.cancel_requested = True
        if work.cancel_event is not None:
            work.cancel_event.set()
        work.deadline = time.monotonic() + self._cancel_grace
        work.escalation = 0

    @staticmethod
    def _cancelled(work: _Work) -> Fact:
        if work.phase == "compile":
            return CompileCancelled(plate_id=work.plate_id, job_id=work.submission_id)
        return ExecutionCancelled(plate_id=work.plate_id, execution_id=work.submission_id)

    @staticmethod
    def _failed(work: _Work, error: str, exit_code: int | None = None) -> Fact:
        if work.phase == "compile":
            return CompileFailed(plate_id=work.plate_id, job_id=work.submission_id, error=error)
        return ExecutionFailed(
            plate_id=work.plate_id,
            execution_id=work.submission_id,
            error=error,
            exit_code=exit_code,
        )

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
                live = list(self._live)
            for work in live:
                if work.process is not None:
                    with contextlib.suppress(Exception):
                        work.process.kill()
                        work.process.join(5)
            self._push(EngineLost(reason=reason))

    def _watch_loop(self) -> None:
        while True:
            to_start: list[_Work] = []
            with self._lock:
                while (
                    self._queue
                    and not self._closing
                    and len(self._live) + len(to_start) < self._max_workers
                ):
                    work = self._queue.popleft()
                    work.state = "running"
                    work.cancel_event = self._ctx.Event()
                    to_start.append(work)
                self._live.extend(to_start)
                if self._closing and not self._live:
                    return
            for work in to_start:
                self._launch(work)

            with self._lock:
                live = list(self._live)
                deadlines = [w.deadline for w in live if w.deadline is not None]
            waitables: list[Any] = [self._wake_r]
            for work in live:
                if work.conn is not None:
                    waitables.append(work.conn)
                if work.process is not None:
                    waitables.append(work.process.sentinel)
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            ready = set(wait(waitables, timeout))

            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
            for work in live:
                if work.conn is not None and work.conn in ready:
                    self._read(work)
                if work.process is not None and work.process.sentinel in ready:
                    self._reap(work)
            self._escalate()

    def _launch(self, work: _Work) -> None:
        reader, writer = self._ctx.Pipe(duplex=False)
        assert work.cancel_event is not None
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker_main,
            name=f"plateflow-{work.phase}-{work.plate_id}",
            args=(
                writer,
                work.cancel_event,
                work.phase,
                work.spec_json,
                self._allowed_modules,
                work.plate_id,
                work.plate_path,
                self._output_dir,
            ),
            daemon=True,
        )
        try:
            process.start()
        except Exception as exc:
            reader.close()
            fact = self._failed(work, f"could not start a worker process: {_describe(exc)}")
            with self._lock:
                self._live.remove(work)
                work.state = "finished"
                work.cancel_event = None
                if work.terminal is None:
                    work.terminal = fact
                else:
                    return
            self._push(fact)
            return
        finally:
            writer.close()
        with self._lock:
            work.process = cast(BaseProcess, process)
            work.conn = reader
            work.pid = process.pid

    def _read(self, work: _Work) -> None:
        """Handle every report the worker has written so far."""
        conn = work.conn
        assert conn is not None
        while True:
            try:
                if not conn.poll():
                    return
                raw = conn.recv_bytes()
            except (EOFError, OSError):
                conn.close()
                work.conn = None  # the exit (sentinel) decides what happened
                return
            try:
                message = json.loads(raw)
                kind = message["t"]
            except (ValueError, KeyError, TypeError):
                _log.warning("worker %s sent a malformed report: %r", work.pid, raw[:200])
                continue
            self._handle(work, kind, message)

    def _handle(self, work: _Work, kind: str, message: dict[str, Any]) -> None:
        fact: Fact | None = None
        with self._lock:
            if work.terminal is not None:
                return  # the first terminal report won; nothing after it counts
            if kind == "started":
                work.started = True
                if work.phase == "execute":
                    fact = ExecutionStarted(plate_id=work.plate_id, execution_id=work.submission_id)
            elif kind == "progress":
                if work.phase == "execute":
                    try:
                        fact = ExecutionProgress(
                            plate_id=work.plate_id,
                            execution_id=work.submission_id,
                            done=message["done"],
                            total=message["total"],
                            message=str(message.get("message", "")),
                        )
                    except (ValueError, KeyError) as exc:
                        _log.warning("dropped a malformed progress report from %s: %s", work, exc)
            elif kind == "compiled":
                artifact_id = str(message["artifact_id"])
                self._artifacts[artifact_id] = work.spec_json
                fact = CompileSucceeded(
                    plate_id=work.plate_id, job_id=work.submission_id, artifact_id=artifact_id
                )
            elif kind == "succeeded":
                fact = ExecutionSucceeded(
                    plate_id=work.plate_id,
                    execution_id=work.submission_id,
                    result=message["result"],
                )
            elif kind == "failed":
                # A failure after a cancel request is most likely the cancel itself.
                if work.cancel_requested:
                    fact = self._cancelled(work)
                else:
                    fact = self._failed(work, str(message["error"]))
            elif kind == "cancelled":
                fact = self._cancelled(work)
            else:
                _log.warning("worker %s sent an unknown report %r", work.pid, kind)
            if fact is not None and kind not in ("started", "progress"):
                work.terminal = fact
                work.state = "finished"
                # It has reported; give it the grace period to exit, then reap it by force.
                work.deadline = time.monotonic() + self._cancel_grace
                work.escalation = 0
        if fact is not None:
            self._push(fact)

    def _reap(self, work: _Work) -> None:
        """The worker exited: collect what it wrote, then settle its submission."""
        if work.conn is not None:
            self._read(work)
        process = work.process
        assert process is not None
        process.join()
        exit_code = process.exitcode
        process.close()
        if work.conn is not None:
            work.conn.close()
        fact: Fact | None = None
        with self._lock:
            self._live.remove(work)
            work.process = None
            work.conn = None
            work.cancel_event = None
            work.deadline = None
            if work.terminal is None:
                if work.cancel_requested:
                    fact = self._cancelled(work)
                else:
                    fact = self._failed(work, _crash_message(exit_code), exit_code)
                work.terminal = fact
                work.state = "finished"
        if fact is not None:
            self._push(fact)

    def _escalate(self) -> None:
        """Terminate, then kill, workers that outstayed their deadline."""
        now = time.monotonic()
        with self._lock:
            due = [w for w in self._live if w.deadline is not None and w.deadline <= now]
            for work in due:
                process = work.process
                if process is None:  # still being started; look again soon
                    work.deadline = now + 0.05
                    continue
                if work.escalation == 0:
                    _log.info("terminating worker %s (%s)", work.pid, work.submission_id)
                    process.terminate()
                    work.escalation = 1
                    work.deadline = now + self._cancel_grace
                else:
                    _log.warning("killing worker %s (%s)", work.pid, work.submission_id)
                    process.kill()
                    work.escalation = 2
                    work.deadline = None
