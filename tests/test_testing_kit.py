"""The testing kit tests itself: the virtual-time loop, the fake engine, the recording
host, the harness's checks, the strategies, the stateful test on broken hosts, and the
pytest plugin.

Each deliberately broken host below is a bug a real host could have; the stateful
test must catch each one, name the guarantee it breaks, and shrink the run to a
few readable steps. The correct hosts must pass: ``test_a_correct_host_passes_*``
runs 1,000 examples in the ``ci`` profile (about 25 s on one core).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import JsonValue

from plateflow.core import (
    BatchMode,
    BatchState,
    BatchSummary,
    CompileFailurePolicy,
    ExecutionSucceeded,
    Fact,
    PlateOutcome,
    PlateState,
    Reason,
)
from plateflow.engines.base import EngineError, Submission
from plateflow.host import BaseBatchHost, BatchHost
from plateflow.jobs import CompileJob
from plateflow.pipeline.spec import PipelineSpec, StepSpec
from plateflow.testing import (
    FakeEngine,
    GuaranteeViolation,
    HostStateMachine,
    PlateScript,
    RecordingHost,
    Scenario,
    ServiceHarness,
    VirtualClock,
    VirtualTimeLoop,
    scenarios,
)
from plateflow.testing.plugin import TemporaryServer
from plateflow.testing.strategies import (
    Cancel,
    Deliver,
    Duplicate,
    HostCatchesUp,
    LoseEngine,
    StaleFact,
    Wait,
)

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = PipelineSpec(steps=(StepSpec(function="plateflow.examples.platereader:normalise"),))

# Find a broken host fast and shrink it, without the (slow) explain phase; the runs
# are short because every one of these bugs shows within a few steps.
CATCH = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.generate, Phase.shrink],
    stateful_step_count=10,
    suppress_health_check=[HealthCheck.too_slow],
)


def job(plate_id: str) -> CompileJob:
    return CompileJob(plate_id=plate_id, plate_path=f"/plates/{plate_id}", pipeline=PIPELINE)


# --- the virtual-time loop ---------------------------------------------------------------


def test_timers_fire_in_virtual_time_in_order() -> None:
    clock = VirtualClock(10.0)
    loop = VirtualTimeLoop(clock)
    fired: list[tuple[str, float]] = []
    try:
        loop.call_later(3600, lambda: fired.append(("hour", clock.now)))
        loop.call_later(5, lambda: fired.append(("five", clock.now)))
        loop.advance(4.9)
        assert fired == []
        loop.advance(3600)
        assert fired == [("five", 15.0), ("hour", 3610.0)]
        assert clock.now == pytest.approx(3614.9)
    finally:
        loop.close()


def test_run_until_done_gives_up_at_its_virtual_bound() -> None:
    loop = VirtualTimeLoop(VirtualClock())
    try:
        quick = loop.run_until_done(asyncio.sleep(30), within=60)
        assert quick.done()
        forever = loop.run_until_done(asyncio.Event().wait(), within=60)
        assert not forever.done()
        forever.cancel()
        loop.run_until_idle()
        assert loop.idle()
    finally:
        loop.close()


def test_the_virtual_clock_never_goes_back() -> None:
    clock = VirtualClock(5.0)
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance_to(4.0)
    with pytest.raises(ValueError, match="negative"):
        clock.advance(-1)


# --- the fake engine -----------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.facts: list[Fact] = []

    def __call__(self, fact: Fact) -> None:
        self.facts.append(fact)

    def kinds(self) -> list[str]:
        return [f.kind for f in self.facts]


async def started(engine: FakeEngine) -> Sink:
    sink = Sink()
    await engine.start(sink)
    return sink


def test_fake_engine_delivers_nothing_until_driven_then_in_virtual_time_order() -> None:
    async def scenario() -> None:
        engine = FakeEngine(default=PlateScript(compile_time=2.0))
        sink = await started(engine)
        await engine.submit_compile("j1", job("a"))
        assert sink.facts == []
        assert [p.fact.kind for p in engine.pending] == ["compile_accepted", "compile_succeeded"]
        assert engine.advance(1.0) == sink.facts
        assert sink.kinds() == ["compile_accepted"]
        engine.advance(1.0)
        assert sink.kinds() == ["compile_accepted", "compile_succeeded"]
        assert engine.pending == []

    asyncio.run(scenario())


def test_fake_engine_steps_reorders_duplicates_and_drops() -> None:
    async def scenario() -> None:
        engine = FakeEngine(default=PlateScript(progress_steps=2))
        sink = await started(engine)
        await engine.submit_execution("x1", job("a"), "art")
        assert [p.fact.kind for p in engine.pending_for("a")] == [
            "execution_accepted",
            "execution_started",
            "execution_progress",
            "execution_progress",
            "execution_succeeded",
        ]
        late = engine.step("a", index=2)  # progress overtakes acceptance and start
        assert late is not None
        assert late.kind == "execution_progress"
        assert engine.step("a") is not None
        assert engine.redeliver("a") is sink.facts[-1]
        dropped = engine.drop("a")
        assert dropped is not None
        assert dropped.kind == "execution_started"
        assert dropped not in sink.facts
        status = await engine.status([Submission("a", "execute", "x1")])
        assert status == [dropped], "status knows what happened, pushed or not"
        assert sink.kinds() == [
            "execution_progress",
            "execution_accepted",
            "execution_accepted",
        ]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("script", "kinds"),
    [
        (PlateScript(compile="reject"), ["compile_rejected"]),
        (PlateScript(compile="fail"), ["compile_accepted", "compile_failed"]),
        (PlateScript(compile="hang"), ["compile_accepted"]),
    ],
)
def test_fake_engine_follows_its_script(script: PlateScript, kinds: list[str]) -> None:
    async def scenario() -> None:
        engine = FakeEngine({"a": script})
        sink = await started(engine)
        await engine.submit_compile("j1", job("a"))
        engine.advance(100)
        assert sink.kinds() == kinds

    asyncio.run(scenario())


def test_fake_engine_cancel_is_confirmed_or_ignored_as_scripted() -> None:
    async def scenario() -> None:
        engine = FakeEngine({"b": PlateScript(on_cancel="ignore")}, auto_deliver=True)
        sink = await started(engine)
        for plate in ("a", "b"):
            await engine.submit_execution(f"x-{plate}", job(plate), "art")
            await engine.cancel(Submission(plate, "execute", f"x-{plate}"))
        engine.advance(100)
        assert [f.kind for f in sink.facts if getattr(f, "plate_id", "") == "a"][-1] == (
            "execution_cancelled"
        )
        assert [f.kind for f in sink.facts if getattr(f, "plate_id", "") == "b"][-1] == (
            "execution_succeeded"
        )

    asyncio.run(scenario())


def test_a_lost_fake_engine_says_so_once_and_refuses_every_call() -> None:
    async def scenario() -> None:
        engine = FakeEngine(fail_calls={"server_info": RuntimeError("no info")})
        sink = await started(engine)
        with pytest.raises(RuntimeError, match="no info"):
            await engine.server_info()
        engine.lose("unplugged")
        engine.lose("again")
        assert sink.kinds() == ["engine_lost"]
        with pytest.raises(EngineError, match="unplugged"):
            await engine.submit_compile("j1", job("a"))
        assert [c.method for c in engine.calls] == ["start", "server_info", "submit_compile"]

    asyncio.run(scenario())


# --- the recording host ----------------------------------------------------------------------


def test_recording_host_records_arguments_thread_and_the_stores_it_could_see() -> None:
    host = RecordingHost(raise_in={"update_item_list"})
    host.plate_execution_states["a"] = PlateState.QUEUED
    host.emit_orchestrator_state("a", PlateState.QUEUED)
    host.emit_error("boom", code="x", plate_id="a")
    with pytest.raises(RuntimeError, match="raise_in"):
        host.update_item_list()
    assert host.names("emit_error") == [("boom", "x", "a")]
    (call,) = host.calls_to("emit_orchestrator_state")
    assert call.view.plate_execution_states == {"a": PlateState.QUEUED}
    assert call.thread_id == threading.get_ident()
    host.plate_execution_states["a"] = PlateState.COMPILING
    assert call.view.plate_execution_states == {"a": PlateState.QUEUED}, "a copy, not the store"
    assert [c.name for c in host.calls] == [
        "emit_orchestrator_state",
        "emit_error",
        "update_item_list",
    ]


def test_recording_host_wait_for_is_bounded_and_sees_other_threads() -> None:
    host = RecordingHost()
    worker = threading.Thread(target=host.update_item_list)
    worker.start()
    call = host.wait_for(lambda c: c.name == "update_item_list", timeout=10.0)
    worker.join(10.0)
    assert call.thread_id != threading.get_ident()
    with pytest.raises(TimeoutError, match="no matching host callback"):
        host.wait_for(lambda c: c.name == "never", timeout=0.05)


# --- the harness on a recording host -----------------------------------------------------------


def test_harness_runs_a_batch_and_the_host_hears_each_plate_once() -> None:
    host = RecordingHost()
    with ServiceHarness(host) as harness:
        harness.start(["a", "b"], BatchMode.RUN)
        summary = harness.finish()
    assert summary.outcome is BatchState.COMPLETED
    assert sorted(a[0] for a in host.names("on_plate_completed")) == ["a", "b"]
    assert len(host.names("on_all_plates_completed")) == 1
    assert host.threads == {threading.get_ident()}
    # compile 1 s, then execute 2 s, all in virtual time
    assert harness.clock.now == pytest.approx(1_003.0)


def test_harness_compile_only_batch_rests_in_compiled() -> None:
    host = RecordingHost()
    with ServiceHarness(host) as harness:
        harness.start(["a"], BatchMode.COMPILE_ONLY)
        summary = harness.finish()
    assert summary.counts == {PlateOutcome.COMPILED: 1}
    assert host.plate_execution_states == {"a": PlateState.COMPILED}
    assert "a" in host.plate_compiled_data


def test_harness_engine_loss_fails_every_plate_at_once() -> None:
    host = RecordingHost()
    with ServiceHarness(host) as harness:
        harness.start(["a", "b"], BatchMode.RUN)
        harness.deliver("a")
        harness.lose_engine()
        assert harness.settled
        summary = harness.finish()
    assert {s.reason for s in summary.plates} == {Reason.ENGINE_LOST}


def test_harness_cancel_an_engine_ignores_settles_after_the_grace_in_virtual_time() -> None:
    host = RecordingHost()
    with ServiceHarness(
        host, default_script=PlateScript(compile="hang", on_cancel="ignore"), cancel_grace=30
    ) as h:
        h.start(["a"], BatchMode.RUN)
        h.cancel("a")
        h.advance(29.0)
        assert not h.settled
        h.advance(2.0)
        assert h.settled
        summary = h.finish()
    assert [(s.outcome, s.reason) for s in summary.plates] == [
        (PlateOutcome.CANCELLED, Reason.CANCEL_UNCONFIRMED)
    ]


def test_harness_slow_host_lags_then_catches_up() -> None:
    host = RecordingHost()
    with ServiceHarness(host, host_pace=1) as harness:
        harness.start(["a", "b", "c"], BatchMode.RUN)
        assert harness.dispatcher.backlog > 0, "the host is behind the service"
        harness.advance(10)
        assert harness.settled
        assert harness.dispatcher.backlog > 0
        harness.finish()
    assert harness.dispatcher.backlog == 0
    assert len(host.names("on_plate_completed")) == 3


def test_harness_injected_faults_are_reported_through_emit_error() -> None:
    host = RecordingHost()
    with ServiceHarness(host, faults=(False, True)) as harness:
        harness.start(["a", "b"], BatchMode.RUN)
        summary = harness.finish()
    assert summary.outcome is BatchState.COMPLETED
    assert harness.probe.faults_needing_report > 0
    reported = [a for a in host.names("emit_error") if a[1] == "host_callback_failed"]
    assert len(reported) >= harness.probe.faults_needing_report


def test_stale_and_duplicate_facts_never_reach_the_host_as_reports() -> None:
    host = RecordingHost()
    with ServiceHarness(host) as harness:
        harness.start(["a", "b"], BatchMode.RUN)
        harness.advance(1.5)
        harness.stale("a")
        harness.stale("b", other_batch=True)
        harness.duplicate("a")
        harness.finish()
    assert sorted(a[0] for a in host.names("on_plate_completed")) == ["a", "b"]


# --- the broken hosts --------------------------------------------------------------------------


class DoubleReportingHost(BaseBatchHost):
    """Reports a plate when it sees its final state, and again when the service reports it."""

    def emit_orchestrator_state(self, plate_id: str, state: PlateState) -> None:
        if state.is_terminal:
            self.on_plate_completed(plate_id, PlateOutcome(state.value), None)


class EagerBatchHost(BaseBatchHost):
    """Declares the batch over as soon as every plate has shown a final state."""

    def __init__(self) -> None:
        super().__init__()
        self.final: set[str] = set()

    def emit_orchestrator_state(self, plate_id: str, state: PlateState) -> None:
        if state.is_terminal or state is PlateState.COMPILED:
            self.final.add(plate_id)
            if self.final >= set(self.plate_execution_states):
                done = BatchSummary("?", BatchMode.RUN, BatchState.COMPLETED, ())
                self.on_all_plates_completed(done)


class RaisingHost(BaseBatchHost):
    """Assumes every plate got as far as executing: a KeyError for any other."""

    def __init__(self) -> None:
        super().__init__()
        self.running: dict[str, PlateState] = {}

    def emit_orchestrator_state(self, plate_id: str, state: PlateState) -> None:
        if state is PlateState.EXECUTING:
            self.running[plate_id] = state

    def on_plate_completed(self, plate_id: str, outcome: PlateOutcome, result: JsonValue) -> None:
        del self.running[plate_id]


class ForeignThreadHost(BaseBatchHost):
    """Forgets a settled plate from a worker thread (it even waits for it)."""

    def on_plate_completed(self, plate_id: str, outcome: PlateOutcome, result: JsonValue) -> None:
        worker = threading.Thread(target=self.plate_execution_states.pop, args=(plate_id,))
        worker.start()
        worker.join(10.0)


def machine_for(make: Callable[[], BatchHost]) -> type[HostStateMachine]:
    class Machine(HostStateMachine):
        def make_host(self) -> BatchHost:
            return make()

    Machine.TestCase.settings = CATCH
    return Machine


RULE_LINE = re.compile(r"^state\.(?!guarantees_hold|teardown)\w+\(", re.M)


@pytest.mark.parametrize(
    ("host", "guarantee", "says"),
    [
        (DoubleReportingHost, "C2", "called a second time"),
        (EagerBatchHost, "C3", "before on_plate_completed"),
        (RaisingHost, "C5", "raised KeyError"),
        (ForeignThreadHost, "C6", "written from thread"),
    ],
)
def test_the_stateful_test_catches_a_broken_host_and_names_the_guarantee(
    host: Callable[[], BatchHost], guarantee: str, says: str
) -> None:
    machine = machine_for(host)
    with pytest.raises(GuaranteeViolation) as info:
        machine.TestCase("runTest").runTest()
    violation = info.value
    assert violation.guarantee == guarantee, str(violation)
    assert str(violation).startswith(f"{guarantee} (")
    assert says in violation.detail
    notes = "\n".join(getattr(violation, "__notes__", []))
    assert "state.start_batch(" in notes, notes
    assert len(RULE_LINE.findall(notes)) <= 3, f"not shrunk to a small example:\n{notes}"
    assert "Draw 1 (plates): 1" in notes, f"not shrunk to one plate:\n{notes}"


def test_a_broken_host_is_caught_by_a_scenario_too_and_the_scenario_reads_as_a_script() -> None:
    scenario = Scenario(1, BatchMode.RUN, steps=(Cancel(0),))
    with pytest.raises(GuaranteeViolation) as info:
        scenario.run(RaisingHost)
    assert info.value.guarantee == "C5"
    assert repr(scenario) == (
        "Scenario(n_plates=1, mode='run', policy='abort', host_pace=None, host_faults=(), "
        "scripts=[], steps=[\n    Cancel(plate=0),\n])"
    )


# --- the correct hosts -------------------------------------------------------------------------


class TableHost(BaseBatchHost):
    """A well-behaved host: one row per plate, a banner once the batch is over."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, str] = {}
        self.banner = ""

    def emit_orchestrator_state(self, plate_id: str, state: PlateState) -> None:
        self.rows[plate_id] = state.value

    def on_plate_completed(self, plate_id: str, outcome: PlateOutcome, result: JsonValue) -> None:
        self.rows[plate_id] = f"{outcome.value} (final)"

    def on_all_plates_completed(self, summary: BatchSummary) -> None:
        self.banner = f"batch {summary.outcome.value}"


