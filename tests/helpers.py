"""Small builders shared by the tests (not part of the public testing kit)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

from plateflow.core import (
    Batch,
    BatchMode,
    CompileFailurePolicy,
    Decision,
    Fact,
)
from plateflow.jobs import CompileJob
from plateflow.pipeline.spec import PipelineSpec, StepSpec


def ticking_clock(start: float = 1000.0, step: float = 0.5) -> Callable[[], float]:
    """A deterministic clock that advances by ``step`` on every read."""
    counter = itertools.count()
    return lambda: start + step * next(counter)


def make_batch(
    n: int = 2,
    *,
    mode: BatchMode = BatchMode.RUN,
    policy: CompileFailurePolicy = CompileFailurePolicy.ABORT,
    batch_id: str = "b",
) -> Batch:
    return Batch(
        batch_id, [f"p{i}" for i in range(n)], mode=mode, policy=policy, clock=ticking_clock()
    )


def job(batch: Batch, plate_id: str) -> str:
    return f"{batch.batch_id}.{batch.plate_ids.index(plate_id)}.c"


def execution(batch: Batch, plate_id: str) -> str:
    return f"{batch.batch_id}.{batch.plate_ids.index(plate_id)}.x"


def feed(batch: Batch, facts: Iterable[Fact]) -> list[Decision]:
    """Hand every fact in; return all decisions in order."""
    out: list[Decision] = []
    for fact in facts:
        out.extend(batch.handle(fact))
    return out


def spec(*steps: tuple[str, dict[str, Any]] | str) -> PipelineSpec:
    """A pipeline of ``steps_for_tests`` steps: ``"finish"`` or ``("count", {"n": 3})``."""
    out = []
    for step in steps:
        name, params = (step, {}) if isinstance(step, str) else step
        out.append(StepSpec(function=f"steps_for_tests:{name}", params=params))
    return PipelineSpec(name="test", steps=tuple(out))


def engine_job(plate: str, pipeline: PipelineSpec) -> CompileJob:
    """The compile job an engine test submits for ``plate``."""
    return CompileJob(plate_id=plate, plate_path=f"/plates/{plate}", pipeline=pipeline)
