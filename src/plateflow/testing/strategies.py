"""Hypothesis strategies for engine-fact orderings, as small readable scenarios.

Theory of operation: a host sees engine facts only through the service, and
the service names submissions with ids it makes up at run time, so an
ordering cannot be a fixed list of facts. It is a list of *steps* relative
to what the fake engine has pending: "deliver plate 1's next fact", "deliver
a later fact of plate 0 first", "re-send plate 0's last fact", "cancel plate
2", "the engine is lost". Steps are tiny frozen dataclasses, so a shrunk
counterexample reads as a script, and :meth:`Scenario.run` replays it.

Every kind of disorder is a parameter of :func:`scenarios`: duplicates,
stale ids, out-of-order arrival, lost pushes, cancels at any point, engine
loss, engine failures, slow host callbacks and failing host callbacks. Turn
one off to find out whether a failure needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from hypothesis import strategies as st

from plateflow.core import BatchMode, BatchSummary, CompileFailurePolicy
from plateflow.host import BatchHost
from plateflow.testing.fake_engine import Outcome, PlateScript
from plateflow.testing.harness import ServiceHarness

__all__ = [
    "Cancel",
    "Deliver",
    "DropPush",
    "Duplicate",
    "HostCatchesUp",
    "LoseEngine",
    "Scenario",
    "StaleFact",
    "Step",
    "Wait",
    "plate_scripts",
    "scenarios",
    "steps",
]


def plate_id(index: int) -> str:
    """The plate ids scenarios use: ``plate-0``, ``plate-1``, …"""
    return f"plate-{index}"


class Step(Protocol):
    def apply(self, harness: ServiceHarness) -> None: ...


def _plate(harness: ServiceHarness, index: int) -> str:
    return harness.plate_ids[index % len(harness.plate_ids)]


@dataclass(frozen=True, slots=True)
class Deliver:
    """The engine pushes plate ``plate``'s next fact; ``late`` > 0 pushes a later one first."""

    plate: int
    late: int = 0

    def apply(self, harness: ServiceHarness) -> None:
        harness.deliver(_plate(harness, self.plate), self.late)


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The engine pushes a fact it already pushed for the plate (``back`` 0: the latest)."""

    plate: int
    back: int = 0

    def apply(self, harness: ServiceHarness) -> None:
        harness.duplicate(_plate(harness, self.plate), self.back)


@dataclass(frozen=True, slots=True)
class DropPush:
    """The plate's next fact happens but its push is lost (the status poller must find it)."""

    plate: int

    def apply(self, harness: ServiceHarness) -> None:
        harness.drop(_plate(harness, self.plate))


@dataclass(frozen=True, slots=True)
class StaleFact:
    """A fact about the plate naming another plate's or another batch's submission."""

    plate: int
    other_batch: bool = False

    def apply(self, harness: ServiceHarness) -> None:
        harness.stale(_plate(harness, self.plate), other_batch=self.other_batch)


@dataclass(frozen=True, slots=True)
class Cancel:
    """The user cancels one plate, or the whole batch when ``plate`` is None."""

    plate: int | None = None

    def apply(self, harness: ServiceHarness) -> None:
        harness.cancel(None if self.plate is None else _plate(harness, self.plate))


@dataclass(frozen=True, slots=True)
class LoseEngine:
    """The engine dies (missed heartbeats); every unsettled plate must fail at once (C7)."""

    def apply(self, harness: ServiceHarness) -> None:
        harness.lose_engine()


@dataclass(frozen=True, slots=True)
class Wait:
    """``seconds`` of virtual time pass: due facts arrive, timers and pollers fire."""

    seconds: float

    def apply(self, harness: ServiceHarness) -> None:
        harness.advance(self.seconds)


@dataclass(frozen=True, slots=True)
class HostCatchesUp:
    """A slow host delivers every callback it has queued."""

    def apply(self, harness: ServiceHarness) -> None:
        harness.catch_up()


AnyStep = Deliver | Duplicate | DropPush | StaleFact | Cancel | LoseEngine | Wait | HostCatchesUp


@dataclass(frozen=True)
class Scenario:
    """One batch: its plates and engine scripts, the host's pace and faults, and the steps."""

    n_plates: int
    mode: BatchMode = BatchMode.RUN
    policy: CompileFailurePolicy = CompileFailurePolicy.ABORT
    scripts: tuple[PlateScript, ...] = ()
    host_pace: int | None = None
    host_faults: tuple[bool, ...] = ()
    steps: tuple[AnyStep, ...] = field(default=())

    @property
    def plate_ids(self) -> tuple[str, ...]:
        return tuple(plate_id(i) for i in range(self.n_plates))

    def harness(self, host: BatchHost) -> ServiceHarness:
        """A harness for ``host`` set up as this scenario says (not started)."""
        return ServiceHarness(
            host,
            scripts=dict(zip(self.plate_ids, self.scripts, strict=False)),
            policy=self.policy,
            host_pace=self.host_pace,
            faults=self.host_faults,
        )

    def run(self, make_host: Callable[[], BatchHost]) -> BatchSummary:
        """Play the scenario against a fresh host; raise the first broken guarantee."""
        with self.harness(make_host()) as harness:
            harness.start(self.plate_ids, self.mode)
            harness.check()
            for step in self.steps:
                step.apply(harness)
                harness.check()
            return harness.finish()

    def __repr__(self) -> str:
        scripts = ", ".join(_script_repr(s) for s in self.scripts)
        head = (
            f"Scenario(n_plates={self.n_plates}, mode={self.mode.value!r}, "
            f"policy={self.policy.value!r}, host_pace={self.host_pace}, "
            f"host_faults={self.host_faults}, scripts=[{scripts}], steps=["
        )
        body = "".join(f"\n    {step!r}," for step in self.steps)
        return head + body + ("\n])" if self.steps else "])")