class TableHostMachine(HostStateMachine):
    def make_host(self) -> BatchHost:
        return TableHost()

    def check_host(self, host: BatchHost, harness: ServiceHarness) -> None:
        assert isinstance(host, TableHost)
        if host.banner:
            assert all(row.endswith("(final)") for row in host.rows.values()), host.rows


def test_a_correct_host_passes_1000_examples_in_the_ci_profile() -> None:
    TableHostMachine.TestCase.settings = settings(
        settings.get_profile("ci"), max_examples=1_000, stateful_step_count=20
    )
    TableHostMachine.TestCase("runTest").runTest()


class RecordingMachine(HostStateMachine):
    """The recording host, with only some kinds of disorder (the switches work)."""

    max_plates: ClassVar[int] = 2
    engine_loss: ClassVar[bool] = False
    failing_callbacks: ClassVar[bool] = False

    def make_host(self) -> BatchHost:
        return RecordingHost()

    def check_host(self, host: BatchHost, harness: ServiceHarness) -> None:
        assert isinstance(host, RecordingHost)
        assert not harness.engine.lost
        assert harness.probe.fault_count == 0


TestRecordingMachine = RecordingMachine.TestCase


@given(scenarios())
def test_every_scenario_passes_on_the_recording_host(scenario: Scenario) -> None:
    summary = scenario.run(RecordingHost)
    assert {s.plate_id for s in summary.plates} == set(scenario.plate_ids)


