"""The ZeroMQ engine: a client of the embedded execution server (``plateflow serve``).

Theory of operation: the engine finds a live server through its runtime
directory (``server.lock`` held, ``server.json`` readable, a ping answered) or,
when allowed, starts one under ``start.lock`` so that two clients never start
two servers. It remembers whether it started the server: only then does
``close`` shut it down (with the token) and reap it; a server it merely
attached to is left running for its other clients.

Leases: the engine's session holds a lease on the server from the start when
it started the server or adopted a crashed engine's session, else from its
first submission. The I/O thread renews it (a ``lease`` request carrying
``heartbeat_timeout``, one in flight at a time) every two server heartbeat
intervals or a quarter of the grace, whichever is shorter; ``close`` releases
it, and the server stops whatever of the session's work is still unfinished.
A server started by an engine runs with ``--exit-when-unowned``: if the
process that started it dies without closing, the server stops the work and
exits once the grace passes without a renewal, unless a resumed process
adopts the session (:meth:`ZmqEngine.adopt`) and renews it in time. When the
engine gives the server up as silent, it also sends a ``release`` marked
lost, so a server that was only frozen stops that work as soon as it runs
again (it would by its own measure of its silence, too).

One client I/O thread owns every socket, because ZeroMQ sockets are not
thread-safe: a DEALER on the control socket, a SUB (subscribed to
everything) on the events socket and the inside end of an inproc PAIR. It
sleeps in one :class:`zmq.Poller`. The event-loop side never touches those
sockets: a request is put on a queue with what to do with its reply, and an
empty frame on the outside end of the PAIR wakes the thread (once per burst
of requests), which sends it. A reply is matched to its request by the
correlation id. ``cancel``, ``status`` and ``server_info`` await theirs:
replies reach the loop through one ``call_soon_threadsafe`` per burst, and a
request without a reply after ``request_timeout`` fails with
:class:`EngineError`. ``submit_compile`` and ``submit_execution`` return once
the request is queued: only a refusal (or no reply in time) matters, and the
I/O thread turns it into the submission's ``*Rejected`` fact. The engine
adds one thread (plus, in ``close``, a short-lived one that waits for the
server process), however many plates there are.

Events: every fact event's fact goes to the sink, in the order the server
published them. The engine tracks ``(server_id, seq)``; the first event after
connecting (a SUB is a late joiner: what was published before its
subscription took effect is lost), a gap in ``seq`` (the PUB dropped events
at its high-water mark) or a new ``server_id`` makes it *reconcile*: one
``status`` request for every submission it has outstanding (from ``submit_*``
until a terminal fact), whose facts go to the sink too. Facts the batch
already has are ignored there as duplicates, so reconciling is always safe.
If the server was replaced and does not know an outstanding submission, that
work is gone: the engine is lost. The service's status poller is the second
safety net.

Liveness: every event (heartbeat or fact) proves the server alive. If none
arrives for ``heartbeat_timeout`` seconds the server is dead or frozen (e.g.
stopped by SIGSTOP); a server this engine started is also watched directly
and its exit noticed within one poll tick. Either way the engine pushes
:class:`EngineLost` into the sink exactly once, fails the requests in
flight, pushes nothing more and raises :class:`EngineError` from every later
call. The bound: loss is reported at most ``heartbeat_timeout`` + one poll
tick (``0.1`` s) after the last event, provided the sink does not block.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import math
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, final

import zmq
from pydantic import BaseModel, JsonValue, ValidationError

from plateflow.core.decoding import first_error
from plateflow.core.facts import (
    CompileRejected,
    EngineLost,
    ExecutionRejected,
    Fact,
)
from plateflow.engines.base import (
    TERMINAL_FACTS,
    Engine,
    EngineError,
    FactSink,
    Recovered,
    Submission,
    cancelled_fact,
    failed_fact,
    submission_key,
)
from plateflow.engines.zmq import rundir
from plateflow.engines.zmq.control import ask_info, find_server, list_servers, stop_server
from plateflow.engines.zmq.lease import DEFAULT_LEASE_GRACE
from plateflow.engines.zmq.rundir import ServerRecord, default_runtime_dir
from plateflow.engines.zmq.wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    CancelRequest,
    CompileRequest,
    Event,
    ExecuteRequest,
    FactEvent,
    LeaseRequest,
    PingRequest,
    ReleaseRequest,
    Reply,
    ServerInfoRequest,
    ShutdownRequest,
    StatusRequest,
    StoppingEvent,
    WireError,
    WireSubmission,
    decode_event,
    decode_reply,
    encode,
)
from plateflow.errors import UsageError
from plateflow.jobs import CompileJob

__all__ = [
    "DEFAULT_LEASE_GRACE",
    "DEFAULT_MAX_IN_FLIGHT",
    "POLL_TICK",
    "WINDOW_PER_WORKER",
    "ZmqEngine",
    "ZmqEngineStatistics",
    # Re-exported: tools (the CLI) reach a server's control helpers through this module.
    "ask_info",
    "default_runtime_dir",
    "find_server",
    "list_servers",
    "stop_server",
]

_log = logging.getLogger(__name__)

POLL_TICK: Final = 0.1
"""The longest the I/O thread sleeps without looking at its deadlines (seconds)."""
_SHUTDOWN_TIMEOUT: Final = 5.0
"""How long ``close`` waits for a shutdown reply, then for the server to exit, then again."""
_JOIN_TIMEOUT: Final = 5.0
_PING_TIMEOUT: Final = 1.0
_MAX_INBOUND_BYTES: Final = 64 << 20
"""Replies and events come from our own user's server; a status reply may be large."""
WINDOW_PER_WORKER: Final = 8
"""With ``max_in_flight="auto"``: submissions in flight per worker of the server."""
DEFAULT_MAX_IN_FLIGHT: Final = 16
"""With ``max_in_flight="auto"``, the window for a server whose record names no worker count.

A window keeps the server from running further ahead than this client can take
in. Everything the server finishes while the client is busy arrives at once, and
each terminal fact waits for every fact queued in front of it: with everything
sent at once, tens to hundreds of ms for a thousand fast plates on a busy
two-core machine; with 64 in flight for two workers, a p90 near 20 ms; with 8 per
worker, a few ms, at the same throughput (see docs/performance.md). Eight per
worker still keeps every worker busy while a reply and a new submission cross."""
_STATUS_CHUNK: Final = 200
"""Submissions per status request, so neither request nor reply nears the frame limit."""
_DRAIN_BATCH: Final = 1_000
"""Frames read from one socket per wake-up before the other sockets get their turn."""
_LOG_TAIL: Final = 2_000

_REPEATABLE: Final = frozenset({"compile_accepted", "execution_accepted", "execution_started"})
"""Kinds that carry nothing but the state: heard twice in a row, the second says nothing."""
_Key = tuple[Literal["compile", "execute"], str]
"""(phase, submission id)."""
_FORGOTTEN: Final = (
    "the zmq server no longer knows this submission, which it had accepted: it was "
    "restarted, or it forgot the submission after it finished (a server remembers a "
    "bounded number of finished submissions: plateflow serve --keep-finished); its "
    "result is lost"
)
_Done = Callable[[Reply | EngineError], None]


