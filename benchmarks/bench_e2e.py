"""End-to-end benchmark: no-op plates compiled and executed through a real ``plateflow serve``.

Run it as a script from the project root::

    .venv/bin/python benchmarks/bench_e2e.py               # full run: N = 100, 1,000, 10,000
    .venv/bin/python benchmarks/bench_e2e.py --quick       # N = 100 and 1,000 only
    .venv/bin/python benchmarks/bench_e2e.py --max-n 1000  # the full plan without N=10,000
    .venv/bin/python benchmarks/bench_e2e.py --profile     # cProfile of the client, N=1,000

On this 2-core machine a full run takes about 40 s plus a minute for the Dask comparison
(N=10,000 alone about 20 s), a quick one about 15 s. ``--window K`` keeps at most K submit
calls in flight (client-side flow control in this script, not in plateflow);
``--status-interval`` and ``--progress-interval`` set the service's options of those
names; ``--sizes 10000`` runs only the listed sizes of the plan. Those are diagnostics:
the figures of record use the defaults, or say which option they used.

What one batch is: a :class:`BatchWorkflowService` on this process's event loop (the main
thread, callbacks inline) with a :class:`ZmqEngine` that starts ``python -m plateflow serve``
in a private temporary runtime dir (IPC sockets, ``--workers`` = CPUs by default,
``--allow noop_steps``). ``run_plates`` takes N plates through compile and execute; the
pipeline is one step, ``noop_steps:noop`` (``benchmarks/noop_steps.py``, put on the
server's ``PYTHONPATH``), which returns ``{"plate", "t": time.time()}``. The server runs
submissions in its pool of reused worker processes (one per CPU). One server serves
every batch of a run; it is started, and warmed up with a
20-plate batch, before anything is timed.

What is measured, per batch (every batch must end with all N plates ``completed``):

* ``wall_s_N``: ``await service.run_plates(...)`` alone, median over the repetitions.
* terminal latency, three spans, pooled over every plate of the N=1,000 batches, each
  ending at the host's ``on_plate_completed`` (its ``time.time()``):
  ``terminal_latency_ms_*`` starts when the server marks the execution terminal: the
  ``observed_at`` of the ``ExecutionSucceeded`` fact, which the server's engine stamps
  when it reads the worker's result and which crosses the wire with the fact.
  ``terminal_latency_from_worker_ms_*`` starts earlier, at the no-op step's return in the
  worker (its ``time.time()`` in the result), so it adds the worker-to-server pipe.
  ``client_terminal_latency_ms_*`` starts when the client I/O thread hands the decoded
  terminal fact to the service's sink (a thin wrapper around the engine's sink stamps
  it): plateflow's own client overhead.
* ``client_threads_max``: ``threading.active_count()`` sampled in every host callback
  (no sampler thread); ``client_os_threads_max`` counts ``/proc/self/task`` (libzmq's
  threads included) in the coalesced progress callback.
* ``client_rss_mb_10000``: ``VmRSS`` of this process right after the N=10,000 batch
  (MB = 10^6 bytes); ``VmHWM`` is the peak.
* CPU per plate, from ``getrusage`` and ``/proc/PID/stat``: this client (and its main
  thread alone), the server process, its fork server, the workers (the fork server's
  live children, plus what reaped ones left) and the multiprocessing resource tracker.
* ``floor_roundtrips_per_s``: raw pyzmq DEALER -> ROUTER round trips, one in flight, over
  IPC, against an echo process; the request is the size of the batch's ``ExecuteRequest``
  frame and the reply the size of its ``Reply``. ``floor_pipelined_per_s`` keeps 100 in
  flight, as a batch does.
* decomposition: the same batch with no server and no processes (an in-process engine
  that answers every submission at once: the client's own floor); in a full run also on a
  ``LocalEngine`` (its worker pool, no ZeroMQ) in a ``python -c`` child process,
  plus one fork-server process start and join on its own. The child has no ``__main__``
  file, like the server's ``-m plateflow``; from this script every worker would re-run
  ``bench_e2e.py`` and its imports (the fork server preloads ``plateflow.engines.local``,
  not ``__main__``), about 10x the cost of a worker.

Sizes are interleaved (N=100 and N=1,000 take turns; N=10,000 runs last, then the
decomposition), so that load from other processes on this shared machine does not fall on
one size only. The readable table goes to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import multiprocessing
import os
import pstats
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from pydantic import JsonValue

from _common import loadavg, log, machine_info, profile_entries, source_info
from plateflow import (
    BaseBatchHost,
    BatchState,
    BatchSummary,
    BatchWorkflowService,
    CompileJob,
    Engine,
    PipelineSpec,
    Plate,
    PlateOutcome,
    ProgressSnapshot,
    StepSpec,
    Submission,
)
from plateflow.core import (
    CompileAccepted,
    CompileSucceeded,
    ExecutionAccepted,
    ExecutionStarted,
    ExecutionSucceeded,
    Fact,
)
from plateflow.engines.base import FactSink
from plateflow.engines.local import LocalEngine
from plateflow.engines.zmq.engine import ZmqEngine
from plateflow.engines.zmq.wire import ExecuteRequest, Reply, encode

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
STEP_MODULE = "noop_steps"
PIPELINE = PipelineSpec(name="noop", steps=(StepSpec(function=f"{STEP_MODULE}:noop"),))
BIG_N = 10_000  # runs after the others, so that the RSS after it is this process's peak use
LATENCY_N = 1_000  # the headline latency pools every plate of the batches of this size
WARMUP_N = 20

TARGET_WALL_S_1000 = 2.0
TARGET_LATENCY_MS_P50 = 2.0
TARGET_LATENCY_MS_P99 = 20.0
TARGET_THREADS = 8
TARGET_PER_PLATE_RATIO = 1.5
TARGET_RSS_MB_10000 = 150.0
# The design plateflow replaces (one status-polling thread per plate at 0.5 s), as quoted in
# the issue for this machine; not measured by this script.
REPLACED_WALL_S_1000 = 45.0
REPLACED_LATENCY_MS_P50 = 520.0

FLOOR_SECONDS = 2.0
FLOOR_WINDOW = 100
SPAWN_SAMPLES = 100
PROFILE_LOCAL_N = 200


@dataclass(frozen=True)
class Plan:
    reps: dict[int, int]  # zmq batches per size
    instant: dict[int, int]  # in-process, process-free engine: batches per size
    local_n: int | None  # one LocalEngine batch of this size (no server), or none


FULL = Plan(reps={100: 3, 1_000: 3, 10_000: 1}, instant={1_000: 3, 10_000: 1}, local_n=1_000)
QUICK = Plan(reps={100: 2, 1_000: 1}, instant={1_000: 1}, local_n=None)


def capped(plan: Plan, max_n: int | None) -> Plan:
    if max_n is None:
        return plan
    local_n = plan.local_n if plan.local_n is not None and plan.local_n <= max_n else None
    return Plan(
        reps={n: r for n, r in plan.reps.items() if n <= max_n},
        instant={n: r for n, r in plan.instant.items() if n <= max_n},
        local_n=local_n,
    )


# --- small helpers ---------------------------------------------------------------------------


def plate_id(i: int) -> str:
    return f"plate-{i:05d}"


def make_plates(n: int) -> list[Plate]:
    return [Plate(plate_id(i), f"/data/plates/{plate_id(i)}.csv") for i in range(n)]


def quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def r3(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def os_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def status_kib(field_name: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def mb(kib: int | None) -> float | None:
    return None if kib is None else round(kib * 1024 / 1e6, 1)


_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcCpu:
    own: float  # utime + stime, seconds
    children: float  # cutime + cstime: reaped children, seconds
    children_sys: float  # cstime alone: the kernel's share (fork, page faults, exit)
    own_sys: float = 0.0  # stime alone


def proc_cpu(pid: int) -> ProcCpu | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            text = stat.read()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2 :].split()  # rest[0] is field 3 (state)
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return ProcCpu(
        (utime + stime) / _TICK, (cutime + cstime) / _TICK, cstime / _TICK, stime / _TICK
    )


def live_children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` now (the fork server's live workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                text = stat.read()
            if int(text[text.rfind(")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def children_of(pid: int) -> dict[str, int]:
    """The server's helper processes by role: ``forkserver`` and ``resource_tracker``."""
    found: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                text = stat.read()
            ppid = int(text[text.rfind(")") + 2 :].split()[1])
            if ppid != pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                cmdline = cmd.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        for role in ("forkserver", "resource_tracker"):
            if f"multiprocessing.{role}" in cmdline:
                found[role] = int(entry)
    return found


