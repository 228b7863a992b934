"""Progress projection: counts, fraction, ETA, and coalescing a flood into few host updates."""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plateflow.core.decisions import BatchChanged, PlateChanged, ProgressRecorded
from plateflow.core.tables import BatchMode, BatchState, PlateState
from plateflow.runtime import (
    Coalescer,
    CoalescingProgressEmitter,
    ProgressProjection,
    ProgressSnapshot,
    ThreadDispatcher,
)

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- the projection ------------------------------------------------------------------


def test_counts_fraction_and_eta() -> None:
    clock = FakeClock()
    projection = ProgressProjection(["a", "b", "c", "d"], clock=clock)
    first = projection.snapshot()
    assert first.counts[PlateState.IDLE] == 4
    assert sum(first.counts.values()) == 4
    assert (first.settled, first.total, first.fraction, first.eta) == (0, 4, 0.0, None)

    for plate in "abcd":
        projection.set_state(plate, PlateState.EXECUTING)
    projection.set_state("a", PlateState.COMPLETED)
    projection.set_state("b", PlateState.FAILED)
    projection.record("c", 1, 2, "half way")
    clock.now += 10.0
    snap = projection.snapshot()
    assert snap.counts[PlateState.EXECUTING] == 2
    assert snap.counts[PlateState.COMPLETED] == snap.counts[PlateState.FAILED] == 1
    assert snap.counts[PlateState.IDLE] == 0
    assert (snap.settled, snap.total) == (2, 4)
    assert snap.fraction == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert snap.elapsed == pytest.approx(10.0)
    # 62.5 % in 10 s: 37.5 % left at the same pace is 6 s.
    assert snap.eta == pytest.approx(6.0)
    plate_c = next(p for p in snap.plates if p.plate_id == "c")
    assert (plate_c.done, plate_c.total, plate_c.message, plate_c.fraction) == (
        1,
        2,
        "half way",
        0.5,
    )

    projection.set_state("c", PlateState.CANCELLED)
    projection.set_state("d", PlateState.COMPLETED)
    done = projection.snapshot()
    assert (done.settled, done.fraction, done.eta) == (4, 1.0, 0.0)


def test_progress_before_execution_and_out_of_range_records() -> None:
    projection = ProgressProjection(["a", "b"], clock=FakeClock())
    assert projection.record("a", 3, 4)  # kept, but a queued plate contributes nothing yet
    assert projection.snapshot().fraction == 0.0
    projection.set_state("a", PlateState.EXECUTING)
    assert projection.snapshot().fraction == pytest.approx(3 / 8)
    assert projection.record("a", 99, 4)  # clamped to total
    assert projection.snapshot().plates[0].done == 4
    assert not projection.record("a", 99, 4)  # no change
    assert not projection.record("zzz", 1, 2)  # unknown plate
    assert not projection.set_state("zzz", PlateState.FAILED)
    assert not projection.set_state("a", PlateState.EXECUTING)


def test_compile_only_batches_settle_on_compiled() -> None:
    projection = ProgressProjection(["a", "b"], mode=BatchMode.COMPILE_ONLY, clock=FakeClock())
    projection.set_state("a", PlateState.COMPILED)
    snap = projection.snapshot()
    assert (snap.settled, snap.fraction) == (1, 0.5)
    projection.reset(["x"], mode=BatchMode.RUN)
    projection.set_state("x", PlateState.COMPILED)
    assert projection.snapshot().settled == 0


def test_apply_folds_in_core_decisions() -> None:
    projection = ProgressProjection(["a"], clock=FakeClock())
    version = projection.version
    assert projection.apply(PlateChanged("a", PlateState.IDLE, PlateState.EXECUTING, "s1"))
    assert projection.apply(ProgressRecorded("a", 1, 4, "step 1", "s2"))
    assert not projection.apply(BatchChanged(BatchState.IDLE, BatchState.COMPILING, "s3"))
    assert projection.version == version + 2
    assert projection.snapshot().fraction == 0.25


