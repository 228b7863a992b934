"""The pytest plugin of plateflow.testing (registered through the ``pytest11`` entry point).

Fixtures:

- ``fake_engine`` — a fresh :class:`FakeEngine` (all plates succeed);
- ``recording_host`` — a fresh :class:`RecordingHost`;
- ``service_harness`` — a factory ``service_harness(host, **options)`` for
  :class:`ServiceHarness` objects, every one closed at teardown;
- ``plateflow_server`` — a real ZeroMQ execution server in a private
  temporary runtime dir, on a thread of the test process; its
  ``engine()`` makes a :class:`ZmqEngine` attached to it. Stopped (and
  checked to have stopped) at teardown.

Hypothesis profiles, selected by ``HYPOTHESIS_PROFILE`` (``dev`` when unset):
``dev`` 50 examples; ``ci`` 300 examples, derandomised, prints the blob to
reproduce a failure; ``nightly`` 5,000 examples. A project that registers a
profile of the same name afterwards (in its conftest) wins.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, final

import pytest
from hypothesis import HealthCheck, settings

from plateflow.engines.zmq.engine import ZmqEngine
from plateflow.engines.zmq.server import ExecutionServer
from plateflow.host import BatchHost
from plateflow.testing.fake_engine import FakeEngine
from plateflow.testing.harness import ServiceHarness
from plateflow.testing.recording import RecordingHost

__all__ = ["PROFILE_ENV", "TemporaryServer", "register_profiles"]

PROFILE_ENV: Final = "HYPOTHESIS_PROFILE"
SERVER_TIMEOUT: Final = 30.0
"""Bound on a temporary server's start and on its stop, in seconds."""


def register_profiles() -> None:
    """Register the ``dev`` / ``ci`` / ``nightly`` profiles and load the one selected.

    Each profile is built on Hypothesis's own ``default`` profile, not on whatever
    is current: Hypothesis loads its built-in ``ci`` profile (derandomised) when it
    sees a ``CI`` variable, and ``nightly`` must stay random there.
    """
    base = settings.get_profile("default")
    settings.register_profile("dev", base, max_examples=50, deadline=None)
    settings.register_profile(
        "ci",
        base,
        max_examples=300,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile(
        "nightly",
        base,
        max_examples=5_000,
        derandomize=False,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile(os.environ.get(PROFILE_ENV, "dev"))


# At import, which pytest does for entry-point plugins before it reads any conftest:
# a project's conftest can still register a profile of the same name, or load another.
register_profiles()


def pytest_report_header(config: pytest.Config) -> str:
    return f"plateflow.testing: hypothesis profile {os.environ.get(PROFILE_ENV, 'dev')!r}"


@pytest.fixture
def fake_engine() -> FakeEngine:
    """A fresh fake engine: every plate compiles and executes successfully."""
    return FakeEngine()


@pytest.fixture
def recording_host() -> RecordingHost:
    """A fresh host that records every callback."""
    return RecordingHost()


@pytest.fixture
def service_harness() -> Iterator[Callable[..., ServiceHarness]]:
    """``service_harness(host, **options)`` makes a :class:`ServiceHarness`; all closed after."""
    made: list[ServiceHarness] = []

    def make(host: BatchHost, **options: Any) -> ServiceHarness:
        harness = ServiceHarness(host, **options)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


@final
class TemporaryServer:
    """A real execution server on a thread, in a private runtime dir of its own."""

    def __init__(self, runtime_dir: Path, output_dir: Path, **options: Any) -> None:
        self.runtime_dir = runtime_dir
        self.output_dir = output_dir
        self.server = ExecutionServer(
            runtime_dir, output_dir=str(output_dir), heartbeat_interval=0.2, **options
        )
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="plateflow-test-server")

    def _run(self) -> None:
        try:
            self.server.run(on_ready=lambda record: self._ready.set())
        except BaseException as exc:  # handed to start()/stop(), never lost
            self._error = exc
            self._ready.set()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(SERVER_TIMEOUT):
            self.stop()
            raise TimeoutError(f"the test server did not start within {SERVER_TIMEOUT:g} s")
        if self._error is not None:
            raise RuntimeError(f"the test server failed to start: {self._error}") from self._error

    def engine(self, **options: Any) -> ZmqEngine:
        """A :class:`~plateflow.engines.zmq.ZmqEngine` attached to this server; never starts one."""
        options.setdefault("heartbeat_timeout", 2.0)
        return ZmqEngine(self.runtime_dir, start_server=False, **options)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop the server and wait (bounded) for it to have cleaned up. Idempotent."""
        self.server.stop("test finished")
        if self._thread.ident is not None:
            self._thread.join(SERVER_TIMEOUT)
        if self._thread.is_alive():
            raise RuntimeError(f"the test server did not stop within {SERVER_TIMEOUT:g} s")


@pytest.fixture
def plateflow_server(tmp_path: Path) -> Iterator[TemporaryServer]:
    """A running execution server in a fresh private runtime dir; stopped at teardown.

    The runtime dir is a short path of its own (Unix socket paths are
    limited to about 100 bytes, more than some ``tmp_path`` values leave).
    """
    runtime_dir = Path(tempfile.mkdtemp(prefix="pft-"))
    server = TemporaryServer(runtime_dir, tmp_path / "server-output")
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(runtime_dir, ignore_errors=True)
