"""Leases: which client sessions still want their work done on this server.

Theory of operation: work belongs to the session that submitted it, and a
session keeps it only while it holds a *lease*. The client renews the lease
with small ``lease`` requests, each carrying the client's loss timeout (how
long it waits for an event before it reports the server, and the session's
work, lost). A lease ends in one of three ways, and the session's unfinished
submissions are stopped with it:

- **released**: the client said it is done (``release``); its work is
  cancelled, since the client asked for that;
- **expired**: nobody renewed it for the grace; its client is gone;
- **lost**: the server itself fell silent (stopped, swapped out, stalled) for
  longer than the client's loss timeout, so that client has already told its
  host the work failed (``engine_lost``). Work the host was told is lost must
  not go on running.

Work stopped because a lease expired or was lost was cancelled by nobody who
asked, so it must not be reported ``*_cancelled``: its cancellation fact is
*restated* as ``*_failed`` with the reason, both when it is published and
in later status answers (a host resuming later asks for exactly that).

This module is sans-IO: the server passes in the clock and the silence it
measured, and does the stopping itself. The book is shared by the server's
loop and the worker pool's watcher thread (terminal facts), hence its lock.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final, Literal

from pydantic import JsonValue

from plateflow.core.facts import CompileCancelled, ExecutionCancelled, Fact
from plateflow.engines.base import (
    TERMINAL_FACTS,
    Submission,
    failed_fact,
    status_fact,
    submission_key,
)

__all__ = [
    "DEFAULT_LEASE_GRACE",
    "Ended",
    "LeaseBook",
    "loss_threshold",
]

DEFAULT_LEASE_GRACE: Final = 60.0
"""Seconds a lease lasts without renewal."""
_LOSS_MARGIN: Final = 0.5
"""A session counts as lost a little before its client's timeout (at most this much,
and at most a quarter of it): a client that gave up a moment early must not find
its work still running."""
_CANCELLED: Final = (CompileCancelled, ExecutionCancelled)
_Key = tuple[Literal["compile", "execute"], str]
Why = Literal["released", "expired", "lost"]


def loss_threshold(loss_timeout: float, heartbeat_interval: float) -> float:
    """The server silence after which a client with ``loss_timeout`` has (or may have) given up.

    A little under the timeout, but never under one and a half heartbeat
    intervals: an ordinary pause between two heartbeats is no silence.
    """
    early = loss_timeout - min(_LOSS_MARGIN, loss_timeout / 4)
    return max(early, min(loss_timeout, 1.5 * heartbeat_interval))


def tag(session: str) -> str:
    """A short, stable name for a session that does not reveal it (for logs and info)."""
    return hashlib.sha256(session.encode()).hexdigest()[:8]


@dataclass(slots=True)
class _Lease:
    renewed: float
    """When the session last renewed it (monotonic seconds)."""
    loss_timeout: float | None
    """The client's loss timeout (None until a ``lease`` request said it)."""
    submissions: set[_Key] = field(default_factory=set)
    """Its submissions the server has not finished."""


@dataclass(frozen=True, slots=True)
class Ended:
    """A lease that ended, and the unfinished submissions to stop with it."""

    session_tag: str
    why: Why
    reason: str
    submissions: tuple[_Key, ...]


