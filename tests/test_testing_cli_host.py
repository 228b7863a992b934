"""The testing kit on the project's own host: ``plateflow.cli.CliHost``.

The CLI host is checked like any third-party host: the stateful test drives
it through every kind of engine disorder, in plain-line and live (terminal)
mode, at every verbosity. On top of C1-C7 it must keep its own promises: its
plate table agrees with what the service reported, every settled plate is
written once as a line (plain mode, verbosity 0), and nothing it writes
breaks because callbacks arrive late or interleaved.
"""

from __future__ import annotations

import io
import itertools
from typing import ClassVar

from hypothesis import settings

from plateflow.cli import CliHost
from plateflow.core import BatchMode, PlateOutcome
from plateflow.host import BatchHost
from plateflow.testing import HostStateMachine, RecordingHost, ServiceHarness


def ticking() -> itertools.count[float]:
    return itertools.count(0.0, 0.25)


class CliHostMachine(HostStateMachine):
    """Plain lines at verbosity 0: one line per settled plate, the table agrees."""

    live: ClassVar[bool] = False
    verbosity: ClassVar[int] = 0

    def make_host(self) -> BatchHost:
        clock = ticking()
        self.stream = io.StringIO()
        return CliHost(
            self.stream,
            verbosity=type(self).verbosity,
            live=type(self).live,
            colour=False,
            clock=lambda: next(clock),
        )

    def check_host(self, host: BatchHost, harness: ServiceHarness) -> None:
        assert isinstance(host, CliHost)
        reported: dict[str, PlateOutcome] = {
            c.args[0]: c.args[1] for c in harness.calls if c.name == "on_plate_completed"
        }
        for plate_id, outcome in reported.items():
            line = host.plates[plate_id]
            assert line.outcome is outcome, f"{plate_id}: table says {line.outcome}"
            if outcome is not PlateOutcome.COMPILED:
                assert line.state == outcome.value, f"{plate_id}: table says {line.state}"
        if not type(self).live and type(self).verbosity == 0:
            text = self.stream.getvalue()
            for plate_id, outcome in reported.items():
                written = text.count(f"] {plate_id} {outcome.value} in ")
                assert written == 1, f"{plate_id} {outcome.value} written {written} times:\n{text}"
        summary = host.summary
        if summary is not None:
            assert summary.batch_id == harness.batch_id
            assert {s.plate_id for s in summary.plates} == set(reported)


class LiveCliHostMachine(CliHostMachine):
    """The live (terminal) view, drawing in place."""

    live = True


class ChattyCliHostMachine(CliHostMachine):
    """Plain lines at verbosity 1: every plate move and engine status too."""

    verbosity = 1


TestCliHost = CliHostMachine.TestCase
TestLiveCliHost = LiveCliHostMachine.TestCase
TestChattyCliHost = ChattyCliHostMachine.TestCase


def test_cli_host_in_ci_profile_examples_with_a_compile_only_batch() -> None:
    class CompileOnly(CliHostMachine):
        modes = (BatchMode.COMPILE_ONLY,)

    CompileOnly.TestCase.settings = settings(settings.get_profile("ci"), max_examples=100)
    CompileOnly.TestCase("runTest").runTest()


def test_the_recording_host_and_the_cli_host_hear_the_same_reports() -> None:
    def reports(host: BatchHost) -> list[tuple[str, PlateOutcome]]:
        with ServiceHarness(host) as harness:
            harness.start(["plate-0", "plate-1"], BatchMode.RUN)
            harness.cancel("plate-1")
            harness.finish()
            return sorted(
                (c.args[0], c.args[1]) for c in harness.calls if c.name == "on_plate_completed"
            )

    cli = CliHost(io.StringIO(), live=False, colour=False)
    assert reports(cli) == reports(RecordingHost())
    assert cli.plates["plate-1"].outcome is PlateOutcome.CANCELLED
