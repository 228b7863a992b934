"""A deterministic in-process engine for the demo: decisions in, facts out.

It answers every submission the way a well-behaved engine would (accept,
start, report progress, finish), failing the plates it is told to fail. It is
a stand-in until the real engines land; it does no IO and keeps no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from plateflow.core import (
    CancelSubmission,
    CompileAccepted,
    CompileCancelled,
    CompileFailed,
    CompileSucceeded,
    Decision,
    ExecutionAccepted,
    ExecutionCancelled,
    ExecutionFailed,
    ExecutionProgress,
    ExecutionStarted,
    ExecutionSucceeded,
    Fact,
    SubmitCompile,
    SubmitExecution,
)

STEPS = 3


class Simulator:
    """Turns the core's engine decisions into the facts an engine would push."""

    def __init__(
        self, *, fail_compile: Iterable[str] = (), fail_execution: Iterable[str] = ()
    ) -> None:
        self._fail_compile = frozenset(fail_compile)
        self._fail_execution = frozenset(fail_execution)
        self._pending: deque[Fact] = deque()

    @property
    def planted(self) -> list[str]:
        """The plates this simulator was told to fail, sorted."""
        return sorted(self._fail_compile | self._fail_execution)

    def submit(self, decisions: Iterable[Decision]) -> None:
        for d in decisions:
            if isinstance(d, SubmitCompile):
                self._pending.append(CompileAccepted(plate_id=d.plate_id, job_id=d.job_id))
                if d.plate_id in self._fail_compile:
                    self._pending.append(
                        CompileFailed(plate_id=d.plate_id, job_id=d.job_id, error="step not found")
                    )
                else:
                    self._pending.append(
                        CompileSucceeded(
                            plate_id=d.plate_id, job_id=d.job_id, artifact_id=f"art-{d.plate_id}"
                        )
                    )
            elif isinstance(d, SubmitExecution):
                self._submit_execution(d)
            elif isinstance(d, CancelSubmission):
                if d.phase == "compile":
                    self._pending.append(
                        CompileCancelled(plate_id=d.plate_id, job_id=d.submission_id)
                    )
                else:
                    self._pending.append(
                        ExecutionCancelled(plate_id=d.plate_id, execution_id=d.submission_id)
                    )

    def _submit_execution(self, d: SubmitExecution) -> None:
        plate, ex = d.plate_id, d.execution_id
        self._pending.append(ExecutionAccepted(plate_id=plate, execution_id=ex))
        self._pending.append(ExecutionStarted(plate_id=plate, execution_id=ex))
        for done in range(1, STEPS + 1):
            self._pending.append(
                ExecutionProgress(plate_id=plate, execution_id=ex, done=done, total=STEPS)
            )
        if plate in self._fail_execution:
            self._pending.append(
                ExecutionFailed(plate_id=plate, execution_id=ex, error="worker exited", exit_code=1)
            )
        else:
            self._pending.append(
                ExecutionSucceeded(plate_id=plate, execution_id=ex, result={"wells": 384})
            )

    def next_fact(self) -> Fact | None:
        return self._pending.popleft() if self._pending else None
