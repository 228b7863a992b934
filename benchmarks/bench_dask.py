"""The Dask engine's overhead: plateflow batches against the same tasks submitted straight.

Run it as a script from the project root::

    .venv/bin/python benchmarks/bench_dask.py                  # N = 100 and 1,000
    .venv/bin/python benchmarks/bench_dask.py --sizes 100 --reps 1

or call :func:`measure` (``bench_e2e.py`` merges its figures into its final JSON line).

One ``LocalCluster`` with worker processes (``--workers``, default the CPU count, one
thread each; the scheduler runs in this process, as in a ``DaskEngine`` that starts its
own cluster) serves both sides of every comparison, in the same run:

* ``dask_per_plate_ms_N``: the wall time of ``BatchWorkflowService.run_plates`` over N
  no-op plates (``noop_steps:noop``) on a ``DaskEngine`` connected to that cluster,
  divided by N; the host's callbacks do nothing.
* ``dask_raw_per_task_ms_N``: N compile -> execute task pairs submitted straight to the
  same cluster with ``Client.submit`` (each execute task takes its compile future, as the
  engine's do; the tasks run the same ``compile_pipeline`` and ``execute_pipeline``), then
  drained with ``as_completed(..., with_results=True)`` — the results are fetched, since
  plateflow hands every result to its host. Divided by N.

Both sides take turns (raw, plateflow, raw, ...) and the median of ``--reps`` runs is
kept, so load from other processes on a shared machine falls on both. A 20-plate warm-up
of each side runs first. ``dask_per_plate_ms`` and ``dask_raw_per_task_ms`` without a
suffix are the figures at the largest N; the target is ``dask_per_plate_ms`` <= 2 x
``dask_raw_per_task_ms``. The readable table goes to stderr; the last line on stdout is
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import log

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # the workers import noop_steps (spawned with our sys.path)
    sys.path.insert(0, str(BENCH_DIR))

import dask  # noqa: E402
from distributed import Client, as_completed  # noqa: E402
from distributed import LocalCluster as _LocalCluster  # noqa: E402
from pydantic import JsonValue  # noqa: E402

from plateflow import BaseBatchHost, BatchState, BatchWorkflowService, Plate  # noqa: E402
from plateflow.engines.dask import DaskEngine  # noqa: E402
from plateflow.pipeline.run import (  # noqa: E402
    CompiledPipeline,
    StepContext,
    compile_pipeline,
    execute_pipeline,
)
from plateflow.pipeline.spec import PipelineSpec, StepSpec  # noqa: E402

STEP_MODULE = "noop_steps"
PIPELINE = PipelineSpec(name="noop", steps=(StepSpec(function=f"{STEP_MODULE}:noop"),))
DEFAULT_SIZES = (100, 1_000)
DEFAULT_REPS = 3
WARMUP_N = 20
TARGET_RATIO = 2.0
BATCH_TIMEOUT_S = 600.0


# --- the raw side: the same work as plain Dask tasks --------------------------------------------


def raw_compile(spec_json: str) -> CompiledPipeline:
    return compile_pipeline(
        PipelineSpec.model_validate_json(spec_json), allowed_modules=(STEP_MODULE,)
    )


def raw_execute(compiled: CompiledPipeline, plate_id: str, path: str) -> dict[str, JsonValue]:
    ctx = StepContext(
        plate_id=plate_id,
        plate_path=path,
        output_dir="",
        _report=lambda done, total, message: None,
        _is_cancelled=lambda: False,
    )
    return execute_pipeline(compiled, ctx)


async def raw_batch(client: Any, n: int) -> float:
    """Submit n compile -> execute pairs, drain them with as_completed; the wall time."""
    tag = uuid.uuid4().hex[:8]
    spec_json = PIPELINE.model_dump_json()
    started = time.perf_counter()
    futures = []
    for i in range(n):
        plate = f"plate-{i:05d}"
        compiled = client.submit(raw_compile, spec_json, key=("raw-compile", tag, plate))
        futures.append(
            client.submit(
                raw_execute, compiled, plate, f"/data/{plate}.csv", key=("raw-execute", tag, plate)
            )
        )
    done = 0
    drain = as_completed(futures, loop=client.loop, with_results=True)  # type: ignore[no-untyped-call]
    async for _future, result in drain:
        assert isinstance(result, dict)
        done += 1
    wall = time.perf_counter() - started
    assert done == n
    futures.clear()
    return wall


# --- the plateflow side -------------------------------------------------------------------------


async def plateflow_batch(service: BatchWorkflowService, n: int) -> float:
    plates = [Plate(f"plate-{i:05d}", f"/data/plate-{i:05d}.csv") for i in range(n)]
    started = time.perf_counter()
    summary = await asyncio.wait_for(service.run_plates(plates, pipeline=PIPELINE), BATCH_TIMEOUT_S)
    wall = time.perf_counter() - started
    if summary.outcome is not BatchState.COMPLETED:
        raise RuntimeError(f"a benchmark batch did not complete: {summary}")
    return wall


async def _measure(sizes: Sequence[int], reps: int, workers: int) -> dict[str, Any]:
    # Only the benchmark's own cluster: a task whose worker dies fails (as in the engine's).
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster: Any = await _LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            asynchronous=True,
            dashboard_address=None,
        )
    try:
        client = await Client(  # type: ignore[no-untyped-call]
            cluster.scheduler_address, asynchronous=True, set_as_default=False
        )
        engine = DaskEngine(cluster.scheduler_address, allowed_modules=(STEP_MODULE,))
        service = BatchWorkflowService(BaseBatchHost(), engine)
        try:
            await raw_batch(client, WARMUP_N)
            await plateflow_batch(service, WARMUP_N)
            walls: dict[str, dict[int, list[float]]] = {"raw": {}, "plateflow": {}}
            for _ in range(reps):
                for n in sizes:
                    walls["raw"].setdefault(n, []).append(await raw_batch(client, n))
                    walls["plateflow"].setdefault(n, []).append(await plateflow_batch(service, n))
                    log(
                        f"  N={n:>6,}: raw {walls['raw'][n][-1]:7.3f} s, "
                        f"plateflow {walls['plateflow'][n][-1]:7.3f} s"
                    )
        finally:
            await service.close()
            await client.close()
    finally:
        await cluster.close()
    return {"walls": walls}


def measure(
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    reps: int = DEFAULT_REPS,
    workers: int | None = None,
) -> dict[str, float]:
    """Run the comparison (in a fresh event loop) and return its figures, in ms per plate.

    Keys: ``dask_per_plate_ms_<N>`` and ``dask_raw_per_task_ms_<N>`` for every N in
    ``sizes``, ``dask_ratio_<N>`` (plateflow / raw), and ``dask_per_plate_ms``,
    ``dask_raw_per_task_ms`` and ``dask_ratio`` at the largest N.
    """
    if not sizes:
        raise ValueError("measure needs at least one size")
    n_workers = workers or os.cpu_count() or 1
    found = asyncio.run(_measure(list(sizes), reps, n_workers))
    walls: dict[str, dict[int, list[float]]] = found["walls"]
    out: dict[str, float] = {}
    for n in sizes:
        ours = statistics.median(walls["plateflow"][n]) * 1e3 / n
        raw = statistics.median(walls["raw"][n]) * 1e3 / n
        out[f"dask_per_plate_ms_{n}"] = round(ours, 3)
        out[f"dask_raw_per_task_ms_{n}"] = round(raw, 3)
        out[f"dask_ratio_{n}"] = round(ours / raw, 3)
    largest = max(sizes)
    out["dask_per_plate_ms"] = out[f"dask_per_plate_ms_{largest}"]
    out["dask_raw_per_task_ms"] = out[f"dask_raw_per_task_ms_{largest}"]
    out["dask_ratio"] = out[f"dask_ratio_{largest}"]
    out["dask_workers"] = float(n_workers)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="100,1000", metavar="N,N", help="batch sizes")
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS, help="batches per size and side")
    parser.add_argument("--workers", type=int, help="worker processes (default: CPUs)")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    started = time.perf_counter()
    log(f"bench_dask: sizes {sizes}, {args.reps} reps, LocalCluster with worker processes")
    figures = measure(sizes, reps=args.reps, workers=args.workers)
    log()
    log(f"{'N':>8}{'plateflow ms/plate':>22}{'raw ms/task pair':>20}{'ratio':>8}")
    for n in sizes:
        log(
            f"{n:>8,}{figures[f'dask_per_plate_ms_{n}']:>22.3f}"
            f"{figures[f'dask_raw_per_task_ms_{n}']:>20.3f}{figures[f'dask_ratio_{n}']:>8.2f}"
        )
    met = figures["dask_ratio"] <= TARGET_RATIO
    verdict = "met" if met else "NOT met"
    log(f"target: plateflow <= {TARGET_RATIO:g} x raw at N={max(sizes):,}: {verdict}")
    result: dict[str, Any] = {
        "benchmark": "bench_dask",
        **figures,
        "target_ratio": TARGET_RATIO,
        "target_met": met,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    sys.stdout.flush()
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
