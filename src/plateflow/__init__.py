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
    replay,
)
from plateflow.errors import (
    ConvergenceViolation,
    ErrorCode,
    InvalidTransition,
    JournalError,
    PlateflowBug,
    PlateflowError,
    ReentrancyError,
    UsageError,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "Batch",
    "BatchMode",
    "BatchSnapshot",
    "BatchState",
    "BatchSummary",
    "CompileFailurePolicy",
    "ConvergenceViolation",
    "ErrorCode",
    "InvalidTransition",
    "Journal",
    "JournalError",
    "PlateOutcome",
    "PlateSnapshot",
    "PlateState",
    "PlateflowBug",
    "PlateflowError",
    "Reason",
    "ReentrancyError",
    "UsageError",
    "__version__",
    "replay",
]
