"""Hostile frames against one real ``plateflow serve``: answered, harmless, survived.

One module-scoped server subprocess (started by ``test_zmq_server.serving``, always
stopped) takes every frame of this module. A few frames that once were, or could have
been, fatal are sent one by one, each followed by a ping and a real batch; then
Hypothesis sends a few thousand hostile messages (``HYPOTHESIS_PROFILE=ci``; at least
100,000 under ``nightly``) from ``tests/wire_frames.py``, each checked against the
oracle there and followed by a ping, while a SUB watches for any fact. Nothing may be
acted on: no fact event, no changed ``server_info`` counter. At the end the server
must still be the same process, and a real plate must still compile and execute.

Every wait is bounded (``wire_frames.TIMEOUT``); the fuzz counts what it sent and
asserts a floor, so it cannot pass by sending nothing.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plateflow.core.facts import (
    CompileAccepted,
    CompileSucceeded,
    Fact,
)
from plateflow.engines.zmq.wire import FactEvent, PingRequest, encode
from plateflow.jobs import CompileJob
from plateflow.testing.plugin import PROFILE_ENV
from test_zmq_server import Client, Server, executed_in_order, serving
from wire_frames import (
    BOM,
    COUNTERS,
    HOSTILE_MESSAGES,
    FrameFuzzer,
    ServerGone,
    describe,
    expected_reply,
)

NIGHTLY_FLOOR = 100_000
"""Messages the nightly profile must send at least."""
COMPLETION = 0.95
"""The share of ``max_examples`` the floor counts on Hypothesis running (it may skip a
repeated example); the floor is ``COMPLETION x examples x the shortest list``."""


@dataclass(frozen=True)
class FuzzPlan:
    """How much to send: ``examples`` lists of ``min_messages`` to ``max_messages``."""

    examples: int
    min_messages: int
    max_messages: int

    @property
    def floor(self) -> int:
        return int(COMPLETION * self.examples * self.min_messages)


def fuzz_plan() -> FuzzPlan:
    """The profile's ``max_examples``; 10 to 14 messages each, or under ``nightly`` as many
    as it takes for the floor to reach :data:`NIGHTLY_FLOOR` (22 to 29 for 5,000)."""
    examples = settings().max_examples
    shortest = 10
    if os.environ.get(PROFILE_ENV) == "nightly":
        shortest = max(shortest, math.ceil(NIGHTLY_FLOOR / (COMPLETION * examples)))
    return FuzzPlan(examples, shortest, shortest + shortest // 4 + 2)


# --- the server (``work_dir``, ``plate`` and ``context`` are test_zmq_server's) -----------


@pytest.fixture(scope="module")
def server(work_dir: Path) -> Iterator[Server]:
    out = work_dir / "reports"
    out.mkdir()
    args = ("--workers", "2", "--heartbeat", "0.5", "--output-dir", str(out))
    with serving(work_dir / "run", *args) as running:
        yield running
    assert running.process.returncode == 0, running.log.read_text()


def _counters(client: Client) -> dict[str, Any]:
    info = client.server_info()
    return {name: info[name] for name in COUNTERS}


def _run_a_plate(client: Client, plate: CompileJob) -> list[Fact]:
    """Compile and execute ``plate``; check every fact of both, in order. Its facts."""
    before = _counters(client)
    executed_in_order(client, plate, client.compile(plate))
    compiled = [
        e.fact
        for e in client.events
        if isinstance(e, FactEvent) and isinstance(e.fact, CompileAccepted | CompileSucceeded)
    ]
    assert [type(f) for f in compiled] == [CompileAccepted, CompileSucceeded]
    after = _counters(client)
    assert after["remembered"] == before["remembered"] + 2, "one compile, one execution"
    assert (after["running"], after["queued"]) == (0, 0)
    seqs = [e.seq for e in client.events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no event missed"
    return [e.fact for e in client.events if isinstance(e, FactEvent)]


# --- one frame at a time -------------------------------------------------------------------

_PING = encode(PingRequest(id="lone"))
SINGLE_FRAMES: dict[str, tuple[bytes, str]] = {
    "5000-digit-v": (
        b'{"v":' + b"7" * 5_000 + b',"id":"x","type":"ping"}',
        "more than 4300 digits",
    ),
    "100000-brackets": (b"[" * 100_000, "nested deeper than"),
    "50000-objects": (b'{"a":' * 50_000, "nested deeper than"),
    "lone-surrogate-id": (
        b'{"v":3,"id":"\\ud800","type":"ping"}',
        "a \\u escape that is not a whole character",
    ),
    "bom-ping": (BOM + _PING, "starts with a byte-order mark"),
    "utf16-ping": (_PING.decode().encode("utf-16"), "not UTF-8"),
}
"""Each frame, and what its error reply must say."""


@pytest.mark.parametrize(("frame", "says"), SINGLE_FRAMES.values(), ids=SINGLE_FRAMES.keys())
def test_a_hostile_frame_is_refused_then_a_ping_and_a_plate_work(
    frame: bytes,
    says: str,
    server: Server,
    plate: CompileJob,
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    client = Client(context, server.record)
    try:
        client.wait_subscribed()
        before = _counters(client)
        client.send_frames([frame])
        reply = client.recv_reply()
        assert reply is not None, "no reply"
        assert (reply.ok, reply.id) == (False, None)
        assert says in reply.error
        expected = expected_reply([frame])
        assert (reply.id, reply.error) == (expected.id, expected.error)
        assert (reply.result, reply.facts) == (None, ())
        assert client.ping().ok
        assert _counters(client) == before, "nothing was acted on"
        assert [e for e in client.events if isinstance(e, FactEvent)] == []
        facts = _run_a_plate(client, plate)
        assert {getattr(f, "plate_id", None) for f in facts} == {plate.plate_id}
        assert server.process.poll() is None
    finally:
        client.close()


# --- Hypothesis ------------------------------------------------------------------------------


def test_hostile_messages_are_answered_change_nothing_and_the_server_still_works(
    server: Server, plate: CompileJob, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    plan = fuzz_plan()
    fuzzer = FrameFuzzer(context, server.record, alive=lambda: server.process.poll() is None)
    killer: list[list[bytes]] = []
    try:
        fuzzer.wait_subscribed()
        fuzzer.facts.clear()
        before = fuzzer.counters()
        started = time.monotonic()

        @settings(
            max_examples=plan.examples,
            deadline=None,
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
                HealthCheck.large_base_example,
                HealthCheck.filter_too_much,
            ],
        )
        @given(
            batch=st.lists(HOSTILE_MESSAGES, min_size=plan.min_messages, max_size=plan.max_messages)
        )
        def hostile_messages_are_answered(batch: list[list[bytes]]) -> None:
            if killer:  # the server is gone: fail at once, do not wait on every shrink
                raise ServerGone("the server process exited")
            for frames in batch:
                try:
                    problems = fuzzer.send(frames)
                except ServerGone:
                    killer.append(frames)
                    raise
                assert not problems, "\n".join(problems)
            problems = fuzzer.drain_events()
            assert not problems, "\n".join(problems)

        try:
            hostile_messages_are_answered()
        except ServerGone:
            raise AssertionError(
                f"the server exited after {describe(killer[0])}:\n{server.log.read_text()}"
            ) from None
        seconds = time.monotonic() - started
        stats = fuzzer.stats
        print(
            f"fuzz: {stats.messages:,} messages ({stats.parts:,} frames, {stats.bytes:,} B, "
            f"{stats.dropped:,} dropped by libzmq) and {stats.pings:,} pings in {seconds:.1f} s; "
            f"{plan}; {dict(stats.kinds.most_common())}"
        )
        assert stats.messages >= plan.floor, f"only {stats.messages} of {plan.floor} sent"
        assert stats.wrong == 0
        after = fuzzer.counters()
        assert fuzzer.settle_events(after["seq"]) == []
        assert fuzzer.facts == [], "a hostile message was acted on"
        assert {k: after[k] for k in COUNTERS} == {k: before[k] for k in COUNTERS}
        assert server.process.poll() is None
    finally:
        fuzzer.close()

    client = Client(context, server.record)
    try:
        client.wait_subscribed()
        assert client.ping().ok
        facts = _run_a_plate(client, plate)
        assert {getattr(f, "plate_id", None) for f in facts} == {plate.plate_id}
    finally:
        client.close()
    assert server.process.poll() is None, "the same server process, all along"