def test_an_empty_batch_is_done() -> None:
    snap = ProgressProjection([], clock=FakeClock()).snapshot()
    assert (snap.total, snap.fraction, snap.eta) == (0, 1.0, 0.0)


# --- the coalescer -------------------------------------------------------------------


_OPS = st.lists(
    st.tuples(
        st.integers(0, 5),  # plate index (5 is not in the batch)
        st.one_of(
            st.sampled_from(list(PlateState)),
            st.tuples(st.integers(-3, 12), st.integers(-1, 10), st.sampled_from(["", "x"])),
        ),
    ),
    max_size=120,
)


@given(_OPS, st.sampled_from(list(BatchMode)))
def test_the_incremental_snapshot_equals_a_recomputation_from_scratch(
    ops: list[tuple[int, PlateState | tuple[int, int, str]]], mode: BatchMode
) -> None:
    plates = [f"p{i}" for i in range(5)]
    projection = ProgressProjection(plates, mode=mode, clock=lambda: 0.0)
    state = dict.fromkeys(plates, PlateState.IDLE)
    done = dict.fromkeys(plates, (0, 1, ""))
    for index, op in ops:
        plate = f"p{index}"
        if isinstance(op, PlateState):
            projection.set_state(plate, op)
            if plate in state:
                state[plate] = op
        else:
            projection.record(plate, *op)
            if plate in done:
                total = max(op[1], 1)
                done[plate] = (min(max(op[0], 0), total), total, op[2])
    settled = {s for s in PlateState if s.is_terminal}
    if mode is BatchMode.COMPILE_ONLY:
        settled.add(PlateState.COMPILED)

    def fraction_of(plate: str) -> float:
        if state[plate] in settled:
            return 1.0
        if state[plate] is PlateState.EXECUTING:
            return done[plate][0] / done[plate][1]
        return 0.0

    snap = projection.snapshot()
    assert [(p.plate_id, p.state, p.done, p.total, p.message, p.fraction) for p in snap.plates] == [
        (plate, state[plate], *done[plate], fraction_of(plate)) for plate in plates
    ]
    assert dict(snap.counts) == {s: sum(1 for p in plates if state[p] is s) for s in PlateState}
    assert snap.settled == sum(1 for p in plates if state[p] in settled)
    expected = sum(fraction_of(p) for p in plates) / len(plates)
    assert snap.fraction == pytest.approx(expected, abs=1e-9)
    assert (snap.fraction == 1.0) == (expected == 1.0)


def test_coalescer_leading_trailing_and_final() -> None:
    c = Coalescer(1.0)
    assert c.offer(0.0)  # the first change goes out at once
    assert not c.offer(0.2)
    assert not c.offer(0.9)
    assert c.due() == 1.0
    assert not c.tick(0.99)
    assert c.tick(1.0)  # the trailing emit carries both changes
    assert not c.pending
    assert c.due() is None
    assert not c.flush()  # nothing owed
    assert not c.offer(1.5)
    assert c.flush()  # the final emit
    assert c.emits == 3
    with pytest.raises(ValueError, match="positive"):
        Coalescer(0)


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=200))
def test_coalescer_never_emits_faster_than_its_interval_and_loses_nothing(
    offsets: list[float],
) -> None:
    interval = 1.0
    c = Coalescer(interval)
    emitted: list[float] = []
    owed = False
    for now in sorted(offsets):
        owed = not c.offer(now)
        if not owed:
            emitted.append(now)
    assert all(b >= a + interval for a, b in itertools.pairwise(emitted))
    if offsets:
        assert len(emitted) <= (max(offsets) - min(offsets)) / interval + 1
    # whatever arrived after the last emit is owed by flush, exactly once
    assert c.flush() == owed
    assert not c.pending
    assert not c.flush()


# --- the emitter ---------------------------------------------------------------------


