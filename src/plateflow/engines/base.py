"""The engine interface: what the service needs from anything that runs plates.

Theory of operation: an engine accepts submissions and *pushes facts* back
through a sink it is given at start. The service calls the engine's methods
from its own event loop; the engine may push from any thread (a socket
reader, a process watcher), and the sink is safe to call from anywhere: it
only posts the fact into the service's loop (guarantee C6). Submissions are
named by ids the batch issued, so the engine never invents identities; an
engine that cannot take a submission pushes a ``*Rejected`` fact rather than
raising, and raises only when it is itself unusable.

Engines never import the service; the service never imports a concrete
engine. Third-party exceptions are translated at this boundary into
``EngineError`` with the original chained.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from pydantic import JsonValue

from plateflow.core.facts import (
    CompileAccepted,
    CompileCancelled,
    CompileFailed,
    CompileRejected,
    CompileSucceeded,
    ExecutionAccepted,
    ExecutionCancelled,
    ExecutionFailed,
    ExecutionRejected,
    ExecutionStarted,
    ExecutionSucceeded,
    Fact,
)
from plateflow.errors import PlateflowError
from plateflow.jobs import CompileJob

__all__ = [
    "TERMINAL_FACTS",
    "Engine",
    "EngineError",
    "FactSink",
    "Recovered",
    "Submission",
    "cancelled_fact",
    "failed_fact",
    "status_fact",
    "submission_key",
]

FactSink = Callable[[Fact], None]
"""Where an engine pushes facts. Thread-safe; never blocks; never raises."""


class EngineError(PlateflowError):
    """The engine cannot be used at all (it failed to start, its server is gone)."""


@dataclass(frozen=True, slots=True)
class Submission:
    """One submission the batch made: a compile job or an execution."""

    plate_id: str
    phase: Literal["compile", "execute"]
    submission_id: str


TERMINAL_FACTS: Final = (
    CompileSucceeded,
    CompileFailed,
    CompileRejected,
    CompileCancelled,
    ExecutionSucceeded,
    ExecutionFailed,
    ExecutionRejected,
    ExecutionCancelled,
)
"""The fact types that end a submission: an engine pushes exactly one per submission."""


def submission_key(fact: Fact) -> tuple[Literal["compile", "execute"], str] | None:
    """``(phase, submission id)`` of a fact about a submission; None for any other fact."""
    job_id = getattr(fact, "job_id", None)
    if isinstance(job_id, str):
        return ("compile", job_id)
    execution_id = getattr(fact, "execution_id", None)
    if isinstance(execution_id, str):
        return ("execute", execution_id)
    return None


def status_fact(submission: Submission, *, terminal: Fact | None, started: bool) -> Fact:
    """Where a submission is now, as a status answer says it.

    Its terminal fact again once it has one (a new stimulus id, the first
    ``observed_at``: a status answer is a new report of an old event);
    otherwise accepted, or started for an execution a worker has picked up.
    """
    if terminal is not None:
        values = {f.name: getattr(terminal, f.name) for f in dataclasses.fields(terminal)}
        del values["stimulus_id"]
        return type(terminal)(**values)
    plate_id, sid = submission.plate_id, submission.submission_id
    if submission.phase == "compile":
        return CompileAccepted(observed_at=time.time(), plate_id=plate_id, job_id=sid)
    if started:
        return ExecutionStarted(observed_at=time.time(), plate_id=plate_id, execution_id=sid)
    return ExecutionAccepted(observed_at=time.time(), plate_id=plate_id, execution_id=sid)


def cancelled_fact(submission: Submission) -> Fact:
    """The submission's ``*Cancelled`` fact, stamped now."""
    plate_id, sid = submission.plate_id, submission.submission_id
    if submission.phase == "compile":
        return CompileCancelled(observed_at=time.time(), plate_id=plate_id, job_id=sid)
    return ExecutionCancelled(observed_at=time.time(), plate_id=plate_id, execution_id=sid)


def failed_fact(submission: Submission, error: str, exit_code: int | None = None) -> Fact:
    """The submission's ``*Failed`` fact, stamped now (``exit_code`` only for executions)."""
    plate_id, sid = submission.plate_id, submission.submission_id
    if submission.phase == "compile":
        return CompileFailed(observed_at=time.time(), plate_id=plate_id, job_id=sid, error=error)
    return ExecutionFailed(
        observed_at=time.time(),
        plate_id=plate_id,
        execution_id=sid,
        error=error,
        exit_code=exit_code,
    )


@dataclass(frozen=True, slots=True)
class Recovered:
    """What an engine still knows about a crashed host's submissions (see :meth:`Engine.recover`).

    ``facts`` say where each known submission is now (like a status answer);
    ``unknown`` are the submissions the engine has no trace of, and ``never_ran``
    the subset of those it can vouch never started anywhere (so running them
    now runs them once). Every asked submission is in exactly one of ``facts``
    (by its submission id) or ``unknown``.
    """

    facts: tuple[Fact, ...] = ()
    unknown: tuple[Submission, ...] = ()
    never_ran: frozenset[str] = frozenset()
    """Submission ids in ``unknown`` that certainly never started."""


class Engine(ABC):
    """Runs compile jobs and executions, and reports what happened as facts."""

    name: str = "engine"

    @abstractmethod
    async def start(self, sink: FactSink) -> None:
        """Connect (or start workers) and remember where to push facts."""

    @abstractmethod
    async def submit_compile(self, job_id: str, job: CompileJob) -> None:
        """Take a compile job; push CompileAccepted then CompileSucceeded/Failed (or Rejected)."""

    @abstractmethod
    async def submit_execution(self, execution_id: str, job: CompileJob, artifact_id: str) -> None:
        """Execute a compiled plate; push Accepted, Started, Progress…, then a terminal fact."""

    @abstractmethod
    async def cancel(self, submission: Submission) -> None:
        """Stop one submission; push its *Cancelled fact when it has stopped.

        Cancelling something already finished is not an error: the engine
        pushes nothing (the terminal fact it already pushed wins).
        """

    @abstractmethod
    async def status(self, submissions: Sequence[Submission]) -> list[Fact]:
        """Reconcile: facts describing where each submission is now, in one query.

        Used by the one status poller as a safety net for lost pushes; a fact
        the batch already has is simply ignored as a duplicate or stale.
        """

    @abstractmethod
    async def server_info(self) -> dict[str, JsonValue]:
        """A snapshot of the engine: workers, running and queued submissions."""

    @abstractmethod
    async def close(self) -> None:
        """Stop everything this engine started. Idempotent."""

    # --- surviving a host restart (optional: the defaults know nothing) ---------------------

    def identity(self) -> dict[str, JsonValue]:
        """What a later process needs to find this engine's work again (JSON, no secrets).

        Asked after :meth:`start`; the service writes it into the journal's
        header, and a resuming service hands it to :meth:`adopt`. The default,
        ``{}``, means nothing survives the process.
        """
        return {}

    def adopt(self, identity: dict[str, JsonValue]) -> None:
        """Before :meth:`start`: take over the work a crashed process's engine left.

        ``identity`` is what that engine's :meth:`identity` returned. Raises
        :class:`~plateflow.errors.UsageError` if it was written by another kind of
        engine or cannot be taken over. The default accepts anything and adopts nothing.
        """
        del identity

    async def recover(self, submissions: Sequence[Submission]) -> Recovered:
        """After :meth:`start` in a resuming process: where each submission is now.

        Submissions it still knows are tracked again as if submitted by this
        process (their later facts reach the sink); the rest are ``unknown``.
        The default knows none of them.
        """
        return Recovered(unknown=tuple(submissions))
