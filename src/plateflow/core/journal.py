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
The file format is JSON Lines: a header line, then one line per record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, NamedTuple

from pydantic import ValidationError

from plateflow.core.decoding import decode_object, one_line
from plateflow.core.facts import Fact, fact_adapter
from plateflow.core.tables import BatchMode, BatchState, CompileFailurePolicy, PlateState
from plateflow.errors import DecodeError, JournalError

__all__ = [
    "JOURNAL_FORMAT",
    "MAX_LINE_BYTES",
    "Change",
    "Disposition",
    "Journal",
    "JournalHeader",
    "Record",
]

JOURNAL_FORMAT = 1
"""Version of the JSON Lines layout; readers refuse a format they do not know."""
MAX_LINE_BYTES = 64 << 20
"""A journal line (one record) longer than this is refused rather than read."""


class Disposition(StrEnum):
    """What the batch did with a fact."""

    APPLIED = "applied"
    IGNORED_STALE = "ignored_stale"
    IGNORED_DUPLICATE = "ignored_duplicate"
    REJECTED = "rejected"


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


class Journal:
    """An append-only list of records behind a header."""

    __slots__ = ("_records", "header")

    def __init__(self, header: JournalHeader, records: Iterable[Record] = ()) -> None:
        self.header = header
        self._records: list[Record] = list(records)

    def append(self, record: Record) -> None:
        self._records.append(record)

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
        stream.write(json.dumps(_header_to_json(self.header)) + "\n")
        for record in self._records:
            stream.write(json.dumps(_record_to_json(record)) + "\n")

    def save(self, path: str | Path) -> None:
        with Path(path).open("w", encoding="utf-8") as stream:
            self.write(stream)

    @classmethod
    def read(cls, stream: IO[str] | IO[bytes], *, source: str = "<stream>") -> Journal:
        """Read a journal written by :meth:`write`; errors name the line and field.

        Every line is decoded by :mod:`plateflow.core.decoding` (strict UTF-8,
        bounded nesting and integers) and may hold at most
        :data:`MAX_LINE_BYTES`; anything else raises :class:`JournalError`.
        """
        header: JournalHeader | None = None
        records: list[Record] = []
        lineno = 0
        while line := stream.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            where = f"{source}:{lineno}"
            if len(line) > MAX_LINE_BYTES:
                raise JournalError(f"{where}: a line longer than {MAX_LINE_BYTES} bytes")
            if not line.strip():
                continue
            try:
                raw = decode_object(line, max_bytes=MAX_LINE_BYTES, what=where)
                if header is None:
                    header = _header_from_json(raw, where)
                else:
                    records.append(_record_from_json(raw, where))
            except (DecodeError, JournalError) as exc:  # one line, whatever the file quoted
                raise JournalError(one_line(str(exc))) from None
            except (ValueError, TypeError, OverflowError) as exc:  # a value of the wrong kind
                raise JournalError(one_line(f"{where}: {type(exc).__name__}: {exc}")) from None
        if header is None:
            raise JournalError(f"{source}: empty journal (no header line)")
        return cls(header, records)

    @classmethod
    def load(cls, path: str | Path) -> Journal:
        """Read a journal file (bytes, so that what is not UTF-8 is said with its line)."""
        with Path(path).open("rb") as stream:
            return cls.read(stream, source=str(path))


def _header_to_json(header: JournalHeader) -> dict[str, Any]:
    return {
        "type": "header",
        "format": header.format,
        "batch_id": header.batch_id,
        "plate_ids": list(header.plate_ids),
        "mode": header.mode.value,
        "policy": header.policy.value,
    }


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
    if fmt != JOURNAL_FORMAT:
        raise JournalError(
            f"{where}: journal format {fmt} is not supported (expected {JOURNAL_FORMAT})"
        )
    plate_ids = _field(raw, "plate_ids", list, where)
    if not all(isinstance(p, str) for p in plate_ids):
        raise JournalError(f"{where}: field 'plate_ids' must be a list of strings")
    try:
        mode = BatchMode(_field(raw, "mode", str, where))
        policy = CompileFailurePolicy(_field(raw, "policy", str, where))
    except ValueError as exc:
        raise JournalError(f"{where}: {exc}") from exc
    return JournalHeader(_field(raw, "batch_id", str, where), tuple(plate_ids), mode, policy)


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
