"""A self-pipe that wakes a thread blocked in select/poll once per batch of news.

Theory of operation: producers (any thread) call :meth:`WakePipe.wake` after
they queued something; the consumer includes :meth:`fileno` in what it waits
on and calls :meth:`drain` when it is readable, *before* it reads its queues.
A write is a system call, so ``wake`` writes only when no wake-up is pending:
a burst of a thousand submissions costs one byte, not a thousand.

The invariant that makes this safe: *while the flag is set, a byte is in the
pipe or the consumer has yet to look at its queues*. ``drain`` therefore
empties the pipe first and clears the flag after. Cleared first, a byte
written between the two by a producer that saw the flag clear would be read
and thrown away with the flag left set, and every later ``wake`` would skip
its write: a lost wake-up, with news queued behind a sleeping consumer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import final

__all__ = ["WakePipe"]


@final
class WakePipe:
    """Wake one waiting thread; cheap to call often. Close it when done."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._pending = False
        self._read: Callable[[int, int], bytes] = os.read

    def fileno(self) -> int:
        """What the consumer waits on (readable when woken)."""
        return self._r

    @property
    def pending(self) -> bool:
        return self._pending

    @property
    def write_fd(self) -> int:
        """The write end, for ``signal.set_wakeup_fd`` (its bytes are drained like ours)."""
        return self._w

    def wake(self) -> None:
        """Make the consumer's wait return, unless a wake-up is already pending. Any thread."""
        if self._pending or self._w < 0:
            return
        self._pending = True
        with contextlib.suppress(OSError):  # a full pipe is a wake-up already; closed: no one
            os.write(self._w, b"!")

    def drain(self) -> None:
        """Consumer side: empty the pipe, then clear the flag. Read the queues after this."""
        with contextlib.suppress(BlockingIOError):
            while self._read(self._r, 4096):
                pass
        self._pending = False

    def close(self) -> None:
        """Close both ends (idempotent); a later ``wake`` does nothing."""
        r, w = self._r, self._w
        self._r = self._w = -1  # a closed fd number may be reused
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