def _script_repr(script: PlateScript) -> str:
    default = PlateScript()
    changed = [
        f"{name}={getattr(script, name)!r}"
        for name in ("compile", "execute", "on_cancel")
        if getattr(script, name) != getattr(default, name)
    ]
    return f"PlateScript({', '.join(changed)})"


def plate_scripts(*, failures: bool = True, hangs: bool = True) -> st.SearchStrategy[PlateScript]:
    """What the engine does with one plate: mostly succeeds, shrinking towards success."""
    outcomes: list[Outcome] = ["succeed"]
    if failures:
        outcomes += ["fail", "reject"]
    if hangs:
        outcomes.append("hang")
    on_cancel: list[Literal["confirm", "ignore"]] = ["confirm", "ignore"] if hangs else ["confirm"]
    return st.builds(
        PlateScript,
        compile=st.sampled_from(outcomes),
        execute=st.sampled_from(outcomes),
        on_cancel=st.sampled_from(on_cancel),
    )


def steps(
    max_plates: int,
    *,
    duplicates: bool = True,
    stale_ids: bool = True,
    out_of_order: bool = True,
    lost_pushes: bool = True,
    cancels: bool = True,
    engine_loss: bool = True,
    slow_callbacks: bool = True,
) -> st.SearchStrategy[AnyStep]:
    """One step of a scenario; plate indexes wrap around the scenario's plate count."""
    plate = st.integers(0, max(max_plates - 1, 0))
    options: list[st.SearchStrategy[AnyStep]] = [
        st.builds(Deliver, plate, st.integers(0, 2) if out_of_order else st.just(0)),
        st.builds(Wait, st.sampled_from([0.5, 1.0, 3.0, 10.0])),
    ]
    if duplicates:
        options.append(st.builds(Duplicate, plate, st.integers(0, 2)))
    if lost_pushes:
        options.append(st.builds(DropPush, plate))
    if stale_ids:
        options.append(st.builds(StaleFact, plate, st.booleans()))
    if cancels:
        options.append(st.builds(Cancel, st.none() | plate))
    if engine_loss:
        options.append(st.just(LoseEngine()))
    if slow_callbacks:
        options.append(st.just(HostCatchesUp()))
    return st.one_of(options)


_ONE_TO_FOUR: Final = st.integers(1, 4)


@st.composite
def scenarios(
    draw: st.DrawFn,
    *,
    n_plates: int | st.SearchStrategy[int] = _ONE_TO_FOUR,
    modes: Sequence[BatchMode] = (BatchMode.RUN, BatchMode.COMPILE_ONLY),
    policies: Sequence[CompileFailurePolicy] = (
        CompileFailurePolicy.ABORT,
        CompileFailurePolicy.CONTINUE,
    ),
    max_steps: int = 25,
    duplicates: bool = True,
    stale_ids: bool = True,
    out_of_order: bool = True,
    lost_pushes: bool = True,
    cancels: bool = True,
    engine_loss: bool = True,
    engine_failures: bool = True,
    slow_callbacks: bool = True,
    failing_callbacks: bool = True,
) -> Scenario:
    """Scenarios over N plates with every kind of disorder a parameter (all on by default).

    ``engine_failures`` lets plates fail, be rejected or hang; ``slow_callbacks``
    makes the host lag behind the service by a drawn number of callbacks per
    step; ``failing_callbacks`` raises :class:`InjectedFault` after host
    callbacks on a drawn schedule.
    """
    count = draw(n_plates) if isinstance(n_plates, st.SearchStrategy) else n_plates
    if count < 1:
        raise ValueError("a scenario needs at least one plate")
    mode = draw(st.sampled_from(list(modes)))
    policy = draw(st.sampled_from(list(policies)))
    scripts = tuple(
        draw(plate_scripts(failures=engine_failures, hangs=engine_failures)) for _ in range(count)
    )
    pace = draw(st.none() | st.integers(1, 3)) if slow_callbacks else None
    faults: tuple[bool, ...] = ()
    if failing_callbacks:
        faults = tuple(draw(st.lists(st.booleans(), max_size=5)))
        if not any(faults):
            faults = ()
    chosen = draw(
        st.lists(
            steps(
                count,
                duplicates=duplicates,
                stale_ids=stale_ids,
                out_of_order=out_of_order,
                lost_pushes=lost_pushes,
                cancels=cancels,
                engine_loss=engine_loss,
                slow_callbacks=slow_callbacks and pace is not None,
            ),
            max_size=max_steps,
        )
    )
    return Scenario(count, mode, policy, scripts, pace, faults, tuple(chosen))