@dataclass
class CpuMark:
    """CPU seconds so far of every process a batch uses."""

    client: float
    client_main: float
    server: float | None = None
    forkserver: float | None = None
    workers: float | None = None
    workers_sys: float | None = None
    tracker: float | None = None


def cpu_mark(server_pid: int | None, helpers_of: int | None = None) -> CpuMark:
    """CPU so far; the fork server and resource tracker are ``helpers_of``'s (the server's)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    mark = CpuMark(usage.ru_utime + usage.ru_stime, time.thread_time())
    parent = server_pid if helpers_of is None else helpers_of
    if server_pid is not None:
        server = proc_cpu(server_pid)
        mark.server = server.own if server else None
    if parent is not None:
        helpers = children_of(parent)
        fork = proc_cpu(helpers["forkserver"]) if "forkserver" in helpers else None
        tracker = proc_cpu(helpers["resource_tracker"]) if "resource_tracker" in helpers else None
        mark.forkserver = fork.own if fork else None
        if fork is not None:
            # Workers are pooled: the live ones' own CPU plus what exited ones left behind.
            live = [c for c in map(proc_cpu, live_children(helpers["forkserver"])) if c]
            mark.workers = fork.children + sum(c.own for c in live)
            mark.workers_sys = fork.children_sys + sum(c.own_sys for c in live)
        mark.tracker = tracker.own if tracker else None
    return mark


def cpu_ms_per_plate(before: CpuMark, after: CpuMark, n: int) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    names = ("client", "client_main", "server", "forkserver", "workers", "workers_sys", "tracker")
    for name in names:
        a, b = getattr(before, name), getattr(after, name)
        out[name] = None if a is None or b is None else round((b - a) * 1e3 / n, 3)
    return out


# --- the host, and the stamp on the engine's sink ------------------------------------------


@dataclass
class Stamps:
    """Per plate, from the first terminal fact to reach the client (StampingEngine)."""

    received: dict[str, float] = field(default_factory=dict)
    """``perf_counter()`` when the client I/O thread handed it to the service's sink."""
    marked: dict[str, float] = field(default_factory=dict)
    """Its ``observed_at``: when the engine (the server's) marked the execution terminal."""


class BenchHost(BaseBatchHost):
    """Records what the benchmark needs from the callbacks, and nothing else."""

    def __init__(self, stamps: Stamps) -> None:
        super().__init__()
        self.received = stamps.received
        self.marked = stamps.marked
        self.reset()

    def reset(self) -> None:
        self.received.clear()
        self.marked.clear()
        self.marked_ms: list[float] = []
        self.worker_ms: list[float] = []
        self.client_ms: list[float] = []
        self.outcomes: Counter[str] = Counter()
        self.threads_max = threading.active_count()
        self.os_threads_max = os_threads()
        self.state_at: dict[str, float] = {}
        self.errors: list[str] = []
        self.failures: list[str] = []

    def on_plate_completed(self, plate_id: str, outcome: PlateOutcome, result: JsonValue) -> None:
        now, wall = time.perf_counter(), time.time()
        self.outcomes[outcome.value] += 1
        threads = threading.active_count()
        if threads > self.threads_max:
            self.threads_max = threads
        if outcome is not PlateOutcome.COMPLETED or not isinstance(result, dict):
            if len(self.failures) < 3:
                self.failures.append(f"{plate_id} {outcome.value}: {str(result)[:300]}")
            return
        stamp = result.get("t")
        if isinstance(stamp, float):
            self.worker_ms.append((wall - stamp) * 1e3)
        marked = self.marked.get(plate_id)
        if marked is not None:
            self.marked_ms.append((wall - marked) * 1e3)
        got = self.received.get(plate_id)
        if got is not None:
            self.client_ms.append((now - got) * 1e3)

    def emit_progress_updated(self, snapshot: ProgressSnapshot) -> None:
        threads = threading.active_count()
        if threads > self.threads_max:
            self.threads_max = threads
        tasks = os_threads()
        if tasks > self.os_threads_max:
            self.os_threads_max = tasks

    def update_button_states(self, batch_state: BatchState) -> None:
        self.state_at[batch_state.value] = time.perf_counter()

    def emit_error(self, message: str, *, code: str = "", plate_id: str | None = None) -> None:
        if len(self.errors) < 3:
            self.errors.append(f"{code}: {message[:300]}")


