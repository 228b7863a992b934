"""The journal: every fact a batch received, what it did with it, and why.

Theory of operation: a batch appends one record per fact it handles,
whatever became of it (applied, ignored as stale or duplicate, rejected).
A record holds the fact itself, so replaying the records' facts into a fresh
batch with the same header reproduces the same states; and it holds every
state change the fact caused (``changes``), including the ones it caused
indirectly, such as the plates an abort cancelled. That is what lets a host
answer "why did plate 7 fail" from the journal alone.

The journal keeps the fact objects in memory and only turns them into JSON
when written, so journaling costs one small object per fact on the hot path.
The file format is JSON Lines: a header line, then one line per record. A
listener (:meth:`Journal.listen`) hears every record as it is appended, which
is how the runtime writes the file as the batch runs; the core itself writes
nothing. A file cut short by a crash ends in a *torn* line without its newline:
:meth:`Journal.read` drops that one line (and says so), and still refuses every
other corrupt line.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from pydantic import JsonValue, ValidationError

from plateflow.core.decoding import decode_object, one_line
from plateflow.core.facts import Fact, fact_adapter
from plateflow.core.tables import (
    BatchMode,
    BatchState,
    CompileFailurePolicy,
    Disposition,
    PlateState,
)
from plateflow.errors import DecodeError, JournalError, JournalWarning

__all__ = [
    "JOURNAL_FORMAT",
    "MAX_LINE_BYTES",
    "Change",
    "Disposition",
    "Journal",
    "JournalHeader",
    "Record",
    "TornLine",
    "encode_header",
    "encode_record",
]

JOURNAL_FORMAT = 2
"""Version of the JSON Lines layout written; readers refuse a format they do not know.
Format 2 added the header's ``context``; format 1 journals are still read."""
_READABLE_FORMATS = frozenset({1, 2})
MAX_LINE_BYTES = 64 << 20
"""A journal line (one record) longer than this is refused rather than read."""


class Change(NamedTuple):
    """One state change a fact caused. ``plate_id`` None means the batch itself."""

    plate_id: str | None
    old: PlateState | BatchState
    new: PlateState | BatchState
    note: str


class Record(NamedTuple):
    """One fact the batch handled, what it did with it, and every change it caused.

    Records are named tuples: immutable, and cheap enough to append one per fact.
    """

    seq: int
    time: float
    fact: Fact
    disposition: Disposition
    detail: str
    changes: tuple[Change, ...]

    @property
    def plate_id(self) -> str | None:
        """The plate the fact was about, if it named one."""
        return getattr(self.fact, "plate_id", None)

    def touches(self, plate_id: str) -> bool:
        return self.plate_id == plate_id or any(c.plate_id == plate_id for c in self.changes)


@dataclass(frozen=True, slots=True)
class JournalHeader:
    """What a replay needs to rebuild the batch before feeding it the facts."""

    batch_id: str
    plate_ids: tuple[str, ...]
    mode: BatchMode
    policy: CompileFailurePolicy
    format: int = JOURNAL_FORMAT
    context: Mapping[str, JsonValue] = field(default_factory=dict, compare=False)
    """What a host needs to resume the batch elsewhere (the jobs, the engine's identity,
    the application's own notes). The core never reads it."""


class TornLine(NamedTuple):
    """The last line of a journal file that a crash cut short, dropped on reading."""

    line: int
    """Its line number (1-based)."""
    offset: int
    """Where it starts: the file's intact part is this many bytes long."""
    reason: str


