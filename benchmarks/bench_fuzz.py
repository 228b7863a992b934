"""Fuzz benchmark: N hostile frames against a real ``plateflow serve``, every answer checked.

Run it as a script from the project root::

    .venv/bin/python benchmarks/bench_fuzz.py --frames 100000            # about 5 minutes
    .venv/bin/python benchmarks/bench_fuzz.py --frames 5000 --seed 7      # under a minute

What it sends: the messages of ``tests/wire_frames.py`` (``HOSTILE_MESSAGES``, the same
strategies as ``tests/test_wire_fuzz.py``), drawn by Hypothesis driven from here: one
``@given`` function, generate phase only, no database, seeded with ``--seed``, each
example a list of ``--per-example`` messages. A "frame" below is one control message
as the server reads it (one request; a multipart message counts once, its parts are
``zmq_frames``). Valid ``compile``, ``execute``, ``cancel`` and ``shutdown`` requests
are never sent (``wire_frames.defang`` turns them into pings).

What it checks, after **every** frame: the reply the oracle predicts (``wire_frames.
expected_reply``: the server's decoder in this process, checked against an independent
reading of the protocol's bounds), or for a frame above the limit + 64 KiB, libzmq's
disconnect and no reply (the next frame goes on a fresh DEALER); then a ping, answered.
After every example: the events a SUB saw (heartbeats only, no gap in ``seq``) and the
``server_info`` counters (``artifacts``, ``running``, ``queued``, ``remembered``), which
must not move.

What it reports: ``server_crashes`` (the server process exited; a new one is started
and the run goes on), ``acted_on_invalid`` (fact events seen plus counter changes
seen), ``wrong_replies`` (frames whose reply or ping was not what the oracle says),
the server's ``VmRSS`` from ``/proc/PID/status`` after start-up (one ping and
``server_info``) and after the last frame, its peak (``VmHWM``) and its RSS every
10,000 frames (MB = 10^6 bytes); ``client_rss_peak_mb`` is this process's own peak.
The readable lines go to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import zmq
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from _common import loadavg, log, machine_info, source_info

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))  # the strategies and the server helper are the tests'

from test_zmq_server import Server, serving  # noqa: E402
from wire_frames import (  # noqa: E402
    COUNTERS,
    HOSTILE_MESSAGES,
    FrameFuzzer,
    FuzzStats,
    ServerGone,
    describe,
)

PER_EXAMPLE = 10
"""Messages per Hypothesis example (the tests' ci profile draws 10 to 14)."""
RSS_EVERY = 10_000
PROBLEMS_KEPT = 20
SERVER_ARGS = ("--heartbeat", "0.5")


def status_kib(name: str, pid: int) -> int | None:
    """A ``kB`` field of ``/proc/PID/status`` (VmRSS, VmHWM), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def running(server: Server) -> Callable[[], bool]:
    """Whether ``server``'s process still runs (ends the fuzzer's waits at once if not)."""
    return lambda: server.process.poll() is None


def mb(kib: int | None) -> float | None:
    return None if kib is None else round(kib * 1024 / 1e6, 1)


@dataclass
class Tally:
    """Everything counted over the run, across servers if one crashed."""

    frames: int = 0
    sent: FuzzStats = field(default_factory=FuzzStats)
    """What every fuzzer sent and saw (each one counts into it)."""
    wrong_replies: int = 0
    fact_events: int = 0
    counter_changes: int = 0
    event_problems: int = 0
    server_crashes: int = 0
    examples: int = 0
    problems: list[str] = field(default_factory=list)
    rss_mb: dict[int, float | None] = field(default_factory=dict)

    def note(self, problems: list[str]) -> None:
        room = PROBLEMS_KEPT - len(self.problems)
        self.problems += [p[:600] for p in problems[: max(0, room)]]


class Crashed(Exception):
    """The server exited; carries the message that was in flight."""


def drive(fuzzer: FrameFuzzer, server: Server, tally: Tally, budget: int, run_seed: int) -> None:
    """Send hostile messages until ``tally.frames`` reaches ``budget`` (or Hypothesis stops)."""
    baseline = fuzzer.counters()
    pid = server.process.pid
    gone: list[list[bytes]] = []

    @seed(run_seed)
    @settings(
        max_examples=-(-(budget - tally.frames) // PER_EXAMPLE),
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(HOSTILE_MESSAGES, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def example(batch: list[list[bytes]]) -> None:
        nonlocal baseline
        if gone:
            raise Crashed  # Hypothesis replays a failing example: do not send it again
        tally.examples += 1
        for frames in batch:
            if tally.frames >= budget:
                return
            before = fuzzer.stats.wrong
            try:
                problems = fuzzer.send(frames)
            except ServerGone:
                gone.append(frames)
                raise Crashed from None
            tally.frames += 1
            if fuzzer.stats.wrong > before:
                tally.wrong_replies += 1
                tally.note(problems)
            if tally.frames % RSS_EVERY == 0:
                tally.rss_mb[tally.frames] = mb(status_kib("VmRSS", pid))
                log(
                    f"  {tally.frames:>8,} frames  RSS {tally.rss_mb[tally.frames]} MB  "
                    f"wrong {tally.wrong_replies}  acted on {tally.fact_events}"
                    f"+{tally.counter_changes}"
                )
        events = fuzzer.drain_events()
        if events:
            tally.event_problems += len(events)
            tally.note(events)
        tally.fact_events = len(fuzzer.facts)
        now = fuzzer.counters()
        if {k: now[k] for k in COUNTERS} != {k: baseline[k] for k in COUNTERS}:
            tally.counter_changes += 1
            tally.note([f"server_info counters moved: {baseline} -> {now}"])
            baseline = now

    try:
        example()
    except Crashed:
        tally.server_crashes += 1
        tally.note([f"the server exited after {describe(gone[0]) if gone else 'a message'}"])


def run(frames: int, run_seed: int) -> dict[str, Any]:
    load_at_start = loadavg()
    wall0 = time.perf_counter()
    tally = Tally()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    tmp = Path(tempfile.mkdtemp(prefix="pfz-"))  # short: Unix socket paths are limited
    rss_before = rss_after = rss_peak = None
    fuzz_seconds = 0.0
    servers = 0
    settled: list[str] = []
    try:
        while tally.frames < frames and tally.server_crashes <= 3:
            servers += 1
            out = tmp / f"out{servers}"
            out.mkdir()
            args = (*SERVER_ARGS, "--output-dir", str(out))
            with serving(tmp / f"run{servers}", *args) as server:
                pid = server.process.pid
                fuzzer = FrameFuzzer(
                    context, server.record, alive=running(server), stats=tally.sent
                )
                try:
                    fuzzer.wait_subscribed()
                    fuzzer.facts.clear()
                    if rss_before is None:
                        fuzzer.counters()
                        rss_before = mb(status_kib("VmRSS", pid))
                        log(f"bench_fuzz: {frames:,} frames, seed {run_seed}; server pid {pid}, "
                            f"RSS {rss_before} MB")  # fmt: skip
                    started = time.perf_counter()
                    crashes = tally.server_crashes
                    attempt = 0
                    while tally.frames < frames and tally.server_crashes == crashes:
                        drive(fuzzer, server, tally, frames, run_seed + attempt)
                        attempt += 1  # Hypothesis ran fewer examples than asked: reseed
                    fuzz_seconds += time.perf_counter() - started
                    if server.process.poll() is None:
                        after = fuzzer.counters()
                        settled = fuzzer.settle_events(after["seq"])
                        tally.fact_events = len(fuzzer.facts)
                        rss_after = mb(status_kib("VmRSS", pid))
                        rss_peak = mb(status_kib("VmHWM", pid))
                finally:
                    fuzzer.close()
    finally:
        context.term()
        shutil.rmtree(tmp, ignore_errors=True)
    tally.note(settled)
    acted = tally.fact_events + tally.counter_changes
    growth = None if rss_before is None or rss_after is None else round(rss_after - rss_before, 1)
    return {
        "benchmark": "bench_fuzz",
        "frames": tally.frames,
        "seconds": round(fuzz_seconds, 1),
        "frames_per_s": round(tally.frames / fuzz_seconds) if fuzz_seconds else None,
        "ms_per_frame": round(fuzz_seconds * 1000 / tally.frames, 3) if tally.frames else None,
        "server_crashes": tally.server_crashes,
        "acted_on_invalid": acted,
        "fact_events": tally.fact_events,
        "counter_changes": tally.counter_changes,
        "wrong_replies": tally.wrong_replies,
        "event_problems": tally.event_problems + len(settled),
        "problems_sample": tally.problems,
        "rss_before_mb": rss_before,
        "rss_after_mb": rss_after,
        "rss_growth_mb": growth,
        "rss_peak_mb": rss_peak,
        "rss_mb_every_10000": {str(k): v for k, v in tally.rss_mb.items()},
        "client_rss_peak_mb": mb(status_kib("VmHWM", os.getpid())),
        "zmq_frames": tally.sent.parts,
        "bytes_sent": tally.sent.bytes,
        "pings": tally.sent.pings,
        "dropped_by_libzmq": tally.sent.dropped,
        "fresh_sockets": tally.sent.fresh_sockets,
        "kinds": dict(tally.sent.kinds.most_common()),
        "config": {
            "seed": run_seed,
            "messages_per_example": PER_EXAMPLE,
            "examples": tally.examples,
            "servers_started": servers,
            "server_args": " ".join(SERVER_ARGS) + " --output-dir TMP (IPC, default limits)",
            "hypothesis": hypothesis.__version__,
            "check": "oracle reply (or drop + fresh DEALER) and a ping after every frame; "
            "events and server_info counters after every example",
        },
        "machine": machine_info(
            loadavg_1_5_15_at_start=load_at_start, pyzmq=zmq.__version__, libzmq=zmq.zmq_version()
        ),
        "source": source_info("src", "src_dirty"),
        "wall_s": round(time.perf_counter() - wall0, 1),
    }


def report(r: dict[str, Any]) -> None:
    log()
    log(f"frames            {r['frames']:,} in {r['seconds']} s ({r['frames_per_s']}/s)")
    log(f"server crashes    {r['server_crashes']}")
    log(f"acted on invalid  {r['acted_on_invalid']} (facts {r['fact_events']}, "
        f"counter changes {r['counter_changes']})")  # fmt: skip
    log(f"wrong replies     {r['wrong_replies']}")
    log(f"server RSS        {r['rss_before_mb']} -> {r['rss_after_mb']} MB "
        f"(growth {r['rss_growth_mb']}, peak {r['rss_peak_mb']})")  # fmt: skip
    log(f"dropped by libzmq {r['dropped_by_libzmq']:,}; kinds: {r['kinds']}")
    for problem in r["problems_sample"]:
        log(f"  ! {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--frames", type=int, default=10_000, help="how many (default 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed (default 0)")
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error("--frames must be at least 1")
    result = run(args.frames, args.seed)
    report(result)
    sys.stdout.flush()
    print(json.dumps(result, separators=(",", ":")))
    ok = result["server_crashes"] == 0 and result["acted_on_invalid"] == 0
    return 0 if ok and result["wrong_replies"] == 0 and result["frames"] >= args.frames else 1


if __name__ == "__main__":
    sys.exit(main())