class StampingEngine(Engine):
    """Delegates to an engine; stamps when a terminal fact reaches the client.

    The stamp is one ``perf_counter()`` and one dict write for the first
    ``ExecutionSucceeded`` of each plate, on whichever path comes first: the engine's
    sink (the ZeroMQ client's I/O thread) or a status reply to the service's poller.
    With ``window`` > 0 at most that many submit calls are in flight at once
    (client-side flow control).
    """

    def __init__(self, inner: Engine, stamps: Stamps, window: int = 0) -> None:
        self.inner = inner
        self.name = inner.name
        self.received = stamps.received
        self.marked = stamps.marked
        self._window = window
        self._slots: asyncio.Semaphore | None = None

    def _stamp(self, fact: Fact) -> None:
        if type(fact) is ExecutionSucceeded and fact.plate_id not in self.received:
            self.received[fact.plate_id] = time.perf_counter()
            self.marked[fact.plate_id] = fact.observed_at

    async def start(self, sink: FactSink) -> None:
        stamp = self._stamp

        def stamped(fact: Fact) -> None:
            stamp(fact)
            sink(fact)

        if self._window > 0:
            self._slots = asyncio.Semaphore(self._window)
        await self.inner.start(stamped)

    async def submit_compile(self, job_id: str, job: CompileJob) -> None:
        if self._slots is None:
            await self.inner.submit_compile(job_id, job)
            return
        async with self._slots:
            await self.inner.submit_compile(job_id, job)

    async def submit_execution(self, execution_id: str, job: CompileJob, artifact_id: str) -> None:
        if self._slots is None:
            await self.inner.submit_execution(execution_id, job, artifact_id)
            return
        async with self._slots:
            await self.inner.submit_execution(execution_id, job, artifact_id)

    async def cancel(self, submission: Submission) -> None:
        await self.inner.cancel(submission)

    async def status(self, submissions: Sequence[Submission]) -> list[Fact]:
        # The service's status poller posts these facts itself, past the sink: a terminal
        # fact can reach the client in a status reply before its event does.
        facts = await self.inner.status(submissions)
        for fact in facts:
            self._stamp(fact)
        return facts

    async def server_info(self) -> dict[str, JsonValue]:
        return await self.inner.server_info()

    async def close(self) -> None:
        await self.inner.close()


class InstantEngine(Engine):
    """No server, no processes: every submission's facts are pushed at once, in order.

    The same five facts per plate as the real server sends for a one-step pipeline
    (compile: accepted, succeeded; execute: accepted, started, succeeded), so a
    batch on it costs what the service, the core and the host cost, and nothing else.
    """

    name = "instant"

    def __init__(self) -> None:
        self._sink: FactSink | None = None

    async def start(self, sink: FactSink) -> None:
        self._sink = sink

    async def submit_compile(self, job_id: str, job: CompileJob) -> None:
        sink = self._sink
        assert sink is not None
        now = time.time()  # an engine stamps the facts it makes (observed_at)
        sink(CompileAccepted(plate_id=job.plate_id, job_id=job_id, observed_at=now))
        sink(
            CompileSucceeded(
                plate_id=job.plate_id, job_id=job_id, artifact_id="noop", observed_at=now
            )
        )

    async def submit_execution(self, execution_id: str, job: CompileJob, artifact_id: str) -> None:
        sink = self._sink
        assert sink is not None
        pid, xid = job.plate_id, execution_id
        now = time.time()
        sink(ExecutionAccepted(plate_id=pid, execution_id=xid, observed_at=now))
        sink(ExecutionStarted(plate_id=pid, execution_id=xid, observed_at=now))
        result: dict[str, JsonValue] = {"plate": pid, "t": now}
        sink(ExecutionSucceeded(plate_id=pid, execution_id=xid, result=result, observed_at=now))

    async def cancel(self, submission: Submission) -> None:
        return None

    async def status(self, submissions: Sequence[Submission]) -> list[Fact]:
        return []

    async def server_info(self) -> dict[str, JsonValue]:
        return {}

    async def close(self) -> None:
        return None


# --- one batch -------------------------------------------------------------------------------


@dataclass
class BatchRun:
    engine: str
    n: int
    wall_s: float
    ok: bool
    outcomes: dict[str, int]
    compile_s: float | None
    execute_s: float | None
    marked_ms: list[float]
    worker_ms: list[float]
    client_ms: list[float]
    threads_max: int
    os_threads_max: int
    cpu_ms_per_plate: dict[str, float | None]
    engine_stats: dict[str, int] = field(default_factory=dict)
    journal: dict[str, int] = field(default_factory=dict)  # records by disposition
    load: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class BatchTimeout(Exception):
    pass


@dataclass
class Session:
    service: BatchWorkflowService
    host: BenchHost
    engine: Engine
    zmq: ZmqEngine | None
    helpers_of: int | None = None  # whose fork server to account (a LocalEngine: ours)

    @property
    def server_pid(self) -> int | None:
        if self.zmq is None or self.zmq.record is None:
            return None
        return self.zmq.record.pid


_ZMQ_COUNTERS = ("requests", "events", "facts", "heartbeats", "gaps", "reconciliations")


def zmq_counters(engine: ZmqEngine | None) -> dict[str, int]:
    if engine is None:
        return {}
    stats = engine.statistics()
    return {name: int(getattr(stats, name)) for name in _ZMQ_COUNTERS}


TIMEOUT_SCALE = [1.0]  # the profile mode triples it
SERVICE_OPTIONS: dict[str, Any] = {}  # --status-interval, --progress-interval; else defaults


def batch_timeout(n: int) -> float:
    return (60.0 + 0.1 * n) * TIMEOUT_SCALE[0]


async def run_batch(session: Session, n: int, label: str) -> BatchRun:
    host = session.host
    plates = make_plates(n)
    host.reset()
    gc.collect()
    load = loadavg()
    counters0 = zmq_counters(session.zmq)
    cpu0 = cpu_mark(session.server_pid, session.helpers_of)
    t0 = time.perf_counter()
    try:
        summary: BatchSummary = await asyncio.wait_for(
            session.service.run_plates(plates, pipeline=PIPELINE), batch_timeout(n)
        )
    except TimeoutError:
        raise BatchTimeout(
            f"{label} N={n}: no settled batch within {batch_timeout(n):.0f} s "
            f"({sum(host.outcomes.values())} plates settled)"
        ) from None
    wall = time.perf_counter() - t0
    cpu1 = cpu_mark(session.server_pid, session.helpers_of)
    counters1 = zmq_counters(session.zmq)
    outcomes = {o.value: c for o, c in summary.counts.items() if c}
    problems = [*host.failures, *host.errors]
    ok = (
        outcomes == {PlateOutcome.COMPLETED.value: n}
        and len(host.marked_ms) == n
        and len(host.worker_ms) == n
        and len(host.client_ms) == n
    )
    if not ok and not problems:
        problems.append(
            f"{len(host.marked_ms)} server, {len(host.worker_ms)} worker, "
            f"{len(host.client_ms)} client stamps for {n}"
        )
    batch = session.service.batch
    journal: dict[str, int] = {}
    if batch is not None:
        stats = batch.statistics()
        journal = {"records": int(stats["facts"]), **stats["facts_per_disposition"]}
    at = host.state_at
    executing = at.get(BatchState.EXECUTING.value)
    done = at.get(BatchState.COMPLETED.value) or at.get(BatchState.FAILED.value)
    return BatchRun(
        engine=label,
        n=n,
        wall_s=wall,
        ok=ok,
        outcomes=outcomes,
        compile_s=None if executing is None else executing - t0,
        execute_s=None if executing is None or done is None else done - executing,
        marked_ms=list(host.marked_ms),
        worker_ms=list(host.worker_ms),
        client_ms=list(host.client_ms),
        threads_max=host.threads_max,
        os_threads_max=host.os_threads_max,
        cpu_ms_per_plate=cpu_ms_per_plate(cpu0, cpu1, n),
        engine_stats={k: counters1[k] - counters0[k] for k in counters1},
        journal=journal,
        load=load,
        problems=problems,
    )