class Journal:
    """An append-only list of records behind a header."""

    __slots__ = ("_listeners", "_records", "header", "torn")

    def __init__(self, header: JournalHeader, records: Iterable[Record] = ()) -> None:
        self.header = header
        self._records: list[Record] = list(records)
        self._listeners: list[Callable[[Record], None]] = []
        self.torn: TornLine | None = None
        """Set by :meth:`read` when the file ended in a torn line (which it dropped)."""

    def append(self, record: Record) -> None:
        self._records.append(record)
        for listener in self._listeners:
            listener(record)

    def listen(self, listener: Callable[[Record], None]) -> None:
        """Call ``listener`` with every record appended from now on (after it is appended).

        A listener must not raise: the batch calls it while handling a fact.
        """
        self._listeners.append(listener)

    @property
    def records(self) -> tuple[Record, ...]:
        return tuple(self._records)

    def __getitem__(self, index: int) -> Record:
        return self._records[index]

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self._records)

    def story(self, plate_id: str) -> list[Record]:
        """Every record that was about ``plate_id`` or changed it, in order."""
        return [r for r in self._records if r.touches(plate_id)]

    # --- JSON Lines -----------------------------------------------------------------

    def write(self, stream: IO[str]) -> None:
        """Write the whole journal as JSON Lines to an open text stream."""
        stream.write(encode_header(self.header))
        for record in self._records:
            stream.write(encode_record(record))

    def save(self, path: str | Path) -> None:
        with Path(path).open("w", encoding="utf-8") as stream:
            self.write(stream)

    @classmethod
    def read(cls, stream: IO[str] | IO[bytes], *, source: str = "<stream>") -> Journal:
        """Read a journal written by :meth:`write`; errors name the line and field.

        Every line is decoded by :mod:`plateflow.core.decoding` (strict UTF-8,
        bounded nesting and integers) and may hold at most
        :data:`MAX_LINE_BYTES`; anything else raises :class:`JournalError`, with
        one exception: a last line without its newline that does not read is
        what a crash leaves mid-write. It is dropped with a
        :class:`~plateflow.errors.JournalWarning` naming the line, and described
        in the journal's :attr:`torn`.
        """
        header: JournalHeader | None = None
        records: list[Record] = []
        torn: TornLine | None = None
        lineno = offset = 0
        while line := stream.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            where = f"{source}:{lineno}"
            start = offset
            offset += len(line) if isinstance(line, bytes) else len(_utf8(line))
            if len(line) > MAX_LINE_BYTES:
                raise JournalError(f"{where}: a line longer than {MAX_LINE_BYTES} bytes")
            if not line.strip():
                continue
            complete = line[-1:] in (b"\n", "\n")
            try:
                raw = decode_object(line, max_bytes=MAX_LINE_BYTES, what=where)
                if header is None:
                    header = _header_from_json(raw, where)
                else:
                    records.append(_record_from_json(raw, where))
            except (DecodeError, JournalError, ValueError, TypeError, OverflowError) as exc:
                text = (
                    str(exc)
                    if isinstance(exc, DecodeError | JournalError)
                    else (f"{where}: {type(exc).__name__}: {exc}")
                )
                if complete:  # one line, whatever the file quoted
                    raise JournalError(one_line(text)) from None
                torn = TornLine(lineno, start, one_line(text))
        if header is None:
            if torn is not None:
                raise JournalError(
                    f"{source}:{torn.line}: the header line is torn (the file was cut short "
                    f"before its header was whole): {torn.reason}"
                )
            raise JournalError(f"{source}: empty journal (no header line)")
        journal = cls(header, records)
        if torn is not None:
            warnings.warn(
                f"{source}:{torn.line}: dropped the last line, which a crash cut short "
                f"({torn.reason})",
                JournalWarning,
                stacklevel=2,
            )
            journal.torn = torn
        return journal

    @classmethod
    def load(cls, path: str | Path) -> Journal:
        """Read a journal file (bytes, so that what is not UTF-8 is said with its line)."""
        with Path(path).open("rb") as stream:
            return cls.read(stream, source=str(path))


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def encode_header(header: JournalHeader) -> str:
    """The header as one JSON Lines line (with its newline)."""
    return json.dumps(_header_to_json(header)) + "\n"


