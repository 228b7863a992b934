"""Replay: rebuild a batch from its journal and check it reaches the same states.

Theory of operation: the batch is deterministic given its header, its facts
and the times the clock returned, all of which the journal records. Replay
feeds the recorded facts back at the recorded times and compares each
record it produces with the one on file, so a journal that does not match
this version of the machines fails loudly at the first record that differs
instead of silently producing other states.
"""

from __future__ import annotations

from collections.abc import Callable

from plateflow.core.batch import Batch
from plateflow.core.journal import Journal
from plateflow.errors import JournalError

__all__ = ["replay"]


def replay(
    journal: Journal, *, until: int | None = None, then: Callable[[], float] | None = None
) -> Batch:
    """A fresh batch that has handled the journal's facts (the first ``until`` of them).

    Raises ``JournalError`` naming the first record whose outcome differs. The
    batch's clock returns the recorded times during the replay and ``then``'s
    afterwards (a resumed batch goes on with a live clock); without ``then``
    the replayed batch cannot handle further facts.
    """
    header = journal.header
    records = journal.records if until is None else journal.records[:until]
    times = iter(r.time for r in records)

    def clock() -> float:
        recorded = next(times, None)
        if recorded is not None:
            return recorded
        if then is None:
            raise JournalError("a replayed batch has no clock of its own: pass replay(then=...)")
        return then()

    batch = Batch(
        header.batch_id,
        header.plate_ids,
        mode=header.mode,
        policy=header.policy,
        clock=clock,
        context=header.context,
    )
    for expected in records:
        batch.handle(expected.fact)
        got = batch.journal[-1]
        if (got.disposition, got.changes) != (expected.disposition, expected.changes):
            raise JournalError(
                f"record {expected.seq} ({expected.fact.kind}, stimulus "
                f"{expected.fact.stimulus_id!r}) replayed as {got.disposition.value} "
                f"with {len(got.changes)} change(s), but the journal says "
                f"{expected.disposition.value} with {len(expected.changes)}; the journal "
                "was written by different machines or was edited"
            )
    return batch