def describe(run: BatchRun) -> str:
    p50 = quantile(run.marked_ms, 0.5)
    p99 = quantile(run.marked_ms, 0.99)
    lat = (
        ""  # the instant engine answers a whole phase at once: no latency to speak of
        if p50 is None or p99 is None or run.engine == "instant"
        else f"  latency p50/p99 {p50:.1f}/{p99:.1f} ms"
    )
    cpu = run.cpu_ms_per_plate
    cpu_text = "  cpu ms/plate " + " ".join(
        f"{k} {v:.2f}"
        for k, v in cpu.items()
        if v is not None and k not in ("client_main", "workers_sys")
    )
    state = "ok" if run.ok else f"NOT OK {run.outcomes} {run.problems[:1]}"
    return (
        f"  {run.engine:>7} N={run.n:>6}: {run.wall_s:8.2f} s "
        f"({run.wall_s * 1e3 / run.n:6.2f} ms/plate){lat}  threads {run.threads_max}"
        f"{cpu_text}  load {run.load[:1]}  {state}"
    )


# --- sessions --------------------------------------------------------------------------------


@contextlib.contextmanager
def server_pythonpath() -> Any:
    """The server (and so its fork server and workers) can import ``noop_steps``."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), old]))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _kill_leftover_server(pid: int | None, runtime_dir: Path) -> None:
    """A server this run started that is somehow still alive after close: stop it."""
    if pid is None:
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmd:
            cmdline = cmd.read()
    except OSError:
        return  # gone, as it should be
    if b"plateflow" not in cmdline or str(runtime_dir).encode() not in cmdline:
        return  # the pid was reused by something else
    log(f"  server pid {pid} still alive after close; terminating it")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        if not os.path.exists(f"/proc/{pid}"):
            return


@contextlib.asynccontextmanager
async def zmq_session(tmp: Path, workers: int, window: int) -> AsyncIterator[Session]:
    runtime_dir = tmp / "rt"
    inner = ZmqEngine(
        runtime_dir,
        server_args=(
            "--workers",
            str(workers),
            "--allow",
            STEP_MODULE,
            "--output-dir",
            str(tmp / "out"),
        ),
    )
    stamps = Stamps()
    host = BenchHost(stamps)
    engine = StampingEngine(inner, stamps, window)
    service = BatchWorkflowService(host, engine, **SERVICE_OPTIONS)
    session = Session(service, host, engine, inner)
    try:
        with server_pythonpath():
            t0 = time.perf_counter()
            warm = await run_batch(session, WARMUP_N, "warmup")
        log(
            f"  server pid {session.server_pid} started and warmed up ({WARMUP_N} plates) "
            f"in {time.perf_counter() - t0:.2f} s"
        )
        if not warm.ok:
            raise SystemExit(f"the warm-up batch failed: {warm.outcomes} {warm.problems}")
        yield session
    finally:
        pid = session.server_pid
        try:
            await asyncio.wait_for(service.close(), 60.0)
        except Exception as exc:  # the leftover check below still runs
            log(f"  closing the service failed: {type(exc).__name__}: {exc}")
        _kill_leftover_server(pid, runtime_dir)


@contextlib.asynccontextmanager
async def plain_session(engine: Engine) -> AsyncIterator[Session]:
    stamps = Stamps()
    host = BenchHost(stamps)
    service = BatchWorkflowService(host, StampingEngine(engine, stamps), **SERVICE_OPTIONS)
    helpers_of = os.getpid() if isinstance(engine, LocalEngine) else None
    session = Session(service, host, engine, None, helpers_of)
    try:
        warm = await run_batch(session, WARMUP_N, engine.name)
        if not warm.ok:
            raise SystemExit(f"the {engine.name} warm-up batch failed: {warm.problems}")
        yield session
    finally:
        await asyncio.wait_for(service.close(), 60.0)


# --- the floor: raw pyzmq DEALER/ROUTER over IPC ---------------------------------------------

_ECHO = textwrap.dedent(
    """
    import sys, zmq
    endpoint, reply = sys.argv[1], b"r" * int(sys.argv[2])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(endpoint)
    print("ready", flush=True)
    while sock.poll(30_000):  # an idle echo exits by itself after 30 s
        ident, body = sock.recv_multipart()
        sock.send_multipart([ident, reply])
        if body == b"stop":
            break
    sock.close()
    ctx.term()
    """
)


def frame_sizes() -> tuple[int, int]:
    """Bytes of one ``ExecuteRequest`` frame of this batch, and of its ``Reply``."""
    i = 9_999
    job = CompileJob(plate_id=plate_id(i), plate_path=f"/data/plates/{plate_id(i)}.csv",
                     pipeline=PIPELINE)  # fmt: skip
    request = ExecuteRequest(
        id="0123abcd-20001",
        session="AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_AbCd",
        execution_id=f"0123456789ab.{i}.x",
        job=job,
        artifact_id=job.fingerprint,
    )
    return len(encode(request)), len(encode(Reply(id=request.id, ok=True)))


def floor(tmp: Path) -> dict[str, Any]:
    request_bytes, reply_bytes = frame_sizes()
    endpoint = f"ipc://{tmp}/floor.sock"
    echo = subprocess.Popen(
        [sys.executable, "-c", _ECHO, endpoint, str(reply_bytes)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        assert echo.stdout is not None
        ready = echo.stdout.readline()  # bounded: the echo prints at once or dies
        if ready.strip() != b"ready":
            raise SystemExit(f"the floor's echo process did not start: {ready!r}")
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(endpoint)
        payload = b"q" * request_bytes

        def recv() -> None:
            if not sock.poll(5_000):
                raise SystemExit("the floor's echo process stopped answering")
            sock.recv()

        for _ in range(200):  # connect and warm up
            sock.send(payload)
            recv()
        pc = time.perf_counter
        count, t0 = 0, pc()
        while pc() - t0 < FLOOR_SECONDS:
            for _ in range(100):
                sock.send(payload)
                recv()
            count += 100
        sequential = count / (pc() - t0)
        count, t0 = 0, pc()
        for _ in range(FLOOR_WINDOW):
            sock.send(payload)
        while pc() - t0 < FLOOR_SECONDS:
            for _ in range(100):
                recv()
                sock.send(payload)
            count += 100
        for _ in range(FLOOR_WINDOW):
            recv()
        pipelined = (count + FLOOR_WINDOW) / (pc() - t0)
        sock.send(b"stop")
        recv()
    finally:
        sock.close(linger=0)
        ctx.term()
        try:
            echo.wait(5.0)
        except subprocess.TimeoutExpired:
            echo.kill()
            echo.wait(5.0)
    return {
        "floor_roundtrips_per_s": round(sequential),
        "floor_rtt_us": round(1e6 / sequential, 1),
        "floor_pipelined_per_s": round(pipelined),
        "floor_request_bytes": request_bytes,
        "floor_reply_bytes": reply_bytes,
    }


# --- decomposition: one process start on its own ---------------------------------------------


def spawn_cost(samples: int) -> dict[str, float]:
    """One fork-server process started and joined at a time, as the server's engine does it."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["plateflow.engines.local"])
    starts: list[float] = []
    totals: list[float] = []
    pc = time.perf_counter
    for k in range(samples + 5):
        t0 = pc()
        process = ctx.Process(target=os.getpid, daemon=True)  # a builtin: nothing to import
        process.start()
        t1 = pc()
        process.join(10.0)
        t2 = pc()
        if process.exitcode is None:
            process.kill()
            process.join(5.0)
            raise SystemExit("a no-op fork-server process did not exit within 10 s")
        process.close()
        if k >= 5:  # the first ones start the fork server
            starts.append(t1 - t0)
            totals.append(t2 - t0)
    return {
        "spawn_start_ms_median": round(statistics.median(starts) * 1e3, 2),
        "spawn_start_join_ms_median": round(statistics.median(totals) * 1e3, 2),
    }


