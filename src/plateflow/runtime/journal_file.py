"""A journal file written as the batch runs: one JSON line per record, flushed at once.

Theory of operation: the core appends a record to its in-memory journal
while it handles a fact, and *before* it returns the decisions that lead to
host callbacks (C4). :class:`JournalFile` listens to that journal and writes
each record as one JSON line, then flushes it to the operating system. So
when a host hears of a change, the line that explains it is already in the
file, and a host that is killed (even by SIGKILL) leaves a journal that ends
at the last record it committed.

Durability: a flush hands the line to the kernel, which keeps it across the
death of the process but not across a power cut or a kernel crash. With
``fsync=True`` every line is also forced to the disk before the host hears
of it, which survives those too and costs a disk round trip per fact (see
docs/performance.md for both, measured). A crash can still cut the last line
short; :meth:`plateflow.core.journal.Journal.read` drops such a torn line and
:meth:`JournalFile.reopen` cuts it off before appending.

A write that fails (disk full, file removed from under us) does not stop the
batch: the file stops growing, and ``on_error`` is called once with the
reason so the host can say that the journal is incomplete.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from plateflow.core.journal import Journal, JournalHeader, Record, encode_header, encode_record

__all__ = ["JournalFile"]


class JournalFile:
    """Appends one journal's records to a file as they are committed."""

    __slots__ = ("_fsync", "_on_error", "_stream", "failed", "path", "records")

    def __init__(
        self,
        path: Path,
        stream: BinaryIO,
        *,
        fsync: bool,
        on_error: Callable[[str], None] | None,
    ) -> None:
        self.path = path
        self._stream: BinaryIO | None = stream
        self._fsync = fsync
        self._on_error = on_error
        self.failed: str | None = None
        """Why the file stopped growing, once a write failed."""
        self.records = 0
        """Records written by this object (not counting the ones already in the file)."""

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        header: JournalHeader,
        *,
        fsync: bool = False,
        on_error: Callable[[str], None] | None = None,
    ) -> JournalFile:
        """A new journal file holding ``header`` (an existing file is replaced).

        Raises ``OSError`` when the file cannot be created: a batch that was
        asked for a journal does not start without one.
        """
        target = Path(path)
        line = encode_header(header).encode("utf-8")  # a context that is not JSON fails here
        stream = target.open("wb")
        try:
            stream.write(line)
            _push(stream, fsync)
        except BaseException:
            stream.close()
            raise
        return cls(target, stream, fsync=fsync, on_error=on_error)

    @classmethod
    def reopen(
        cls,
        path: str | os.PathLike[str],
        journal: Journal,
        *,
        fsync: bool = False,
        on_error: Callable[[str], None] | None = None,
    ) -> JournalFile:
        """Go on appending to the file ``journal`` was loaded from.

        A torn last line (see :attr:`Journal.torn`) is cut off first, and a
        last line that lost only its newline gets it back.
        """
        target = Path(path)
        stream = target.open("r+b")
        try:
            if journal.torn is not None:
                stream.truncate(journal.torn.offset)
            end = stream.seek(0, os.SEEK_END)
            if end > 0:
                stream.seek(end - 1)
                if stream.read(1) != b"\n":
                    stream.write(b"\n")
            _push(stream, fsync)
        except BaseException:
            stream.close()
            raise
        return cls(target, stream, fsync=fsync, on_error=on_error)

    def append(self, record: Record) -> None:
        """Write one record and flush it (the journal's listener). Never raises."""
        stream = self._stream
        if stream is None:
            return
        try:
            stream.write(encode_record(record).encode("utf-8", "surrogatepass"))
            _push(stream, self._fsync)
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            self._give_up(f"could not write the journal {self.path}: {exc}")
            return
        self.records += 1

    def close(self) -> None:
        """Flush and close the file. Idempotent."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            stream.close()
        except OSError as exc:
            self._give_up(f"could not close the journal {self.path}: {exc}")

    def _give_up(self, reason: str) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(OSError):  # the reason already says what went wrong
                stream.close()
        if self.failed is None:
            self.failed = reason
            if self._on_error is not None:
                self._on_error(reason)


def _push(stream: BinaryIO, fsync: bool) -> None:
    stream.flush()
    if fsync:
        os.fsync(stream.fileno())
