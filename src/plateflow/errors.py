"""Every exception plateflow raises, grouped by whose fault it is.

- ``PlateflowBug`` and its subclasses mean plateflow itself broke one of its
  own rules. They are loud on purpose: please report them.
- ``UsageError`` and its subclasses mean the caller (a host, a batch file, a
  journal on disk) gave plateflow something it cannot use. The message says
  what and where.
- ``DecodeError`` means bytes from outside (a frame on a socket, a journal
  line, a record on disk) are not one bounded, strictly valid JSON document;
  whoever sent them is at fault, and nothing was acted on.
- Engine misbehaviour is never raised at the host: the core turns it into a
  journal entry, an ``emit_error`` report and a ``failed`` plate. The codes
  used for that are in :class:`ErrorCode`.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ConvergenceViolation",
    "DecodeError",
    "ErrorCode",
    "InvalidTransition",
    "JournalError",
    "JournalWarning",
    "PlateflowBug",
    "PlateflowError",
    "ReentrancyError",
    "UsageError",
]


class ErrorCode(StrEnum):
    """Codes of the errors the core reports to a host instead of raising."""

    ENGINE_PROTOCOL_ERROR = "engine_protocol_error"
    """The engine sent a fact that cannot happen (its fault, not the host's)."""
    UNKNOWN_PLATE = "unknown_plate"
    """The engine sent a fact about a plate that is not in the batch."""
    HOST_CALLBACK_FAILED = "host_callback_failed"
    """A host callback raised; the batch carried on (guarantee C5)."""


class PlateflowError(Exception):
    """Base class of every exception plateflow raises on purpose."""


class PlateflowBug(PlateflowError):
    """plateflow broke one of its own rules; this is never the host's fault."""


class ConvergenceViolation(PlateflowBug):
    """A terminal transition was attempted outside the convergence path (C1)."""

    def __init__(self, machine: str, subject: str, state: str, event: str) -> None:
        self.machine = machine
        self.subject = subject
        self.state = state
        self.event = event
        super().__init__(
            f"{machine} {subject!r}: terminal event {event!r} from state {state!r} was "
            "attempted outside the convergence path; only the convergence callback may "
            "settle a plate or a batch (guarantee C1)"
        )


class InvalidTransition(PlateflowBug):
    """The core asked a machine for a move its table does not have."""

    def __init__(
        self, machine: str, subject: str, state: str, event: str, stimulus_id: str | None
    ) -> None:
        self.machine = machine
        self.subject = subject
        self.state = state
        self.event = event
        self.stimulus_id = stimulus_id
        super().__init__(
            f"{machine} {subject!r}: no transition for event {event!r} from state "
            f"{state!r} (stimulus {stimulus_id!r}); the transition table has no such row"
        )


class ReentrancyError(PlateflowBug):
    """A batch was asked to handle a fact while it was still handling another (C4)."""


class DecodeError(PlateflowError):
    """Bytes that are not one bounded, strictly valid JSON document; nothing was acted on.

    ``where`` names the document (``"request"``, ``"journal.jsonl:3"``) and
    ``reason`` says what was wrong with it; the message is both.
    """

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}")


class UsageError(PlateflowError):
    """The caller gave plateflow something it cannot use; the message says what."""


class JournalError(UsageError):
    """A journal file or record could not be read; names the line and the field."""


class JournalWarning(UserWarning):
    """A journal was read, but not all of it: a crash had cut its last line short."""
