"""One plate-id rule, checked at the service's door, with one outcome on every engine.

A plate whose id breaks the rule (:func:`plateflow.jobs.plate_id_problem`) is
rejected at its compile submission, before any engine sees it: the plate ends
``failed`` / ``compile_rejected`` with an error naming the rule, the other
plates follow the batch's compile-failure policy, and the service stays usable.
Before, a 600-character id killed the ZeroMQ client's I/O thread (both plates
``engine_lost``, the next batch failed too) while the local engine ran it.
The engines are real: a ``plateflow serve`` subprocess, a Dask ``LocalCluster``,
local worker processes.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import JsonValue

from plateflow import (
    BaseBatchHost,
    BatchState,
    BatchSummary,
    BatchWorkflowService,
    CompileFailurePolicy,
    Plate,
    PlateOutcome,
    Reason,
    UsageError,
)
from plateflow.engines.base import Engine
from plateflow.engines.dask import DaskEngine
from plateflow.engines.local import LocalEngine
from plateflow.engines.zmq import rundir
from plateflow.engines.zmq.engine import ZmqEngine
from plateflow.examples.platereader import demo_pipeline, generate_plates
from plateflow.jobs import MAX_PLATE_ID_LENGTH, plate_id_problem

TIMEOUT = 60.0
LONG_ID = "L" * 600


class Host(BaseBatchHost):
    def __init__(self) -> None:
        super().__init__()
        self.completed: list[tuple[str, PlateOutcome, JsonValue]] = []

    def on_plate_completed(self, plate_id: str, outcome: PlateOutcome, result: JsonValue) -> None:
        self.completed.append((plate_id, outcome, result))


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """Short (Unix socket paths are limited) and checked to hold no live server after."""
    path = Path(tempfile.mkdtemp(prefix="pfid-"))
    try:
        yield path
    finally:
        alive = rundir.server_alive(path)
        shutil.rmtree(path, ignore_errors=True)
        assert not alive, "the engine left its server running"


def _engines(tmp_path: Path, runtime_dir: Path) -> dict[str, Callable[[], Engine]]:
    out = str(tmp_path / "out")
    return {
        "local": lambda: LocalEngine(max_workers=1, output_dir=out),
        "zmq": lambda: ZmqEngine(
            runtime_dir,
            server_args=("--workers", "1", "--heartbeat", "0.2", "--output-dir", out),
            heartbeat_timeout=2.0,
        ),
        "dask": lambda: DaskEngine(
            n_workers=1, threads_per_worker=1, processes=False, output_dir=out
        ),
    }


def _outcome(summary: BatchSummary) -> dict[str, tuple[PlateOutcome, Reason]]:
    return {s.plate_id: (s.outcome, s.reason) for s in summary.plates}


@pytest.mark.parametrize("kind", ["local", "zmq", "dask"])
def test_a_600_character_plate_id_is_rejected_alone_and_the_service_stays_usable(
    kind: str, tmp_path: Path, runtime_dir: Path
) -> None:
    generated = generate_plates(tmp_path / "plates", 3, seed=5, wells=96)
    first = [Plate(LONG_ID, str(generated[0].path)), Plate("A", str(generated[1].path))]
    host = Host()
    engine = _engines(tmp_path, runtime_dir)[kind]()

    async def scenario() -> tuple[BatchSummary, BatchSummary]:
        service = BatchWorkflowService(
            host, engine, policy=CompileFailurePolicy.CONTINUE, status_interval=0.2
        )
        try:
            batch = await service.run_plates(first, pipeline=demo_pipeline())
            after = await service.run_plates(
                [Plate("B", str(generated[2].path))], pipeline=demo_pipeline()
            )
            return batch, after
        finally:
            await service.close()

    batch, after = asyncio.run(asyncio.wait_for(scenario(), TIMEOUT))
    assert _outcome(batch) == {
        LONG_ID: (PlateOutcome.FAILED, Reason.COMPILE_REJECTED),
        "A": (PlateOutcome.COMPLETED, Reason.SUCCEEDED),
    }
    assert batch.outcome is BatchState.FAILED
    (rejected,) = [result for plate, _, result in host.completed if plate == LONG_ID]
    assert "600 characters; at most 512" in str(rejected)
    assert [plate for plate, _, _ in host.completed].count(LONG_ID) == 1, "reported once"
    assert _outcome(after) == {"B": (PlateOutcome.COMPLETED, Reason.SUCCEEDED)}
    assert after.outcome is BatchState.COMPLETED


@pytest.mark.parametrize(
    ("plate_id", "words"),
    [
        ("x" * (MAX_PLATE_ID_LENGTH + 1), "513 characters"),
        ("two\nlines", "control character ('\\n') at character 3"),
        ("nul\x00", "control character"),
        ("bell\x07", "control character"),
        ("c1\x85", "control character"),
        ("name\udcff", "lone surrogate at character 4"),
    ],
)
def test_every_id_that_breaks_the_rule_is_rejected_the_same_way_and_aborts_the_batch(
    plate_id: str, words: str, tmp_path: Path
) -> None:
    """Under the default ``abort`` policy a rejected plate is a compile failure like any."""
    generated = generate_plates(tmp_path / "plates", 2, seed=5, wells=96)
    host = Host()

    async def scenario() -> BatchSummary:
        engine = LocalEngine(max_workers=1, output_dir=str(tmp_path / "out"))
        service = BatchWorkflowService(host, engine, status_interval=0.2)
        try:
            plates = [Plate(plate_id, str(generated[0].path)), Plate("ok", str(generated[1].path))]
            return await service.run_plates(plates, pipeline=demo_pipeline())
        finally:
            await service.close()

    summary = asyncio.run(asyncio.wait_for(scenario(), TIMEOUT))
    assert _outcome(summary) == {
        plate_id: (PlateOutcome.FAILED, Reason.COMPILE_REJECTED),
        "ok": (PlateOutcome.CANCELLED, Reason.BATCH_ABORTED),
    }
    (rejected,) = [result for plate, _, result in host.completed if plate == plate_id]
    assert words in str(rejected)


def test_ids_within_the_rule_are_accepted() -> None:
    for plate_id in ["A01", "x" * MAX_PLATE_ID_LENGTH, "plate 7 (repeat)", "Ünïcødé-😀", "a/b"]:
        assert plate_id_problem(plate_id) is None, plate_id


@pytest.mark.parametrize(
    ("plates", "words"),
    [
        ([Plate(7, "p")], r"plates\[0\]\.plate_id is a int, not a string"),  # type: ignore[arg-type]
        (["A01"], r"plates\[0\] is a str, not a Plate"),
        ([Plate("ok", "p"), Plate("", "q")], r"plates\[1\]\.plate_id is empty"),
        ("A01", "plates must be a sequence of Plate"),
        ([Plate("a", "p"), Plate("a", "q")], "selected twice"),
    ],
)
def test_a_selection_that_is_not_one_is_a_usage_error_before_anything_starts(
    plates: object, words: str
) -> None:
    host = Host()
    engine = LocalEngine(max_workers=1)

    async def scenario() -> None:
        service = BatchWorkflowService(host, engine)
        try:
            await service.run_plates(plates, pipeline=demo_pipeline())  # type: ignore[arg-type]
        finally:
            await service.close()

    with pytest.raises(UsageError, match=words):
        asyncio.run(asyncio.wait_for(scenario(), TIMEOUT))
    assert host.completed == []
