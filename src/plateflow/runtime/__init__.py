"""Runtime primitives the service is built from: IO-facing, loop-bound, small.

- ``BatchSubmitWaitEngine``: submit every job, then wait for all (event-driven).
- ``ExecutionStatusPoller``: the one batched reconciliation loop for all submissions.
- ``IntervalSnapshotPoller``: server snapshots at an interval, with change detection.
- ``ProgressProjection`` / ``Coalescer`` / ``CoalescingProgressEmitter``: progress,
  coalesced so a flood of records cannot flood the host.
- ``Dispatcher`` / ``inline_dispatcher`` / ``ThreadDispatcher``: how callbacks reach
  the host's chosen thread.

Everything here runs on the service's event loop (guarantee C6) and bounds every
wait (C7); none of it starts a thread per plate.
"""

from plateflow.runtime._bounded import PollTimeout
from plateflow.runtime.dispatch import (
    Dispatcher,
    DispatcherClosed,
    DispatcherStatistics,
    ThreadDispatcher,
    inline_dispatcher,
)
from plateflow.runtime.progress import (
    Coalescer,
    CoalescingProgressEmitter,
    PlateProgress,
    ProgressEmitterStatistics,
    ProgressProjection,
    ProgressSnapshot,
)
from plateflow.runtime.snapshot_poller import IntervalSnapshotPoller, SnapshotPollerStatistics
from plateflow.runtime.status_poller import (
    ExecutionStatusPoller,
    StatusPollerStatistics,
    StatusQuery,
)
from plateflow.runtime.submit_wait import (
    BatchSubmitWaitEngine,
    JobCancelled,
    JobStatus,
    Outcome,
    SubmitWaitStatistics,
)

__all__ = [
    "BatchSubmitWaitEngine",
    "Coalescer",
    "CoalescingProgressEmitter",
    "Dispatcher",
    "DispatcherClosed",
    "DispatcherStatistics",
    "ExecutionStatusPoller",
    "IntervalSnapshotPoller",
    "JobCancelled",
    "JobStatus",
    "Outcome",
    "PlateProgress",
    "PollTimeout",
    "ProgressEmitterStatistics",
    "ProgressProjection",
    "ProgressSnapshot",
    "SnapshotPollerStatistics",
    "StatusPollerStatistics",
    "StatusQuery",
    "SubmitWaitStatistics",
    "ThreadDispatcher",
    "inline_dispatcher",
]