@dataclass(frozen=True, slots=True)
class ZmqEngineStatistics:
    """What the client has seen so far (:meth:`ZmqEngine.statistics`)."""

    server_id: str | None
    server_pid: int | None
    started_server: bool
    last_seq: int | None
    events: int
    heartbeats: int
    facts: int
    gaps: int
    server_changes: int
    reconciliations: int
    reconciled_facts: int
    forgotten: int
    """Acknowledged submissions a status answer no longer knew: failed by this client."""
    repeats: int
    """Facts not passed on because they repeated the last fact about their submission
    (an accepted or started fact heard both as an event and in a status answer):
    the batch would only journal them as duplicates."""
    requests: int
    timeouts: int
    malformed: int
    outstanding: int
    held: int
    """Submissions waiting in the client for room in the ``max_in_flight`` window."""
    broken: str | None
    leased: bool = False
    """Whether the engine's session holds a lease on the server (and renews it)."""
    renewals: int = 0
    """Lease renewals the server confirmed."""


@dataclass(slots=True)
class _Pending:
    done: _Done
    deadline: float
    """Seconds to wait for the reply until it is sent; then the monotonic deadline."""
    what: str


@dataclass(slots=True)
class _Counters:
    events: int = 0
    heartbeats: int = 0
    facts: int = 0
    gaps: int = 0
    server_changes: int = 0
    reconciliations: int = 0
    reconciled_facts: int = 0
    repeats: int = 0
    forgotten: int = 0
    requests: int = 0
    timeouts: int = 0
    malformed: int = 0
    renewals: int = 0


@dataclass(slots=True)
class _Found:
    record: ServerRecord
    process: subprocess.Popen[bytes] | None = None
    token: str | None = None
    log_path: Path | None = None


