"""Core benchmark: plates through full lifecycles in one ``plateflow.core.Batch``.

Run it as a script from the project root::

    .venv/bin/python benchmarks/bench_core.py            # full run, about a minute
    .venv/bin/python benchmarks/bench_core.py --quick    # smoke run, under 20 s
    .venv/bin/python benchmarks/bench_core.py --profile  # cProfile of one N=1,000 lifecycle
    .venv/bin/python benchmarks/bench_core.py --journal-file  # cost of a journal file per fact

What one lifecycle is (RUN mode, abort policy, journal in memory as always):
``BatchStarted``; then, phase by phase over all N plates, ``CompileAccepted`` and
``CompileSucceeded`` (job ``{batch_id}.{i}.c``); the last ``CompileSucceeded`` crosses the
compile barrier and submits every execution; then ``ExecutionAccepted``,
``ExecutionStarted``, three ``ExecutionProgress`` (1/3, 2/3, 3/3) and ``ExecutionSucceeded``
(execution ``{batch_id}.{i}.x``); the last ``ExecutionSucceeded`` settles the batch.
That is 8 facts per plate plus one ``BatchStarted``, every one of them ``applied``
(checked after each run, outside the timed region).

How it measures:

* per fact: ``time.perf_counter_ns()`` around ``batch.handle(fact)`` alone, facts built
  beforehand; building each fact (pydantic validation) is timed separately. Three facts
  fan out to every plate and are reported per plate instead of entering the per-fact
  median: ``BatchStarted``, the barrier-crossing ``CompileSucceeded`` and the settling
  ``ExecutionSucceeded`` (which builds the batch summary).
* setup: ``Batch(...)`` construction and ``handle(BatchStarted())``, per plate, median of
  several repetitions (plate ids built beforehand). Repetitions of different sizes are
  interleaved, lifecycles too, so that load from other processes on this shared machine
  does not fall on one size only.
* memory: a separate pass under ``tracemalloc`` (never mixed with timing). The facts are
  built one at a time from fresh strings, as if they came off the wire, and only the
  batch keeps them (in its journal). Retained = traced memory after the lifecycle and a
  ``gc.collect()``, minus traced memory before the batch was built. The collector is
  paused while this untimed pass feeds the facts.
* context: one trigger of a plain two-state ``transitions`` machine, one move through a
  dict table and one ``TableMachine.fire`` (plateflow's wrapper) in the same process.

The garbage collector stays enabled in timed loops unless ``--gc-off`` is given; a
``gc.collect()`` precedes every timed section, and a full run adds one N=10,000 lifecycle
with the collector flipped (``gc_flipped_context``). All figures are medians. ``--quick``
times lifecycles at N=100 and 1,000 only (``fact_us_median`` then comes from N=1,000;
the key ``fact_us_median_sizes`` says which). The readable table goes to stderr; the
last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import itertools
import json
import os
import statistics
import sys
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from transitions import Machine

from _common import log, machine_info, profile_entries, source_info
from plateflow.core import (
    PLATE_TABLE,
    Batch,
    BatchMode,
    BatchStarted,
    BatchState,
    CompileAccepted,
    CompileSucceeded,
    Disposition,
    ExecutionAccepted,
    ExecutionProgress,
    ExecutionStarted,
    ExecutionSucceeded,
    PlateEvent,
    PlateState,
)
from plateflow.core.machines import TableMachine

SIZES = (100, 1_000, 10_000)
MEDIAN_POOL = (1_000, 10_000)  # fact_us_median: every fact of these runs (those timed)
PROGRESS_STEPS = 3
FACTS_PER_PLATE = 2 + 2 + PROGRESS_STEPS + 1
# Kinds whose handling fires a state-changing row (through transitions); the others
# (execution_started, execution_progress) take internal rows that stay in the dict table.
STATE_CHANGING = (
    "compile_accepted",
    "compile_succeeded",
    "execution_accepted",
    "execution_succeeded",
)

TARGET_FACT_US = 25.0
TARGET_SETUP_RATIO = 1.5
TARGET_BYTES_PER_PLATE = 8192

FactSpec = tuple[type[Any], dict[str, Any]]


@dataclass(frozen=True)
class Plan:
    lifecycle_reps: dict[int, int]
    setup_reps: dict[int, int]
    memory_sizes: tuple[int, ...]
    micro_loops: int
    micro_reps: int
    gc_context_n: int | None = None  # one extra lifecycle with the collector flipped


FULL = Plan(
    lifecycle_reps={100: 9, 1_000: 5, 10_000: 3},
    setup_reps={100: 41, 1_000: 15, 10_000: 9},
    memory_sizes=(100, 1_000, 10_000),
    micro_loops=200,
    micro_reps=81,
    gc_context_n=10_000,
)
# The tracemalloc pass at N=10,000 alone takes ~13 s here (tracing every allocation slows
# the core ~5x), so a quick run times lifecycles at N=100 and 1,000 only.
QUICK = Plan(
    lifecycle_reps={100: 3, 1_000: 2},
    setup_reps={100: 11, 1_000: 3, 10_000: 1},
    memory_sizes=(10_000,),
    micro_loops=200,
    micro_reps=15,
)


# --- the workload --------------------------------------------------------------------------


def plate_name(i: int) -> str:
    return f"plate-{i:05d}"


def plate_ids(n: int) -> tuple[str, ...]:
    return tuple(plate_name(i) for i in range(n))


def make_clock() -> Callable[[], float]:
    """A cheap deterministic clock: 0.0, 0.001, 0.002, ... (one C call, no syscall)."""
    return itertools.count(0.0, 0.001).__next__


def fact_specs(batch_id: str, n: int) -> Iterator[FactSpec]:
    """Every fact after ``BatchStarted``, phase by phase, as (class, fresh kwargs)."""
    for i in range(n):
        yield CompileAccepted, {"plate_id": plate_name(i), "job_id": f"{batch_id}.{i}.c"}
    for i in range(n):
        yield (
            CompileSucceeded,
            {"plate_id": plate_name(i), "job_id": f"{batch_id}.{i}.c", "artifact_id": f"art-{i}"},
        )
    for i in range(n):
        yield ExecutionAccepted, {"plate_id": plate_name(i), "execution_id": f"{batch_id}.{i}.x"}
    for i in range(n):
        yield ExecutionStarted, {"plate_id": plate_name(i), "execution_id": f"{batch_id}.{i}.x"}
    for step in range(1, PROGRESS_STEPS + 1):
        for i in range(n):
            yield (
                ExecutionProgress,
                {
                    "plate_id": plate_name(i),
                    "execution_id": f"{batch_id}.{i}.x",
                    "done": step,
                    "total": PROGRESS_STEPS,
                },
            )
    for i in range(n):
        yield (
            ExecutionSucceeded,
            {
                "plate_id": plate_name(i),
                "execution_id": f"{batch_id}.{i}.x",
                "result": {"index": i},
            },
        )


def check_lifecycle(batch: Batch, n: int) -> None:
    """The run measured what it claims: every fact applied, every plate completed."""
    if batch.state is not BatchState.COMPLETED:
        raise SystemExit(f"benchmark bug: batch ended {batch.state}, expected completed")
    stats = batch.statistics()
    expected = FACTS_PER_PLATE * n + 1
    if stats["facts"] != expected or stats["facts_per_disposition"] != {
        Disposition.APPLIED.value: expected
    }:
        raise SystemExit(f"benchmark bug: unexpected dispositions {stats}")
    if stats["plates_per_state"] != {PlateState.COMPLETED.value: n}:
        raise SystemExit(f"benchmark bug: unexpected plate states {stats['plates_per_state']}")


# --- timing ---------------------------------------------------------------------------------


@dataclass
class LifecycleTimes:
    n: int
    handle_ns: list[int] = field(default_factory=list)  # ordinary facts only
    by_kind_ns: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    construct_ns: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    start_ns: int = 0
    barrier_ns: int = 0
    settle_ns: int = 0
    total_ns: int = 0


def time_lifecycle(n: int, rep: int, gc_off: bool) -> LifecycleTimes:
    batch_id = f"b{n}r{rep}"
    out = LifecycleTimes(n)
    pc = time.perf_counter_ns

    facts = []
    for cls, kwargs in fact_specs(batch_id, n):
        t0 = pc()
        fact = cls(**kwargs)
        t1 = pc()
        out.construct_ns[fact.kind].append(t1 - t0)
        facts.append(fact)
    start = BatchStarted()
    kinds = [f.kind for f in facts]
    ids = plate_ids(n)
    after_ns = [0] * len(facts)
    states: list[BatchState] = [BatchState.IDLE] * len(facts)

    batch = Batch(batch_id, ids, mode=BatchMode.RUN, clock=make_clock())
    handle = batch.handle
    gc.collect()
    if gc_off:
        gc.disable()
    try:
        t_begin = pc()
        t0 = pc()
        handle(start)
        t1 = pc()
        out.start_ns = t1 - t0
        for k, fact in enumerate(facts):
            t0 = pc()
            handle(fact)
            t1 = pc()
            after_ns[k] = t1 - t0
            states[k] = batch.state
        out.total_ns = pc() - t_begin
    finally:
        if gc_off:
            gc.enable()
    check_lifecycle(batch, n)

    previous = BatchState.COMPILING
    for k, (ns, kind, state) in enumerate(zip(after_ns, kinds, states, strict=True)):
        if state is not previous:
            if previous is BatchState.COMPILING and state is BatchState.EXECUTING:
                out.barrier_ns = ns
            elif state is BatchState.COMPLETED:
                out.settle_ns = ns
            else:
                raise SystemExit(f"benchmark bug: batch moved {previous} -> {state} at fact {k}")
            previous = state
            continue
        out.handle_ns.append(ns)
        out.by_kind_ns[kind].append(ns)
    if not (out.barrier_ns and out.settle_ns):
        raise SystemExit("benchmark bug: the barrier or the settling fact was not seen")
    return out


@dataclass
class SetupTimes:
    n: int
    construct_ns: list[int] = field(default_factory=list)
    start_ns: list[int] = field(default_factory=list)
    setup_ns: list[int] = field(default_factory=list)


def time_setup(out: SetupTimes, ids: tuple[str, ...], rep: int, gc_off: bool) -> None:
    """One repetition: ``Batch(...)`` then ``handle(BatchStarted())``, appended to ``out``."""
    n = out.n
    pc = time.perf_counter_ns
    start = BatchStarted()
    clock = make_clock()
    gc.collect()
    if gc_off:
        gc.disable()
    try:
        t0 = pc()
        batch = Batch(f"s{n}r{rep}", ids, mode=BatchMode.RUN, clock=clock)
        t1 = pc()
        batch.handle(start)
        t2 = pc()
    finally:
        if gc_off:
            gc.enable()
    if batch.state is not BatchState.COMPILING:
        raise SystemExit(f"benchmark bug: batch is {batch.state} after BatchStarted")
    out.construct_ns.append(t1 - t0)
    out.start_ns.append(t2 - t1)
    out.setup_ns.append(t2 - t0)


def interleaved(reps: dict[int, int]) -> list[tuple[int, int]]:
    """(n, rep) pairs with each size's repetitions spread evenly over the whole schedule.

    The machine is shared: load from other processes comes and goes over seconds, so
    sizes are measured side by side rather than one after the other, and a busy spell
    does not land on one size only (which would fake a scaling effect).
    """
    slots = [((k + 0.5) / r, n, k) for n, r in reps.items() for k in range(r)]
    return [(n, k) for _, n, k in sorted(slots)]


def per_call_us(
    bodies: dict[str, tuple[Callable[[int], None], int, int]], loops: int, reps: int
) -> dict[str, float]:
    """Per call: median over ``reps`` rounds of ``body(loops * scale)`` / calls.

    ``bodies`` maps a name to (body, loop scale, calls per loop); the bodies take turns
    within each round so that load from other processes hits them alike.
    """
    pc = time.perf_counter_ns
    samples: dict[str, list[float]] = {name: [] for name in bodies}
    for _ in range(reps):
        for name, (body, scale, per_loop) in bodies.items():
            k = loops * scale
            t0 = pc()
            body(k)
            samples[name].append((pc() - t0) / (k * per_loop))
    return {name: statistics.median(values) / 1000.0 for name, values in samples.items()}


def micro_benchmarks(loops: int, reps: int) -> dict[str, float]:
    class Model:
        state: str

    model = Model()
    Machine(
        model=model,
        states=["a", "b"],
        transitions=[
            {"trigger": "go", "source": "a", "dest": "b"},
            {"trigger": "back", "source": "b", "dest": "a"},
        ],
        initial="a",
        auto_transitions=False,
    )

    def transitions_raw(k: int) -> None:
        go, back = model.go, model.back  # type: ignore[attr-defined]
        for _ in range(k):
            go()
            back()

    table = {("a", "go"): "b", ("b", "back"): "a"}

    def dict_table(k: int) -> None:
        state = "a"
        for _ in range(k):
            state = table[(state, "go")]
            state = table[(state, "back")]

    machine: TableMachine[PlateState, PlateEvent] = TableMachine(
        "plate", PLATE_TABLE, PlateState, PlateState.IDLE
    )
    fire = machine.fire

    def table_machine_fire(k: int) -> None:
        for _ in range(k):
            fire("p", PlateState.IDLE, PlateEvent.SELECTED, "s")
            fire("p", PlateState.QUEUED, PlateEvent.COMPILE_ACCEPTED, "s")

    def table_machine_internal(k: int) -> None:
        for _ in range(k):
            fire("p", PlateState.EXECUTING, PlateEvent.PROGRESS, "s")
            fire("p", PlateState.EXECUTING, PlateEvent.EXECUTION_STARTED, "s")

    pc = time.perf_counter_ns

    def timer(k: int) -> None:
        for _ in range(k):
            pc()
            pc()

    gc.collect()
    return per_call_us(
        {
            "transitions_raw_us": (transitions_raw, 1, 2),
            "dict_table_us": (dict_table, 20, 2),
            "table_machine_fire_us": (table_machine_fire, 1, 2),
            "table_machine_internal_us": (table_machine_internal, 20, 2),
            "timer_overhead_us": (timer, 20, 1),
        },
        loops,
        reps,
    )


# --- memory ---------------------------------------------------------------------------------


def retained_bytes(n: int) -> dict[str, int]:
    """Traced bytes a Batch of ``n`` plates retains after construction, start and lifecycle."""
    batch_id = f"m{n}"
    gc.collect()
    tracemalloc.start()
    try:
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        batch = Batch(batch_id, plate_ids(n), mode=BatchMode.RUN, clock=make_clock())
        gc.collect()
        constructed = tracemalloc.get_traced_memory()[0] - base
        batch.handle(BatchStarted())
        gc.collect()
        started = tracemalloc.get_traced_memory()[0] - base
        gc.disable()  # not a timed loop; saves ~10% of a slow pass. Collected right after.
        try:
            for cls, kwargs in fact_specs(batch_id, n):
                batch.handle(cls(**kwargs))
        finally:
            gc.enable()
        gc.collect()
        full, peak = tracemalloc.get_traced_memory()
        full -= base
        peak -= base
        check_lifecycle(batch, n)
        records = len(batch.journal)
        del batch
        gc.collect()
        leftover = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    return {
        "constructed": constructed,
        "started": started,
        "full": full,
        "peak": peak,
        "leftover_after_del": leftover,
        "journal_records": records,
    }


# --- reporting ------------------------------------------------------------------------------


def us(ns: float) -> float:
    return round(ns / 1000.0, 3)


def median_us(values: list[int]) -> float:
    return us(statistics.median(values))


def quantile_us(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return us(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def run(plan: Plan, quick: bool, gc_off: bool) -> dict[str, Any]:
    wall0 = time.perf_counter()
    load_at_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []
    log(f"bench_core: {'quick' if quick else 'full'} run, gc {'off' if gc_off else 'on'}")

    phases: dict[str, float] = {}
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = round(now - mark, 1)
        mark = now

    # Warm up: first-use costs (pydantic, transitions, enum caches) stay out of the figures.
    for rep in range(2):
        time_lifecycle(100, -1 - rep, gc_off)
    phase("warmup")

    micro = micro_benchmarks(plan.micro_loops, plan.micro_reps)
    phase("micro")

    lifecycles: dict[int, list[LifecycleTimes]] = {}
    timed = tuple(n for n in SIZES if n in plan.lifecycle_reps)
    for n in timed:
        lifecycles[n] = []
    for n, rep in interleaved(plan.lifecycle_reps):
        t = time_lifecycle(n, rep, gc_off)
        lifecycles[n].append(t)
        log(f"  lifecycle N={n:>6} rep {rep}: {t.total_ns / 1e9:6.2f} s in handle()")
    gc_context: dict[str, Any] = {}
    if plan.gc_context_n:
        # The fan-out facts allocate a lot at once and can trigger a full collection, which
        # walks every live object (the journal, and here the pre-built facts too). One
        # lifecycle with the collector flipped shows how much of a figure that is.
        n = plan.gc_context_n
        t = time_lifecycle(n, 99, not gc_off)
        gc_context = {
            "gc": "enabled" if gc_off else "disabled around timed loops",
            "n": n,
            "repetitions": 1,
            "fact_us_median": median_us(t.handle_ns),
            "start_us_per_plate": round(t.start_ns / n / 1000, 3),
            "barrier_us_per_plate": round(t.barrier_ns / n / 1000, 3),
            "settle_us_per_plate": round(t.settle_ns / n / 1000, 3),
            "lifecycle_us_per_plate": round(t.total_ns / n / 1000, 3),
        }
        log(f"  lifecycle N={n:>6} gc flipped: {t.total_ns / 1e9:6.2f} s in handle()")
    phase("lifecycles")

    setups = {n: SetupTimes(n) for n in SIZES}
    ids_by_n = {n: plate_ids(n) for n in SIZES}
    for n, rep in interleaved(plan.setup_reps):
        time_setup(setups[n], ids_by_n[n], rep, gc_off)
    log("  setup repetitions done (interleaved across sizes)")
    phase("setup")

    memory = {}
    for n in plan.memory_sizes:
        memory[n] = retained_bytes(n)
        log(f"  memory N={n:>6}: {memory[n]['full'] / n:,.0f} B/plate")
    phase("memory")

    pool_sizes = tuple(n for n in MEDIAN_POOL if n in lifecycles)
    pool = [ns for n in pool_sizes for t in lifecycles[n] for ns in t.handle_ns]
    pool_kinds: dict[str, list[int]] = defaultdict(list)
    pool_construct: dict[str, list[int]] = defaultdict(list)
    for n in pool_sizes:
        for t in lifecycles[n]:
            for kind, values in t.by_kind_ns.items():
                pool_kinds[kind].extend(values)
            for kind, values in t.construct_ns.items():
                pool_construct[kind].extend(values)
    construct_all = [ns for values in pool_construct.values() for ns in values]

    def per_plate(values: list[float], n: int) -> float:
        return round(statistics.median(values) / n / 1000.0, 3)

    setup_us = {n: per_plate(setups[n].setup_ns, n) for n in SIZES}
    construct_us = {n: per_plate(setups[n].construct_ns, n) for n in SIZES}
    start_us = {n: per_plate(setups[n].start_ns, n) for n in SIZES}
    barrier_us = {n: per_plate([t.barrier_ns for t in lifecycles[n]], n) for n in timed}
    settle_us = {n: per_plate([t.settle_ns for t in lifecycles[n]], n) for n in timed}
    lifecycle_us = {n: per_plate([t.total_ns for t in lifecycles[n]], n) for n in timed}
    big = SIZES[-1]
    big_timed = timed[-1]
    bytes_per_plate = {n: round(m["full"] / n) for n, m in memory.items()}

    fact_us = median_us(pool)
    # Half the facts of a lifecycle (started, progress) are internal moves that never reach
    # transitions, the other half move a plate through it: the distribution is bimodal and
    # its median sits in the gap between the modes. These two figures do not.
    kind_medians = {k: statistics.median(v) for k, v in pool_kinds.items()}
    kind_weighted = sum(kind_medians[k] * len(v) for k, v in pool_kinds.items()) / len(pool)
    moving = [ns for k in STATE_CHANGING for ns in pool_kinds.get(k, [])]
    setup_ratio = setup_us[big] / setup_us[SIZES[0]]
    targets_met = {
        "fact_us_median_le_25": fact_us <= TARGET_FACT_US,
        "setup_10000_le_1_5x_setup_100": setup_ratio <= TARGET_SETUP_RATIO,
        "bytes_per_plate_10000_le_8192": bytes_per_plate[big] <= TARGET_BYTES_PER_PLATE,
    }
    targets_met["all"] = all(targets_met.values())

    result: dict[str, Any] = {
        "benchmark": "bench_core",
        "mode": "quick" if quick else "full",
        "fact_us_median": fact_us,
        "fact_us_median_sizes": "+".join(map(str, pool_sizes)),
        "fact_us_median_pool": (
            f"every ordinary fact of the N={' and N='.join(map(str, pool_sizes))} runs "
            f"({len(pool)} facts; BatchStarted, barrier and settling facts excluded)"
        ),
        "fact_us_kind_weighted": us(kind_weighted),
        "fact_us_median_state_changing": median_us(moving),
        "fact_us_p25": quantile_us(pool, 0.25),
        "fact_us_p75": quantile_us(pool, 0.75),
        "fact_us_p90": quantile_us(pool, 0.90),
        "fact_us_p99": quantile_us(pool, 0.99),
        "fact_us_median_by_kind": {k: median_us(v) for k, v in sorted(pool_kinds.items())},
        "fact_us_median_by_kind_by_n": {
            str(n): {
                k: median_us([ns for t in lifecycles[n] for ns in t.by_kind_ns[k]])
                for k in sorted(pool_kinds)
            }
            for n in timed
        },
        "fact_us_median_by_n": {
            str(n): median_us([ns for t in lifecycles[n] for ns in t.handle_ns]) for n in timed
        },
        "fact_construct_us_median": median_us(construct_all),
        "fact_construct_us_median_by_kind": {
            k: median_us(v) for k, v in sorted(pool_construct.items())
        },
        "start_us_per_plate": start_us[big],
        "barrier_us_per_plate": barrier_us[big_timed],
        "settle_us_per_plate": settle_us[big_timed],
        "barrier_settle_n": big_timed,
        "start_us_per_plate_by_n": {str(n): v for n, v in start_us.items()},
        "barrier_us_per_plate_by_n": {str(n): v for n, v in barrier_us.items()},
        "settle_us_per_plate_by_n": {str(n): v for n, v in settle_us.items()},
        "lifecycle_us_per_plate_by_n": {str(n): v for n, v in lifecycle_us.items()},
        "gc_flipped_context": gc_context,
        "setup_us_per_plate_100": setup_us[100],
        "setup_us_per_plate_1000": setup_us[1_000],
        "setup_us_per_plate_10000": setup_us[big],
        "setup_ratio_10000_vs_100": round(setup_ratio, 3),
        "construct_us_per_plate_100": construct_us[100],
        "construct_us_per_plate_1000": construct_us[1_000],
        "construct_us_per_plate_10000": construct_us[big],
        "start_us_per_plate_100": start_us[100],
        "start_us_per_plate_1000": start_us[1_000],
        "start_us_per_plate_10000": start_us[big],
        "bytes_per_plate_10000": bytes_per_plate[big],
        "bytes_per_plate_by_n": {str(n): v for n, v in bytes_per_plate.items()},
        "bytes_per_plate_10000_after_construct": round(memory[big]["constructed"] / big),
        "bytes_per_plate_10000_after_start": round(memory[big]["started"] / big),
        "bytes_leftover_after_del_10000": memory[big]["leftover_after_del"],
        "journal_records_10000": memory[big]["journal_records"],
        "transitions_raw_us": round(micro["transitions_raw_us"], 3),
        "dict_table_us": round(micro["dict_table_us"], 4),
        "table_machine_fire_us": round(micro["table_machine_fire_us"], 3),
        "table_machine_internal_us": round(micro["table_machine_internal_us"], 3),
        "timer_overhead_us": round(micro["timer_overhead_us"], 4),
        "targets": {
            "fact_us_median": TARGET_FACT_US,
            "setup_ratio_10000_vs_100": TARGET_SETUP_RATIO,
            "bytes_per_plate_10000": TARGET_BYTES_PER_PLATE,
        },
        "targets_met": targets_met,
        "facts_per_plate": FACTS_PER_PLATE,
        "repetitions": {
            "lifecycle": {str(n): r for n, r in plan.lifecycle_reps.items()},
            "setup": {str(n): r for n, r in plan.setup_reps.items()},
        },
        "gc": (
            "disabled around timed loops (--gc-off); gc.collect() before each"
            if gc_off
            else "enabled during timed loops; gc.collect() before each timed section"
        ),
        "statistic": "median (p90/p99 for context)",
        "clock": "itertools.count(0.0, 0.001).__next__",
        "machine": machine_info(loadavg_1_5_15_at_start=load_at_start),
        "source": source_info("src/plateflow/core", "core_dirty"),
        "phases_s": phases,
        "wall_s": round(time.perf_counter() - wall0, 1),
    }
    print_table(result)
    return result


def print_table(r: dict[str, Any]) -> None:
    def mark(ok: bool) -> str:
        return "met" if ok else "MISSED"

    met = r["targets_met"]
    m = r["machine"]
    log()
    log(f"plateflow core benchmark ({r['mode']}), {r['wall_s']} s wall")
    log(f"machine: {m['cores']} cores, {m['cpu_model']}, Python {m['python']}, {m['platform']}")
    log(f"gc: {r['gc']}")
    log(
        f"load average (1/5/15 min) at start {m['loadavg_1_5_15_at_start']}, "
        f"at end {m['loadavg_1_5_15_at_end']}"
    )
    log(f"source: {r['source']}")
    log()
    log(f"{'figure':<44}{'value':>14}  {'target':<22}")
    log("-" * 86)
    rows: list[tuple[str, str, str]] = [
        (
            f"fact_us_median (handle, N={r['fact_us_median_sizes']})",
            f"{r['fact_us_median']:.2f} us",
            f"<= 25 us: {mark(met['fact_us_median_le_25'])}",
        ),
        ("  kind-weighted (sum of kind medians)", f"{r['fact_us_kind_weighted']:.2f} us", ""),
        (
            "  median, state-changing kinds",
            f"{r['fact_us_median_state_changing']:.2f} us",
            "",
        ),
        (
            "  p25 / p75",
            f"{r['fact_us_p25']:.1f}/{r['fact_us_p75']:.1f} us",
            "(bimodal: see docs)",
        ),
        ("  p90 / p99", f"{r['fact_us_p90']:.1f}/{r['fact_us_p99']:.1f} us", ""),
        ("fact_construct_us_median", f"{r['fact_construct_us_median']:.2f} us", ""),
        ("setup_us_per_plate_100", f"{r['setup_us_per_plate_100']:.2f} us", ""),
        ("setup_us_per_plate_1000", f"{r['setup_us_per_plate_1000']:.2f} us", ""),
        (
            "setup_us_per_plate_10000",
            f"{r['setup_us_per_plate_10000']:.2f} us",
            f"<= 1.5x N=100 ({r['setup_ratio_10000_vs_100']:.2f}x): "
            f"{mark(met['setup_10000_le_1_5x_setup_100'])}",
        ),
        ("  construct_us_per_plate 100/10000", _pair(r, "construct_us_per_plate"), ""),
        ("  start_us_per_plate 100/10000", _pair(r, "start_us_per_plate"), ""),
        (
            f"barrier_us_per_plate (N={r['barrier_settle_n']})",
            f"{r['barrier_us_per_plate']:.2f} us",
            "",
        ),
        (
            f"settle_us_per_plate (N={r['barrier_settle_n']})",
            f"{r['settle_us_per_plate']:.2f} us",
            "",
        ),
        (
            "bytes_per_plate_10000",
            f"{r['bytes_per_plate_10000']:,} B",
            f"<= 8192 B: {mark(met['bytes_per_plate_10000_le_8192'])}",
        ),
        ("  after construct / after start", _bytes_pair(r), ""),
        ("transitions_raw_us (2-state trigger)", f"{r['transitions_raw_us']:.2f} us", ""),
        ("table_machine_fire_us (state-changing)", f"{r['table_machine_fire_us']:.2f} us", ""),
        ("table_machine_internal_us (dest None)", f"{r['table_machine_internal_us']:.3f} us", ""),
        ("dict_table_us", f"{r['dict_table_us']:.3f} us", ""),
        ("timer_overhead_us (perf_counter_ns)", f"{r['timer_overhead_us']:.3f} us", ""),
        *_gc_rows(r["gc_flipped_context"]),
    ]
    for name, value, target in rows:
        log(f"{name:<44}{value:>14}  {target}")
    log()
    log(f"{'fact kind':<24}{'handle us':>12}{'construct us':>14}")
    for kind, value in r["fact_us_median_by_kind"].items():
        construct = r["fact_construct_us_median_by_kind"].get(kind, float("nan"))
        log(f"{kind:<24}{value:>12.2f}{construct:>14.2f}")
    log()
    log(f"{'N':>8}{'fact us':>10}{'lifecycle us/plate':>20}{'start us/plate':>16}")
    for n in r["lifecycle_us_per_plate_by_n"]:
        log(
            f"{n:>8}{r['fact_us_median_by_n'][n]:>10.2f}"
            f"{r['lifecycle_us_per_plate_by_n'][n]:>20.2f}{r['start_us_per_plate_by_n'][n]:>16.2f}"
        )
    log()
    log(f"targets met: {'all' if met['all'] else 'NOT all'}")


def _gc_rows(c: dict[str, Any]) -> list[tuple[str, str, str]]:
    if not c:
        return []
    head = f"gc {c['gc'].split()[0]}, N={c['n']}, 1 rep:"
    return [
        (head, "", ""),
        ("  fact_us_median", f"{c['fact_us_median']:.2f} us", ""),
        ("  start / barrier us per plate", _slash(c, "start", "barrier"), ""),
    ]


def _slash(c: dict[str, Any], a: str, b: str) -> str:
    return f"{c[a + '_us_per_plate']:.2f}/{c[b + '_us_per_plate']:.2f} us"


def _pair(r: dict[str, Any], key: str) -> str:
    return f"{r[key + '_100']:.2f}/{r[key + '_10000']:.2f} us"


def _bytes_pair(r: dict[str, Any]) -> str:
    a = r["bytes_per_plate_10000_after_construct"]
    b = r["bytes_per_plate_10000_after_start"]
    return f"{a:,}/{b:,} B"


# --- the journal file -----------------------------------------------------------------------

JOURNAL_MODES = ("memory", "flush", "fsync")
"""``memory``: the in-memory journal alone; ``flush``: plus a JournalFile writing and
flushing each record (the default of a batch given a journal); ``fsync``: plus an fsync."""


def journal_file_costs(n: int, reps: int, directory: str) -> dict[str, Any]:
    """``handle(fact)`` per ordinary fact with each journal mode, N plates, interleaved reps.

    The journal file listens to the batch's journal, so its write (and flush, and
    fsync) happen inside ``handle``: that is the cost a batch with a journal pays.
    """
    from plateflow.runtime.journal_file import JournalFile

    per_mode: dict[str, list[int]] = {mode: [] for mode in JOURNAL_MODES}
    lifecycle: dict[str, list[int]] = {mode: [] for mode in JOURNAL_MODES}
    pc = time.perf_counter_ns
    for rep in range(reps):
        for mode in JOURNAL_MODES:
            batch_id = f"j{mode}{rep}"
            facts = [cls(**kwargs) for cls, kwargs in fact_specs(batch_id, n)]
            batch = Batch(batch_id, plate_ids(n), mode=BatchMode.RUN, clock=make_clock())
            file = None
            if mode != "memory":
                path = os.path.join(directory, f"{batch_id}.jsonl")
                file = JournalFile.create(path, batch.journal.header, fsync=mode == "fsync")
                batch.journal.listen(file.append)
            handle = batch.handle
            gc.collect()
            begin = pc()
            handle(BatchStarted())
            times = per_mode[mode]
            for fact in facts:
                t0 = pc()
                handle(fact)
                times.append(pc() - t0)
            lifecycle[mode].append(pc() - begin)
            check_lifecycle(batch, n)
            if file is not None:
                file.close()
                if file.failed is not None or file.records != len(facts) + 1:
                    raise SystemExit(f"benchmark bug: journal file {file.failed or file.records}")
                os.unlink(path)
    medians = {mode: median_us(per_mode[mode]) for mode in JOURNAL_MODES}
    out: dict[str, Any] = {
        "benchmark": "bench_core.journal_file",
        "n": n,
        "repetitions": reps,
        "facts_per_mode": len(per_mode["memory"]),
        "fact_us_median": medians,
        "fact_us_p90": {mode: quantile_us(per_mode[mode], 0.9) for mode in JOURNAL_MODES},
        "file_us_per_fact": {
            mode: round(medians[mode] - medians["memory"], 3) for mode in ("flush", "fsync")
        },
        "lifecycle_ms_median": {
            mode: round(statistics.median(lifecycle[mode]) / 1e6, 2) for mode in JOURNAL_MODES
        },
        "directory": directory,
        "filesystem": _filesystem(directory),
    }
    log(f"journal file, N={n}, {reps} interleaved reps, {out['filesystem']} at {directory}:")
    for mode in JOURNAL_MODES:
        log(
            f"  {mode:<7} {medians[mode]:8.2f} us per fact (p90 {out['fact_us_p90'][mode]:.2f}),"
            f" lifecycle {out['lifecycle_ms_median'][mode]:.1f} ms"
        )
    return out


def _filesystem(directory: str) -> str:
    """The type of the filesystem ``directory`` is on (from /proc/mounts), or "unknown"."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                _, point, fstype, *_ = line.split()
                if os.path.realpath(directory).startswith(point) and len(point) > len(best):
                    best, kind = point, fstype
    except OSError:
        pass
    return kind


