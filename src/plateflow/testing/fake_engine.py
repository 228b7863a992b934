"""FakeEngine: a scripted, deterministic engine that the test drives step by step.

Theory of operation: the fake keeps two things apart that a real engine
mixes up — *what happened* on the engine and *what the service was told*.
When the service submits a job, the plate's :class:`PlateScript` decides
its whole life at once (accepted, progress, then succeeded, failed or
nothing at all) and every fact of it is put in an outbox with the virtual
time it happens at. Nothing reaches the service until the test says so:

- :meth:`FakeEngine.advance` lets virtual time pass and delivers what fell due;
- :meth:`FakeEngine.step` delivers the next fact now (of one plate, or of
  any), or a later one first (``index``), which is how reordering is made;
- :meth:`FakeEngine.redeliver` sends an already delivered fact again;
- :meth:`FakeEngine.drop` loses a push: it happened (``status`` reports it,
  as the status poller's reconciliation would find it) but is never pushed;
- :meth:`FakeEngine.lose` pushes ``EngineLost`` and makes every later call
  raise :class:`EngineError`.

``auto_deliver=True`` delivers every fact as soon as it is due, inside the
call that made it so, for tests that just want a working engine. Every call
the service makes is logged in :attr:`FakeEngine.calls`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, final

from pydantic import JsonValue

from plateflow.core.facts import (
    CompileAccepted,
    CompileCancelled,
    CompileFailed,
    CompileRejected,
    CompileSucceeded,
    EngineLost,
    ExecutionAccepted,
    ExecutionCancelled,
    ExecutionFailed,
    ExecutionProgress,
    ExecutionRejected,
    ExecutionStarted,
    ExecutionSucceeded,
    Fact,
)
from plateflow.engines.base import TERMINAL_FACTS, Engine, EngineError, FactSink, Submission
from plateflow.jobs import CompileJob
from plateflow.testing._loop import VirtualClock

__all__ = ["EngineCall", "FakeEngine", "Outcome", "Pending", "PlateScript"]

Outcome = Literal["succeed", "fail", "reject", "hang"]
"""How a submission ends: ``hang`` means the engine never says (a stuck worker)."""


@dataclass(frozen=True, slots=True)
class PlateScript:
    """What the engine does with one plate's submissions."""

    compile: Outcome = "succeed"
    execute: Outcome = "succeed"
    compile_time: float = 1.0
    """Virtual seconds from the compile submission to its end."""
    execute_time: float = 2.0
    progress_steps: int = 2
    """Progress records sent while executing (``done`` 1..n of n)."""
    on_cancel: Literal["confirm", "ignore"] = "confirm"
    """``ignore``: a cancel is never confirmed (the service's cancel grace must settle it)."""
    cancel_time: float = 0.5

    def __post_init__(self) -> None:
        if min(self.compile_time, self.execute_time, self.cancel_time) < 0:
            raise ValueError("script times must not be negative")
        if self.progress_steps < 0:
            raise ValueError("progress_steps must not be negative")


@dataclass(frozen=True, slots=True)
class Pending:
    """A fact the engine made that is not delivered yet, and when it falls due."""

    due: float
    order: int
    fact: Fact

    @property
    def plate_id(self) -> str:
        return getattr(self.fact, "plate_id", "")


@dataclass(frozen=True, slots=True)
class EngineCall:
    """One call the service made on the engine, at a virtual time."""

    time: float
    method: str
    args: tuple[object, ...]


@dataclass(slots=True)
class _Live:
    submission: Submission
    facts: list[Fact] = field(default_factory=list)
    """Every fact that happened for it (delivered or dropped): what ``status`` knows."""
    finished: bool = False
    cancel_asked: bool = False


