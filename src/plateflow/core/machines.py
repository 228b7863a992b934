"""Builds ``transitions`` machines from the tables and runs them for many subjects.

Theory of operation: ``transitions`` binds a state to a model object, and
attaching one model per plate to a shared machine costs time linear in the
models already attached (and silently merges models that compare equal),
while one machine per plate costs kilobytes and a millisecond each. So each
batch owns one machine per table with a single private *cursor* model: to
move a plate, the cursor is set to the plate's state, the event is triggered,
and the resulting state is read back. The plate records themselves stay small
slotted objects that know nothing of ``transitions``.

Every convergence row gets a guard that raises ``ConvergenceViolation``
unless the move was made through :meth:`TableMachine.converge`; the batch
calls that from its one convergence function only (guarantee C1). Triggers
are never nested: a second move while one is in progress is a bug and raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from transitions import Machine

from plateflow.core.tables import BatchEvent, BatchState, PlateEvent, PlateState, Row
from plateflow.errors import ConvergenceViolation, InvalidTransition, ReentrancyError

__all__ = ["TableMachine"]

S = TypeVar("S", PlateState, BatchState)
E = TypeVar("E", PlateEvent, BatchEvent)


class _Cursor:
    """The one model object ``transitions`` sees; it carries a borrowed state."""

    state: Any


class TableMachine(Generic[S, E]):
    """A ``transitions`` machine built from one table, moving any number of subjects."""

    def __init__(self, name: str, table: Iterable[Row[S, E]], states: type[S], initial: S) -> None:
        self.name = name
        self._rows: dict[tuple[S, E], Row[S, E]] = {}
        for row in table:
            if (row.source, row.event) in self._rows:
                raise ValueError(f"{name} table: duplicate row {row.source}/{row.event}")
            self._rows[(row.source, row.event)] = row
        self._cursor = _Cursor()
        self._subject: str | None = None
        self._event: str = ""
        self._converging: str | None = None
        self._moving = False
        # transitions is given the plain string values: its State objects then
        # answer ``name`` without going through the enum on every trigger.
        self._by_value: dict[str, S] = {s.value: s for s in states}
        machine_rows = [
            {
                "trigger": row.event.value,
                "source": row.source.value,
                "dest": None if row.dest is None else row.dest.value,
                "conditions": [self._guard] if row.convergence else [],
            }
            for row in self._rows.values()
        ]
        self._machine = Machine(
            model=self._cursor,
            states=list(self._by_value),
            transitions=machine_rows,
            initial=initial.value,
            auto_transitions=False,
            ignore_invalid_triggers=False,
            queued=False,
            send_event=False,
        )
        self._events: dict[E, Any] = {
            row.event: self._machine.events[row.event.value] for row in self._rows.values()
        }

    def row(self, state: S, event: E) -> Row[S, E] | None:
        """The table row for ``event`` in ``state``, or None when the move is illegal."""
        return self._rows.get((state, event))

    def fire(self, subject: str, state: S, event: E, stimulus_id: str | None) -> S:
        """Move ``subject`` from ``state`` by ``event``; return the new state."""
        row = self._rows.get((state, event))
        if row is None:
            raise InvalidTransition(self.name, subject, state, event, stimulus_id)
        if row.dest is None:
            return state  # internal move: the table says the state stays
        if self._moving:
            raise ReentrancyError(
                f"{self.name} {subject!r}: {event!r} triggered while {self._subject!r} was "
                "still moving; moves are never nested"
            )
        self._moving = True
        self._subject = subject
        self._event = event
        self._cursor.state = state.value
        try:
            self._events[event].trigger(self._cursor)
            new_state = self._by_value[self._cursor.state]
        finally:
            self._moving = False
            self._subject = None
        return new_state

    def converge(self, subject: str, state: S, event: E, stimulus_id: str | None) -> S:
        """Take a convergence row. Only the batch's convergence function calls this."""
        self._converging = subject
        try:
            return self.fire(subject, state, event, stimulus_id)
        finally:
            self._converging = None

    def _guard(self, *_args: object, **_kwargs: object) -> bool:
        subject = self._subject
        if subject is None or self._converging != subject:
            raise ConvergenceViolation(
                self.name, str(subject), str(self._cursor.state), self._event
            )
        return True