# --- profiling ------------------------------------------------------------------------------


def profile(n: int, top: int) -> dict[str, Any]:
    """cProfile one lifecycle of ``n`` plates (handle() calls only, start and barrier included)."""
    batch_id = f"p{n}"
    facts = [cls(**kwargs) for cls, kwargs in fact_specs(batch_id, n)]
    start = BatchStarted()
    batch = Batch(batch_id, plate_ids(n), mode=BatchMode.RUN, clock=make_clock())
    handle = batch.handle
    profiler = cProfile.Profile()
    gc.collect()
    profiler.enable()
    handle(start)
    for fact in facts:
        handle(fact)
    profiler.disable()
    check_lifecycle(batch, n)
    n_facts = len(facts) + 1

    rows = [
        {
            "function": function,
            "calls_per_fact": round(calls, 2),
            "tottime_us_per_fact": round(own, 3),
            "cumtime_us_per_fact": round(cum, 3),
        }
        for function, calls, own, cum in profile_entries(profiler, n_facts)
    ]
    total_us = sum(row["tottime_us_per_fact"] for row in rows)
    by_cum = sorted(rows, key=lambda row: -row["cumtime_us_per_fact"])[:top]
    by_tot = sorted(rows, key=lambda row: -row["tottime_us_per_fact"])[:top]
    for title, table in (("cumulative", by_cum), ("own time", by_tot)):
        log()
        log(f"top {top} by {title} (us per fact, {n_facts} facts, N={n}, profiler-inflated)")
        log(f"{'cum':>9}{'own':>9}{'calls/f':>9}  function")
        for row in table:
            log(
                f"{row['cumtime_us_per_fact']:>9.2f}{row['tottime_us_per_fact']:>9.2f}"
                f"{row['calls_per_fact']:>9.2f}  {row['function']}"
            )
    log()
    log(f"total profiled: {total_us:.1f} us per fact")
    return {
        "benchmark": "bench_core.profile",
        "n": n,
        "facts": n_facts,
        "profiled_us_per_fact": round(total_us, 2),
        "top_cumulative": by_cum,
        "top_own": by_tot,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, under 20 s")
    parser.add_argument(
        "--gc-off", action="store_true", help="disable the garbage collector in timed loops"
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        type=int,
        const=1_000,
        metavar="N",
        help="cProfile one lifecycle of N plates (default 1000) instead of benchmarking",
    )
    parser.add_argument("--top", type=int, default=25, help="rows per profile table")
    parser.add_argument(
        "--journal-file",
        nargs="?",
        const=".",
        metavar="DIR",
        help="measure a journal file's cost per fact (memory / flush / fsync), writing in "
        "DIR (default: the current directory, i.e. a real disk rather than a tmpfs)",
    )
    args = parser.parse_args(argv)
    if args.journal_file is not None:
        reps = 3 if args.quick else 7
        result = journal_file_costs(1_000, reps, os.path.abspath(args.journal_file))
    elif args.profile is not None:
        result = profile(args.profile, args.top)
    else:
        result = run(QUICK if args.quick else FULL, args.quick, args.gc_off)
    sys.stdout.flush()
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
