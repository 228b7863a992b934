"""Fixtures shared by the tests of the embedded server (test_zmq_server, test_wire_fuzz).

The Hypothesis profiles (``dev`` / ``ci`` / ``nightly``, chosen by
``HYPOTHESIS_PROFILE``) and the testing kit's fixtures come from the
``plateflow.testing.plugin`` pytest plugin, which the package registers
through its ``pytest11`` entry point.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from plateflow.examples.platereader import demo_pipeline, generate_plates
from plateflow.jobs import CompileJob


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for one test module's server, plates and reports."""
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def plate(work_dir: Path) -> CompileJob:
    """One real plate-reader plate with the demo pipeline."""
    (generated,) = generate_plates(work_dir / "plates", 1, seed=3, wells=96)
    return CompileJob(
        plate_id=generated.plate_id, plate_path=str(generated.path), pipeline=demo_pipeline()
    )


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A ZeroMQ context for a raw client, terminated after the test."""
    ctx = zmq.Context()
    yield ctx
    ctx.term()
