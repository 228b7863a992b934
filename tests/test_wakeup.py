"""WakePipe: one byte per batch of news, and never a lost wake-up."""

from __future__ import annotations

import os
import select
import threading

from hypothesis import given
from hypothesis import strategies as st

from plateflow.engines._wakeup import WakePipe


def readable(pipe: WakePipe) -> bool:
    ready, _, _ = select.select([pipe.fileno()], [], [], 0)
    return bool(ready)


def test_a_burst_of_wakes_writes_one_byte_and_drain_clears_it() -> None:
    pipe = WakePipe()
    try:
        assert not readable(pipe)
        for _ in range(1000):
            pipe.wake()
        assert pipe.pending
        assert os.read(pipe.fileno(), 4096) == b"!"
        os.write(pipe.write_fd, b"!")  # put it back, and drain as the consumer does
        pipe.drain()
        assert not pipe.pending
        assert not readable(pipe)
        pipe.wake()
        assert readable(pipe)
    finally:
        pipe.close()
    pipe.close()  # idempotent
    pipe.wake()  # closed: nothing to wake, and no error


# Each operation: a plain wake, or a drain during which another thread's wake lands
# after the consumer's n-th read (n = 0: before the first read).
_OPS = st.lists(st.one_of(st.just(None), st.integers(0, 3)), max_size=30)


@given(_OPS)
def test_a_wake_racing_a_drain_is_never_lost(ops: list[int | None]) -> None:
    pipe = WakePipe()
    real_read = os.read
    try:
        for op in ops:
            if op is None:
                pipe.wake()
                continue
            reads = 0

            def racing_read(fd: int, n: int, at: int = op) -> bytes:
                nonlocal reads
                if reads == at:
                    pipe.wake()  # the producer's wake, between the consumer's reads
                reads += 1
                return real_read(fd, n)

            pipe._read = racing_read
            pipe.drain()
            pipe._read = real_read
            # The invariant: a pending flag always has a byte behind it, so the next
            # wait returns; no flag, and the next wake writes one.
            assert not pipe.pending or readable(pipe)
        pipe.wake()
        assert readable(pipe), "a wake after this history would not wake the consumer"
    finally:
        pipe.close()


def test_many_producers_and_one_consumer_lose_nothing() -> None:
    pipe = WakePipe()
    items: list[int] = []
    lock = threading.Lock()
    total = 4 * 2000
    seen = 0
    try:

        def produce(base: int) -> None:
            for i in range(2000):
                with lock:
                    items.append(base + i)
                pipe.wake()

        producers = [threading.Thread(target=produce, args=(k * 10_000,)) for k in range(4)]
        for thread in producers:
            thread.start()
        while seen < total:
            ready, _, _ = select.select([pipe.fileno()], [], [], 10.0)
            assert ready, f"no wake-up within 10 s with {total - seen} items queued"
            pipe.drain()
            with lock:
                seen += len(items)
                items.clear()
        for thread in producers:
            thread.join(timeout=10)
        assert seen == total
    finally:
        pipe.close()