def encode_record(record: Record) -> str:
    """A record as one JSON Lines line (with its newline)."""
    return json.dumps(_record_to_json(record)) + "\n"


def _header_to_json(header: JournalHeader) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "type": "header",
        "format": JOURNAL_FORMAT,
        "batch_id": header.batch_id,
        "plate_ids": list(header.plate_ids),
        "mode": header.mode.value,
        "policy": header.policy.value,
    }
    if header.context:
        raw["context"] = dict(header.context)
    return raw


def _record_to_json(record: Record) -> dict[str, Any]:
    return {
        "type": "record",
        "seq": record.seq,
        "time": record.time,
        "disposition": record.disposition.value,
        "detail": record.detail,
        "fact": fact_adapter.dump_python(record.fact, mode="json"),
        "changes": [[c.plate_id, c.old.value, c.new.value, c.note] for c in record.changes],
    }


def _field(raw: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in raw:
        raise JournalError(f"{where}: missing field {name!r}")
    value = raw[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise JournalError(f"{where}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _header_from_json(raw: dict[str, Any], where: str) -> JournalHeader:
    if raw.get("type") != "header":
        raise JournalError(f"{where}: the first line must be the journal header")
    fmt = _field(raw, "format", int, where)
    if fmt not in _READABLE_FORMATS:
        raise JournalError(
            f"{where}: journal format {fmt} is not supported (this version reads "
            f"{', '.join(str(f) for f in sorted(_READABLE_FORMATS))})"
        )
    context = raw.get("context", {})
    if not isinstance(context, dict):
        raise JournalError(f"{where}: field 'context' must be an object")
    plate_ids = _field(raw, "plate_ids", list, where)
    if not all(isinstance(p, str) for p in plate_ids):
        raise JournalError(f"{where}: field 'plate_ids' must be a list of strings")
    try:
        mode = BatchMode(_field(raw, "mode", str, where))
        policy = CompileFailurePolicy(_field(raw, "policy", str, where))
    except ValueError as exc:
        raise JournalError(f"{where}: {exc}") from exc
    return JournalHeader(
        _field(raw, "batch_id", str, where),
        tuple(plate_ids),
        mode,
        policy,
        format=fmt,
        context=context,
    )


def _state(value: Any, plate_id: str | None, where: str) -> PlateState | BatchState:
    enum: type[PlateState] | type[BatchState] = BatchState if plate_id is None else PlateState
    try:
        return enum(value)
    except ValueError as exc:
        raise JournalError(f"{where}: {value!r} is not a {enum.__name__}") from exc


def _record_from_json(raw: dict[str, Any], where: str) -> Record:
    if raw.get("type") != "record":
        raise JournalError(f"{where}: expected a record line, got type {raw.get('type')!r}")
    try:
        fact = fact_adapter.validate_python(_field(raw, "fact", dict, where))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise JournalError(f"{where}: invalid fact at {loc or 'fact'}: {first['msg']}") from exc
    try:
        disposition = Disposition(_field(raw, "disposition", str, where))
    except ValueError as exc:
        raise JournalError(f"{where}: {exc}") from exc
    changes: list[Change] = []
    for item in _field(raw, "changes", list, where):
        if not (isinstance(item, list) and len(item) == 4):
            raise JournalError(f"{where}: each change must be [plate_id, old, new, note]")
        plate_id, old, new, note = item
        if plate_id is not None and not isinstance(plate_id, str):
            raise JournalError(f"{where}: a change's plate_id must be a string or null")
        changes.append(
            Change(plate_id, _state(old, plate_id, where), _state(new, plate_id, where), str(note))
        )
    moment = float(_field(raw, "time", (int, float), where))
    if not math.isfinite(moment):
        raise JournalError(f"{where}: field 'time' is not a finite number")
    return Record(
        seq=_field(raw, "seq", int, where),
        time=moment,
        fact=fact,
        disposition=disposition,
        detail=_field(raw, "detail", str, where),
        changes=tuple(changes),
    )
