"""plateflow: batches of plates through compile-then-execute, on explicit state machines.

The public surface is what ``__all__`` lists; everything else is private.
"""

from plateflow.core import (
    Batch,
    BatchMode,
    BatchSnapshot,
    BatchState,
    BatchSummary,
    CompileFailurePolicy,
    Journal,
    PlateOutcome,
    PlateSnapshot,
    PlateState,
    Reason,
    ResumedBatch,
    SettledPlate,
    replay,
)
from plateflow.engines.base import Engine, EngineError, Submission
from plateflow.errors import (
    ConvergenceViolation,
    DecodeError,
    ErrorCode,
    InvalidTransition,
    JournalError,
    JournalWarning,
    PlateflowBug,
    PlateflowError,
    ReentrancyError,
    UsageError,
)
from plateflow.host import BaseBatchHost, BatchHost
from plateflow.jobs import CompileJob
from plateflow.pipeline import PipelineError, PipelineSpec, StepContext, StepSpec
from plateflow.runtime import (
    BatchSubmitWaitEngine,
    CoalescingProgressEmitter,
    ExecutionStatusPoller,
    IntervalSnapshotPoller,
    ProgressProjection,
    ProgressSnapshot,
    ThreadDispatcher,
)
from plateflow.service import BatchWorkflowService, Plate, SyncBatchWorkflowService

__version__ = "0.1.0.dev0"

__all__ = [
    "BaseBatchHost",
    "Batch",
    "BatchHost",
    "BatchMode",
    "BatchSnapshot",
    "BatchState",
    "BatchSubmitWaitEngine",
    "BatchSummary",
    "BatchWorkflowService",
    "CoalescingProgressEmitter",
    "CompileFailurePolicy",
    "CompileJob",
    "ConvergenceViolation",
    "DecodeError",
    "Engine",
    "EngineError",
    "ErrorCode",
    "ExecutionStatusPoller",
    "IntervalSnapshotPoller",
    "InvalidTransition",
    "Journal",
    "JournalError",
    "JournalWarning",
    "PipelineError",
    "PipelineSpec",
    "Plate",
    "PlateOutcome",
    "PlateSnapshot",
    "PlateState",
    "PlateflowBug",
    "PlateflowError",
    "ProgressProjection",
    "ProgressSnapshot",
    "Reason",
    "ReentrancyError",
    "ResumedBatch",
    "SettledPlate",
    "StepContext",
    "StepSpec",
    "Submission",
    "SyncBatchWorkflowService",
    "ThreadDispatcher",
    "UsageError",
    "__version__",
    "replay",
]
