"""Id factories: where stimulus and batch ids come from, injected by their owner.

Theory of operation: the core keeps no process-global counter. Whoever makes
facts owns an ``IdFactory`` (the service owns one and takes one as an
option, so a test can make every id it hands out predictable) and passes its
ids explicitly. A fact made without one (by an engine, or by hand) gets a
random 64-bit stimulus id (``random_id``): no shared state, and a collision
is about as likely as one in 10^8 among a million facts, so a journal entry
still traces back to exactly one fact.
"""

from __future__ import annotations

import itertools
import os

__all__ = ["IdFactory", "random_id"]


def random_id(prefix: str = "s") -> str:
    """A fresh random id (64 bits), for a fact whose maker has no ``IdFactory``."""
    return prefix + os.urandom(8).hex()


class IdFactory:
    """Hands out ``<prefix>.<n>`` for n = 1, 2, ...; safe to call from any thread.

    The default prefix is random, so two factories (two processes, two
    services) never hand out the same id; pass a fixed prefix to make ids
    predictable in tests.
    """

    def __init__(self, prefix: str | None = None) -> None:
        if prefix is not None and not prefix:
            raise ValueError("an IdFactory prefix must be a non-empty string")
        self.prefix = os.urandom(4).hex() if prefix is None else prefix
        # next() on itertools.count is one C call, atomic under the GIL.
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}.{next(self._counter)}"

    def __repr__(self) -> str:
        return f"IdFactory({self.prefix!r})"