def test_a_burst_of_100k_records_gives_a_bounded_number_of_host_updates() -> None:
    interval = 0.01
    plates = [f"p{i}" for i in range(10)]
    records = 100_000
    steps = records // len(plates)
    updates: list[tuple[float, ProgressSnapshot]] = []

    async def main() -> tuple[float, float, CoalescingProgressEmitter]:
        loop = asyncio.get_running_loop()
        projection = ProgressProjection(plates, clock=loop.time)
        readings = [0.0]

        def clock() -> float:  # the loop's clock, remembering what the emitter last read
            readings[0] = loop.time()
            return readings[0]

        emitter = CoalescingProgressEmitter(
            projection, lambda s: updates.append((readings[0], s)), interval=interval, clock=clock
        )
        for plate in plates:
            emitter.set_state(plate, PlateState.EXECUTING)
        began = loop.time()
        for n in range(records):
            emitter.record(plates[n % len(plates)], n // len(plates) + 1, steps, "working")
            if n % 500 == 0:
                await asyncio.sleep(0)  # the engine's reader yields between messages
        ended = loop.time()
        await asyncio.sleep(interval * 2)  # let the trailing emit fire
        emitter.flush()
        return began, ended, emitter

    began, ended, emitter = run(main())
    elapsed = ended - began + interval * 2
    bound = math.floor(elapsed / interval) + 1 + 1  # one per interval, the leading one, the final
    assert 2 <= len(updates) <= bound, (len(updates), bound, elapsed)
    assert len(updates) < records / 100
    times = [t for t, _ in updates]
    assert all(b >= a + interval for a, b in itertools.pairwise(times))
    last = updates[-1][1]
    assert last.fraction == 1.0  # the final update shows everything
    assert all(p.done == steps for p in last.plates)
    stats = emitter.statistics()
    assert stats.emits == len(updates)
    assert stats.changes == records + len(plates)
    assert not stats.pending
    assert not stats.timer_armed


def test_a_quiet_emitter_arms_no_timer_and_delivers_on_the_dispatcher_thread() -> None:
    seen: list[tuple[float, int]] = []

    async def main(dispatcher: ThreadDispatcher) -> CoalescingProgressEmitter:
        loop = asyncio.get_running_loop()
        clock = FakeClock()
        projection = ProgressProjection(["a", "b"], clock=clock)
        got_two = asyncio.Event()

        def emit(snapshot: ProgressSnapshot) -> None:
            seen.append((snapshot.fraction, threading.get_ident()))
            if len(seen) == 2:
                loop.call_soon_threadsafe(got_two.set)

        emitter = CoalescingProgressEmitter(
            projection, emit, interval=0.02, dispatcher=dispatcher, clock=clock
        )
        emitter.set_state("a", PlateState.EXECUTING)  # leading emit
        assert not emitter.statistics().timer_armed
        emitter.record("a", 1, 2)  # pending: the timer is armed once
        emitter.record("a", 1, 2)  # no change: nothing happens
        assert emitter.statistics().timer_armed
        clock.now += 0.02
        await asyncio.wait_for(got_two.wait(), 2)
        assert not emitter.statistics().timer_armed
        emitter.close()
        emitter.set_state("b", PlateState.COMPLETED)  # ignored after close
        return emitter

    with ThreadDispatcher() as dispatcher:
        emitter = run(main(dispatcher))
    assert [fraction for fraction, _ in seen] == [0.0, 0.25]
    assert {ident for _, ident in seen} == {dispatcher.thread_id}
    assert emitter.statistics().emits == 2


def test_emit_errors_go_to_on_error() -> None:
    errors: list[BaseException] = []

    def emit(snapshot: ProgressSnapshot) -> None:
        raise RuntimeError("host bug")

    async def main() -> None:
        emitter = CoalescingProgressEmitter(
            ProgressProjection(["a"]), emit, interval=0.01, on_error=errors.append
        )
        emitter.set_state("a", PlateState.QUEUED)

    run(main())
    assert [str(e) for e in errors] == ["host bug"]