@given(
    scenarios(
        n_plates=2,
        duplicates=False,
        stale_ids=False,
        out_of_order=False,
        lost_pushes=False,
        cancels=False,
        engine_loss=False,
        engine_failures=False,
        slow_callbacks=False,
        failing_callbacks=False,
    )
)
def test_scenario_switches_turn_each_kind_of_disorder_off(scenario: Scenario) -> None:
    assert scenario.n_plates == 2
    assert scenario.host_pace is None
    assert scenario.host_faults == ()
    assert {s.compile for s in scenario.scripts} | {s.execute for s in scenario.scripts} <= {
        "succeed"
    }
    allowed = (Deliver, Wait)
    assert all(
        isinstance(step, allowed) and getattr(step, "late", 0) == 0 for step in scenario.steps
    )
    summary = scenario.run(RecordingHost)
    assert summary.outcome is BatchState.COMPLETED


@settings(max_examples=25)
@given(st.data())
def test_a_scenario_replays_the_same_callbacks(data: st.DataObject) -> None:
    scenario = data.draw(scenarios(n_plates=2, max_steps=10))
    hosts: list[RecordingHost] = []

    def make() -> RecordingHost:
        hosts.append(RecordingHost())
        return hosts[-1]

    scenario.run(make)
    scenario.run(make)
    first, second = ([(c.name, _comparable(c.args)) for c in host.calls] for host in hosts)
    assert first == second


