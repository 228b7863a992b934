"""Facts: everything that can happen to a batch, as typed immutable values.

Theory of operation: engines report what happened (past tense:
``CompileSucceeded``) and hosts ask for things (``CancelRequested``); both are
facts, and a batch changes only by handling one. Every fact carries a
``stimulus_id`` so a journal entry, a decision and a host report can be traced
back to the fact that caused it. Facts are pydantic models so the journal can
write and read them as JSON without pickle, and a malformed fact from an
engine fails at the boundary with a message that names the field.

Submission ids (``job_id`` for compiles, ``execution_id`` for executions) are
issued by the batch, not by the engine, so a fact that arrives before the
engine's acknowledgement can still be matched to its plate.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, JsonValue, TypeAdapter
from pydantic.dataclasses import dataclass

from plateflow.core.ids import random_id

__all__ = [
    "BatchResumed",
    "BatchStarted",
    "CancelRequested",
    "CancelTimedOut",
    "CompileAccepted",
    "CompileCancelled",
    "CompileFailed",
    "CompileRejected",
    "CompileSucceeded",
    "EngineLost",
    "ExecutionAccepted",
    "ExecutionCancelled",
    "ExecutionFailed",
    "ExecutionProgress",
    "ExecutionRejected",
    "ExecutionStarted",
    "ExecutionSucceeded",
    "Fact",
    "HostCallbackFailed",
    "SubmissionLost",
    "fact_adapter",
]

# Facts are pydantic dataclasses: validated on construction like models, but
# slotted, so the journal that keeps every fact costs a fraction of the memory.
_CONFIG = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class _FactBase:
    stimulus_id: str = Field(default_factory=random_id, min_length=1)
    """Who made the fact passes one from its ``IdFactory``; otherwise it is random."""
    observed_at: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )
    """Unix time at which what the fact says was seen, when its maker says: the
    engines stamp every fact they make with their own clock (the core reads no
    clock). A server's fact keeps the server's time across the wire, and a terminal
    fact repeated in a status answer keeps its first time. Information only: the
    batch never reads it, and equal facts may differ in it."""


# --- host commands -----------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class BatchStarted(_FactBase):
    """The host started the batch: every plate is selected at once."""

    kind: Literal["batch_started"] = "batch_started"


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class CancelRequested(_FactBase):
    """The host asked to cancel one plate, or the whole batch when ``plate_id`` is None."""

    kind: Literal["cancel_requested"] = "cancel_requested"
    plate_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class CancelTimedOut(_FactBase):
    """The engine did not confirm a cancel in time: settle the plate ``cancelled``.

    Sent by the service after its cancel grace period, so a silent engine
    cannot keep a plate from converging (guarantee C7).
    """

    kind: Literal["cancel_timed_out"] = "cancel_timed_out"
    plate_id: str


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class HostCallbackFailed(_FactBase):
    """A host callback raised. Journaled and reported; nothing stops (C5)."""

    kind: Literal["host_callback_failed"] = "host_callback_failed"
    callback: str
    plate_id: str | None = None
    error: str


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class BatchResumed(_FactBase):
    """A new host process took the batch over from its journal (after a crash).

    Changes nothing; it marks in the journal where the new process began.
    """

    kind: Literal["batch_resumed"] = "batch_resumed"
    note: str = ""


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class SubmissionLost(_FactBase):
    """After a restart, the engine has no trace of one of the batch's submissions.

    Sent by a resuming service for each submission its engine's ``recover``
    did not know. With ``resubmit`` the batch submits it again (same id);
    otherwise the plate settles ``failed`` (``lost_in_restart``). ``never_ran``
    says whether the engine vouched that it never started anywhere.
    """

    kind: Literal["submission_lost"] = "submission_lost"
    plate_id: str
    phase: Literal["compile", "execute"]
    submission_id: str
    resubmit: bool = False
    never_ran: bool = False


# --- engine facts: compile -----------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class CompileAccepted(_FactBase):
    kind: Literal["compile_accepted"] = "compile_accepted"
    plate_id: str
    job_id: str


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class CompileSucceeded(_FactBase):
    kind: Literal["compile_succeeded"] = "compile_succeeded"
    plate_id: str
    job_id: str
    artifact_id: str = Field(min_length=1)


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class CompileFailed(_FactBase):
    kind: Literal["compile_failed"] = "compile_failed"
    plate_id: str
    job_id: str
    error: str


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class CompileRejected(_FactBase):
    """The engine refused the compile submission (never accepted it)."""

    kind: Literal["compile_rejected"] = "compile_rejected"
    plate_id: str
    job_id: str
    error: str


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class CompileCancelled(_FactBase):
    kind: Literal["compile_cancelled"] = "compile_cancelled"
    plate_id: str
    job_id: str


# --- engine facts: execution ---------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class ExecutionAccepted(_FactBase):
    kind: Literal["execution_accepted"] = "execution_accepted"
    plate_id: str
    execution_id: str


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class ExecutionStarted(_FactBase):
    """The engine picked the execution up (records ``started_at``)."""

    kind: Literal["execution_started"] = "execution_started"
    plate_id: str
    execution_id: str


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class ExecutionProgress(_FactBase):
    """A progress record: ``done`` of ``total`` steps. Never changes the state."""

    kind: Literal["execution_progress"] = "execution_progress"
    plate_id: str
    execution_id: str
    done: int = Field(ge=0)
    total: int = Field(ge=1)
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class ExecutionSucceeded(_FactBase):
    kind: Literal["execution_succeeded"] = "execution_succeeded"
    plate_id: str
    execution_id: str
    result: dict[str, JsonValue] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class ExecutionFailed(_FactBase):
    kind: Literal["execution_failed"] = "execution_failed"
    plate_id: str
    execution_id: str
    error: str
    exit_code: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class ExecutionRejected(_FactBase):
    """The engine refused the execution submission (e.g. unknown artifact)."""

    kind: Literal["execution_rejected"] = "execution_rejected"
    plate_id: str
    execution_id: str
    error: str


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class ExecutionCancelled(_FactBase):
    kind: Literal["execution_cancelled"] = "execution_cancelled"
    plate_id: str
    execution_id: str


# --- engine facts: the engine itself ---------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class EngineLost(_FactBase):
    """The engine is gone (dead server, lost connection, missed heartbeats)."""

    kind: Literal["engine_lost"] = "engine_lost"
    reason: str = "engine lost"


Fact = Annotated[
    BatchStarted
    | CancelRequested
    | CancelTimedOut
    | HostCallbackFailed
    | BatchResumed
    | SubmissionLost
    | CompileAccepted
    | CompileSucceeded
    | CompileFailed
    | CompileRejected
    | CompileCancelled
    | ExecutionAccepted
    | ExecutionStarted
    | ExecutionProgress
    | ExecutionSucceeded
    | ExecutionFailed
    | ExecutionRejected
    | ExecutionCancelled
    | EngineLost,
    Field(discriminator="kind"),
]
"""Any fact a batch can handle; discriminated by ``kind`` on the wire and on disk."""

fact_adapter: TypeAdapter[Fact] = TypeAdapter(Fact)
"""Validates a fact from JSON or a mapping (``fact_adapter.validate_json(raw)``)
and dumps one back (``fact_adapter.dump_python(fact, mode="json")``)."""
