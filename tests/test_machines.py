"""The tables and the machines built from them; guarantee C1 at the machine level."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

import plateflow.core.batch
from plateflow import ConvergenceViolation, InvalidTransition, ReentrancyError
from plateflow.core import (
    BATCH_TABLE,
    PLATE_TABLE,
    BatchEvent,
    BatchState,
    PlateEvent,
    PlateState,
    Row,
)
from plateflow.core.machines import TableMachine


def plate_machine() -> TableMachine[PlateState, PlateEvent]:
    return TableMachine("plate", PLATE_TABLE, PlateState, PlateState.IDLE)


def batch_machine() -> TableMachine[BatchState, BatchEvent]:
    return TableMachine("batch", BATCH_TABLE, BatchState, BatchState.IDLE)


def test_state_values_are_the_designed_wire_names() -> None:
    assert [s.value for s in PlateState] == [
        "idle",
        "queued",
        "compiling",
        "compiled",
        "executing",
        "completed",
        "failed",
        "cancelled",
    ]
    assert [s.value for s in BatchState] == [
        "idle",
        "compiling",
        "executing",
        "cancelling",
        "completed",
        "failed",
        "cancelled",
    ]


@pytest.mark.parametrize("row", [r for r in PLATE_TABLE if not r.convergence], ids=str)
def test_plate_machine_takes_every_ordinary_row(row: Row[PlateState, PlateEvent]) -> None:
    machine = plate_machine()
    new = machine.fire("p", row.source, row.event, "s1")
    assert new is (row.dest or row.source)


@pytest.mark.parametrize("row", [r for r in PLATE_TABLE if r.convergence], ids=str)
def test_c1_plate_terminal_row_outside_convergence_raises(row: Row[PlateState, PlateEvent]) -> None:
    machine = plate_machine()
    with pytest.raises(ConvergenceViolation, match="C1"):
        machine.fire("p", row.source, row.event, "s1")
    assert machine.converge("p", row.source, row.event, "s1") is row.dest


@pytest.mark.parametrize("row", [r for r in BATCH_TABLE if r.convergence], ids=str)
def test_c1_batch_terminal_row_outside_convergence_raises(row: Row[BatchState, BatchEvent]) -> None:
    machine = batch_machine()
    with pytest.raises(ConvergenceViolation):
        machine.fire("b", row.source, row.event, "s1")
    assert machine.converge("b", row.source, row.event, "s1") is row.dest


def test_c1_converging_one_subject_does_not_license_another() -> None:
    machine = plate_machine()
    machine._converging = "p1"  # as if p1's convergence were in progress
    with pytest.raises(ConvergenceViolation):
        machine.fire("p2", PlateState.EXECUTING, PlateEvent.CONVERGE_COMPLETED, "s1")


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (s, e)
        for s, e in itertools.product(PlateState, PlateEvent)
        if (s, e) not in {(r.source, r.event) for r in PLATE_TABLE}
    ],
    ids=str,
)
def test_moves_missing_from_the_table_are_invalid(state: PlateState, event: PlateEvent) -> None:
    with pytest.raises(InvalidTransition) as info:
        plate_machine().fire("p7", state, event, "s9")
    assert info.value.subject == "p7"
    assert info.value.stimulus_id == "s9"
    assert state.value in str(info.value)


def test_moves_are_never_nested() -> None:
    machine = plate_machine()
    machine._moving = True  # as if a move were in progress (queued=False, asserted)
    with pytest.raises(ReentrancyError):
        machine.fire("p", PlateState.IDLE, PlateEvent.SELECTED, "s1")


def test_tables_have_no_duplicate_rows_and_terminals_are_final() -> None:
    for table in (PLATE_TABLE, BATCH_TABLE):
        keys = [(r.source, r.event) for r in table]
        assert len(keys) == len(set(keys))
        for row in table:
            assert not row.source.is_terminal
            assert row.convergence == (row.dest is not None and row.dest.is_terminal)


def test_c1_only_the_convergence_functions_take_convergence_rows() -> None:
    """Static check: ``.converge(`` is called from the two convergence functions only."""
    source = Path(plateflow.core.batch.__file__).read_text(encoding="utf-8")
    callers = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            for inner in ast.walk(node):
                if (
                    isinstance(inner, ast.Call)
                    and isinstance(inner.func, ast.Attribute)
                    and inner.func.attr == "converge"
                ):
                    callers.add(node.name)
    assert callers == {"_converge", "_converge_batch"}


def test_core_imports_nothing_of_the_package_but_errors() -> None:
    core = Path(plateflow.core.batch.__file__).parent
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                name = node.module
                if name.startswith("plateflow"):
                    assert name.startswith(("plateflow.core", "plateflow.errors")), (path, name)
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                for banned in ("socket", "threading", "asyncio", "time", "zmq", "logging"):
                    assert banned not in names, f"{path.name} imports {banned}: the core does no IO"