def _comparable(args: tuple[object, ...]) -> tuple[object, ...]:
    """Arguments without what differs between runs by design (the batch id is random)."""
    return tuple(
        a.outcome if isinstance(a, BatchSummary) else a
        for a in args
        if isinstance(a, BatchSummary | PlateState | PlateOutcome | BatchState | int)
        or (isinstance(a, str) and a.startswith("plate-"))
    )


def test_pinned_regression_scenario_reads_as_a_script() -> None:
    scenario = Scenario(
        2,
        BatchMode.RUN,
        CompileFailurePolicy.CONTINUE,
        scripts=(PlateScript(execute="fail"), PlateScript(on_cancel="ignore")),
        host_pace=1,
        steps=(
            Deliver(0),
            Deliver(1, late=1),
            Duplicate(0),
            StaleFact(1),
            Cancel(1),
            HostCatchesUp(),
            LoseEngine(),
        ),
    )
    summary = scenario.run(RecordingHost)
    assert summary.outcome is BatchState.FAILED
    assert "PlateScript(execute='fail')" in repr(scenario)


# --- the harness's own checks, one by one ---------------------------------------------------------


def test_a_callback_called_from_a_foreign_thread_breaks_c6() -> None:
    host = RecordingHost()
    with ServiceHarness(host) as harness:
        harness.start(["a"], BatchMode.RUN)
        worker = threading.Thread(target=host.update_item_list, name="rogue")
        worker.start()
        worker.join(10.0)
        with pytest.raises(GuaranteeViolation, match=r"^C6 .*'rogue'") as info:
            harness.check()
    assert info.value.guarantee == "C6"