@final
class FakeEngine(Engine):
    """An :class:`~plateflow.engines.base.Engine` that does exactly what it is told.

    ``scripts`` maps plate ids to their :class:`PlateScript` (``default`` for
    the rest). ``clock`` is the virtual time facts are scheduled on; pass the
    same :class:`VirtualClock` as the event loop's so that engine delays and
    the service's timers share one time line. ``fail_calls`` makes a method
    raise (e.g. ``{"submit_compile": RuntimeError("refused")}``).
    """

    name = "fake"

    def __init__(
        self,
        scripts: Mapping[str, PlateScript] | None = None,
        *,
        default: PlateScript | None = None,
        clock: VirtualClock | None = None,
        auto_deliver: bool = False,
        fail_calls: Mapping[str, BaseException] | None = None,
    ) -> None:
        self.scripts = dict(scripts or {})
        self.default = default or PlateScript()
        self.clock = clock if clock is not None else VirtualClock()
        self.auto_deliver = auto_deliver
        self.fail_calls: dict[str, BaseException] = dict(fail_calls or {})
        self.calls: list[EngineCall] = []
        self.delivered: list[Fact] = []
        self.dropped: list[Fact] = []
        self._sink: FactSink | None = None
        self._outbox: list[Pending] = []
        self._order = itertools.count()
        self._live: dict[str, _Live] = {}
        self._current: dict[str, str] = {}
        self._lost: str | None = None
        self.started = False
        self.closed = False

    # --- the Engine interface ----------------------------------------------------------------

    async def start(self, sink: FactSink) -> None:
        self._call("start")
        self._sink = sink
        self.started = True

    async def submit_compile(self, job_id: str, job: CompileJob) -> None:
        self._call("submit_compile", job_id, job.plate_id)
        script = self.script(job.plate_id)
        self._open(Submission(job.plate_id, "compile", job_id))
        pid, now = job.plate_id, self.clock.now
        if script.compile == "reject":
            self._schedule(now, CompileRejected(plate_id=pid, job_id=job_id, error="refused"))
            return
        self._schedule(now, CompileAccepted(plate_id=pid, job_id=job_id))
        end = now + script.compile_time
        if script.compile == "succeed":
            artifact = f"artifact-{job.fingerprint[:8]}"
            self._schedule(end, CompileSucceeded(plate_id=pid, job_id=job_id, artifact_id=artifact))
        elif script.compile == "fail":
            self._schedule(end, CompileFailed(plate_id=pid, job_id=job_id, error="compile failed"))
        self._flush()

    async def submit_execution(self, execution_id: str, job: CompileJob, artifact_id: str) -> None:
        self._call("submit_execution", execution_id, job.plate_id, artifact_id)
        script = self.script(job.plate_id)
        self._open(Submission(job.plate_id, "execute", execution_id))
        pid, xid, now = job.plate_id, execution_id, self.clock.now
        if script.execute == "reject":
            self._schedule(now, ExecutionRejected(plate_id=pid, execution_id=xid, error="refused"))
            return
        self._schedule(now, ExecutionAccepted(plate_id=pid, execution_id=xid))
        self._schedule(now, ExecutionStarted(plate_id=pid, execution_id=xid))
        steps = script.progress_steps
        for done in range(1, steps + 1):
            self._schedule(
                now + script.execute_time * done / (steps + 1),
                ExecutionProgress(plate_id=pid, execution_id=xid, done=done, total=steps),
            )
        end = now + script.execute_time
        if script.execute == "succeed":
            result: dict[str, JsonValue] = {"plate": pid}
            self._schedule(end, ExecutionSucceeded(plate_id=pid, execution_id=xid, result=result))
        elif script.execute == "fail":
            failed = ExecutionFailed(plate_id=pid, execution_id=xid, error="failed", exit_code=1)
            self._schedule(end, failed)
        self._flush()

    async def cancel(self, submission: Submission) -> None:
        self._call("cancel", submission.submission_id, submission.plate_id)
        live = self._live.get(submission.submission_id)
        if live is None or live.finished or live.cancel_asked:
            return
        live.cancel_asked = True
        script = self.script(submission.plate_id)
        if script.on_cancel == "ignore":
            return
        # The cancel overtakes whatever had not happened by the time it takes effect.
        sid = submission.submission_id
        when = self.clock.now + script.cancel_time
        self._outbox = [p for p in self._outbox if not _overtaken(p, sid, when)]
        pid = submission.plate_id
        fact: Fact = (
            CompileCancelled(plate_id=pid, job_id=sid)
            if submission.phase == "compile"
            else ExecutionCancelled(plate_id=pid, execution_id=sid)
        )
        self._schedule(when, fact)
        self._flush()

    async def status(self, submissions: Sequence[Submission]) -> list[Fact]:
        self._call("status", tuple(s.submission_id for s in submissions))
        self._flush()
        out: list[Fact] = []
        for submission in submissions:
            live = self._live.get(submission.submission_id)
            if live is not None and live.facts:
                out.append(live.facts[-1])
        return out

    async def server_info(self) -> dict[str, JsonValue]:
        self._call("server_info")
        running = sum(1 for live in self._live.values() if not live.finished)
        return {"engine": "fake", "running": running, "queued": 0, "pending": len(self._outbox)}

    async def close(self) -> None:
        if not self.closed:
            self.calls.append(EngineCall(self.clock.now, "close", ()))
        self.closed = True

    # --- scripting and driving ---------------------------------------------------------------

    def script(self, plate_id: str) -> PlateScript:
        return self.scripts.get(plate_id, self.default)

    @property
    def pending(self) -> list[Pending]:
        """Facts made but not delivered, in delivery order (due time, then creation)."""
        return sorted(self._outbox, key=lambda p: (p.due, p.order))

    def pending_for(self, plate_id: str) -> list[Pending]:
        return [p for p in self.pending if p.plate_id == plate_id]

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def next_due(self) -> float | None:
        """When the earliest pending fact falls due (None when nothing is pending)."""
        return min((p.due for p in self._outbox), default=None)

    def step(self, plate_id: str | None = None, index: int = 0) -> Fact | None:
        """Deliver one pending fact now, whatever its due time; None when there is none.

        ``index`` 0 is the next one in order; a larger index delivers a later
        fact before the earlier ones (they stay pending: out-of-order arrival).
        """
        queue = self.pending if plate_id is None else self.pending_for(plate_id)
        if not queue:
            return None
        chosen = queue[min(index, len(queue) - 1)]
        self._outbox.remove(chosen)
        self._happened(chosen.fact)
        self._push(chosen.fact)
        return chosen.fact

    def drop(self, plate_id: str | None = None) -> Fact | None:
        """Lose the next pending push: it happened, ``status`` knows it, the sink never hears."""
        queue = self.pending if plate_id is None else self.pending_for(plate_id)
        if not queue:
            return None
        chosen = queue[0]
        self._outbox.remove(chosen)
        self._happened(chosen.fact)
        self.dropped.append(chosen.fact)
        return chosen.fact

    def redeliver(self, plate_id: str | None = None, back: int = 0) -> Fact | None:
        """Push an already delivered fact again (``back`` 0 is the latest); None if none."""
        sent = [f for f in self.delivered if plate_id is None or _plate_id(f) == plate_id]
        if not sent:
            return None
        fact = sent[-1 - min(back, len(sent) - 1)]
        self._push(fact)
        return fact

    def inject(self, fact: Fact) -> None:
        """Push any fact at all (a stale id, a fact from nowhere) straight to the sink."""
        self._push(fact)

    def advance(self, seconds: float) -> list[Fact]:
        """Let time pass (when the engine owns its clock) and deliver what fell due."""
        self.clock.advance(seconds)
        return self.deliver_due()

    def deliver_due(self) -> list[Fact]:
        """Deliver every pending fact whose time has come, in order."""
        out: list[Fact] = []
        while self._outbox:
            first = self.pending[0]
            if first.due > self.clock.now:
                break
            fact = self.step()
            assert fact is first.fact
            out.append(fact)
        return out

    def lose(self, reason: str = "fake engine lost") -> None:
        """The engine dies: ``EngineLost`` is pushed, nothing else is, every call raises."""
        if self._lost is not None:
            return
        self._lost = reason
        self._outbox.clear()
        if self._sink is not None:
            self._sink(EngineLost(reason=reason))

    def current_submission(self, plate_id: str) -> Submission | None:
        sid = self._current.get(plate_id)
        return None if sid is None else self._live[sid].submission

    def statistics(self) -> dict[str, int]:
        return {
            "submissions": len(self._live),
            "running": sum(1 for live in self._live.values() if not live.finished),
            "pending": len(self._outbox),
            "delivered": len(self.delivered),
            "dropped": len(self.dropped),
        }

    def __repr__(self) -> str:
        stats = ", ".join(f"{k}={v}" for k, v in self.statistics().items())
        return f"<FakeEngine t={self.clock.now:g} {stats}{' LOST' if self.lost else ''}>"

    # --- internals -----------------------------------------------------------------------------

    def _call(self, method: str, *args: object) -> None:
        self.calls.append(EngineCall(self.clock.now, method, args))
        if self._lost is not None and method != "start":
            raise EngineError(f"the fake engine is lost: {self._lost}")
        failure = self.fail_calls.get(method)
        if failure is not None:
            raise failure

    def _open(self, submission: Submission) -> None:
        self._live[submission.submission_id] = _Live(submission)
        self._current[submission.plate_id] = submission.submission_id

    def _schedule(self, due: float, fact: Fact) -> None:
        self._outbox.append(Pending(due, next(self._order), fact))

    def _happened(self, fact: Fact) -> None:
        live = self._live.get(_submission_id(fact) or "")
        if live is not None:
            live.facts.append(fact)
            if isinstance(fact, TERMINAL_FACTS):
                live.finished = True

    def _push(self, fact: Fact) -> None:
        self.delivered.append(fact)
        if self._sink is not None:
            self._sink(fact)

    def _flush(self) -> None:
        if self.auto_deliver:
            self.deliver_due()


def never_run() -> None:
    """The step of the harness's placeholder pipeline: a fake engine runs no steps."""
    raise AssertionError("the fake engine never runs pipeline steps")


def _overtaken(pending: Pending, submission_id: str, cancelled_at: float) -> bool:
    """Whether a cancel taking effect at ``cancelled_at`` means ``pending`` never happens."""
    if _submission_id(pending.fact) != submission_id:
        return False
    return pending.due > cancelled_at or isinstance(pending.fact, TERMINAL_FACTS)


def _submission_id(fact: Fact) -> str | None:
    return getattr(fact, "job_id", None) or getattr(fact, "execution_id", None)


def _plate_id(fact: Fact) -> str | None:
    return getattr(fact, "plate_id", None)