def local_child(
    n: int, workers: int, top: int, timeout_scale: float, options: dict[str, Any]
) -> None:
    """One batch on a LocalEngine in this process; prints one JSON line. Run it as ``-c``.

    A ``python -c`` process has a ``__main__`` without a file, like the server's
    ``-m plateflow``: the fork server's children do not re-run it. (Run from this script
    instead, every worker would re-import ``bench_e2e.py`` and all it imports: the fork
    server preloads ``plateflow.engines.local`` only, not ``__main__``.) With ``top`` > 0
    the engine's watcher thread is profiled and the process-start figures are left out.
    """
    TIMEOUT_SCALE[0] = timeout_scale
    SERVICE_OPTIONS.update(options)

    async def go() -> dict[str, Any]:
        tmp = Path(tempfile.mkdtemp(prefix="pfe2e-"))
        profiler = cProfile.Profile()
        try:
            local = LocalEngine(
                max_workers=workers, allowed_modules=(STEP_MODULE,), output_dir=str(tmp / "lo")
            )
            profiled = top > 0 and profile_thread(local, "_watch", profiler)
            async with plain_session(local) as session:
                batch = await run_batch(session, n, "local")
            log(describe(batch))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out: dict[str, Any] = {"local_engine": summarize([batch])}
        if profiled:
            title = f"LocalEngine watcher thread (the server's engine), N={n} + {WARMUP_N} warm-up"
            rows = profile_rows(profiler, n + WARMUP_N, top)
            busy = busy_us(profiler, n + WARMUP_N)
            log_profile(title, rows, busy)
            out["watcher_profile"] = {"busy_us_per_plate": round(busy, 1), "top_own": rows}
        else:
            out.update(spawn_cost(SPAWN_SAMPLES))
            log(
                f"    one fork-server process: start {out['spawn_start_ms_median']:.2f} ms, "
                f"start + join {out['spawn_start_join_ms_median']:.2f} ms (median)"
            )
        return out

    result = asyncio.run(go())
    sys.stdout.flush()
    print(json.dumps(result, separators=(",", ":")))