def test_a_host_that_reports_an_unsettled_plate_breaks_c1() -> None:
    class Impatient(BaseBatchHost):
        def emit_orchestrator_state(self, plate_id: str, state: PlateState) -> None:
            if state is PlateState.COMPILING:
                self.on_plate_completed(plate_id, PlateOutcome.COMPLETED, None)

    with ServiceHarness(Impatient()) as harness:
        harness.start(["a"], BatchMode.RUN)
        harness.deliver("a")
        with pytest.raises(GuaranteeViolation, match="still compiling") as info:
            harness.check()
    assert info.value.guarantee == "C1"


def test_an_engine_fact_from_another_batch_is_not_the_hosts_business() -> None:
    host = RecordingHost()
    with ServiceHarness(host) as harness:
        harness.start(["a"], BatchMode.RUN)
        harness.engine.inject(ExecutionSucceeded(plate_id="a", execution_id="old.0.x"))
        harness.settle()
        harness.check()
        assert host.names("on_plate_completed") == []
        harness.finish()


# --- the pytest plugin ---------------------------------------------------------------------------


def test_the_plugin_fixtures(
    fake_engine: FakeEngine,
    recording_host: RecordingHost,
    service_harness: Callable[..., ServiceHarness],
) -> None:
    assert isinstance(fake_engine, FakeEngine)
    assert fake_engine.calls == []
    assert recording_host.calls == []
    harness = service_harness(recording_host, policy=CompileFailurePolicy.CONTINUE)
    harness.start(["a"], BatchMode.RUN)
    assert harness.finish().outcome is BatchState.COMPLETED


