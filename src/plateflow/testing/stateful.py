"""HostStateMachine: the stateful test a host author subclasses.

Theory of operation: each Hypothesis example is one batch of 1 to
``max_plates`` plates (run or compile-only, abort or continue) driven
through the real service on a :class:`FakeEngine` in virtual time. The
rules are the steps of :mod:`plateflow.testing.strategies` (the same
objects, so a rule and a scenario step mean the same thing); after every
rule the invariant raises the first broken guarantee, and teardown brings
the batch to its end and checks what a finished batch guarantees. A
failure is a :class:`GuaranteeViolation` whose message starts with the
guarantee's code (``C2 (exactly once per plate) broken: …``), followed by
the last host callbacks; Hypothesis prints the shrunk rules above it.

Subclass it, implement :meth:`HostStateMachine.make_host`, and expose it to
pytest with ``TestMyHost = MyHostMachine.TestCase``. Class attributes turn
kinds of disorder off; :meth:`HostStateMachine.check_host` adds the host's
own invariants.
"""

from __future__ import annotations

from typing import ClassVar

from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from plateflow.core import BatchMode, CompileFailurePolicy
from plateflow.host import BatchHost
from plateflow.testing.harness import ServiceHarness
from plateflow.testing.strategies import (
    AnyStep,
    Cancel,
    Deliver,
    DropPush,
    Duplicate,
    HostCatchesUp,
    LoseEngine,
    StaleFact,
    Wait,
    plate_id,
    plate_scripts,
)

__all__ = ["HostStateMachine"]

_PLATE = st.integers(0, 7)
"""Plate indexes wrap around the batch's plate count: shrinking goes towards plate 0."""


class HostStateMachine(RuleBasedStateMachine):
    """Checks a host against C1-C7 and the seed flows over random engine-fact orderings."""

    max_plates: ClassVar[int] = 4
    modes: ClassVar[tuple[BatchMode, ...]] = (BatchMode.RUN, BatchMode.COMPILE_ONLY)
    policies: ClassVar[tuple[CompileFailurePolicy, ...]] = (
        CompileFailurePolicy.ABORT,
        CompileFailurePolicy.CONTINUE,
    )
    duplicates: ClassVar[bool] = True
    stale_ids: ClassVar[bool] = True
    out_of_order: ClassVar[bool] = True
    lost_pushes: ClassVar[bool] = True
    cancels: ClassVar[bool] = True
    engine_loss: ClassVar[bool] = True
    engine_failures: ClassVar[bool] = True
    slow_callbacks: ClassVar[bool] = True
    failing_callbacks: ClassVar[bool] = True

    explain: ClassVar[bool] = False
    """Keep Hypothesis's explain phase: on a failing run it replays the example hundreds
    of times (a minute or more) to point at lines; off by default."""

    harness: ServiceHarness
    host: BatchHost

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        case = cls.TestCase
        original = case.runTest

        def runTest(self: object) -> None:
            chosen = getattr(self, "settings", None) or case.settings
            if not cls.explain and Phase.explain in chosen.phases:
                kept = tuple(p for p in chosen.phases if p is not Phase.explain)
                chosen = settings(chosen, phases=kept)
            run_state_machine_as_test(cls, settings=chosen)

        for name in ("is_hypothesis_test", "_hypothesis_state_machine_class"):
            if hasattr(original, name):
                setattr(runTest, name, getattr(original, name))
        case.runTest = runTest  # type: ignore[method-assign]

    def __init__(self) -> None:
        super().__init__()
        self._ready = False
        self._failed = False

    # --- what a host author provides ------------------------------------------------------

    def make_host(self) -> BatchHost:
        """A fresh host for one example. Subclasses must implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_host()")

    def check_host(self, host: BatchHost, harness: ServiceHarness) -> None:
        """The host's own invariants, checked after every step and at the end. Raise to fail."""

    # --- setup ----------------------------------------------------------------------------

    @initialize(data=st.data())
    def start_batch(self, data: st.DataObject) -> None:
        cls = type(self)
        n = data.draw(st.integers(1, cls.max_plates), label="plates")
        mode = data.draw(st.sampled_from(cls.modes), label="mode")
        policy = data.draw(st.sampled_from(cls.policies), label="policy")
        hangs = cls.engine_failures
        scripts = {
            plate_id(i): data.draw(
                plate_scripts(failures=cls.engine_failures, hangs=hangs),
                label=f"script of {plate_id(i)}",
            )
            for i in range(n)
        }
        pace = (
            data.draw(st.none() | st.integers(1, 3), label="host pace")
            if cls.slow_callbacks
            else None
        )
        faults: tuple[bool, ...] = ()
        if cls.failing_callbacks:
            drawn = data.draw(st.lists(st.booleans(), max_size=5), label="host faults")
            faults = tuple(drawn) if any(drawn) else ()
        self.host = self.make_host()
        self.harness = ServiceHarness(
            self.host, scripts=scripts, policy=policy, host_pace=pace, faults=faults
        )
        self._ready = True
        self.harness.start(tuple(scripts), mode)

    def _apply(self, step: AnyStep) -> None:
        step.apply(self.harness)

    # --- rules: the engine --------------------------------------------------------------------

    @rule(plate=_PLATE)
    def deliver(self, plate: int) -> None:
        """The engine pushes the plate's next fact."""
        self._apply(Deliver(plate))

    @precondition(lambda self: type(self).out_of_order)
    @rule(plate=_PLATE, late=st.integers(1, 3))
    def deliver_out_of_order(self, plate: int, late: int) -> None:
        """A later fact of the plate overtakes the ones before it."""
        self._apply(Deliver(plate, late))

    @precondition(lambda self: type(self).duplicates)
    @rule(plate=_PLATE, back=st.integers(0, 2))
    def duplicate(self, plate: int, back: int) -> None:
        self._apply(Duplicate(plate, back))

    @precondition(lambda self: type(self).lost_pushes)
    @rule(plate=_PLATE)
    def drop_push(self, plate: int) -> None:
        self._apply(DropPush(plate))

    @precondition(lambda self: type(self).stale_ids)
    @rule(plate=_PLATE, other_batch=st.booleans())
    def stale_fact(self, plate: int, other_batch: bool) -> None:
        self._apply(StaleFact(plate, other_batch))

    @precondition(lambda self: type(self).engine_loss)
    @rule()
    def lose_engine(self) -> None:
        self._apply(LoseEngine())

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 10.0]))
    def wait(self, seconds: float) -> None:
        """Virtual time passes: due facts arrive, the service's timers and pollers fire."""
        self._apply(Wait(seconds))

    # --- rules: the user and the host ---------------------------------------------------------

    @precondition(lambda self: type(self).cancels)
    @rule(plate=_PLATE)
    def cancel_plate(self, plate: int) -> None:
        self._apply(Cancel(plate))

    @precondition(lambda self: type(self).cancels)
    @rule()
    def cancel_batch(self) -> None:
        self._apply(Cancel(None))

    @precondition(lambda self: type(self).slow_callbacks)
    @rule()
    def host_catches_up(self) -> None:
        self._apply(HostCatchesUp())

    # --- checks ---------------------------------------------------------------------------------

    @invariant()
    def guarantees_hold(self) -> None:
        if not self._ready:
            return
        try:
            self.harness.check()
            self.check_host(self.host, self.harness)
        except BaseException:
            self._failed = True
            raise

    def teardown(self) -> None:
        if not self._ready:
            return
        try:
            if not self._failed:
                self.harness.finish()
                self.check_host(self.host, self.harness)
        finally:
            self.harness.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self, 'harness', None)!r}>"