def run_local_child(n: int, workers: int, top: int = 0) -> dict[str, Any]:
    """:func:`local_child` in a ``python -c`` process, bounded; its stderr passes through."""
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r}); import bench_e2e; "
        f"bench_e2e.local_child({n}, {workers}, {top}, {TIMEOUT_SCALE[0]}, {SERVICE_OPTIONS!r})"
    )
    timeout = 2 * batch_timeout(n + WARMUP_N) + 60.0
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:  # run() has killed it
        return {"error": f"the LocalEngine child did not finish within {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"the LocalEngine child exited with {done.returncode}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --- the run ---------------------------------------------------------------------------------


def interleaved(reps: dict[int, int]) -> list[tuple[int, int]]:
    """(n, rep) pairs with each size's repetitions spread evenly over the schedule."""
    slots = [((k + 0.5) / r, n, k) for n, r in reps.items() for k in range(r)]
    return [(n, k) for _, n, k in sorted(slots)]


def summarize(runs: list[BatchRun]) -> dict[str, Any]:
    n = runs[0].n
    walls = [r.wall_s for r in runs]
    marked = [x for r in runs for x in r.marked_ms]
    worker = [x for r in runs for x in r.worker_ms]
    client = [x for r in runs for x in r.client_ms]
    cpu_keys = runs[0].cpu_ms_per_plate.keys()
    cpu: dict[str, float | None] = {}
    for key in cpu_keys:
        values = [r.cpu_ms_per_plate[key] for r in runs]
        present = [v for v in values if v is not None]
        cpu[key] = round(statistics.median(present), 3) if present else None
    stats: dict[str, float] = {}
    for key in runs[0].engine_stats:
        stats[key] = round(statistics.median(r.engine_stats[key] for r in runs) / n, 3)
    journal: dict[str, float] = {}
    for key in runs[0].journal:
        journal[key] = round(statistics.median(r.journal.get(key, 0) for r in runs) / n, 2)

    def median_or_none(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return round(statistics.median(present), 3) if present else None

    return {
        "n": n,
        "repetitions": len(runs),
        "all_ok": all(r.ok for r in runs),
        "wall_s": round(statistics.median(walls), 3),
        "wall_s_all": [round(w, 3) for w in walls],
        "ms_per_plate": round(statistics.median(walls) * 1e3 / n, 3),
        "compile_phase_s": median_or_none([r.compile_s for r in runs]),
        "execute_phase_s": median_or_none([r.execute_s for r in runs]),
        "terminal_latency_ms_p50": r3(quantile(marked, 0.5)),
        "terminal_latency_ms_p99": r3(quantile(marked, 0.99)),
        "terminal_latency_from_worker_ms_p50": r3(quantile(worker, 0.5)),
        "terminal_latency_from_worker_ms_p99": r3(quantile(worker, 0.99)),
        "client_terminal_latency_ms_p50": r3(quantile(client, 0.5)),
        "client_terminal_latency_ms_p99": r3(quantile(client, 0.99)),
        "threads_max": max(r.threads_max for r in runs),
        "os_threads_max": max(r.os_threads_max for r in runs),
        "cpu_ms_per_plate": cpu,
        "engine_per_plate": stats,
        "journal_records_per_plate": journal,
        "load_at_start": [r.load[:1] for r in runs],
        "problems": [p for r in runs for p in r.problems][:3],
    }


async def run(plan: Plan, mode: str, workers: int, window: int) -> dict[str, Any]:
    wall0 = time.perf_counter()
    load_at_start = loadavg()
    log(
        f"bench_e2e: {mode} run, {workers} server workers, submit window "
        f"{window or 'unbounded'}, sizes {sorted(plan.reps)}"
    )
    phases: dict[str, float] = {}
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = round(now - mark, 1)
        mark = now

    tmp = Path(tempfile.mkdtemp(prefix="pfe2e-"))
    zmq_runs: dict[int, list[BatchRun]] = {n: [] for n in plan.reps}
    instant_runs: dict[int, list[BatchRun]] = {n: [] for n in plan.instant}
    rss: dict[str, float | None] = {}
    server_rss: float | None = None
    aborted = ""
    try:
        floor_figures = floor(tmp)
        log(
            f"  floor: {floor_figures['floor_roundtrips_per_s']:,} round trips/s one at a time, "
            f"{floor_figures['floor_pipelined_per_s']:,}/s with {FLOOR_WINDOW} in flight "
            f"({floor_figures['floor_request_bytes']} B requests)"
        )
        phase("floor")
        big = BIG_N if BIG_N in plan.reps else None  # last, for the RSS after it
        small = {n: r for n, r in plan.reps.items() if n != big}
        try:
            async with zmq_session(tmp, workers, window) as session:
                phase("server_start")
                for n, _rep in interleaved(small):
                    zmq_runs[n].append(await run_batch(session, n, "zmq"))
                    log(describe(zmq_runs[n][-1]))
                rss["after_smaller_sizes"] = mb(status_kib("VmRSS"))
                if big is not None:
                    for _rep in range(plan.reps[big]):
                        zmq_runs[big].append(await run_batch(session, big, "zmq"))
                        log(describe(zmq_runs[big][-1]))
                    rss["after_10000"] = mb(status_kib("VmRSS"))
                rss["peak"] = mb(status_kib("VmHWM"))
                if session.server_pid is not None:
                    server_rss = mb(status_kib("VmRSS", session.server_pid))
        except BatchTimeout as exc:
            aborted = str(exc)
            log(f"  ABORTED: {aborted}")
        phase("zmq_batches")
        if plan.instant and not aborted:
            async with plain_session(InstantEngine()) as session:
                for n, _rep in interleaved(plan.instant):
                    instant_runs[n].append(await run_batch(session, n, "instant"))
                    log(describe(instant_runs[n][-1]))
            phase("instant_batches")
        local: dict[str, Any] = {"local_engine": None}
        if plan.local_n is not None and not aborted:
            log(f"  LocalEngine in a child process, N={plan.local_n}:")
            local = run_local_child(plan.local_n, workers)
            phase("local_batch")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    by_n = {n: summarize(runs) for n, runs in zmq_runs.items() if runs}
    result = headline(by_n, rss)
    result.update(floor_figures)
    result["by_n"] = {str(n): s for n, s in sorted(by_n.items())}
    result["decomposition"] = {
        "instant_engine_by_n": {
            str(n): summarize(runs) for n, runs in sorted(instant_runs.items()) if runs
        },
        **local,
    }
    result["client_rss_mb"] = rss
    result["server_rss_mb_at_end"] = server_rss
    result["replaced_design"] = {
        "wall_s_1000": REPLACED_WALL_S_1000,
        "terminal_latency_ms_p50": REPLACED_LATENCY_MS_P50,
        "source": "quoted in the issue for this machine, not measured here",
    }
    result["config"] = {
        "mode": mode,
        "server_workers": workers,
        "submit_window": window or None,
        "pipeline": f"one step, {STEP_MODULE}:noop",
        "service": "BatchWorkflowService on the main thread's loop, inline dispatcher",
        "service_options": dict(SERVICE_OPTIONS)
        or "the defaults (status_interval 1.0 s, progress_interval 0.1 s)",
        "engine": "ZmqEngine(start_server=True), IPC, defaults",
        "repetitions": {str(n): r for n, r in plan.reps.items()},
        "warmup_plates": WARMUP_N,
    }
    result["aborted"] = aborted or None
    result["machine"] = machine_info(
        loadavg_1_5_15_at_start=load_at_start,
        pyzmq=zmq.__version__,
        libzmq=zmq.zmq_version(),
    )
    result["source"] = source_info("src", "src_dirty")
    result["phases_s"] = phases
    result["wall_s"] = round(time.perf_counter() - wall0, 1)
    report(result)
    return result


def headline(by_n: dict[int, dict[str, Any]], rss: dict[str, float | None]) -> dict[str, Any]:
    """The figures of record; a size with a batch that did not complete every plate has none."""
    failed = sorted(n for n, s in by_n.items() if not s["all_ok"])
    by_n = {n: s for n, s in by_n.items() if s["all_ok"]}

    def get(n: int, key: str) -> Any:
        return by_n[n][key] if n in by_n else None

    latency_n = LATENCY_N if LATENCY_N in by_n else (max(by_n) if by_n else None)
    per_1000 = get(1_000, "ms_per_plate")
    per_10000 = get(10_000, "ms_per_plate")
    ratio = round(per_10000 / per_1000, 3) if per_1000 and per_10000 else None
    threads = max((s["threads_max"] for s in by_n.values()), default=None)
    os_threads_max = max((s["os_threads_max"] for s in by_n.values()), default=None)
    rss_10000 = rss.get("after_10000") if 10_000 in by_n else None
    out: dict[str, Any] = {
        "benchmark": "bench_e2e",
        "wall_s_100": get(100, "wall_s"),
        "wall_s_1000": get(1_000, "wall_s"),
        "wall_s_10000": get(10_000, "wall_s"),
        "ms_per_plate_by_n": {str(n): s["ms_per_plate"] for n, s in sorted(by_n.items())},
        "per_plate_ratio_10000_vs_1000": ratio,
        "terminal_latency_ms_p50": get(latency_n, "terminal_latency_ms_p50") if latency_n else None,
        "terminal_latency_ms_p99": get(latency_n, "terminal_latency_ms_p99") if latency_n else None,
        "terminal_latency_from_worker_ms_p50": (
            get(latency_n, "terminal_latency_from_worker_ms_p50") if latency_n else None
        ),
        "terminal_latency_from_worker_ms_p99": (
            get(latency_n, "terminal_latency_from_worker_ms_p99") if latency_n else None
        ),
        "client_terminal_latency_ms_p50": (
            get(latency_n, "client_terminal_latency_ms_p50") if latency_n else None
        ),
        "client_terminal_latency_ms_p99": (
            get(latency_n, "client_terminal_latency_ms_p99") if latency_n else None
        ),
        "latency_pool": f"every plate of the N={latency_n} batches",
        "terminal_latency_span": "server marks terminal (observed_at of the server engine's "
        "ExecutionSucceeded, stamped when it reads the worker's result) -> host "
        "on_plate_completed",
        "terminal_latency_from_worker_span": "no-op step returns in the worker (time.time() "
        "in its result) -> host on_plate_completed",
        "client_terminal_latency_span": "client I/O thread hands the decoded terminal fact to "
        "the service's sink -> host on_plate_completed",
        "client_threads_max": threads,
        "client_os_threads_max": os_threads_max,
        "client_rss_mb_10000": rss_10000,
        "all_batches_ok": bool(by_n) and not failed,
        "failed_sizes": failed,
    }
    lat50, lat99 = out["terminal_latency_ms_p50"], out["terminal_latency_ms_p99"]

    def check(value: Any, limit: float) -> bool | None:
        return None if value is None else bool(value <= limit)

    met = {
        "wall_s_1000_le_2": check(out["wall_s_1000"], TARGET_WALL_S_1000),
        "terminal_latency_ms_p50_le_2": check(lat50, TARGET_LATENCY_MS_P50),
        "terminal_latency_ms_p99_le_20": check(lat99, TARGET_LATENCY_MS_P99),
        "client_threads_max_le_8": check(threads, TARGET_THREADS),
        "per_plate_10000_le_1_5x_1000": check(ratio, TARGET_PER_PLATE_RATIO),
        "client_rss_mb_10000_le_150": check(rss_10000, TARGET_RSS_MB_10000),
    }
    known = [v for v in met.values() if v is not None]
    not_measured = [k for k, v in met.items() if v is None]
    met["all"] = bool(known) and all(known)  # of the targets this run measured
    out["targets"] = {
        "wall_s_1000": TARGET_WALL_S_1000,
        "terminal_latency_ms_p50": TARGET_LATENCY_MS_P50,
        "terminal_latency_ms_p99": TARGET_LATENCY_MS_P99,
        "client_threads_max": TARGET_THREADS,
        "per_plate_ratio_10000_vs_1000": TARGET_PER_PLATE_RATIO,
        "client_rss_mb_10000": TARGET_RSS_MB_10000,
    }
    out["targets_met"] = met
    out["targets_not_measured"] = not_measured
    return out


def _fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "not run"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value}{unit}"


def report(r: dict[str, Any]) -> None:
    met = r["targets_met"]

    def yes(key: str) -> str:
        value = met[key]
        return "-" if value is None else ("yes" if value else "NO")

    def wall(n: int) -> str:
        return "FAILED" if n in r["failed_sizes"] else _fmt(r[f"wall_s_{n}"], " s")

    rows = [
        ("wall, N=100", wall(100), "", ""),
        ("wall, N=1,000", wall(1_000), "<= 2 s", yes("wall_s_1000_le_2")),
        ("wall, N=10,000", wall(10_000), "", ""),
        (
            "per plate, 10,000 vs 1,000",
            _fmt(r["per_plate_ratio_10000_vs_1000"], "x"),
            "<= 1.5x",
            yes("per_plate_10000_le_1_5x_1000"),
        ),
        (
            "terminal latency p50 (server marks terminal -> callback)",
            _fmt(r["terminal_latency_ms_p50"], " ms"),
            "<= 2 ms",
            yes("terminal_latency_ms_p50_le_2"),
        ),
        (
            "terminal latency p99 (server marks terminal -> callback)",
            _fmt(r["terminal_latency_ms_p99"], " ms"),
            "<= 20 ms",
            yes("terminal_latency_ms_p99_le_20"),
        ),
        (
            "from the worker's return, p50/p99",
            f"{_fmt(r['terminal_latency_from_worker_ms_p50'])}/"
            f"{_fmt(r['terminal_latency_from_worker_ms_p99'], ' ms')}",
            "",
            "",
        ),
        (
            "client latency p50/p99 (I/O thread -> callback)",
            f"{_fmt(r['client_terminal_latency_ms_p50'])}/"
            f"{_fmt(r['client_terminal_latency_ms_p99'], ' ms')}",
            "",
            "",
        ),
        (
            "client threads, max over every N",
            _fmt(r["client_threads_max"]),
            "<= 8",
            yes("client_threads_max_le_8"),
        ),
        ("client OS threads (libzmq too)", _fmt(r["client_os_threads_max"]), "", ""),
        (
            "client RSS after N=10,000",
            _fmt(r["client_rss_mb_10000"], " MB", 1),
            "<= 150 MB",
            yes("client_rss_mb_10000_le_150"),
        ),
        ("floor: raw DEALER/ROUTER round trips", f"{r['floor_roundtrips_per_s']:,}/s", "", ""),
        ("floor: 100 in flight", f"{r['floor_pipelined_per_s']:,}/s", "", ""),
    ]
    log()
    log(f"{'figure':<48}{'measured':>16}{'target':>12}{'met':>6}")
    for name, value, target, ok in rows:
        log(f"{name:<48}{value:>16}{target:>12}{ok:>6}")
    log()
    log("per plate (median over batches): wall, journal records, CPU ms of the client [its")
    log("main thread], the server, its fork server, the workers, the resource tracker")
    sources = [(f"zmq N={n}", s) for n, s in r["by_n"].items()]
    decomposition = r["decomposition"]
    sources += [(f"instant N={n}", s) for n, s in decomposition["instant_engine_by_n"].items()]
    if decomposition.get("local_engine"):
        sources.append(
            (f"local N={decomposition['local_engine']['n']}", decomposition["local_engine"])
        )
    for name, s in sources:
        c = s["cpu_ms_per_plate"]
        parts = [
            f"{_fmt(c['client'])} [{_fmt(c['client_main'])}]",
            *(_fmt(c[k]) for k in ("server", "forkserver", "workers", "tracker")),
        ]
        records = s["journal_records_per_plate"].get("records")
        log(
            f"  {name:<15} wall {s['ms_per_plate']:8.3f} ms/plate  journal {_fmt(records, '', 1)}"
            "/plate  cpu " + " / ".join(parts)
        )
    log()
    log(f"targets met: {'all' if met['all'] else 'NOT all'}; wall {r['wall_s']} s")


# --- profiling -------------------------------------------------------------------------------


def profile_rows(profiler: cProfile.Profile, n: int, top: int) -> list[dict[str, Any]]:
    rows = [
        {
            "function": function,
            "calls_per_plate": round(calls, 2),
            "own_us_per_plate": round(own, 2),
            "cum_us_per_plate": round(cum, 2),
        }
        for function, calls, own, cum in profile_entries(profiler, n)
    ]
    return sorted(rows, key=lambda row: -row["own_us_per_plate"])[:top]


_WAITS = ("select", "poll", "epoll", "wait")


def log_profile(title: str, rows: list[dict[str, Any]], busy_us: float) -> None:
    log()
    log(f"{title}: {busy_us:,.0f} us per plate outside waits (profiler-inflated)")
    log(f"{'own us':>9}{'cum us':>10}{'calls/p':>9}  function")
    for row in rows:
        log(
            f"{row['own_us_per_plate']:>9.1f}{row['cum_us_per_plate']:>10.1f}"
            f"{row['calls_per_plate']:>9.2f}  {row['function']}"
        )


def busy_us(profiler: cProfile.Profile, n: int) -> float:
    stats = pstats.Stats(profiler)
    total = 0.0
    for (_file, _line, func), (_cc, _nc, tottime, _cum, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if not any(w in func for w in _WAITS):
            total += tottime
    return total * 1e6 / n


def profile_thread(engine: object, method: str, profiler: cProfile.Profile) -> bool:
    """Profile the thread an engine will start on ``engine.<method>`` (diagnostics only).

    cProfile sees one thread; an engine's own thread (the ZeroMQ client's I/O thread, the
    local engine's watcher) is reached by replacing the bound method on the instance
    before the engine starts it. The benchmark proper never touches private members.
    """
    original = getattr(engine, method, None)
    if original is None:
        return False

    def profiled(*args: Any) -> None:
        profiler.enable()
        try:
            original(*args)
        finally:
            profiler.disable()

    setattr(engine, method, profiled)
    return True


async def profile(n: int, workers: int, window: int, top: int) -> dict[str, Any]:
    """cProfile one batch of ``n`` plates through the server, then one on a LocalEngine.

    Through the server: the event loop (main thread, this batch only) and the ZeroMQ
    client's I/O thread (from the engine's start, so the warm-up batch too). On a
    LocalEngine in this process (what the server runs, without ZeroMQ): its watcher
    thread, which starts, reads and reaps every worker process (at most
    ``PROFILE_LOCAL_N`` plates). Batch timeouts are tripled: the profiler slows everything.
    """
    TIMEOUT_SCALE[0] = 3.0
    tmp = Path(tempfile.mkdtemp(prefix="pfe2e-"))
    loop_profiler = cProfile.Profile()
    io_profiler = cProfile.Profile()
    local_n = min(n, PROFILE_LOCAL_N)  # the profiler slows the watcher several times over
    try:
        runtime_dir = tmp / "rt"
        inner = ZmqEngine(
            runtime_dir,
            server_args=("--workers", str(workers), "--allow", STEP_MODULE, "--output-dir",
                         str(tmp / "out")),
        )  # fmt: skip
        io_profiled = profile_thread(inner, "_io_main", io_profiler)
        stamps = Stamps()
        host = BenchHost(stamps)
        service = BatchWorkflowService(
            host, StampingEngine(inner, stamps, window), **SERVICE_OPTIONS
        )
        session = Session(service, host, inner, inner)
        pid = None
        try:
            with server_pythonpath():
                await run_batch(session, WARMUP_N, "warmup")
            pid = session.server_pid
            loop_profiler.enable()
            result = await run_batch(session, n, "zmq")
            loop_profiler.disable()
            log(describe(result))
        finally:
            await asyncio.wait_for(service.close(), 60.0)
            _kill_leftover_server(pid, runtime_dir)

        log(f"  LocalEngine in a child process, N={local_n}, watcher profiled:")
        local = run_local_child(local_n, workers, top)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    tables: dict[str, Any] = {}
    for name, title, profiler, plates, used in (
        ("loop", f"event loop (main thread), N={n}", loop_profiler, n, True),
        (
            "io_thread",
            f"ZeroMQ client I/O thread, N={n} + {WARMUP_N} warm-up",
            io_profiler,
            n + WARMUP_N,
            io_profiled,
        ),
    ):
        if not used:
            continue
        rows = profile_rows(profiler, plates, top)
        busy = busy_us(profiler, plates)
        log_profile(title, rows, busy)
        tables[name] = {"busy_us_per_plate": round(busy, 1), "top_own": rows}
    return {
        "benchmark": "bench_e2e.profile",
        "n": n,
        "ok": result.ok,
        "wall_s": round(result.wall_s, 3),
        "local_n": local_n,
        "local": local,
        "cpu_ms_per_plate": result.cpu_ms_per_plate,
        "profiles": tables,  # the local watcher's is under "local"
    }


DASK_SIZES = (100, 1_000)
DASK_TARGET_RATIO = 2.0


def add_dask(result: dict[str, Any]) -> None:
    """Merge bench_dask.py's figures (LocalCluster with worker processes) into ``result``."""
    import bench_dask  # benchmarks/ is this script's folder, so it is on sys.path

    log(f"  dask: plateflow vs raw compile->execute task pairs, N = {DASK_SIZES}")
    started = time.perf_counter()
    figures = bench_dask.measure(DASK_SIZES)
    result.update(figures)
    ok = figures["dask_per_plate_ms"] <= DASK_TARGET_RATIO * figures["dask_raw_per_task_ms"]
    result["targets"]["dask_per_plate_ms_vs_raw"] = DASK_TARGET_RATIO
    result["targets_met"]["dask_per_plate_le_2x_raw"] = ok
    result["targets_met"]["all"] = bool(result["targets_met"]["all"]) and ok
    result["phases_s"]["dask"] = round(time.perf_counter() - started, 1)
    for n in DASK_SIZES:
        log(
            f"    N={n:>6}: plateflow {figures[f'dask_per_plate_ms_{n}']:.2f} ms/plate, "
            f"raw {figures[f'dask_raw_per_task_ms_{n}']:.2f} ms/task pair "
            f"({figures[f'dask_ratio_{n}']:.2f}x; target <= {DASK_TARGET_RATIO:g}x)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="N = 100 and 1,000 only")
    parser.add_argument(
        "--max-n", type=int, metavar="N", help="leave out sizes above N (e.g. 1000)"
    )
    parser.add_argument(
        "--sizes",
        metavar="N,N",
        help="only these sizes of the plan (e.g. 10000), with the plan's repetitions",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="server worker processes (default: CPUs, the server's own default)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=0,
        metavar="K",
        help="at most K submit calls in flight (client-side flow control; default unbounded)",
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        type=int,
        const=1_000,
        metavar="N",
        help="cProfile the client through one batch of N plates (default 1000) instead",
    )
    parser.add_argument("--top", type=int, default=25, help="rows per profile table")
    parser.add_argument(
        "--dask",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the Dask comparison of bench_dask.py at N = 100 and 1,000 "
        "(default: in a full run, not with --quick)",
    )
    parser.add_argument(
        "--status-interval",
        type=float,
        metavar="S",
        help="the service's status_interval (diagnostics; default: the service's, 1.0 s)",
    )
    parser.add_argument(
        "--progress-interval",
        type=float,
        metavar="S",
        help="the service's progress_interval (diagnostics; default: the service's, 0.1 s)",
    )
    args = parser.parse_args(argv)
    if args.status_interval is not None:
        SERVICE_OPTIONS["status_interval"] = args.status_interval
    if args.progress_interval is not None:
        SERVICE_OPTIONS["progress_interval"] = args.progress_interval
    if args.profile is not None:
        result = asyncio.run(profile(args.profile, args.workers, args.window, args.top))
    else:
        plan = capped(QUICK if args.quick else FULL, args.max_n)
        mode = "quick" if args.quick else "full"
        if args.max_n is not None:
            mode += f", max-n {args.max_n}"
        if args.sizes:
            wanted = {int(x) for x in args.sizes.split(",")}
            plan = Plan(
                reps={n: r for n, r in plan.reps.items() if n in wanted},
                instant={n: r for n, r in plan.instant.items() if n in wanted},
                local_n=plan.local_n if plan.local_n in wanted else None,
            )
            mode += f", sizes {args.sizes}"
        if not plan.reps:
            parser.error("no size of the plan is left to run")
        result = asyncio.run(run(plan, mode, args.workers, args.window))
        if args.dask if args.dask is not None else not args.quick:
            add_dask(result)
    sys.stdout.flush()
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