def test_the_hypothesis_profiles_match_what_the_project_used() -> None:
    ci = settings.get_profile("ci")
    assert (ci.max_examples, ci.derandomize, ci.deadline, ci.print_blob) == (300, True, None, True)
    assert settings.get_profile("dev").max_examples == 50
    nightly = settings.get_profile("nightly")
    assert (nightly.max_examples, nightly.derandomize) == (5_000, False)


@pytest.mark.parametrize(
    ("profile", "examples", "derandomized", "in_ci"),
    [("ci", 300, True, False), (None, 50, False, False), ("nightly", 5_000, False, True)],
    ids=["ci", "unset", "nightly-with-CI-variable"],
)
def test_the_plugin_selects_the_profile_from_the_environment(
    tmp_path: Path, profile: str | None, examples: int, derandomized: bool, in_ci: bool
) -> None:
    # Hypothesis itself loads a derandomised profile when it sees CI=...; ours must
    # not inherit from it (a nightly run on a CI machine would repeat one sequence).
    (tmp_path / "test_profile.py").write_text(
        "from hypothesis import settings\n\n"
        "def test_profile():\n"
        f"    assert settings.default.max_examples == {examples}\n"
        f"    assert settings.default.derandomize is {derandomized}\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HYPOTHESIS_PROFILE", "CI")}
    if profile is not None:
        env["HYPOTHESIS_PROFILE"] = profile
    if in_ci:
        env["CI"] = "true"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_plugin_is_registered_through_the_pytest11_entry_point() -> None:
    import importlib.metadata

    (entry,) = [
        ep
        for ep in importlib.metadata.entry_points(group="pytest11")
        if ep.value == "plateflow.testing.plugin"
    ]
    assert entry.name == "plateflow"


def test_plateflow_server_fixture_runs_a_real_batch(
    plateflow_server: TemporaryServer, tmp_path: Path
) -> None:
    from plateflow.examples.platereader import demo_pipeline, generate_plates
    from plateflow.service import Plate, SyncBatchWorkflowService

    plates = generate_plates(tmp_path / "plates", 2, seed=5, wells=96)
    host = RecordingHost()
    with SyncBatchWorkflowService(host, plateflow_server.engine()) as service:
        summary = service.run_plates(
            [Plate(p.plate_id, str(p.path)) for p in plates], pipeline=demo_pipeline()
        )
    assert summary.outcome is BatchState.COMPLETED
    assert plateflow_server.running, "closing an engine that attached leaves the server running"


def test_a_temporary_server_stops_and_cleans_up(tmp_path: Path) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="pft-"))
    server = TemporaryServer(runtime, tmp_path / "out")
    try:
        server.start()
        assert (runtime / "server.json").exists()
        assert server.running
    finally:
        server.stop()
        stopped = not server.running
        left = sorted(p.name for p in runtime.iterdir())
        shutil.rmtree(runtime, ignore_errors=True)
    assert stopped
    assert "server.json" not in left
    assert "token" not in left
    server.stop()  # idempotent


def test_the_kit_is_typed_and_exports_what_it_documents() -> None:
    import plateflow.testing as kit

    assert set(kit.__all__) >= {
        "FakeEngine",
        "RecordingHost",
        "HostStateMachine",
        "ServiceHarness",
        "GuaranteeViolation",
        "scenarios",
    }
    assert (ROOT / "src" / "plateflow" / "py.typed").exists()
