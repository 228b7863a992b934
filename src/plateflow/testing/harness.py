"""ServiceHarness: a real service, a fake engine and a host, in virtual time, checked.

Theory of operation: a host is only ever exercised through the service, so
the harness runs the real :class:`~plateflow.service.BatchWorkflowService`
against a :class:`FakeEngine` on a :class:`VirtualTimeLoop`, and hands host
callbacks to a :class:`QueuedDispatcher` that delivers them later, in order,
on the test's thread — the way a GUI host's marshalling does. Nothing runs
on its own: every step (an engine fact, a cancel, time passing, the host
catching up) is a method call, so a run is deterministic and Hypothesis can
shrink it.

The host is *probed*, not wrapped: its callback methods are replaced on the
instance and its stores by watched dicts, so that a host calling its own
``on_plate_completed`` or writing a store from a worker thread is seen. Each
observation is checked against the guarantee a host relies on, and a broken
one is recorded as a :class:`GuaranteeViolation` naming it. Violations are
never raised inside a callback (the service would contain them, C5); the
harness raises the first one from :meth:`ServiceHarness.check`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, final

from plateflow.core import (
    BatchMode,
    BatchState,
    BatchSummary,
    CompileFailurePolicy,
    CompileSucceeded,
    ExecutionSucceeded,
    Fact,
    PlateOutcome,
    PlateState,
)
from plateflow.host import HOST_CALLBACKS, BatchHost
from plateflow.pipeline.spec import PipelineSpec, StepSpec
from plateflow.runtime.progress import ProgressSnapshot
from plateflow.service import BatchWorkflowService, Plate
from plateflow.testing._loop import VirtualClock, VirtualTimeLoop
from plateflow.testing.fake_engine import FakeEngine, PlateScript

__all__ = [
    "GUARANTEES",
    "GuaranteeViolation",
    "InjectedFault",
    "ObservedCall",
    "QueuedDispatcher",
    "ServiceHarness",
]

GUARANTEES: Final[Mapping[str, str]] = {
    "C1": "one path",
    "C2": "exactly once per plate",
    "C3": "exactly once per batch",
    "C4": "after commit",
    "C5": "host faults are contained",
    "C6": "one thread",
    "C7": "bounded",
    "seed": "the seed flows",
}
"""The guarantees of ``docs/guarantees.md`` (and the seed flows) by code, with their titles."""

STORES: Final = ("plate_execution_states", "plate_compiled_data", "plate_execution_ids")
_REPORTS_BATCH: Final = ("on_all_plates_completed", "emit_execution_complete")
_DUMMY_PIPELINE: Final = PipelineSpec(
    name="fake", steps=(StepSpec(function="plateflow.testing.fake_engine:never_run"),)
)


class GuaranteeViolation(AssertionError):
    """A guarantee was broken. ``guarantee`` is its code (``"C2"``), ``detail`` what happened."""

    def __init__(self, guarantee: str, detail: str, context: Sequence[str] = ()) -> None:
        self.guarantee = guarantee
        self.detail = detail
        title = GUARANTEES.get(guarantee, "")
        message = f"{guarantee} ({title}) broken: {detail}"
        if context:
            message += "\nlast host callbacks:\n  " + "\n  ".join(context)
        super().__init__(message)


class InjectedFault(RuntimeError):
    """Raised by the harness around a host callback, on a drawn schedule, to exercise C5."""


@dataclass(frozen=True, slots=True)
class ObservedCall:
    """A host callback as the probe saw it."""

    seq: int
    name: str
    args: tuple[Any, ...]
    time: float
    origin: Literal["service", "host", "outside"]
    """``service``: delivered by the dispatcher; ``host``: the host called its own
    callback from inside another; ``outside``: neither (a timer, a foreign thread)."""
    thread_name: str

    def __str__(self) -> str:
        shown = ", ".join(_short(a) for a in self.args)
        by = "" if self.origin == "service" else f" [called by {self.origin}]"
        return f"t={self.time:g} {self.name}({shown}){by}"


def _short(value: object) -> str:
    if isinstance(value, BatchSummary):
        return f"<summary {value.outcome.value}>"
    if isinstance(value, ProgressSnapshot):
        return f"<progress {value.settled}/{value.total} settled>"
    if isinstance(value, PlateState | PlateOutcome | BatchState):
        return value.value
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@final
class QueuedDispatcher:
    """Queues host callbacks; :meth:`deliver` runs them later, in order, on its caller's thread.

    This models a host that marshals callbacks onto its own (GUI) thread: the
    service has moved on by the time a callback runs. ``delivering`` is True
    while a queued callable runs.
    """

    def __init__(self) -> None:
        self._queue: list[Callable[[], None]] = []
        self.delivering = False
        self.thread_id: int | None = None
        self.delivered = 0

    def __call__(self, fn: Callable[[], None]) -> None:
        self._queue.append(fn)

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def deliver(self, limit: int | None = None) -> int:
        """Run up to ``limit`` queued callables (all when None); returns how many ran."""
        if self.delivering:
            raise RuntimeError("QueuedDispatcher.deliver called from inside a delivery")
        self.thread_id = threading.get_ident()
        ran = 0
        while self._queue and (limit is None or ran < limit):
            fn = self._queue.pop(0)
            self.delivering = True
            try:
                fn()
            finally:
                self.delivering = False
            ran += 1
        self.delivered += ran
        return ran


class _WatchedDict(dict[str, Any]):
    """A store that tells the probe about every write, and from which thread."""

    def __init__(self, name: str, probe: _Probe, items: Mapping[str, Any]) -> None:
        super().__init__(items)
        self._name = name
        self._probe = probe

    def _wrote(self, how: str) -> None:
        self._probe.store_written(self._name, how)

    def __setitem__(self, key: str, value: Any) -> None:
        self._wrote(f"[{key!r}] = {_short(value)}")
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._wrote(f"del [{key!r}]")
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:
        self._wrote(f".pop({key!r})")
        return super().pop(key, *default)

    def popitem(self) -> tuple[str, Any]:
        self._wrote(".popitem()")
        return super().popitem()

    def clear(self) -> None:
        self._wrote(".clear()")
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._wrote(".update()")
        super().update(*args, **kwargs)

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._wrote(f".setdefault({key!r})")
        return super().setdefault(key, default)


class _Probe:
    """Instruments one host instance; checks each callback as it happens."""

    def __init__(self, harness: ServiceHarness, host: BatchHost, faults: Sequence[bool]) -> None:
        self.harness = harness
        self.host = host
        self.calls: list[ObservedCall] = []
        self.violations: list[GuaranteeViolation] = []
        self.faults = tuple(faults)
        self.fault_count = 0
        self.faults_needing_report = 0
        self.host_raised: list[tuple[str, BaseException]] = []
        self._service_calls = 0
        self._local = threading.local()
        self.reported: dict[str, ObservedCall] = {}
        self.batch_reports: dict[str, ObservedCall] = {}
        self.shown_terminal: dict[str, PlateState] = {}
        for name in HOST_CALLBACKS:
            original = getattr(host, name)
            setattr(host, name, self._wrap(name, original))
        for store in STORES:
            setattr(host, store, _WatchedDict(store, self, getattr(host, store)))

    # --- recording ----------------------------------------------------------------------

    def violate(self, guarantee: str, detail: str) -> None:
        context = [str(c) for c in self.calls[-8:]]
        self.violations.append(GuaranteeViolation(guarantee, detail, context))

    def _depth(self) -> int:
        return int(getattr(self._local, "depth", 0))

    def _origin(self) -> Literal["service", "host", "outside"]:
        if self._depth() > 0:
            return "host"
        dispatcher = self.harness.dispatcher
        on_host_thread = threading.get_ident() == dispatcher.thread_id
        return "service" if dispatcher.delivering and on_host_thread else "outside"

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def probed(*args: Any, **kwargs: Any) -> Any:
            origin = self._origin()
            call = ObservedCall(
                len(self.calls),
                name,
                (*args, *kwargs.values()),
                self.harness.clock.now,
                origin,
                threading.current_thread().name,
            )
            self.calls.append(call)
            self.check_call(call)
            self._local.depth = self._depth() + 1
            try:
                value = original(*args, **kwargs)
            except Exception as exc:
                self.host_raised.append((name, exc))
                self.violate(
                    "C5",
                    f"the host's {name} raised {type(exc).__name__}: {exc} (the service "
                    "contains it, but a host callback must not raise)",
                )
                raise
            finally:
                self._local.depth -= 1
            if origin == "service":
                self._service_calls += 1
                if self.faults and self.faults[(self._service_calls - 1) % len(self.faults)]:
                    self.fault_count += 1
                    if name != "emit_error":
                        self.faults_needing_report += 1
                    raise InjectedFault(f"fault #{self.fault_count} injected after {name}")
            return value

        probed.__name__ = name
        probed.__wrapped__ = original  # type: ignore[attr-defined]
        return probed

    def store_written(self, store: str, how: str) -> None:
        dispatcher = self.harness.dispatcher
        thread = threading.current_thread()
        if dispatcher.thread_id is not None and thread.ident != dispatcher.thread_id:
            self.violate(
                "C6",
                f"host store {store}{how} written from thread {thread.name!r}, not the "
                "host's dispatcher thread",
            )

    # --- the checks, as each callback happens -------------------------------------------

    def check_call(self, call: ObservedCall) -> None:
        name, args = call.name, call.args
        if call.origin == "outside":
            where = threading.current_thread()
            on = "on the dispatcher thread but outside a delivery"
            if where.ident != self.harness.dispatcher.thread_id:
                on = f"on thread {where.name!r}, not the host's dispatcher thread"
            self.violate("C6", f"{name} was called {on}")
        batch = self.harness.service.batch
        if name == "on_plate_completed":
            plate_id, outcome = args[0], args[1]
            first = self.reported.get(plate_id)
            if first is not None:
                self.violate(
                    "C2",
                    f"on_plate_completed({plate_id!r}) called a second time ({call}); "
                    f"the first was {first}",
                )
                return
            self.reported[plate_id] = call
            if batch is not None and plate_id in batch.plate_ids:
                snap = batch.snapshot().plate(plate_id)
                if snap.outcome is None:
                    self.violate(
                        "C1",
                        f"{call}: the plate is still {snap.state.value}; only the service's "
                        "convergence path may settle a plate",
                    )
                elif snap.outcome is not outcome:
                    self.violate("C4", f"{call} but the committed outcome is {snap.outcome.value}")
        elif name in _REPORTS_BATCH:
            first = self.batch_reports.get(name)
            if first is not None:
                self.violate("C3", f"{name} called a second time ({call}); the first was {first}")
                return
            self.batch_reports[name] = call
            if batch is not None:
                missing = [p for p in batch.plate_ids if p not in self.reported]
                if missing:
                    self.violate(
                        "C3",
                        f"{call} before on_plate_completed for {missing}",
                    )
        elif name == "emit_orchestrator_state":
            plate_id, state = args[0], args[1]
            shown = self.shown_terminal.get(plate_id)
            if shown is not None:
                self.violate(
                    "C1",
                    f"{call}: the plate was already shown {shown.value}; a settled plate "
                    "never moves again",
                )
            if state.is_terminal:
                self.shown_terminal[plate_id] = state
            if call.origin == "service":
                stored = self.host.plate_execution_states.get(plate_id)
                if stored is not state:
                    self.violate(
                        "C4",
                        f"{call} but plate_execution_states[{plate_id!r}] is {stored}; "
                        "the store is written before the callback",
                    )
                if batch is not None and not any(
                    c.plate_id == plate_id and c.new is state
                    for record in batch.journal
                    for c in record.changes
                ):
                    self.violate("C4", f"{call} but the journal has no such change")


@final
class ServiceHarness:
    """Runs one host through real batches on a :class:`FakeEngine`, in virtual time.

    ``host_pace`` models a slow host: at most that many callbacks are
    delivered after each step (None: the host keeps up). ``faults`` is a
    schedule, cycled, of callbacks after which an :class:`InjectedFault` is
    raised (C5). Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        host: BatchHost,
        *,
        scripts: Mapping[str, PlateScript] | None = None,
        default_script: PlateScript | None = None,
        policy: CompileFailurePolicy = CompileFailurePolicy.ABORT,
        cancel_grace: float = 5.0,
        status_interval: float = 2.0,
        host_pace: int | None = None,
        faults: Sequence[bool] = (),
    ) -> None:
        if host_pace is not None and host_pace < 1:
            raise ValueError("host_pace must be at least 1 (or None for a host that keeps up)")
        self.host = host
        self.clock = VirtualClock(1_000.0)
        self.loop = VirtualTimeLoop(self.clock)
        self.engine = FakeEngine(scripts, default=default_script, clock=self.clock)
        self.dispatcher = QueuedDispatcher()
        self.dispatcher.thread_id = threading.get_ident()
        self.host_pace = host_pace
        self.cancel_grace = cancel_grace
        self.service = BatchWorkflowService(
            host,
            self.engine,
            dispatcher=self.dispatcher,
            policy=policy,
            cancel_grace=cancel_grace,
            status_interval=status_interval,
            progress_interval=0.25,
            clock=self.clock,
        )
        self.probe = _Probe(self, host, faults)
        self.mode: BatchMode | None = None
        self.plate_ids: tuple[str, ...] = ()
        self._task: asyncio.Task[BatchSummary] | None = None
        self._closed = False

    # --- running a batch ----------------------------------------------------------------

    def start(self, plate_ids: Sequence[str], mode: BatchMode = BatchMode.RUN) -> None:
        """Start a compile-only or run batch of ``plate_ids`` and let it get going."""
        if self._task is not None:
            raise RuntimeError("the harness runs one batch; make another harness for the next")
        self.mode = BatchMode(mode)
        self.plate_ids = tuple(plate_ids)
        plates = [Plate(p, f"/fake/{p}") for p in self.plate_ids]
        run = self.service.run_plates if self.mode is BatchMode.RUN else self.service.compile_plates
        self._task = self.loop.create_task(run(plates, pipeline=_DUMMY_PIPELINE))
        self.settle()

    @property
    def batch_id(self) -> str:
        batch = self.service.batch
        return batch.batch_id if batch is not None else ""

    @property
    def settled(self) -> bool:
        """The service has settled the batch (the host may not have heard yet)."""
        return self._task is not None and self._task.done()

    def settle(self, *, catch_up: bool = False) -> None:
        """Run the loop until idle, delivering host callbacks at the host's pace.

        ``catch_up`` delivers every queued callback whatever the pace.
        """
        pace = None if catch_up else self.host_pace
        self.loop.run_until_idle()
        while self.dispatcher.backlog:
            self.dispatcher.deliver(pace)
            self.loop.run_until_idle()
            if pace is not None:
                break

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass: engine facts and service timers, in time order."""
        deadline = self.clock.now + seconds
        self.settle()
        while True:
            times = [t for t in (self.engine.next_due(), self.loop.next_timer()) if t is not None]
            if not times or min(times) > deadline:
                break
            self.clock.advance_to(max(min(times), self.clock.now))
            self.engine.deliver_due()
            self.settle()
        self.clock.advance_to(deadline)
        self.settle()

    # --- steps a test or a strategy takes -----------------------------------------------

    def deliver(self, plate_id: str | None = None, index: int = 0) -> Fact | None:
        fact = self.engine.step(plate_id, index)
        self.settle()
        return fact

    def duplicate(self, plate_id: str | None = None, back: int = 0) -> Fact | None:
        fact = self.engine.redeliver(plate_id, back)
        self.settle()
        return fact

    def drop(self, plate_id: str | None = None) -> Fact | None:
        fact = self.engine.drop(plate_id)
        self.settle()
        return fact

    def stale(self, plate_id: str, *, other_batch: bool = False) -> Fact:
        """An engine fact about ``plate_id`` naming a submission that is not its current one."""
        index = self.plate_ids.index(plate_id)
        prefix = "0ther0batch0" if other_batch else self.batch_id
        other = (index + 1) % len(self.plate_ids) if len(self.plate_ids) > 1 else index + 100
        fact: Fact
        if self.engine.current_submission(plate_id) is None or other_batch:
            fact = CompileSucceeded(
                plate_id=plate_id, job_id=f"{prefix}.{other}.c", artifact_id="stale"
            )
        else:
            fact = ExecutionSucceeded(plate_id=plate_id, execution_id=f"{prefix}.{other}.x")
        self.engine.inject(fact)
        self.settle()
        return fact

    def cancel(self, plate_id: str | None = None) -> None:
        """The user cancels one plate, or the batch."""
        if not self.settled:
            self.service.cancel(plate_id)
        self.settle()

    def lose_engine(self, reason: str = "heartbeats missed") -> None:
        """The engine dies; the service must settle every plate at once (C7)."""
        self.engine.lose(reason)
        self.settle()
        if not self.settled:
            unsettled = self._unsettled()
            self.violate("C7", f"the engine was lost but plates {unsettled} are still unsettled")

    def catch_up(self) -> None:
        """A slow host delivers everything it has queued."""
        self.settle(catch_up=True)

    # --- checking -----------------------------------------------------------------------

    def violate(self, guarantee: str, detail: str) -> None:
        self.probe.violate(guarantee, detail)

    @property
    def violations(self) -> list[GuaranteeViolation]:
        return list(self.probe.violations)

    @property
    def calls(self) -> list[ObservedCall]:
        """Every host callback the probe saw, in order."""
        return list(self.probe.calls)

    def check(self) -> None:
        """Raise the first :class:`GuaranteeViolation` seen so far, if any."""
        if self.probe.violations:
            raise self.probe.violations[0]
        task = self._task
        if task is not None and task.done() and not task.cancelled():
            exc = task.exception()
            if exc is not None:
                raise GuaranteeViolation(
                    "C1", f"the batch ended with {type(exc).__name__}: {exc}"
                ) from exc

    def _unsettled(self) -> list[str]:
        batch = self.service.batch
        if batch is None:
            return list(self.plate_ids)
        return [p.plate_id for p in batch.snapshot().plates if p.outcome is None]

    def finish(self, *, patience: float = 60.0) -> BatchSummary:
        """Bring the batch to its end and check everything a finished batch guarantees.

        The engine gets ``patience`` virtual seconds to finish on its own; a
        batch still running then is cancelled, and must settle within the
        cancel grace (C7). Then the host catches up, and the reports are
        checked against the batch (C2, C3, C4, C5) and the seed flows.
        """
        self.check()
        if self._task is None:
            raise RuntimeError("finish() before start()")
        self._run_for(patience)
        if not self.settled:
            self.cancel()
            cancelled_at = self.clock.now
            self._run_for(self.cancel_grace + 1.0)
            if not self.settled:
                self.violate(
                    "C7",
                    f"plates {self._unsettled()} still unsettled {self.clock.now - cancelled_at:g} "
                    f"virtual seconds after the batch was cancelled (cancel grace "
                    f"{self.cancel_grace:g} s)",
                )
                self.check()
        self.catch_up()
        self.check()
        summary = self._task.result()
        self._check_finished(summary)
        self.check()
        return summary

    def _run_for(self, seconds: float) -> None:
        deadline = self.clock.now + seconds
        while not self.settled and self.clock.now < deadline:
            times = [t for t in (self.engine.next_due(), self.loop.next_timer()) if t is not None]
            if not times:
                break
            self.advance(max(min(min(times), deadline) - self.clock.now, 0.0))
        self.settle()

    def _check_finished(self, summary: BatchSummary) -> None:
        probe = self.probe
        for plate_id in self.plate_ids:
            if plate_id not in probe.reported:
                self.violate("C2", f"the batch settled but {plate_id!r} was never reported")
        for name in _REPORTS_BATCH:
            if name not in probe.batch_reports:
                self.violate("C3", f"the batch settled but {name} was never called")
        reported = {p: c.args[1] for p, c in probe.reported.items() if c.origin == "service"}
        settled = {s.plate_id: s.outcome for s in summary.plates}
        if reported != settled:
            self.violate("C2", f"plates reported {reported} but the batch settled {settled}")
        for name, call in probe.batch_reports.items():
            if call.args[0] != summary:
                self.violate("C3", f"{name} reported {call.args[0]!r}, not the batch's summary")
        errors = [
            c for c in probe.calls if c.name == "emit_error" and "host_callback_failed" in c.args
        ]
        if len(errors) < probe.faults_needing_report:
            self.violate(
                "C5",
                f"{probe.faults_needing_report} host callbacks raised but only {len(errors)} "
                "were reported through emit_error",
            )
        self._check_seed_flow(summary)

    def _check_seed_flow(self, summary: BatchSummary) -> None:
        calls = self.engine.calls
        compiles = [i for i, c in enumerate(calls) if c.method == "submit_compile"]
        executions = [i for i, c in enumerate(calls) if c.method == "submit_execution"]
        if executions and compiles and min(executions) < max(compiles):
            self.violate("seed", "an execution was submitted before every compile was")
        if self.mode is BatchMode.COMPILE_ONLY and executions:
            self.violate("seed", "a compile-only batch submitted executions")
        states = [
            c.args
            for c in self.probe.calls
            if c.name == "emit_orchestrator_state" and c.origin == "service"
        ]
        firsts: dict[str, PlateState] = {}
        for plate_id, state in states:
            firsts.setdefault(plate_id, state)
        not_queued = {p: s.value for p, s in firsts.items() if s is not PlateState.QUEUED}
        if not_queued:
            self.violate("seed", f"plates were not marked queued first: {not_queued}")
        counts = Counter(s.outcome for s in summary.plates)
        if dict(summary.counts) != dict(counts):
            self.violate("C3", f"summary counts {summary.counts} do not match its plates")
        for plate_id in self.plate_ids:
            want = _final_state(summary, plate_id)
            got = self.host.plate_execution_states.get(plate_id)
            if want is not None and got is not want:
                self.violate(
                    "C4",
                    f"after the batch, plate_execution_states[{plate_id!r}] is {got}, "
                    f"not {want.value}",
                )
            if _outcome(summary, plate_id) is PlateOutcome.COMPILED and (
                plate_id not in self.host.plate_compiled_data
            ):
                self.violate("seed", f"{plate_id!r} compiled but plate_compiled_data lacks it")

    # --- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the service (cancelling a running batch) and the loop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            closing = self.loop.run_until_done(self.service.close(), within=self.cancel_grace + 5.0)
            self.settle(catch_up=True)
            if not closing.done():
                closing.cancel()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.run_until_idle()
            with contextlib.suppress(Exception):
                self.loop.run_until_done(self.loop.shutdown_asyncgens(), within=1.0)
        finally:
            self.loop.close()

    def __enter__(self) -> ServiceHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = self.service.batch.state.value if self.service.batch is not None else "idle"
        return (
            f"<ServiceHarness t={self.clock.now:g} batch={state} "
            f"calls={len(self.probe.calls)} backlog={self.dispatcher.backlog}>"
        )


def _outcome(summary: BatchSummary, plate_id: str) -> PlateOutcome | None:
    return next((s.outcome for s in summary.plates if s.plate_id == plate_id), None)


def _final_state(summary: BatchSummary, plate_id: str) -> PlateState | None:
    outcome = _outcome(summary, plate_id)
    if outcome is None:
        return None
    return PlateState.COMPILED if outcome is PlateOutcome.COMPILED else PlateState(outcome.value)


@contextlib.contextmanager
def harness_for(host: BatchHost, **options: Any) -> Iterator[ServiceHarness]:
    """A :class:`ServiceHarness` that is closed on exit, whatever happened."""
    harness = ServiceHarness(host, **options)
    try:
        yield harness
    finally:
        harness.close()