def _tail(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""
    return text[-_LOG_TAIL:]


@final
class ZmqEngine(Engine):
    r"""Run plates on a ``plateflow serve`` execution server over ZeroMQ.

    ``runtime_dir`` is where the server lives (default
    :func:`~plateflow.engines.zmq.rundir.default_runtime_dir`). With
    ``start_server`` (the default) a missing server is started as
    ``python -m plateflow serve --runtime-dir DIR *server_args`` in its own
    session (a Ctrl-C to the host does not reach it), and ``close`` shuts it
    down again; a server that was already running is attached to and left
    running. ``startup_timeout`` bounds finding or starting the server,
    ``request_timeout`` every request, and ``heartbeat_timeout`` the silence
    after which the server is considered lost: :class:`EngineLost` is pushed
    at most ``heartbeat_timeout`` + 0.1 s (one poll tick) after the last
    event. ``heartbeat_timeout`` must exceed the server's heartbeat interval.
    At most ``max_in_flight`` submissions are at the server and unsettled at
    once; later ones wait in the client, in order, without a fact until they
    are sent, and a cancel of one of those is confirmed at once. ``"auto"``
    (the default) is :data:`WINDOW_PER_WORKER` per worker of the server (16
    for two), :data:`DEFAULT_MAX_IN_FLIGHT` when its record does not say;
    ``None`` sends everything at once.

    A server this engine starts runs with ``--lease-grace lease_grace
    --exit-when-unowned``: should this process die without closing, the server
    stops its work and exits ``lease_grace`` seconds later, unless a resumed
    process adopts this engine's :meth:`identity` (:meth:`adopt`) in time.
    """

    name = "zmq"

    def __init__(
        self,
        runtime_dir: Path | None = None,
        *,
        start_server: bool = True,
        server_args: Sequence[str] = (),
        heartbeat_timeout: float = 3.0,
        request_timeout: float = 10.0,
        startup_timeout: float = 20.0,
        max_in_flight: int | Literal["auto"] | None = "auto",
        lease_grace: float = DEFAULT_LEASE_GRACE,
    ) -> None:
        for label, value in (
            ("heartbeat_timeout", heartbeat_timeout),
            ("request_timeout", request_timeout),
            ("startup_timeout", startup_timeout),
            ("lease_grace", lease_grace),
        ):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{label} must be a positive number of seconds, got {value!r}")
        if isinstance(server_args, str):
            raise TypeError("server_args must be a sequence of arguments, not one string")
        window_ok = max_in_flight is None or max_in_flight == "auto"
        if not window_ok and (type(max_in_flight) is not int or max_in_flight < 1):
            raise ValueError(
                f"max_in_flight must be a whole number >= 1, 'auto' or None, got {max_in_flight!r}"
            )
        self._window_asked: int | Literal["auto"] | None = max_in_flight
        self._max_in_flight: int | None = (
            DEFAULT_MAX_IN_FLIGHT if max_in_flight == "auto" else max_in_flight
        )
        """The window in force: ``"auto"`` is resolved when the server is found."""
        self._dir = Path(runtime_dir) if runtime_dir is not None else rundir.default_runtime_dir()
        self._start_server = start_server
        self._server_args = tuple(str(arg) for arg in server_args)
        self._heartbeat_timeout = float(heartbeat_timeout)
        self._request_timeout = float(request_timeout)
        self._startup_timeout = float(startup_timeout)
        self._lease_grace = float(lease_grace)

        self._client_id = uuid.uuid4().hex[:8]
        self._session = secrets.token_urlsafe(24)
        """Sent with every submission and cancel: only this session may cancel its work."""
        self._leasing = False
        """Whether the session holds a lease: renewed while running, released at close."""
        self._adopted_server: str | None = None
        """The server id named by the identity :meth:`adopt` took over."""
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        """Guards the outstanding submissions, the broken/closing flags and the outbox."""
        self._outstanding: dict[_Key, Submission] = {}
        self._held: dict[_Key, tuple[Submission, str, bytes, _Pending]] = {}
        """Submissions not sent yet, in order, while ``max_in_flight`` are outstanding."""
        self._outbox: queue.SimpleQueue[tuple[str, bytes, _Pending]] = queue.SimpleQueue()
        self._backlog: collections.deque[tuple[str, bytes]] = collections.deque()
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._replies: collections.deque[tuple[Callable[[Reply | EngineError], None], Any]] = (
            collections.deque()
        )
        self._replies_scheduled = False
        self._counters = _Counters()

        self._sink: FactSink | None = None
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._wake_out: zmq.Socket[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closing = False
        self._closed = False
        self._broken: str | None = None

        self._record: ServerRecord | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._token: str | None = None
        self._log_path: Path | None = None

        # Owned by the I/O thread once it runs.
        self._pending: dict[str, _Pending] = {}
        self._deadlines: list[tuple[float, str]] = []
        """A heap of (deadline, request id) over ``_pending``; answered ones are skipped."""
        self._server_id: str | None = None
        self._seq: int | None = None
        self._last_event = time.monotonic()
        self._reconciling = False
        self._reconcile_again = False
        self._replaced_from: str | None = None
        self._last_kind: dict[_Key, str] = {}
        """The kind of the last fact delivered about each outstanding submission."""
        self._acked: dict[_Key, int] = {}
        """Outstanding submissions the server acknowledged, numbered in that order."""
        self._acks = 0
        """How many acknowledgements so far: a status request sent when it was ``n``
        comes after every submission numbered up to ``n`` reached the server."""
        self._renewing = False
        """A lease request is in flight."""
        self._next_renewal = 0.0
        """When the lease is renewed next (monotonic)."""
        self._renew_every = POLL_TICK
        """Seconds between renewals: set from the server's heartbeat and grace."""
        self._release_lost = False
        """Send a ``release`` marked lost: the server was given up as silent."""

    # --- the Engine interface ------------------------------------------------------------

    @property
    def runtime_dir(self) -> Path:
        return self._dir

    @property
    def started_server(self) -> bool:
        """Whether this engine started the server (and so will shut it down at close)."""
        return self._process is not None

    @property
    def record(self) -> ServerRecord | None:
        """The server's record as found at start."""
        return self._record

    async def start(self, sink: FactSink) -> None:
        """Find or start the server, connect, and start the I/O thread.

        Raises :class:`EngineError` when no server can be found or started
        within ``startup_timeout``.
        """
        if self._closed:
            raise EngineError("the zmq engine is closed; make a new one")
        if self._thread is not None or self._ctx is not None:
            raise EngineError("the zmq engine is already started")
        self._ctx = zmq.Context()
        search = asyncio.ensure_future(asyncio.to_thread(self._find_or_start))
        try:
            found = await asyncio.shield(search)
        except asyncio.CancelledError:
            # The search goes on in its thread and may yet start a server: undo that.
            self._closed = True
            with contextlib.suppress(BaseException):
                late = await asyncio.wait_for(search, self._startup_timeout + _SHUTDOWN_TIMEOUT)
                if late.process is not None:
                    await asyncio.to_thread(self._reap, late.process, False)
            self._ctx.destroy(linger=0)
            self._ctx = None
            raise
        except BaseException:
            self._ctx.destroy(linger=0)
            self._ctx = None
            raise
        self._record = found.record
        if self._window_asked == "auto" and found.record.workers is not None:
            self._max_in_flight = WINDOW_PER_WORKER * max(1, found.record.workers)
        self._process = found.process
        self._token = found.token
        self._log_path = found.log_path
        if found.process is not None:
            self._leasing = True  # it exits when nobody holds a lease: hold one from now
        self._renew_every = self._renewal_interval(found.record.heartbeat_interval, None)
        if found.record.heartbeat_interval >= self._heartbeat_timeout:
            message = (
                f"heartbeat_timeout {self._heartbeat_timeout} s must exceed the server's "
                f"heartbeat interval {found.record.heartbeat_interval} s, or every pause "
                "between heartbeats would look like a lost server"
            )
            await self._abandon()
            raise EngineError(message)
        self._sink = sink
        try:
            self._connect(found.record)
        except zmq.ZMQError as exc:
            await self._abandon()
            raise EngineError(f"cannot connect to the server in {self._dir}: {exc}") from exc

    async def submit_compile(self, job_id: str, job: CompileJob) -> None:
        self._check_usable()
        rid = self._new_id()
        try:
            request = CompileRequest(id=rid, session=self._session, job_id=job_id, job=job)
        except ValidationError as exc:
            self._push(
                CompileRejected(
                    observed_at=time.time(),
                    plate_id=job.plate_id,
                    job_id=job_id,
                    error=f"the zmq engine cannot send this job: {first_error(exc)}",
                )
            )
            return
        await self._submit(
            Submission(job.plate_id, "compile", job_id),
            request,
            lambda error: CompileRejected(
                observed_at=time.time(), plate_id=job.plate_id, job_id=job_id, error=error
            ),
        )

    async def submit_execution(self, execution_id: str, job: CompileJob, artifact_id: str) -> None:
        self._check_usable()
        rid = self._new_id()
        try:
            request = ExecuteRequest(
                id=rid,
                session=self._session,
                execution_id=execution_id,
                job=job,
                artifact_id=artifact_id,
            )
        except ValidationError as exc:
            self._push(
                ExecutionRejected(
                    observed_at=time.time(),
                    plate_id=job.plate_id,
                    execution_id=execution_id,
                    error=f"the zmq engine cannot send this execution: {first_error(exc)}",
                )
            )
            return
        await self._submit(
            Submission(job.plate_id, "execute", execution_id),
            request,
            lambda error: ExecutionRejected(
                observed_at=time.time(),
                plate_id=job.plate_id,
                execution_id=execution_id,
                error=error,
            ),
        )

    async def cancel(self, submission: Submission) -> None:
        self._check_usable()
        with self._lock:
            held = self._held.pop((submission.phase, submission.submission_id), None)
        if held is not None:  # never sent: cancelled here, at once
            self._push(cancelled_fact(submission))
            return
        try:
            request = CancelRequest(
                id=self._new_id(), submission=self._wire(submission), session=self._session
            )
        except ValidationError:
            return  # no such submission can exist on the server
        reply = await self._call(request, f"cancel {submission.submission_id}")
        if not reply.ok:
            # Not a transport failure: the server could not cancel it (unknown or finished).
            # Pushing nothing is right; the service's cancel grace settles the plate.
            _log.info("the server refused to cancel %s: %s", submission.submission_id, reply.error)

    async def status(self, submissions: Sequence[Submission]) -> list[Fact]:
        self._check_usable()
        facts: list[Fact] = []
        for chunk in self._chunks(submissions):
            request = StatusRequest(id=self._new_id(), submissions=chunk)
            mark = self._acks
            reply = await self._call(request, f"status of {len(chunk)} submissions")
            if not reply.ok:
                raise EngineError(f"the zmq server refused a status request: {reply.error}")
            known = {key for fact in reply.facts if (key := submission_key(fact)) is not None}
            asked = [Submission(s.plate_id, s.phase, s.submission_id) for s in chunk]
            lost = self._forgotten(asked, known, mark)
            self._observe(reply.facts)
            self._observe(lost)
            facts.extend(reply.facts)
            facts.extend(lost)
        return facts

    async def server_info(self) -> dict[str, JsonValue]:
        self._check_usable()
        reply = await self._call(ServerInfoRequest(id=self._new_id()), "server_info")
        if not reply.ok:
            raise EngineError(f"the zmq server refused server_info: {reply.error}")
        if not isinstance(reply.result, dict):
            raise EngineError(
                f"the zmq server answered server_info with {type(reply.result).__name__}, "
                "not a mapping"
            )
        info: dict[str, JsonValue] = dict(reply.result)
        info["engine"] = self.name
        info["attached"] = self._process is None
        return info

    async def close(self) -> None:
        """Release the lease, stop the I/O thread and, if this engine started the server, shut
        it down. Idempotent.

        Releasing the lease stops whatever of this session's work the server
        still has (a server started for a client exits when its last lease is
        released). A server it started gets a shutdown request (with the token)
        unless it is exiting already; if it does not exit within a few seconds
        it is terminated, then killed. A server it attached to is left running
        for its other clients.
        """
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._closing = True  # a server going away now is no loss
        process = self._process
        asked = False
        try:
            if self._leasing and self._broken is None and self._thread_alive():
                asked = await self._release_lease()
            if (
                not asked
                and process is not None
                and self._token is not None
                and self._broken is None
                and process.poll() is None
                and self._thread_alive()
            ):
                try:
                    request = ShutdownRequest(id=self._new_id(), token=self._token)
                    reply = await self._call(
                        request,
                        "shutdown",
                        timeout=min(self._request_timeout, _SHUTDOWN_TIMEOUT),
                        closing=True,
                    )
                    asked = reply.ok
                    if not reply.ok:
                        _log.warning("the zmq server refused to shut down: %s", reply.error)
                except EngineError as exc:
                    _log.warning("could not ask the zmq server to shut down: %s", exc)
        finally:  # even if cancelled: a closed engine leaves no thread and no server of its own
            await self._stop_thread()
            if process is not None:
                await asyncio.to_thread(self._reap, process, asked)

    # --- surviving a host restart ------------------------------------------------------------

    def identity(self) -> dict[str, JsonValue]:
        """The runtime dir, this engine's session and the id of the server it talks to.

        The session is what lets a later process take the work over
        (:meth:`adopt`); the token is never included.
        """
        record = self._record
        server_id = self._server_id or (record.server_id if record is not None else None)
        return {
            "engine": self.name,
            "runtime_dir": str(self._dir),
            "session": self._session,
            "server_id": server_id,
        }

    def adopt(self, identity: dict[str, JsonValue]) -> None:
        """Before :meth:`start`: continue the session of the engine whose :meth:`identity` this is.

        The lease is renewed from the start, so a server waiting for that
        session keeps its work. Raises :class:`UsageError` for another engine's
        identity, a malformed one, another runtime dir, or after start.
        """
        if self._thread is not None or self._ctx is not None or self._closed:
            raise UsageError("adopt() must be called before start(), on a new ZmqEngine")
        if identity.get("engine") != self.name:
            raise UsageError(
                f"cannot adopt the identity of a {identity.get('engine')!r} engine: "
                "it was not written by a zmq engine"
            )
        runtime_dir, session = identity.get("runtime_dir"), identity.get("session")
        server_id = identity.get("server_id")
        if not isinstance(runtime_dir, str) or not runtime_dir:
            raise UsageError("the zmq identity names no runtime_dir")
        if not isinstance(session, str) or not 16 <= len(session) <= 128:
            raise UsageError("the zmq identity has no valid session (16-128 characters)")
        if server_id is not None and not isinstance(server_id, str):
            raise UsageError("the zmq identity's server_id is not a string")
        if Path(runtime_dir).resolve() != self._dir.resolve():
            raise UsageError(
                f"the work to adopt lives on the server in {runtime_dir}, but this engine "
                f"uses {self._dir}; make the engine with runtime_dir={runtime_dir!r}"
            )
        self._session = session
        self._adopted_server = server_id
        self._leasing = True

    async def recover(self, submissions: Sequence[Submission]) -> Recovered:
        """After :meth:`start`: where each submission is now, in one status query (chunked).

        Those the server knows are tracked again as this engine's own: their
        later facts reach the sink, reconciliation covers them, and they count
        against the window. ``never_ran`` vouches for the unknown ones only when
        this is the very server the adopted identity names and it has forgotten
        no finished submission (it never received them); a replaced server
        vouches for nothing.
        """
        self._check_usable()
        asked = {(s.phase, s.submission_id): s for s in submissions}
        with self._lock:
            # Tracked before asking: a terminal event arriving meanwhile then untracks it.
            added = [key for key in asked if key not in self._outstanding]
            for key in added:
                self._outstanding[key] = asked[key]
        self._leasing = True
        known: dict[_Key, Fact] = {}
        try:
            for chunk in self._chunks(list(asked.values())):
                request = StatusRequest(id=self._new_id(), submissions=chunk)
                reply = await self._call(request, f"recover {len(chunk)} submissions")
                if not reply.ok:
                    raise EngineError(f"the zmq server refused a status request: {reply.error}")
                for answer in reply.facts:
                    found = submission_key(answer)
                    if found is not None and found in asked:
                        known[found] = answer
        except BaseException:
            with self._lock:
                for key in added:
                    self._outstanding.pop(key, None)
            raise
        with self._lock:
            for key in asked:
                now = known.get(key)
                if now is None or isinstance(now, TERMINAL_FACTS):
                    if key in added:
                        self._outstanding.pop(key, None)
                elif key in self._outstanding:
                    self._acks += 1
                    self._acked[key] = self._acks
        unknown = tuple(s for key, s in asked.items() if key not in known)
        never_ran: frozenset[str] = frozenset()
        if unknown and await self._vouches():
            never_ran = frozenset(s.submission_id for s in unknown)
        return Recovered(facts=tuple(known.values()), unknown=unknown, never_ran=never_ran)

    async def _vouches(self) -> bool:
        """Whether a submission this server does not know certainly never reached it."""
        if self._adopted_server is None or self._server_id != self._adopted_server:
            return False  # not adopted, or replaced: the old server may have run it
        info = await self.server_info()
        return info.get("forgotten") == 0

    async def _release_lease(self) -> bool:
        """Give the lease back (closing); True when the server said it exits for it."""
        request = ReleaseRequest(id=self._new_id(), session=self._session)
        try:
            reply = await self._call(
                request,
                "release",
                timeout=min(self._request_timeout, _SHUTDOWN_TIMEOUT),
                closing=True,
            )
        except EngineError as exc:
            _log.warning("could not release the lease on the zmq server: %s", exc)
            return False
        if not reply.ok:
            _log.warning("the zmq server refused to release the lease: %s", reply.error)
            return False
        result = reply.result
        return isinstance(result, dict) and result.get("exiting") is True

    # --- extras ------------------------------------------------------------------------------

    @property
    def max_in_flight(self) -> int | None:
        """The window in force (``"auto"`` is resolved by :meth:`start`); None: no limit."""
        return self._max_in_flight

    def statistics(self) -> ZmqEngineStatistics:
        c = self._counters
        with self._lock:
            outstanding, held = len(self._outstanding), len(self._held)
        record = self._record
        return ZmqEngineStatistics(
            server_id=self._server_id,
            server_pid=record.pid if record is not None else None,
            started_server=self._process is not None,
            last_seq=self._seq,
            events=c.events,
            heartbeats=c.heartbeats,
            facts=c.facts,
            gaps=c.gaps,
            server_changes=c.server_changes,
            reconciliations=c.reconciliations,
            reconciled_facts=c.reconciled_facts,
            repeats=c.repeats,
            forgotten=c.forgotten,
            requests=c.requests,
            timeouts=c.timeouts,
            malformed=c.malformed,
            outstanding=outstanding,
            held=held,
            broken=self._broken,
            leased=self._leasing,
            renewals=c.renewals,
        )

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._broken is not None:
            state = "broken"
        elif self._thread is not None:
            state = "started"
        else:
            state = "new"
        how = "started" if self._process is not None else "attached"
        server = f" server={self._server_id or '?'} ({how})" if self._record else ""
        return f"<ZmqEngine {state} dir={self._dir}{server}>"

    # --- finding or starting the server (a worker thread during start) -----------------------

    def _find_or_start(self) -> _Found:
        try:
            directory = rundir.ensure_private_dir(self._dir)
        except (UsageError, OSError) as exc:
            raise EngineError(f"cannot use runtime dir {self._dir}: {exc}") from exc
        deadline = time.monotonic() + self._startup_timeout
        record = self._attach(directory, deadline)
        if record is not None:
            return _Found(record)
        if not self._start_server:
            raise EngineError(
                f"no plateflow server is running in {directory}; start one with "
                f"`plateflow serve --runtime-dir {directory}` or let the engine start it "
                "(start_server=True)"
            )
        with self._start_lock(directory, deadline):
            # Someone may have started one while we waited for the lock.
            record = self._attach(directory, deadline)
            if record is not None:
                return _Found(record)
            return self._spawn(directory, deadline)

    @contextlib.contextmanager
    def _start_lock(self, directory: Path, deadline: float) -> Iterator[None]:
        """Hold ``start.lock``, waiting for another client at most until ``deadline``."""
        with contextlib.ExitStack() as stack:
            while True:
                try:
                    stack.enter_context(
                        rundir.exclusive_lock(directory / "start.lock", blocking=False)
                    )
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise EngineError(
                            f"another client has been starting a server in {directory} for "
                            f"longer than {self._startup_timeout} s (start.lock is held)"
                        ) from None
                    time.sleep(0.02)
            yield

    def _attach(self, directory: Path, deadline: float) -> ServerRecord | None:
        """The live server's record once it answers a ping; None when no server is alive."""
        while rundir.server_alive(directory):
            record = rundir.read_record(directory)
            if record is not None and self._ping(record, deadline):
                return record
            if time.monotonic() >= deadline:
                raise EngineError(
                    f"a plateflow server holds {directory / 'server.lock'} but did not answer "
                    f"within {self._startup_timeout} s"
                )
            time.sleep(0.05)
        return None

    def _spawn(self, directory: Path, deadline: float) -> _Found:
        log_path = directory / "server.log"
        command = [
            sys.executable,
            "-m",
            "plateflow",
            "serve",
            "--runtime-dir",
            str(directory),
            "--lease-grace",
            str(self._lease_grace),
            "--exit-when-unowned",
            *self._server_args,
        ]
        try:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise EngineError(f"cannot write the server log {log_path}: {exc}") from exc
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,  # a Ctrl-C to the host must not kill it mid-batch
                close_fds=True,
            )
        except OSError as exc:
            raise EngineError(f"cannot start the plateflow server: {exc}") from exc
        finally:
            os.close(log_fd)
        _log.info("started plateflow server pid %s in %s", process.pid, directory)
        try:
            record = self._wait_ready(directory, process, log_path, deadline)
            token = rundir.read_token(directory)
        except BaseException as exc:
            self._reap(process, asked=False)
            if isinstance(exc, OSError):
                raise EngineError(f"cannot read the server's token: {exc}") from exc
            raise
        return _Found(record, process=process, token=token, log_path=log_path)

    def _wait_ready(
        self,
        directory: Path,
        process: subprocess.Popen[bytes],
        log_path: Path,
        deadline: float,
    ) -> ServerRecord:
        while True:
            code = process.poll()
            if code is not None:
                tail = _tail(log_path)
                raise EngineError(
                    f"the plateflow server exited with code {code} before it was ready"
                    + (f":\n{tail}" if tail else f" (see {log_path})")
                )
            record = rundir.read_record(directory)
            if record is not None and record.pid == process.pid and self._ping(record, deadline):
                return record
            if time.monotonic() >= deadline:
                tail = _tail(log_path)
                raise EngineError(
                    f"the plateflow server did not become ready within {self._startup_timeout} s"
                    + (f":\n{tail}" if tail else "")
                )
            time.sleep(0.05)

    def _ping(self, record: ServerRecord, deadline: float) -> bool:
        """One ping on a throwaway socket: does this record's server answer?"""
        if record.protocol != PROTOCOL_VERSION:
            raise EngineError(
                f"the plateflow server in {self._dir} speaks protocol {record.protocol}; "
                f"this client speaks {PROTOCOL_VERSION}"
            )
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(record.control)
            rid = self._new_id()
            sock.send(encode(PingRequest(id=rid)), zmq.NOBLOCK)
            wait = max(0.0, min(_PING_TIMEOUT, deadline - time.monotonic()))
            end = time.monotonic() + wait
            while (left := end - time.monotonic()) > 0:
                if not sock.poll(math.ceil(left * 1000), zmq.POLLIN):
                    return False
                reply = decode_reply(sock.recv_multipart()[-1], max_bytes=_MAX_INBOUND_BYTES)
                if reply.id == rid:
                    if not reply.ok:
                        return False
                    result = reply.result
                    server_id = result.get("server_id") if isinstance(result, dict) else None
                    return server_id in (None, record.server_id)
            return False
        except (zmq.ZMQError, WireError) as exc:
            _log.debug("ping of %s failed: %s", record.control, exc)
            return False
        finally:
            sock.close(linger=0)

    def _reap(self, process: subprocess.Popen[bytes], asked: bool) -> None:
        """Make sure a server this engine started is gone: wait, terminate, kill."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(_SHUTDOWN_TIMEOUT if asked else 0.0)
        if process.poll() is None:
            _log.warning("terminating plateflow server pid %s", process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
                process.send_signal(signal.SIGCONT)  # a stopped server must see the SIGTERM
            try:
                process.wait(_SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                _log.warning("killing plateflow server pid %s", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                try:
                    process.wait(_SHUTDOWN_TIMEOUT)
                except subprocess.TimeoutExpired:
                    _log.error("plateflow server pid %s survived SIGKILL", process.pid)
                    return
        # A server that could not clean up leaves its record behind; remove what is ours.
        record = rundir.read_record(self._dir)
        if record is not None and record.pid == process.pid and not rundir.server_alive(self._dir):
            with contextlib.suppress(OSError):
                (self._dir / "server.json").unlink()

    async def _abandon(self) -> None:
        """Undo a start that found a server but cannot use it."""
        process = self._process
        if process is not None:
            await asyncio.to_thread(self._reap, process, False)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
        self._closed = True

    # --- the I/O thread ---------------------------------------------------------------------

    def _connect(self, record: ServerRecord) -> None:
        ctx = self._ctx
        assert ctx is not None
        address = f"inproc://plateflow-zmq-engine-{self._client_id}"
        control = ctx.socket(zmq.DEALER)
        events = ctx.socket(zmq.SUB)
        wake_in = ctx.socket(zmq.PAIR)
        wake_out = ctx.socket(zmq.PAIR)
        for sock in (control, events, wake_in, wake_out):
            sock.setsockopt(zmq.LINGER, 0)
        try:
            wake_in.bind(address)
            wake_out.connect(address)
            control.connect(record.control)
            events.setsockopt(zmq.SUBSCRIBE, b"")
            events.connect(record.events)
        except zmq.ZMQError:
            for sock in (control, events, wake_in, wake_out):
                sock.close(linger=0)
            raise
        self._wake_out = wake_out
        self._server_id = record.server_id
        self._last_event = time.monotonic()
        self._thread = threading.Thread(
            target=self._io_main,
            args=(control, events, wake_in),
            name=f"plateflow-zmq-client-{self._client_id}",
            daemon=True,
        )
        self._thread.start()

    def _io_main(
        self, control: zmq.Socket[bytes], events: zmq.Socket[bytes], wake: zmq.Socket[bytes]
    ) -> None:
        poller = zmq.Poller()
        for sock in (control, events, wake):
            poller.register(sock, zmq.POLLIN)
        try:
            while not self._stopping:
                poller.modify(control, zmq.POLLIN | (zmq.POLLOUT if self._backlog else 0))
                ready = dict(poller.poll(math.ceil(self._poll_timeout() * 1000)))
                if wake in ready:
                    self._drain_wake(wake)
                if control in ready:
                    self._drain_replies(control)
                if events in ready:
                    self._drain_events(events)
                self._check_deadlines()
                self._check_liveness()
                if self._release_lost:
                    self._release_lost = False
                    self._send_release_lost(control)
                self._renew()
                self._flush_outbox(control)  # callers' requests, our reconciliations, renewals
        except BaseException as exc:  # a bug here must not leave callers waiting
            _log.exception("the zmq client I/O thread crashed")
            self._lose(f"the client I/O thread crashed: {type(exc).__name__}: {exc}")
        finally:
            self._fail_all(EngineError("the zmq engine is closed"))
            for sock in (control, events, wake):
                sock.close(linger=0)

    def _poll_timeout(self) -> float:
        now = time.monotonic()
        timeout = POLL_TICK
        if self._broken is None and not self._closing:
            timeout = min(timeout, self._last_event + self._heartbeat_timeout - now)
            if self._leasing and not self._renewing:
                timeout = min(timeout, self._next_renewal - now)
        if self._pending:
            timeout = min(timeout, self._next_deadline() - now)
        return max(0.0, timeout)

    def _drain_wake(self, wake: zmq.Socket[bytes]) -> None:
        for _ in range(_DRAIN_BATCH):
            try:
                wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        # Cleared once the socket is empty, before the outbox is read: a request queued
        # from now on sends a fresh wake-up. (Cleared first, a wake-up sent meanwhile
        # would be swallowed with the flag left set, and the next request never sent.)
        self._wake_pending = False

    def _flush_outbox(self, control: zmq.Socket[bytes]) -> None:
        while True:
            try:
                rid, frame, pending = self._outbox.get_nowait()
            except queue.Empty:
                break
            self._send(control, rid, frame, pending)
        # A burst larger than the socket's queue waits here, not in an error: it is
        # sent as the socket drains (the poller watches POLLOUT while anything waits).
        while self._backlog:
            rid, frame = self._backlog[0]
            if rid not in self._pending:  # timed out while waiting: nobody wants it now
                self._backlog.popleft()
                continue
            try:
                control.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                self._backlog.popleft()
                pending = self._pending.pop(rid)
                pending.done(EngineError(f"{pending.what}: cannot send to the zmq server: {exc}"))
                continue
            self._backlog.popleft()

    def _send(self, control: zmq.Socket[bytes], rid: str, frame: bytes, pending: _Pending) -> None:
        if self._broken is not None:
            pending.done(EngineError(f"the zmq server is lost: {self._broken}"))
            return
        self._counters.requests += 1
        pending.deadline += time.monotonic()  # it runs from now, sent or waiting
        self._pending[rid] = pending
        heapq.heappush(self._deadlines, (pending.deadline, rid))
        self._backlog.append((rid, frame))

    def _drain_replies(self, control: zmq.Socket[bytes]) -> None:
        for _ in range(_DRAIN_BATCH):
            try:
                frames = control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = decode_reply(frames[-1], max_bytes=_MAX_INBOUND_BYTES)
            except WireError as exc:
                self._counters.malformed += 1
                _log.warning("dropped a malformed reply from the zmq server: %s", exc)
                continue
            pending = self._pending.pop(reply.id, None) if reply.id is not None else None
            if pending is None:
                if reply.id is None:
                    _log.warning("the zmq server could not read a request: %s", reply.error)
                else:
                    _log.debug("a late or unknown reply %s was dropped", reply.id)
                continue
            pending.done(reply)

    def _drain_events(self, events: zmq.Socket[bytes]) -> None:
        for _ in range(_DRAIN_BATCH):
            try:
                frames = events.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_event = time.monotonic()  # anything at all proves the server alive
            try:
                event = decode_event(frames[-1], max_bytes=_MAX_INBOUND_BYTES)
            except WireError as exc:
                self._counters.malformed += 1
                _log.warning("dropped a malformed event from the zmq server: %s", exc)
                continue
            self._on_event(event)

    def _on_event(self, event: Event) -> None:
        """Track ``(server_id, seq)``, deliver a fact, reconcile on first contact or a gap."""
        c = self._counters
        c.events += 1
        self._last_event = time.monotonic()
        if self._broken is not None:
            return  # after EngineLost nothing more is pushed
        replaced_from: str | None = None
        if event.server_id != self._server_id:
            c.server_changes += 1
            replaced_from = self._server_id
            _log.warning(
                "the zmq server changed from %s to %s; reconciling",
                self._server_id,
                event.server_id,
            )
            reconcile = True
        elif self._seq is None:
            reconcile = True  # first contact: what came before our subscription is lost
        elif event.seq != self._seq + 1:
            c.gaps += 1
            _log.info("event gap: expected seq %s, got %s; reconciling", self._seq + 1, event.seq)
            reconcile = True
        else:
            reconcile = False
        self._server_id, self._seq = event.server_id, event.seq
        if isinstance(event, FactEvent):
            c.facts += 1
            self._deliver(event.fact)
        elif isinstance(event, StoppingEvent):
            # Its work is lost, not cancelled: whatever it had is reported engine_lost
            # (unless this client is closing and asked for the stop itself).
            self._lose(f"the server {event.server_id} stopped: {event.reason}")
            return
        else:
            c.heartbeats += 1
        if reconcile:
            self._reconcile(replaced_from)

    def _deliver(self, fact: Fact) -> bool:
        """Pass a fact on (I/O thread); False when it only repeated the last one."""
        key = submission_key(fact)
        if key is not None:
            if isinstance(fact, TERMINAL_FACTS):
                self._last_kind.pop(key, None)
            elif fact.kind in _REPEATABLE:
                if self._last_kind.get(key) == fact.kind:
                    self._counters.repeats += 1
                    return False
                if key in self._outstanding:  # a racy read is fine: a miss costs a duplicate
                    self._last_kind[key] = fact.kind
        self._observe((fact,))
        self._push(fact)
        return True

    def _reconcile(self, replaced_from: str | None = None) -> None:
        """One status request for every outstanding submission (I/O thread only).

        Requests go through the outbox, so they are sent at the end of this
        turn of the loop. One reconciliation is in flight at a time; a gap
        seen meanwhile asks for one more when it is answered.
        """
        if self._broken is not None or self._stopping:
            return
        if replaced_from is not None and self._replaced_from is None:
            self._replaced_from = replaced_from
        if self._reconciling:
            self._reconcile_again = True
            return
        with self._lock:
            submissions = list(self._outstanding.values())
        replaced, self._replaced_from = self._replaced_from, None
        if not submissions:
            return
        self._counters.reconciliations += 1
        self._reconciling = True
        chunks = self._chunks(submissions)
        answers: list[Reply | EngineError] = []
        mark = self._acks

        def done(result: Reply | EngineError) -> None:
            answers.append(result)
            if len(answers) == len(chunks):
                self._reconciled(submissions, answers, replaced, mark)

        for chunk in chunks:
            rid = self._new_id()
            frame = encode(StatusRequest(id=rid, submissions=chunk))
            self._outbox.put((rid, frame, _Pending(done, self._request_timeout, "reconcile")))

    def _reconciled(
        self,
        submissions: list[Submission],
        answers: list[Reply | EngineError],
        replaced_from: str | None,
        mark: int,
    ) -> None:
        self._reconciling = False
        known: set[_Key] = set()
        complete = True
        for answer in answers:
            if isinstance(answer, EngineError) or not answer.ok:
                complete = False
                why = answer if isinstance(answer, EngineError) else answer.error
                _log.warning("reconciliation failed (the status poller will retry): %s", why)
                continue
            for fact in answer.facts:
                key = submission_key(fact)
                if key is not None:
                    known.add(key)
                if self._deliver(fact):
                    self._counters.reconciled_facts += 1
        if complete and replaced_from is None:
            for fact in self._forgotten(submissions, known, mark):
                self._deliver(fact)
        if replaced_from is not None and self._broken is None:
            if not complete:
                self._lose(
                    f"the server {replaced_from} was replaced by {self._server_id} and could "
                    "not be asked what became of the outstanding submissions"
                )
                return
            with self._lock:
                lost = [
                    s
                    for s in submissions
                    if (s.phase, s.submission_id) not in known
                    and (s.phase, s.submission_id) in self._outstanding
                ]
            if lost:
                self._lose(
                    f"the server {replaced_from} was replaced by {self._server_id}, which does "
                    f"not know {len(lost)} outstanding submission(s) (e.g. "
                    f"{lost[0].submission_id!r}); their work is gone"
                )
                return
        if self._reconcile_again:
            self._reconcile_again = False
            self._reconcile()

    def _forgotten(self, asked: Sequence[Submission], known: set[_Key], mark: int) -> list[Fact]:
        """Failed facts for acknowledged submissions a status answer did not know.

        Requests on one socket are handled in order, so a submission acknowledged
        before the status request went out (number <= ``mark``) had reached the
        server: if the answer does not know it, the server was restarted or has
        forgotten it after it finished (``plateflow serve --keep-finished``).
        Either way its result is gone, and waiting for it would never end.
        """
        facts: list[Fact] = []
        for submission in asked:
            key = (submission.phase, submission.submission_id)
            number = self._acked.get(key)
            if number is None or number > mark or key in known:
                continue
            self._counters.forgotten += 1
            facts.append(failed_fact(submission, _FORGOTTEN))
        return facts

    def _next_deadline(self) -> float:
        """The earliest deadline of a request still waiting (inf if none); drops stale ones."""
        heap = self._deadlines
        while heap:
            deadline, rid = heap[0]
            pending = self._pending.get(rid)
            if pending is not None and pending.deadline == deadline:
                return deadline
            heapq.heappop(heap)  # answered already
        return math.inf

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        while self._pending and self._next_deadline() <= now:
            _, rid = heapq.heappop(self._deadlines)
            pending = self._pending.pop(rid)
            self._counters.timeouts += 1
            pending.done(
                EngineError(
                    f"{pending.what}: no reply from the zmq server within {self._request_timeout} s"
                )
            )

    def _check_liveness(self) -> None:
        if self._broken is not None or self._closing:
            return
        process = self._process
        if process is not None:
            code = process.poll()
            if code is not None:
                how = (
                    f"was killed by {signal.Signals(-code).name}"
                    if code < 0 and -code in signal.valid_signals()
                    else f"exited with code {code}"
                )
                self._lose(f"the server process (pid {process.pid}) {how}")
                return
        silent = time.monotonic() - self._last_event
        if silent > self._heartbeat_timeout:
            self._lose(
                f"no event from the server {self._server_id} for {silent:.1f} s "
                f"(heartbeat timeout {self._heartbeat_timeout} s): it is dead or frozen"
            )
            # A frozen server that wakes must stop what this client reported lost.
            self._release_lost = self._leasing

    # --- the lease (I/O thread) ---------------------------------------------------------------

    def _renewal_interval(self, heartbeat_interval: float, grace: float | None) -> float:
        grace = self._lease_grace if grace is None else grace
        return max(POLL_TICK, min(2 * heartbeat_interval, grace / 4))

    def _renew(self) -> None:
        """Renew the lease when due: one ``lease`` request in flight at a time."""
        if not self._leasing or self._renewing or self._broken is not None or self._closing:
            return
        now = time.monotonic()
        if now < self._next_renewal:
            return
        self._renewing = True
        self._next_renewal = now + self._renew_every
        rid = self._new_id()
        frame = encode(
            LeaseRequest(id=rid, session=self._session, loss_timeout=self._heartbeat_timeout)
        )

        def done(result: Reply | EngineError) -> None:
            self._renewing = False
            if isinstance(result, EngineError) or not result.ok:
                why = result if isinstance(result, EngineError) else result.error
                _log.warning("the lease was not renewed (retrying): %s", why)
                return
            self._counters.renewals += 1
            answer = result.result
            grace = answer.get("grace") if isinstance(answer, dict) else None
            record = self._record
            if isinstance(grace, int | float) and grace > 0 and record is not None:
                self._renew_every = self._renewal_interval(record.heartbeat_interval, grace)

        self._outbox.put((rid, frame, _Pending(done, self._request_timeout, "lease")))

    def _send_release_lost(self, control: zmq.Socket[bytes]) -> None:
        """Tell the server, best effort, that this client gave it up (no reply awaited)."""
        frame = encode(ReleaseRequest(id=self._new_id(), session=self._session, lost=True))
        try:
            control.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            _log.info("could not tell the lost server to stop this session's work: %s", exc)

    def _lose(self, reason: str) -> None:
        """Report the server lost: once, never while closing (I/O thread only)."""
        with self._lock:
            if self._broken is not None or self._closing:
                return
            self._broken = reason
        _log.error("zmq engine lost: %s", reason)
        self._fail_all(EngineError(f"the zmq server is lost: {reason}"))
        self._push(EngineLost(observed_at=time.time(), reason=f"zmq: {reason}"), force=True)

    def _fail_all(self, error: EngineError) -> None:
        pending, self._pending = self._pending, {}
        self._deadlines.clear()
        for entry in pending.values():
            entry.done(error)
        while True:
            try:
                _, _, entry = self._outbox.get_nowait()
            except queue.Empty:
                return
            entry.done(error)

    async def _stop_thread(self) -> None:
        thread = self._thread
        with self._lock:
            self._stopping = True  # under the lock: no request is queued after this
        if thread is not None:
            self._wake()
            await asyncio.to_thread(thread.join, _JOIN_TIMEOUT)
        with self._wake_lock:
            wake, self._wake_out = self._wake_out, None
        if wake is not None:
            wake.close(linger=0)
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            if thread is not None and thread.is_alive():
                _log.error("the zmq client I/O thread did not stop; leaving its context open")
            else:
                ctx.destroy(linger=0)

    # --- caller side ----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise EngineError("the zmq engine is closed")
        if self._thread is None:
            raise EngineError("the zmq engine is not started; call start(sink) first")
        if self._broken is not None:
            raise EngineError(f"the zmq server is lost: {self._broken}")

    def _thread_alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _new_id(self) -> str:
        return f"{self._client_id}-{next(self._ids)}"

    @staticmethod
    def _wire(submission: Submission) -> WireSubmission:
        return WireSubmission(
            plate_id=submission.plate_id,
            phase=submission.phase,
            submission_id=submission.submission_id,
        )

    def _chunks(self, submissions: Sequence[Submission]) -> list[tuple[WireSubmission, ...]]:
        wired: list[WireSubmission] = []
        for submission in submissions:
            try:
                wired.append(self._wire(submission))
            except ValidationError:
                continue  # it cannot be named on the wire, so the server cannot have it
        return [tuple(wired[i : i + _STATUS_CHUNK]) for i in range(0, len(wired), _STATUS_CHUNK)]

    async def _submit(
        self,
        submission: Submission,
        request: CompileRequest | ExecuteRequest,
        rejected: Callable[[str], Fact],
    ) -> None:
        frame = encode(request)
        frame_size = len(frame)
        if frame_size > DEFAULT_MAX_MESSAGE_BYTES:
            self._push(
                rejected(
                    f"the request is {frame_size} bytes, over the server's limit of "
                    f"{DEFAULT_MAX_MESSAGE_BYTES}"
                )
            )
            return
        key = (submission.phase, submission.submission_id)

        def answered(result: Reply | EngineError) -> None:
            """On the I/O thread: an accepted submission is noted as acknowledged; a
            refused one is rejected (after the server is lost, _push drops it:
            EngineLost says it all)."""
            if isinstance(result, Reply) and result.ok:
                with self._lock:
                    if key in self._outstanding:  # not finished already (events may be first)
                        self._acks += 1
                        self._acked[key] = self._acks
                return
            with self._lock:
                self._outstanding.pop(key, None)
            if isinstance(result, Reply):
                self._push(rejected(f"the zmq server refused the submission: {result.error}"))
            else:
                self._push(rejected(str(result)))
            self._release()

        # Sent, not awaited: the reply only matters when it refuses, and then the
        # submission's Rejected fact says so. A phase of a thousand submissions is a
        # thousand queued frames, not a thousand waits on the caller's loop.
        assert isinstance(request.id, str)
        self._leasing = True  # the server keeps this work only while the session holds a lease
        pending = _Pending(answered, 0.0, f"{submission.phase} {submission.submission_id}")
        with self._lock:
            window = self._max_in_flight
            if window is not None and (self._held or len(self._outstanding) >= window):
                # Flow control: the rest waits here, not in the server's queue, so the
                # facts coming back never outrun what this client can take in.
                self._held[key] = (submission, request.id, frame, pending)
                return
            self._outstanding[key] = submission  # before sending, so a reconcile covers it
        self._enqueue(request.id, frame, pending)

    def _release(self) -> None:
        """Send held submissions while the window has room (any thread)."""
        released: list[tuple[str, bytes, _Pending]] = []
        with self._lock:
            window = self._max_in_flight
            while self._held and (window is None or len(self._outstanding) < window):
                key = next(iter(self._held))
                submission, rid, frame, pending = self._held.pop(key)
                self._outstanding[key] = submission
                released.append((rid, frame, pending))
        for rid, frame, pending in released:
            with contextlib.suppress(EngineError):  # closing or lost: EngineLost says it all
                self._enqueue(rid, frame, pending)

    async def _call(
        self,
        request: BaseModel,
        what: str,
        *,
        timeout: float | None = None,
        closing: bool = False,
        frame: bytes | None = None,
    ) -> Reply:
        """Send one request through the I/O thread and wait for its reply (bounded)."""
        timeout = self._request_timeout if timeout is None else timeout
        rid = getattr(request, "id", None)
        assert isinstance(rid, str)
        if frame is None:
            frame = encode(request)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()

        def settle(result: Reply | EngineError) -> None:
            if future.done():
                return
            if isinstance(result, EngineError):
                future.set_exception(result)
            else:
                future.set_result(result)

        def done(result: Reply | EngineError) -> None:
            self._replies.append((settle, result))
            if self._replies_scheduled:
                return  # the drain already scheduled takes this one too
            self._replies_scheduled = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self._settle_replies)

        self._enqueue(rid, frame, _Pending(done, timeout, what), closing=closing)
        try:
            # The I/O thread fails the request at its deadline; this is only a backstop.
            return await asyncio.wait_for(future, timeout + 1.0)
        except TimeoutError as exc:
            raise EngineError(f"{what}: no reply from the zmq server within {timeout} s") from exc

    def _enqueue(self, rid: str, frame: bytes, pending: _Pending, *, closing: bool = False) -> None:
        """Queue one request for the I/O thread; ``pending.done`` gets its reply or error."""
        if pending.deadline <= 0:
            pending.deadline = self._request_timeout
        with self._lock:
            if (self._closing and not closing) or self._stopping or not self._thread_alive():
                raise EngineError("the zmq engine is closed")
            if self._broken is not None:
                raise EngineError(f"the zmq server is lost: {self._broken}")
            self._outbox.put((rid, frame, pending))
        self._wake()

    def _settle_replies(self) -> None:
        """On the caller's loop: hand every reply that arrived to its waiting call."""
        self._replies_scheduled = False  # cleared first: a reply after this schedules anew
        replies = self._replies
        while replies:
            settle, result = replies.popleft()
            settle(result)

    def _wake(self) -> None:
        """Wake the I/O thread; once per batch of requests, not once per request."""
        if self._wake_pending:
            return
        with self._wake_lock:
            wake = self._wake_out
            if wake is None or self._wake_pending:
                return
            self._wake_pending = True
            with contextlib.suppress(zmq.Again):  # a full pipe is already a wake-up
                wake.send(b"", zmq.NOBLOCK)

    def _observe(self, facts: Iterable[Fact]) -> None:
        """Forget submissions that reached a terminal fact."""
        done = [
            key
            for fact in facts
            if isinstance(fact, TERMINAL_FACTS) and (key := submission_key(fact))
        ]
        if done:
            with self._lock:
                for key in done:
                    self._outstanding.pop(key, None)
                    self._acked.pop(key, None)
                room = bool(self._held)
            if room:
                self._release()

    def _push(self, fact: Fact, *, force: bool = False) -> None:
        sink = self._sink
        if sink is None or (self._broken is not None and not force):
            return
        try:
            sink(fact)
        except Exception:  # the sink must not raise; if it does, the engine carries on
            _log.exception("the fact sink raised on %r", fact)
