"""One bounded await, shared by the pollers and the submit/wait engine.

Theory of operation: nothing here may freeze because one call hangs (C7).
``asyncio.wait_for`` is not enough on its own: after the timeout it waits for
the cancelled operation to finish, so an operation that swallows or ignores
cancellation would hang the poller anyway. Here the operation runs as its
own task; on timeout it is cancelled and given a short grace period to
finish, and if it still has not, it is *abandoned* (kept referenced until it
ends, its outcome retrieved so asyncio does not warn) and the caller moves on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["PollTimeout", "call_bounded"]

T = TypeVar("T")

# Abandoned operations, kept alive until they end so they are not garbage-collected mid-run.
_abandoned: set[asyncio.Future[Any]] = set()


class PollTimeout(TimeoutError):
    """A fetch or status query did not finish within its timeout and was cancelled.

    ``abandoned`` is True when it ignored the cancellation too and was left
    running in the background (it can no longer deliver anything).
    """

    def __init__(self, what: str, timeout: float, *, abandoned: bool) -> None:
        self.what = what
        self.timeout = timeout
        self.abandoned = abandoned
        detail = "; it ignored cancellation and was abandoned" if abandoned else ""
        super().__init__(f"{what} did not finish within {timeout:g} s and was cancelled{detail}")


def _retrieve(future: asyncio.Future[Any]) -> None:
    _abandoned.discard(future)
    if not future.cancelled():
        future.exception()  # mark the outcome retrieved: a late failure is already reported


def _abandon(future: asyncio.Future[Any]) -> None:
    future.cancel()
    if future.done():
        _retrieve(future)
    else:
        _abandoned.add(future)
        future.add_done_callback(_retrieve)


async def call_bounded(
    make: Callable[[], Awaitable[T]], timeout: float, *, what: str, grace: float = 0.1
) -> T:
    """Await ``make()`` for at most ``timeout`` seconds (plus ``grace`` to let it cancel).

    Returns its result or raises its exception; raises ``PollTimeout`` when it
    took too long. If the caller is cancelled, the operation is cancelled too.
    """
    future = asyncio.ensure_future(make())
    try:
        await asyncio.wait({future}, timeout=timeout)
        if future.done():
            if future.cancelled():
                # Cancelled from inside, not by our caller: an error of the operation,
                # which must not look like the poller itself being cancelled.
                raise RuntimeError(f"{what} was cancelled from within")
            return future.result()
        future.cancel()
        await asyncio.wait({future}, timeout=grace)
    except asyncio.CancelledError:
        _abandon(future)
        raise
    abandoned = not future.done()
    _abandon(future)
    raise PollTimeout(what, timeout, abandoned=abandoned)
