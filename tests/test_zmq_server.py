"""The ZeroMQ execution server, as a real ``plateflow serve`` process, over raw sockets.

Every server a test starts runs in a subprocess and is always stopped (shutdown
with its token, then terminate, then kill, each bounded); the test talks to it
with a plain DEALER and SUB, and every receive has a timeout. Most tests share
one module-scoped server, so it starts once; the tests that stop a server start
their own.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from pydantic import BaseModel

from plateflow.cli import main
from plateflow.core.facts import (
    CompileAccepted,
    CompileSucceeded,
    ExecutionAccepted,
    ExecutionCancelled,
    ExecutionFailed,
    ExecutionProgress,
    ExecutionRejected,
    ExecutionStarted,
    ExecutionSucceeded,
    Fact,
)
from plateflow.engines.zmq import rundir
from plateflow.engines.zmq.server import MAXMSGSIZE_MARGIN
from plateflow.engines.zmq.wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    CancelRequest,
    CompileRequest,
    Event,
    ExecuteRequest,
    FactEvent,
    HeartbeatEvent,
    PingRequest,
    Reply,
    ServerInfoRequest,
    ShutdownRequest,
    StatusRequest,
    WireSubmission,
    decode_event,
    decode_reply,
    encode,
)
from plateflow.examples.platereader import demo_pipeline
from plateflow.jobs import CompileJob
from wire_frames import JOB as _JOB
from wire_frames import expected_error as _expected_error
from wire_frames import messages as _messages

TIMEOUT = 20.0
"""The longest any single wait may take before the test fails."""
HEARTBEAT = 0.2
TERMINAL = (ExecutionSucceeded, ExecutionFailed, ExecutionRejected, ExecutionCancelled)


# --- a server process and a raw client ---------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    runtime_dir: Path
    record: rundir.ServerRecord
    log: Path


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


def _sid(fact: Fact) -> str | None:
    return getattr(fact, "execution_id", None) or getattr(fact, "job_id", None)


class Client:
    """One DEALER and one SUB; every receive is bounded by a poller timeout."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], record: rundir.ServerRecord):
        self.dealer = context.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(record.control)
        self.sub = context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(record.events)
        self.events: list[Event] = []
        """Every event this client received, in order."""
        self.session = uuid.uuid4().hex
        """The secret this client submits with (and cancels with)."""

    def close(self) -> None:
        self.dealer.close(0)
        self.sub.close(0)

    def send_frames(self, frames: list[bytes]) -> None:
        self.dealer.send_multipart(frames)

    def recv_reply(self, timeout: float = TIMEOUT) -> Reply | None:
        if not self.dealer.poll(int(timeout * 1000)):
            return None
        return decode_reply(self.dealer.recv())

    def call(self, request: BaseModel, timeout: float = TIMEOUT) -> Reply:
        self.send_frames([encode(request)])
        reply = self.recv_reply(timeout)
        assert reply is not None, f"no reply to {request!r} within {timeout} s"
        assert reply.id == getattr(request, "id", None)
        return reply

    def next_event(self, timeout: float) -> Event | None:
        if not self.sub.poll(int(timeout * 1000)):
            return None
        event = decode_event(self.sub.recv())
        self.events.append(event)
        return event

    def wait_subscribed(self) -> None:
        """Wait for one heartbeat, so no event published after this is missed."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if isinstance(self.next_event(deadline - time.monotonic()), HeartbeatEvent):
                return
        raise AssertionError("no heartbeat arrived")

    def facts(self, *ids: str) -> list[Fact]:
        return [
            e.fact for e in self.events if isinstance(e, FactEvent) and _sid(e.fact) in set(ids)
        ]

    def wait_facts(
        self, predicate: Callable[[list[Fact]], bool], *ids: str, timeout: float = TIMEOUT
    ) -> list[Fact]:
        deadline = time.monotonic() + timeout
        while not predicate(self.facts(*ids)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; facts of {ids}: {self.facts(*ids)}")
            self.next_event(min(left, 0.5))
        return self.facts(*ids)

    def terminal(self, sid: str, timeout: float = TIMEOUT) -> Fact:
        facts = self.wait_facts(
            lambda fs: any(isinstance(f, TERMINAL) for f in fs), sid, timeout=timeout
        )
        (fact,) = [f for f in facts if isinstance(f, TERMINAL)]
        return fact

    def ping(self, timeout: float = TIMEOUT) -> Reply:
        return self.call(PingRequest(id=_new_id()), timeout)

    def compile(self, job: CompileJob) -> str:
        """Compile ``job``; return the artifact id."""
        job_id = _new_id()
        request = CompileRequest(id=_new_id(), session=self.session, job_id=job_id, job=job)
        assert self.call(request).ok
        facts = self.wait_facts(lambda fs: any(isinstance(f, CompileSucceeded) for f in fs), job_id)
        assert isinstance(facts[0], CompileAccepted)
        succeeded = facts[-1]
        assert isinstance(succeeded, CompileSucceeded)
        return succeeded.artifact_id

    def execute(self, job: CompileJob, artifact_id: str) -> str:
        execution_id = _new_id()
        request = ExecuteRequest(
            id=_new_id(),
            session=self.session,
            execution_id=execution_id,
            job=job,
            artifact_id=artifact_id,
        )
        assert self.call(request).ok
        return execution_id

    def server_info(self) -> dict[str, Any]:
        reply = self.call(ServerInfoRequest(id=_new_id()))
        assert reply.ok
        assert isinstance(reply.result, dict)
        return reply.result


def _ping_once(context: zmq.Context[zmq.Socket[bytes]], control: str, timeout: float) -> bool:
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(control)
        dealer.send(encode(PingRequest(id="ready")))
        if not dealer.poll(int(timeout * 1000)):
            return False
        return decode_reply(dealer.recv()).ok
    finally:
        dealer.close(0)


def _stop(server: subprocess.Popen[bytes], runtime_dir: Path) -> None:
    """Shutdown with the token, else terminate, else kill; every wait bounded."""
    if server.poll() is None:
        with contextlib.suppress(OSError, zmq.ZMQError, AssertionError):
            record = rundir.read_record(runtime_dir)
            assert record is not None
            context = zmq.Context()
            try:
                client = Client(context, record)
                token = rundir.read_token(runtime_dir)
                client.call(ShutdownRequest(id="stop", token=token), timeout=5)
                client.close()
            finally:
                context.term()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.terminate()
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=5)
    assert server.returncode is not None


@contextlib.contextmanager
def serving(runtime_dir: Path, *args: str) -> Iterator[Server]:
    """A ``plateflow serve`` subprocess, ready (it answered a ping), always stopped after."""
    log = runtime_dir.parent / f"{runtime_dir.name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "plateflow", "serve", "--runtime-dir", str(runtime_dir), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        context = zmq.Context()
        try:
            deadline = time.monotonic() + TIMEOUT
            while True:
                if process.poll() is not None:
                    raise AssertionError(f"the server exited early:\n{log.read_text()}")
                record = rundir.read_record(runtime_dir)
                if record is not None and _ping_once(context, record.control, 1.0):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"the server did not come up:\n{log.read_text()}")
                time.sleep(0.05)
        finally:
            context.term()
        yield Server(process, runtime_dir, record, log)
    finally:
        _stop(process, runtime_dir)


@pytest.fixture(scope="module")
def server(work_dir: Path) -> Iterator[Server]:
    out = work_dir / "reports"
    out.mkdir()
    args = ("--workers", "3", "--heartbeat", str(HEARTBEAT), "--output-dir", str(out))
    with serving(work_dir / "run", *args) as running:
        yield running
    assert running.process.returncode == 0, running.log.read_text()


@pytest.fixture
def client(context: zmq.Context[zmq.Socket[bytes]], server: Server) -> Iterator[Client]:
    c = Client(context, server.record)
    c.wait_subscribed()
    yield c
    c.close()


def _with_pipeline(job: CompileJob, pause_seconds: float) -> CompileJob:
    return job.model_copy(update={"pipeline": demo_pipeline(pause_seconds=pause_seconds)})


# --- the shared server ---------------------------------------------------------------------


def test_ping_answers_with_the_server_id_and_protocol(client: Client, server: Server) -> None:
    reply = client.ping()
    assert reply.ok
    assert reply.result == {"server_id": server.record.server_id, "protocol": PROTOCOL_VERSION}


def test_runtime_dir_is_private_token_is_0600_and_the_record_is_complete(server: Server) -> None:
    directory = server.runtime_dir
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "token").stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "server.json").stat().st_mode) == 0o600
    assert len(rundir.read_token(directory)) >= 32
    raw = json.loads((directory / "server.json").read_text())
    assert set(raw) == {
        "server_id",
        "pid",
        "control",
        "events",
        "protocol",
        "heartbeat_interval",
        "started_at",
        "workers",
    }
    record = server.record
    assert record.pid == server.process.pid
    assert record.workers == 3
    assert record.control == f"ipc://{directory / 'control.sock'}"
    assert record.events == f"ipc://{directory / 'events.sock'}"
    assert record.protocol == PROTOCOL_VERSION
    assert record.heartbeat_interval == HEARTBEAT
    assert rundir.server_alive(directory)


def executed_in_order(client: Client, plate: CompileJob, artifact: str) -> list[Fact]:
    """Execute compiled ``plate``; check its facts came in order and its report was written."""
    execution = client.execute(plate, artifact)
    assert isinstance(client.terminal(execution), ExecutionSucceeded)
    facts = client.facts(execution)
    assert isinstance(facts[0], ExecutionAccepted)
    assert isinstance(facts[1], ExecutionStarted)
    assert all(isinstance(f, ExecutionProgress) for f in facts[2:-1])
    assert len(facts) > 3
    result = facts[-1].result  # type: ignore[union-attr]
    assert isinstance(result, dict)
    assert Path(str(result["report"])).is_file()
    return facts


def test_compile_then_execute_publishes_the_facts_in_order_with_consecutive_seq(
    client: Client, server: Server, plate: CompileJob
) -> None:
    artifact = client.compile(plate)
    assert len(artifact) == 64
    assert client.compile(plate) == artifact, "artifacts are named by content"
    executed_in_order(client, plate, artifact)
    seqs = [e.seq for e in client.events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no gap, no reordering"
    assert {e.server_id for e in client.events} == {server.record.server_id}


def test_status_answers_for_many_ids_in_one_request(client: Client, plate: CompileJob) -> None:
    artifact = client.compile(plate)
    executions = [client.execute(plate, artifact) for _ in range(3)]
    for execution in executions:
        client.terminal(execution)
    unknown = _new_id()
    submissions = tuple(
        WireSubmission(plate_id=plate.plate_id, phase="execute", submission_id=sid)
        for sid in [*executions, unknown]
    )
    reply = client.call(StatusRequest(id=_new_id(), submissions=submissions))
    assert reply.ok
    assert sorted(_sid(f) or "" for f in reply.facts) == sorted(executions)
    assert all(isinstance(f, ExecutionSucceeded) for f in reply.facts)


def test_cancel_stops_only_that_execution(client: Client, plate: CompileJob) -> None:
    slow, short = _with_pipeline(plate, 30), _with_pipeline(plate, 1.5)
    slow_execution = client.execute(slow, client.compile(slow))
    short_execution = client.execute(short, client.compile(short))
    for execution in (slow_execution, short_execution):
        client.wait_facts(lambda fs: any(isinstance(f, ExecutionStarted) for f in fs), execution)
    submission = WireSubmission(
        plate_id=plate.plate_id, phase="execute", submission_id=slow_execution
    )
    started = time.monotonic()
    assert client.call(
        CancelRequest(id=_new_id(), submission=submission, session=client.session)
    ).ok
    assert isinstance(client.terminal(slow_execution), ExecutionCancelled)
    assert time.monotonic() - started < 5, "the step observed the cancel; no escalation needed"
    assert isinstance(client.terminal(short_execution), ExecutionSucceeded)
    again = client.call(CancelRequest(id=_new_id(), submission=submission, session=client.session))
    assert again.ok, "cancelling something finished is not an error"


def test_a_killed_worker_fails_only_its_execution_and_the_server_keeps_serving(
    client: Client, plate: CompileJob
) -> None:
    slow = _with_pipeline(plate, 30)
    execution = client.execute(slow, client.compile(slow))
    client.wait_facts(lambda fs: any(isinstance(f, ExecutionStarted) for f in fs), execution)
    (running,) = [
        r for r in client.server_info()["running_submissions"] if r["submission_id"] == execution
    ]
    os.kill(running["pid"], signal.SIGKILL)
    failed = client.terminal(execution)
    assert isinstance(failed, ExecutionFailed)
    assert failed.exit_code == -signal.SIGKILL
    assert "SIGKILL" in failed.error
    assert client.ping().ok
    assert isinstance(
        client.terminal(client.execute(plate, client.compile(plate))), ExecutionSucceeded
    )


def test_an_unknown_artifact_is_rejected_as_a_fact(client: Client, plate: CompileJob) -> None:
    execution = client.execute(plate, "no-such-artifact")
    rejected = client.terminal(execution)
    assert isinstance(rejected, ExecutionRejected)
    assert "unknown compile artifact" in rejected.error


def test_server_info_reports_the_engine_and_the_server(client: Client, server: Server) -> None:
    info = client.server_info()
    assert info["server_id"] == server.record.server_id
    assert info["pid"] == server.process.pid
    assert info["protocol"] == PROTOCOL_VERSION
    assert info["engine"] == "local"
    assert info["workers"] == 3
    assert info["uptime"] > 0
    assert info["seq"] >= client.events[-1].seq


def test_heartbeats_arrive_at_the_configured_interval(client: Client, server: Server) -> None:
    arrivals: list[tuple[float, HeartbeatEvent]] = []
    deadline = time.monotonic() + 10 * HEARTBEAT
    while time.monotonic() < deadline:
        event = client.next_event(deadline - time.monotonic())
        if isinstance(event, HeartbeatEvent):
            arrivals.append((time.monotonic(), event))
    assert 7 <= len(arrivals) <= 12
    assert all(event.interval == HEARTBEAT for _, event in arrivals)
    assert all(event.server_id == server.record.server_id for _, event in arrivals)
    seqs = [event.seq for _, event in arrivals]
    assert seqs == sorted(set(seqs))
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert max(gaps) < 3 * HEARTBEAT
    assert abs(sum(gaps) / len(gaps) - HEARTBEAT) < HEARTBEAT / 2


def test_a_multipart_request_gets_an_error_and_a_req_envelope_is_answered(
    client: Client,
) -> None:
    client.send_frames([b"one", b"two", b"three"])
    reply = client.recv_reply()
    assert reply is not None
    assert (reply.id, reply.ok) == (None, False)
    assert "expected one frame per request, got 3" in reply.error
    client.send_frames([b"", encode(PingRequest(id="req"))])  # what a REQ socket sends
    assert client.dealer.poll(int(TIMEOUT * 1000))
    delimiter, frame = client.dealer.recv_multipart()
    assert delimiter == b""
    assert decode_reply(frame).ok
    assert client.ping().ok


def test_a_frame_beyond_maxmsgsize_is_dropped_and_the_server_keeps_serving(
    client: Client, context: zmq.Context[zmq.Socket[bytes]], server: Server
) -> None:
    client.send_frames([b" " * (DEFAULT_MAX_MESSAGE_BYTES + MAXMSGSIZE_MARGIN + 1)])
    assert client.recv_reply(timeout=0.5) is None, "libzmq dropped it; nothing to answer"
    fresh = Client(context, server.record)
    try:
        assert fresh.ping().ok
    finally:
        fresh.close()
    assert client.ping().ok, "the dropped client reconnects"


def test_a_second_server_on_the_same_runtime_dir_refuses_to_start(server: Server) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "plateflow", "serve", "--runtime-dir", str(server.runtime_dir)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "already running" in lines[0]
    assert str(server.process.pid) in lines[0]
    assert rundir.read_record(server.runtime_dir) == server.record, "the live server is untouched"


# --- bad input, with Hypothesis ------------------------------------------------------------

# The strategies of bad frames live in wire_frames.py (the fuzz test and benchmark use them).


def test_bad_input_gets_an_error_reply_and_changes_nothing(
    client: Client, plate: CompileJob
) -> None:
    artifact = client.compile(plate)
    before = client.server_info()
    in_flight = client.execute(
        _with_pipeline(plate, 0.5), client.compile(_with_pipeline(plate, 0.5))
    )

    sent: list[list[bytes]] = []

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(frames=_messages)
    def bad_input_is_answered(frames: list[bytes]) -> None:
        expected_id, expected_error = _expected_error(frames)
        client.send_frames(frames)
        sent.append(frames)
        assert client.dealer.poll(int(TIMEOUT * 1000)), f"no reply to {frames!r:.300}"
        *_envelope, frame = client.dealer.recv_multipart()
        reply = decode_reply(frame)
        assert not reply.ok
        assert (reply.id, reply.error) == (expected_id, expected_error)
        assert reply.facts == ()
        assert reply.result is None

    bad_input_is_answered()
    assert len(sent) >= 150, "most examples reached the server"

    assert client.ping().ok
    assert isinstance(client.terminal(in_flight), ExecutionSucceeded), "no execution was lost"
    after_execution = client.execute(plate, artifact)
    assert isinstance(client.terminal(after_execution), ExecutionSucceeded)
    after = client.server_info()
    assert after["artifacts"] == before["artifacts"] + 1  # only the paused pipeline's
    assert after["running"] == 0
    assert after["queued"] == 0
    strays = [
        e.fact
        for e in client.events
        if isinstance(e, FactEvent) and getattr(e.fact, "plate_id", None) == _JOB.plate_id
    ]
    assert strays == [], "bad input submitted nothing"


# --- servers of their own ----------------------------------------------------------------


def test_shutdown_needs_the_token_and_then_stops_cleanly(
    tmp_path: Path, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    with serving(tmp_path / "run", "--heartbeat", "0.1") as running:
        client = Client(context, running.record)
        try:
            refused = client.call(ShutdownRequest(id="s1", token="guess"))
            assert (refused.ok, refused.error) == (False, "wrong token")
            assert client.ping().ok
            assert running.process.poll() is None
            token = rundir.read_token(running.runtime_dir)
            assert client.call(ShutdownRequest(id="s2", token=token)).ok
            assert running.process.wait(timeout=TIMEOUT) == 0
        finally:
            client.close()
        for name in ("server.json", "token", "control.sock", "events.sock"):
            assert not (running.runtime_dir / name).exists(), name
        assert not rundir.server_alive(running.runtime_dir)
    log = running.log.read_text()
    assert "server.json" in log
    assert "stopped" in log


def test_tcp_on_loopback_and_sigterm_stops_cleanly(
    tmp_path: Path, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    with serving(tmp_path / "run", "--tcp-port", "0") as running:
        record = running.record
        assert record.control.startswith("tcp://127.0.0.1:")
        assert record.events.startswith("tcp://127.0.0.1:")
        assert record.control != record.events
        client = Client(context, record)
        try:
            client.wait_subscribed()
            assert client.ping().ok
        finally:
            client.close()
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=TIMEOUT) == 0
        assert not (running.runtime_dir / "server.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--heartbeat", "0"], "heartbeat_interval must be a positive number"),
        (["--workers", "0"], "max_workers must be at least 1"),
        (["--tcp-port", "70000"], "tcp_port must be within"),
    ],
)
def test_bad_options_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["serve", "--runtime-dir", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert message in err[0]


def test_a_runtime_dir_others_can_enter_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    assert main(["serve", "--runtime-dir", str(shared)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "accessible to other users" in line
    assert list(shared.iterdir()) == []
