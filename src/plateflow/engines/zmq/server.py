"""The embedded execution server: a :class:`LocalEngine` behind a ZeroMQ ROUTER and PUB.

Theory of operation: one thread (the one that calls :meth:`ExecutionServer.run`,
the main thread under ``plateflow serve``) owns every ZeroMQ socket, because
ZeroMQ sockets are not thread-safe. It sleeps in one :class:`zmq.Poller` over
the control ROUTER and the read end of a self-pipe, with a timeout that ends
at the next heartbeat, so it never busy-polls.

Work runs in a :class:`LocalEngine`, i.e. in worker processes: a cancel stops
that one worker, a crashed worker fails only its own execution, and the server
keeps serving. The engine pushes facts from its watcher thread (and, for
``*Accepted``/``*Rejected``, from the server's own thread during a submit);
its sink publishes each fact at once as a
:class:`~plateflow.engines.zmq.wire.FactEvent`. The PUB socket is only ever
used under one lock, which also assigns the sequence numbers, so events leave
in sequence order and every submission's facts in the order the engine pushed
them (Accepted, Started, Progress..., one terminal fact), without a hand-over
between threads on the way out. SIGTERM/SIGINT only set a flag;
:func:`signal.set_wakeup_fd` on the self-pipe wakes the poller. Requests are
handled synchronously through the engine's ``*_now`` methods, so replies go
out in the order requests came in.

The server adds a fixed number of threads whatever the load: its own thread,
the engine's watcher thread and ZeroMQ's I/O thread.

Every frame is validated (:func:`~plateflow.engines.zmq.wire.decode_request`)
before anything acts on it; a bad frame gets an ``ok=false`` reply and changes
nothing. libzmq itself drops (and disconnects the sender of) frames larger
than ``MAXMSGSIZE``, set a little above ``max_message_bytes``, so a huge frame
is never even buffered. Shutdown needs the token, compared in constant time;
a cancel needs the session that submitted (or the token). A submission id
the server already has is refused to the one who sent it, in the reply, so
that nobody else's submission hears of it.

No request takes the server down: an exception while answering one becomes
that request's ``ok=false`` reply, and one in the loop itself is logged and
the loop goes on; only a loop that keeps failing stops the server. However
the server stops (a shutdown request, a signal, a crash), its last event is a
:class:`~plateflow.engines.zmq.wire.StoppingEvent` with the reason, and the
cancellations of closing its worker pool are *not* published: nobody asked
for them, and a client must report its work lost (``engine_lost``), not
``engine_cancelled``.

Every submission belongs to a session, and a session keeps its work only
while it holds a lease (:mod:`~plateflow.engines.zmq.lease`). Once per turn,
right after the poller wakes and before any request is served, the loop ends
the leases of clients that have given the server up: the longest pause
between two published events is measured, and a pause longer than a client's
loss timeout (the server was stopped, swapped out or stalled) means that
client has already reported its work ``engine_lost``; that work is stopped
at once. After the requests, it ends the leases nobody renewed for the
grace. A server started for a client (``owned``) exits when no lease is left;
a standalone one only stops the work of the ended leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Callable, Collection, Coroutine, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, Final, Literal, TypeVar, final

import zmq
from pydantic import JsonValue

from plateflow.core.facts import Fact
from plateflow.engines._wakeup import WakePipe
from plateflow.engines.base import TERMINAL_FACTS, EngineError, Submission, submission_key
from plateflow.engines.local import DEFAULT_KEEP_FINISHED, LocalEngine
from plateflow.engines.zmq import rundir
from plateflow.engines.zmq.lease import DEFAULT_LEASE_GRACE, Ended, LeaseBook
from plateflow.engines.zmq.rundir import ServerRecord
from plateflow.engines.zmq.wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_REASON_LENGTH,
    PROTOCOL_VERSION,
    CancelRequest,
    CompileRequest,
    ExecuteRequest,
    FactEvent,
    HeartbeatEvent,
    LeaseRequest,
    PingRequest,
    ReleaseRequest,
    Reply,
    Request,
    ServerInfoRequest,
    ShutdownRequest,
    StatusRequest,
    StoppingEvent,
    WireError,
    WireSubmission,
    decode_request,
    encode,
)
from plateflow.errors import UsageError
from plateflow.pipeline.run import DEFAULT_ALLOWED_MODULES

__all__ = ["DEFAULT_ALLOWED_MODULES", "DEFAULT_LEASE_GRACE", "ExecutionServer", "ServerRecord"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

PUB_SNDHWM: Final = 10_000
"""Events queued per subscriber before PUB drops; a client repairs a gap with ``status``."""
MAXMSGSIZE_MARGIN: Final = 64 * 1024
"""libzmq drops frames this much above ``max_message_bytes``; between the two, an error reply."""
_BATCH: Final = 256
"""Requests handled per wake-up before events and heartbeats get their turn."""
_LINGER_MS: Final = 1_000
"""How long closing sockets may spend delivering the last replies and events."""
_IPC_PATH_MAX: Final = 100
"""A little under the ``sun_path`` limit of Unix sockets (108 bytes on Linux)."""
_LOOP_FAILURES: Final = 50
"""Turns of the loop in a row that may fail before the server gives up and stops."""
_Key = tuple[Literal["compile", "execute"], str]
"""(phase, submission id)."""


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _submission(wire_submission: WireSubmission) -> Submission:
    return Submission(
        plate_id=wire_submission.plate_id,
        phase=wire_submission.phase,
        submission_id=wire_submission.submission_id,
    )


@final
class ExecutionServer:
    """Serve a :class:`LocalEngine` over ZeroMQ until shut down.

    By default binds IPC sockets inside the private ``runtime_dir`` (default
    :func:`rundir.default_runtime_dir`); with ``tcp_port`` binds TCP on
    127.0.0.1 only: control on ``tcp_port`` and events on ``tcp_port + 1``, or
    both on ports the OS picks when ``tcp_port`` is 0. The runtime dir holds
    ``server.lock`` (one live server per dir), ``token`` and ``server.json``
    either way. ``max_workers``, ``allowed_modules``, ``output_dir``,
    ``cancel_grace`` and ``keep_finished`` go to the :class:`LocalEngine`. A heartbeat is published
    every ``heartbeat_interval`` seconds.

    A client session's lease lasts ``lease_grace`` seconds unrenewed; when it
    ends, the session's unfinished work is stopped. With ``owned`` (a server
    started for a client) the server also exits once no session holds a lease,
    or when none took one within ``lease_grace`` of the start.
    """

    def __init__(
        self,
        runtime_dir: Path | None = None,
        *,
        tcp_port: int | None = None,
        max_workers: int | None = None,
        allowed_modules: Collection[str] = DEFAULT_ALLOWED_MODULES,
        output_dir: str | None = None,
        heartbeat_interval: float = 0.5,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        cancel_grace: float = 2.0,
        keep_finished: int | None = DEFAULT_KEEP_FINISHED,
        lease_grace: float = DEFAULT_LEASE_GRACE,
        owned: bool = False,
    ) -> None:
        if tcp_port is not None and not 0 <= tcp_port <= 65534:
            raise UsageError(f"tcp_port must be within 0..65534, got {tcp_port}")
        if max_workers is not None and max_workers < 1:
            raise UsageError(f"max_workers must be at least 1, got {max_workers}")
        if not (math.isfinite(heartbeat_interval) and heartbeat_interval > 0):
            raise UsageError(
                f"heartbeat_interval must be a positive number of seconds, got {heartbeat_interval}"
            )
        if max_message_bytes < 1024:
            raise UsageError(f"max_message_bytes must be at least 1024, got {max_message_bytes}")
        if keep_finished is not None and keep_finished < 1:
            raise UsageError(f"keep_finished must be at least 1 (or None), got {keep_finished}")
        if not (math.isfinite(cancel_grace) and cancel_grace > 0):
            raise UsageError(
                f"cancel_grace must be a positive number of seconds, got {cancel_grace}"
            )
        if not (math.isfinite(lease_grace) and lease_grace > 0):
            raise UsageError(f"lease_grace must be a positive number of seconds, got {lease_grace}")
        self._runtime_dir = Path(runtime_dir) if runtime_dir else rundir.default_runtime_dir()
        self._tcp_port = tcp_port
        self._max_workers = max_workers
        self._allowed_modules = tuple(allowed_modules)
        self._output_dir = output_dir
        self._heartbeat_interval = float(heartbeat_interval)
        self._max_message_bytes = int(max_message_bytes)
        self._cancel_grace = float(cancel_grace)
        self._keep_finished = keep_finished
        self._owned = bool(owned)

        self.server_id = uuid.uuid4().hex
        """New on every start (every :class:`ExecutionServer`); clients see a restart by it."""
        self._seq = 0
        """The seq of the next event."""
        self._started = time.monotonic()
        self._token = ""
        self._record: ServerRecord | None = None

        self._pub_lock = threading.Lock()
        """Held for every use of the PUB socket, of ``_seq``, ``_muted`` and the silence."""
        self._leases = self._new_book(float(lease_grace))
        """Who owns each unfinished submission, and which sessions still want theirs."""
        self._last_event = time.monotonic()
        """When the last event was published (monotonic)."""
        self._longest_silence = 0.0
        """The longest pause between two events since the loop last looked."""
        self._registration: Path | None = None
        self._muted = False
        """Set with the stopping event: nothing is published after it."""
        self._failures = 0
        """Turns of the loop in a row that raised."""
        self._next_beat = 0.0
        """When the next heartbeat is due (monotonic)."""
        self._wakeup: WakePipe | None = None
        self._stop = threading.Event()
        self._stop_reason = ""
        self._running = False

        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: LocalEngine | None = None
        self._router: zmq.Socket[bytes] | None = None
        self._pub: zmq.Socket[bytes] | None = None

    # --- public --------------------------------------------------------------------

    @property
    def runtime_dir(self) -> Path:
        return self._runtime_dir

    @property
    def record(self) -> ServerRecord | None:
        """What ``server.json`` says, once the server is listening."""
        return self._record

    @property
    def stop_reason(self) -> str:
        """Why the server stopped (or is stopping); empty while it serves."""
        return self._stop_reason

    @property
    def owned(self) -> bool:
        """Whether the server exits once no client holds a lease."""
        return self._owned

    def stop(self, reason: str = "stop requested") -> None:
        """Ask :meth:`run` to shut down cleanly. Thread-safe, idempotent, never blocks."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()
        self._wake()

    def run(self, on_ready: Callable[[ServerRecord], None] | None = None) -> None:
        """Bind, write ``token`` and ``server.json``, serve until stopped, then clean up.

        ``on_ready`` is called with the record once clients can connect.
        Raises :class:`UsageError` when the runtime dir is unusable or another
        live server holds it. SIGTERM and SIGINT stop the server cleanly when
        ``run`` is called from the main thread.
        """
        if self._running:
            raise UsageError("this ExecutionServer is already running")
        self._running = True
        directory = rundir.ensure_private_dir(self._runtime_dir)
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(
                    rundir.exclusive_lock(directory / "server.lock", blocking=False)
                )
            except BlockingIOError:
                other = rundir.read_record(directory)
                who = f" (pid {other.pid})" if other is not None else ""
                raise UsageError(
                    f"another plateflow server{who} is already running in {directory}"
                ) from None
            self._wakeup = WakePipe()
            stack.callback(self._close_pipe)
            stack.enter_context(self._signals())
            context = zmq.Context()
            stack.callback(context.term)
            stack.callback(self._remove_files, directory)
            self._bind(context, directory)
            self._loop = asyncio.new_event_loop()
            stack.callback(self._close_loop)
            engine = LocalEngine(
                max_workers=self._max_workers,
                allowed_modules=self._allowed_modules,
                output_dir=self._output_dir,
                cancel_grace=self._cancel_grace,
                keep_finished=self._keep_finished,
            )
            self._await(engine.start(self._sink))
            self._engine = engine
            stack.callback(self._close_engine)
            self._token = secrets.token_urlsafe(32)
            rundir.write_private(directory / "token", self._token + "\n")
            assert self._router is not None
            assert self._pub is not None
            self._record = ServerRecord(
                server_id=self.server_id,
                pid=os.getpid(),
                control=self._endpoint(self._router),
                events=self._endpoint(self._pub),
                protocol=PROTOCOL_VERSION,
                heartbeat_interval=self._heartbeat_interval,
                started_at=time.time(),
                workers=engine.max_workers,
            )
            rundir.write_record(directory, self._record)
            self._registration = rundir.register(self._record, directory, owned=self._owned)
            self._started = time.monotonic()
            self._leases = self._new_book(self._leases.grace)
            _log.info("serving %s in %s", self.server_id, directory)
            try:
                if on_ready is not None:
                    on_ready(self._record)
                self._serve()
            except BaseException as exc:
                if not self._stop_reason:
                    self._stop_reason = f"crashed: {type(exc).__name__}: {exc}"
                raise
            finally:
                _log.info("stopping: %s", self._stop_reason)
                # Say we are going before the (possibly slow) engine close.
                with contextlib.suppress(FileNotFoundError):
                    (directory / "server.json").unlink()
                rundir.unregister(self._registration)
                self._farewell(self._stop_reason or "stopped")

    def __repr__(self) -> str:
        state = "running" if self._running and not self._stop.is_set() else "idle"
        return (
            f"<ExecutionServer {state} id={self.server_id} dir={self._runtime_dir} seq={self._seq}>"
        )

    # --- startup and cleanup ---------------------------------------------------------

    def _new_book(self, grace: float) -> LeaseBook:
        return LeaseBook(
            grace,
            heartbeat_interval=self._heartbeat_interval,
            started=self._started,
            keep=self._keep_finished or DEFAULT_KEEP_FINISHED,
        )

    def _bind(self, context: zmq.Context[zmq.Socket[bytes]], directory: Path) -> None:
        router = context.socket(zmq.ROUTER)
        pub = context.socket(zmq.PUB)
        for sock in (router, pub):
            sock.setsockopt(zmq.LINGER, _LINGER_MS)
        router.setsockopt(zmq.MAXMSGSIZE, self._max_message_bytes + MAXMSGSIZE_MARGIN)
        pub.setsockopt(zmq.SNDHWM, PUB_SNDHWM)
        self._router, self._pub = router, pub
        if self._tcp_port is None:
            endpoints = [directory / "control.sock", directory / "events.sock"]
            for path in endpoints:
                if len(str(path)) > _IPC_PATH_MAX:
                    raise UsageError(
                        f"runtime dir {directory} is too long a path for a Unix socket "
                        f"({len(str(path))} > {_IPC_PATH_MAX} bytes); choose a shorter one "
                        "or use TCP"
                    )
                # We hold server.lock, so a socket file left here is a dead server's.
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            addresses = [f"ipc://{path}" for path in endpoints]
        elif self._tcp_port == 0:
            addresses = ["tcp://127.0.0.1:0", "tcp://127.0.0.1:0"]
        else:
            addresses = [
                f"tcp://127.0.0.1:{self._tcp_port}",
                f"tcp://127.0.0.1:{self._tcp_port + 1}",
            ]
        for sock, address in zip((router, pub), addresses, strict=True):
            try:
                sock.bind(address)
            except zmq.ZMQError as exc:
                raise UsageError(f"cannot listen on {address}: {exc}") from exc
            if address.startswith("ipc://"):
                os.chmod(address.removeprefix("ipc://"), 0o600)  # the dir is 0700 already

    @staticmethod
    def _endpoint(sock: zmq.Socket[bytes]) -> str:
        endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
        return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(signum: int, frame: FrameType | None) -> None:
            self.stop(signal.Signals(signum).name)

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        assert self._wakeup is not None
        previous_fd = signal.set_wakeup_fd(self._wakeup.write_fd, warn_on_full_buffer=False)
        try:
            yield
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _close_engine(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        try:
            self._await(engine.close())
        except Exception:
            _log.exception("closing the local engine failed")

    def _close_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def _remove_files(self, directory: Path) -> None:
        with self._pub_lock:  # a late fact from the engine must not meet a closing socket
            for sock in (self._router, self._pub):
                if sock is not None:
                    sock.close()
            self._router = self._pub = None
        names = ["server.json", "token"]
        if self._tcp_port is None:
            names += ["control.sock", "events.sock"]
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                (directory / name).unlink()

    def _close_pipe(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            wakeup.close()

    def _await(self, coro: Coroutine[Any, Any, _T]) -> _T:
        assert self._loop is not None
        return self._loop.run_until_complete(coro)

    # --- the loop -------------------------------------------------------------------

    def _serve(self) -> None:
        router = self._router
        assert router is not None
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        wakeup = self._wakeup
        assert wakeup is not None
        poller.register(wakeup.fileno(), zmq.POLLIN)
        self._next_beat = time.monotonic()
        with self._pub_lock:  # silence is measured from here, not from the constructor
            self._last_event = self._next_beat
            self._longest_silence = 0.0
        while not self._stop.is_set():
            try:
                self._turn(poller, router, wakeup)
            except Exception as exc:  # a bug: log it, and go on serving the others
                self._failures += 1
                _log.exception("the server loop failed (%s in a row)", self._failures)
                if self._failures >= _LOOP_FAILURES:
                    self.stop(
                        f"crashed: the server loop failed {self._failures} times in a row; "
                        f"the last: {type(exc).__name__}: {exc}"
                    )
            else:
                self._failures = 0

    def _turn(self, poller: zmq.Poller, router: zmq.Socket[bytes], wakeup: WakePipe) -> None:
        """One turn of the loop: a heartbeat when due, then what arrived, then the leases.

        Clients that gave the server up while it was silent are dealt with before
        anything else, on waking (and again at the start of the turn, for a stall
        in the middle of one): their work must stop before more is served.
        """
        self._end_lost_leases()
        now = time.monotonic()
        if now >= self._next_beat:
            self._publish(
                lambda seq: HeartbeatEvent(
                    server_id=self.server_id, seq=seq, interval=self._heartbeat_interval
                )
            )
            self._next_beat += self._heartbeat_interval
            if self._next_beat <= now:  # we fell behind; do not send a burst
                self._next_beat = now + self._heartbeat_interval
        timeout_ms = max(0, math.ceil((self._next_beat - time.monotonic()) * 1000))
        ready = dict(poller.poll(timeout_ms))
        self._end_lost_leases()
        if wakeup.fileno() in ready:
            wakeup.drain()
        if router in ready:
            for _ in range(_BATCH):
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_message(frames)
                if self._stop.is_set():
                    break
        now = time.monotonic()
        for ended in self._leases.expired(now):
            self._stop_work(ended)
        self._exit_if_unowned(now)

    # --- leases ---------------------------------------------------------------------

    def _silence(self) -> float:
        """The longest pause between events since the last call, up to now."""
        with self._pub_lock:
            silence = max(self._longest_silence, time.monotonic() - self._last_event)
            self._longest_silence = 0.0
        return silence

    def _end_lost_leases(self) -> None:
        for ended in self._leases.lost(self._silence()):
            self._stop_work(ended)

    def _stop_work(self, ended: Ended) -> None:
        """Stop the unfinished work of a lease that ended (failed, not cancelled, unless
        its client released it)."""
        engine = self._engine
        _log.info(
            "the lease of session %s %s (%s); stopping %s submission(s)",
            ended.session_tag,
            ended.why,
            ended.reason,
            len(ended.submissions),
        )
        self._leases.doom(ended)
        if engine is None:
            return
        for phase, submission_id in ended.submissions:
            # The pool names the plate in the facts it pushes; the key is all it needs.
            engine.cancel_now(Submission("", phase, submission_id))

    def _exit_if_unowned(self, now: float) -> bool:
        if not self._owned or self._stop.is_set():
            return self._stop.is_set()
        reason = self._leases.unowned(now)
        if reason is None:
            return False
        self.stop(f"unowned: {reason}")
        return True

    def _sink(self, fact: Fact) -> None:
        """The engine's fact sink: any thread; publishes at once, never blocks."""
        if isinstance(fact, TERMINAL_FACTS) and (key := submission_key(fact)) is not None:
            fact = self._leases.restate(fact)
            self._leases.finished(key)
        self._publish(lambda seq: FactEvent(server_id=self.server_id, seq=seq, fact=fact))

    def _farewell(self, reason: str) -> None:
        """Publish the stopping event, then nothing more (the pool's cancellations included)."""
        self._publish(
            lambda seq: StoppingEvent(
                server_id=self.server_id, seq=seq, reason=_cut(reason, MAX_REASON_LENGTH)
            ),
            last=True,
        )

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.wake()

    def _publish(
        self,
        make: Callable[[int], FactEvent | HeartbeatEvent | StoppingEvent],
        *,
        last: bool = False,
    ) -> None:
        """Number and send one event (any thread; the lock keeps seq order on the wire).

        ``last``: nothing is published after this one (set under the same lock, so
        that no fact from another thread slips in behind the stopping event).
        """
        with self._pub_lock:
            if self._muted:
                return
            self._muted = last
            now = time.monotonic()
            self._longest_silence = max(self._longest_silence, now - self._last_event)
            self._last_event = now
            seq = self._seq
            self._seq += 1  # a dropped event still uses its seq: that is how clients see a gap
            if self._pub is None:
                return
            try:
                self._pub.send(encode(make(seq)), zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                _log.warning("dropped event %s: %s", seq, exc)
            except Exception:  # an event that cannot be encoded: a bug, not a reason to stop
                _log.exception("could not publish event %s", seq)

    # --- requests -------------------------------------------------------------------

    def _on_message(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return  # a ROUTER always prepends the peer's identity; nothing to answer
        identity, body = frames[0], frames[1:]
        if len(body) == 2 and body[0] == b"":
            envelope = [identity, b""]  # a REQ client's delimiter: answer the same way
            body = body[1:]
        else:
            envelope = [identity]
        if len(body) != 1:
            reply = Reply(
                id=None, ok=False, error=f"expected one frame per request, got {len(body)}"
            )
        else:
            reply = self._answer(body[0])
        try:
            frame = encode(reply)
        except Exception:  # a bug: the reply cannot be encoded; say so rather than nothing
            _log.exception("could not encode the reply to %s", reply.id)
            frame = encode(Reply(id=None, ok=False, error="internal server error: bad reply"))
        assert self._router is not None
        try:
            self._router.send_multipart([*envelope, frame], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the peer is gone or not reading
            _log.info("could not reply to %s: %s", reply.id, exc)

    def _answer(self, frame: bytes) -> Reply:
        try:
            request = decode_request(frame, max_bytes=self._max_message_bytes)
        except WireError as exc:
            return Reply(id=exc.request_id, ok=False, error=str(exc))
        except Exception as exc:  # a bug in decoding: this request fails, nothing else
            _log.exception("decoding a request failed")
            return Reply(
                id=None, ok=False, error=f"internal server error: {type(exc).__name__}: {exc}"
            )
        try:
            return self._handle(request)
        except EngineError as exc:
            return Reply(id=request.id, ok=False, error=str(exc))
        except Exception as exc:
            _log.exception("request %s (%s) failed", request.id, request.type)
            return Reply(
                id=request.id,
                ok=False,
                error=f"internal server error: {type(exc).__name__}: {exc}",
            )

    def _handle(self, request: Request) -> Reply:
        engine = self._engine
        assert engine is not None
        if isinstance(request, PingRequest):
            return Reply(
                id=request.id,
                ok=True,
                result={"server_id": self.server_id, "protocol": PROTOCOL_VERSION},
            )
        if isinstance(request, CompileRequest | ExecuteRequest):
            return self._submit(engine, request)
        if isinstance(request, StatusRequest):
            facts = engine.status_now([_submission(s) for s in request.submissions])
            return Reply(id=request.id, ok=True, facts=tuple(self._leases.restated(facts)))
        if isinstance(request, CancelRequest):
            return self._cancel(engine, request)
        if isinstance(request, LeaseRequest):
            self._leases.renew(request.session, time.monotonic(), request.loss_timeout)
            return Reply(
                id=request.id,
                ok=True,
                result={
                    "server_id": self.server_id,
                    "grace": self._leases.grace,
                    "owned": self._owned,
                },
            )
        if isinstance(request, ReleaseRequest):
            ended = self._leases.release(request.session, lost=request.lost)
            if ended is not None:
                self._stop_work(ended)
            exiting = self._exit_if_unowned(time.monotonic())
            return Reply(
                id=request.id,
                ok=True,
                result={
                    "released": ended is not None,
                    "stopped": len(ended.submissions) if ended is not None else 0,
                    "exiting": exiting,
                },
            )
        if isinstance(request, ServerInfoRequest):
            info = engine.info_now()
            info.update(self._info())
            return Reply(id=request.id, ok=True, result=info)
        if isinstance(request, ShutdownRequest):
            if not hmac.compare_digest(request.token.encode(), self._token.encode()):
                return Reply(id=request.id, ok=False, error="wrong token")
            self.stop("shutdown requested")
            return Reply(id=request.id, ok=True)
        raise AssertionError(f"unhandled request {request!r}")  # pragma: no cover

    def _submit(self, engine: LocalEngine, request: CompileRequest | ExecuteRequest) -> Reply:
        phase: Literal["compile", "execute"]
        if isinstance(request, CompileRequest):
            phase, submission_id = "compile", request.job_id
        else:
            phase, submission_id = "execute", request.execution_id
        key: _Key = (phase, submission_id)
        if engine.knows(phase, submission_id):
            # Refused to the sender only: a rejected fact would tell the submission's
            # real owner that *its* submission was refused.
            return Reply(
                id=request.id,
                ok=False,
                error=f"duplicate submission: this server already has {key[0]} {key[1]!r}",
            )
        self._leases.submitted(request.session, key, time.monotonic())
        try:
            if isinstance(request, CompileRequest):
                engine.submit_compile_now(request.job_id, request.job)
            else:
                engine.submit_execution_now(request.execution_id, request.job, request.artifact_id)
        except BaseException:
            self._leases.finished(key)
            raise
        return Reply(id=request.id, ok=True)

    def _cancel(self, engine: LocalEngine, request: CancelRequest) -> Reply:
        submission = request.submission
        key = (submission.phase, submission.submission_id)
        owner = self._leases.owner(key)
        if owner is None:
            return Reply(id=request.id, ok=True)  # finished or unknown: nothing to cancel
        allowed = (
            request.session is not None
            and hmac.compare_digest(request.session.encode(), owner.encode())
        ) or (
            request.token is not None
            and hmac.compare_digest(request.token.encode(), self._token.encode())
        )
        if not allowed:
            return Reply(
                id=request.id,
                ok=False,
                error=(
                    f"not cancelled: {submission.phase} {submission.submission_id!r} belongs to "
                    "another session (a cancel needs the session that submitted it, or the "
                    "server's token)"
                ),
            )
        engine.cancel_now(_submission(submission))
        return Reply(id=request.id, ok=True)

    def _info(self) -> dict[str, JsonValue]:
        record = self._record
        return {
            "server_id": self.server_id,
            "seq": self._seq - 1,
            "pid": os.getpid(),
            "protocol": PROTOCOL_VERSION,
            "uptime": round(time.monotonic() - self._started, 3),
            "heartbeat_interval": self._heartbeat_interval,
            "control": record.control if record else None,
            "events": record.events if record else None,
            "runtime_dir": str(self._runtime_dir),
            "owned": self._owned,
            "lease_grace": self._leases.grace,
            "leases": self._leases.snapshot(time.monotonic()),
            "leases_ended": dict(self._leases.ended),
        }