class LeaseBook:
    """Leases by session, owners by submission; thread-safe.

    ``grace`` is how long a lease lasts unrenewed; ``heartbeat_interval`` the
    server's, for :func:`loss_threshold`; ``started`` when the server started
    (monotonic); ``keep`` how many restated terminal facts are remembered for
    status answers.
    """

    def __init__(
        self, grace: float, *, heartbeat_interval: float, started: float, keep: int = 100_000
    ) -> None:
        if not (math.isfinite(grace) and grace > 0):
            raise ValueError(f"grace must be a positive number of seconds, got {grace}")
        self.grace = float(grace)
        self._heartbeat_interval = heartbeat_interval
        self._started = started
        self._keep = keep
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._owners: dict[_Key, str] = {}
        """The session that submitted each unfinished submission: who may cancel it."""
        self._doomed: dict[_Key, str] = {}
        """Submissions being stopped for an expired or lost lease: the failure to report."""
        self._restated: OrderedDict[_Key, Fact] = OrderedDict()
        """Their ``*_failed`` facts, once stopped (the newest ``keep``)."""
        self._ever_held = False
        self._last_ended: Ended | None = None
        self.ended = {"released": 0, "expired": 0, "lost": 0}
        """How many leases ended, by why."""

    # --- what clients do ----------------------------------------------------------------

    def renew(self, session: str, now: float, loss_timeout: float | None = None) -> None:
        """Take or renew ``session``'s lease (a submission renews it too, without a timeout)."""
        with self._lock:
            self._renew(session, now, loss_timeout)

    def submitted(self, session: str, key: _Key, now: float) -> None:
        """``session`` submitted ``key``: it owns it, and its lease is renewed."""
        with self._lock:
            self._owners[key] = session
            self._renew(session, now, None).submissions.add(key)

    def finished(self, key: _Key) -> None:
        """``key`` reached a terminal fact (or its submission failed to be taken)."""
        with self._lock:
            session = self._owners.pop(key, None)
            lease = self._leases.get(session) if session is not None else None
            if lease is not None:
                lease.submissions.discard(key)

    def owner(self, key: _Key) -> str | None:
        with self._lock:
            return self._owners.get(key)

    def release(self, session: str, *, lost: bool = False) -> Ended | None:
        """End ``session``'s lease at its client's request; None if it held none."""
        with self._lock:
            lease = self._leases.get(session)
            if lease is None:
                return None
            if lost:
                return self._end(
                    session,
                    "lost",
                    "its client gave the server up (engine_lost) and released the session",
                )
            return self._end(session, "released", "its client released the session")

    # --- what the server's loop does every turn -----------------------------------------

    def lost(self, silence: float) -> list[Ended]:
        """End the leases of clients that have given the server up after ``silence`` seconds
        without an event from it. Done first thing after the server wakes."""
        ended: list[Ended] = []
        with self._lock:
            for session, lease in list(self._leases.items()):
                timeout = lease.loss_timeout
                if timeout is None:
                    continue
                if silence > loss_threshold(timeout, self._heartbeat_interval):
                    reason = (
                        f"the server published nothing for {silence:.1f} s, longer than its "
                        f"client waits ({timeout:g} s): the client has reported it lost"
                    )
                    ended.append(self._end(session, "lost", reason))
        return ended

    def expired(self, now: float) -> list[Ended]:
        """End the leases nobody renewed for the grace."""
        ended: list[Ended] = []
        with self._lock:
            for session, lease in list(self._leases.items()):
                idle = now - lease.renewed
                if idle > self.grace:
                    reason = (
                        f"nobody renewed its lease for {idle:.1f} s (grace {self.grace:g} s): "
                        "its client is gone"
                    )
                    ended.append(self._end(session, "expired", reason))
        return ended

    def unowned(self, now: float) -> str | None:
        """Why a server started for a client should exit now; None while someone owns it."""
        with self._lock:
            if self._leases:
                return None
            last = self._last_ended
            if last is not None:
                return f"no client holds a lease any more (the last one {last.why}: {last.reason})"
            if not self._ever_held and now - self._started > self.grace:
                return f"no client took a lease within the grace of {self.grace:g} s"
            return None

    # --- the facts of stopped work ------------------------------------------------------

    def doom(self, ended: Ended) -> None:
        """Report the stopped submissions of an expired or lost lease as failed, not cancelled."""
        if ended.why == "released":
            return
        error = f"stopped by the server: the lease of its session ended ({ended.reason})"
        with self._lock:
            for key in ended.submissions:
                self._doomed[key] = error

    def restate(self, fact: Fact) -> Fact:
        """The fact to publish for ``fact`` (from the pool): a doomed cancellation fails."""
        key = submission_key(fact)
        if key is None or not isinstance(fact, TERMINAL_FACTS):
            return fact
        with self._lock:
            error = self._doomed.pop(key, None)
            if error is None or not isinstance(fact, _CANCELLED):
                return fact
            failed = failed_fact(_submission(fact, key), error)
            self._restated[key] = failed
            while len(self._restated) > self._keep:
                self._restated.popitem(last=False)
            return failed

    def restated(self, facts: list[Fact]) -> list[Fact]:
        """A status answer with every restated cancellation replaced by its failure."""
        with self._lock:
            if not self._restated:
                return facts
            out: list[Fact] = []
            for fact in facts:
                key = submission_key(fact)
                failed = self._restated.get(key) if key is not None else None
                if key is not None and failed is not None and isinstance(fact, _CANCELLED):
                    # A new report of the old failure: a new stimulus id, the first time.
                    again = status_fact(_submission(fact, key), terminal=failed, started=False)
                    out.append(again)
                else:
                    out.append(fact)
            return out

    # --- looking -----------------------------------------------------------------------

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._leases)

    def snapshot(self, now: float) -> list[JsonValue]:
        """The leases, for ``server_info``: never the sessions themselves."""
        with self._lock:
            return [
                {
                    "session": tag(session),
                    "renewed_ago": round(now - lease.renewed, 3),
                    "expires_in": round(self.grace - (now - lease.renewed), 3),
                    "loss_timeout": lease.loss_timeout,
                    "outstanding": len(lease.submissions),
                }
                for session, lease in self._leases.items()
            ]

    # --- under the lock -----------------------------------------------------------------

    def _renew(self, session: str, now: float, loss_timeout: float | None) -> _Lease:
        lease = self._leases.get(session)
        if lease is None:
            lease = self._leases[session] = _Lease(renewed=now, loss_timeout=loss_timeout)
            self._ever_held = True
        lease.renewed = max(lease.renewed, now)
        if loss_timeout is not None:
            lease.loss_timeout = loss_timeout
        return lease

    def _end(self, session: str, why: Why, reason: str) -> Ended:
        lease = self._leases.pop(session)
        # Owners stay until the terminal facts: a cancel from that session still counts.
        ended = Ended(tag(session), why, reason, tuple(sorted(lease.submissions)))
        self._last_ended = ended
        self.ended[why] += 1
        return ended


def _submission(fact: Fact, key: _Key) -> Submission:
    plate_id = getattr(fact, "plate_id", None)
    return Submission(str(plate_id), key[0], key[1])
