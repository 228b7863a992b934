"""Statecharts: generated from the tables, checked in, parseable, and the same machines.

- the checked-in files under ``statecharts/`` are what the code generates now,
  and ``plateflow diagram --check`` names any file that is not;
- every DOT chart is drawn by the real Graphviz ``dot`` (never skipped);
- every Mermaid chart passes a parser of the syntax subset we emit, and shows
  every state and row of its table;
- the SCXML charts are loaded into another statechart implementation
  (python-statemachine) and must make the same moves as our machines, both
  exhaustively (state x event) and along journaled fact sequences;
- a journal annotation counts exactly the edges the batch took.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from statemachine.io import load as load_statechart

from helpers import make_batch, ticking_clock
from plateflow.core import (
    BATCH_TABLE,
    PLATE_TABLE,
    Batch,
    BatchMode,
    BatchStarted,
    CancelRequested,
    CancelTimedOut,
    Change,
    CompileAccepted,
    CompileCancelled,
    CompileFailed,
    CompileFailurePolicy,
    CompileRejected,
    CompileSucceeded,
    Disposition,
    EngineLost,
    ExecutionAccepted,
    ExecutionCancelled,
    ExecutionFailed,
    ExecutionProgress,
    ExecutionRejected,
    ExecutionStarted,
    ExecutionSucceeded,
    Fact,
    Journal,
    PlateState,
    Record,
    Row,
)
from plateflow.core.machines import TableMachine
from plateflow.errors import ConvergenceViolation, InvalidTransition, JournalError, UsageError
from plateflow.statecharts import (
    FORMATS,
    MACHINES,
    Annotation,
    add_diagram_arguments,
    annotate,
    check_charts,
    diagram_command,
    escape_id,
    render,
    to_dot,
    to_mermaid,
    to_scxml,
    to_svg,
    write_charts,
)

ROOT = Path(__file__).resolve().parent.parent
CHARTS = ROOT / "statecharts"
DOCS = ROOT / "docs" / "statecharts.md"
TIMEOUT = 60.0
ID = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
SCXML_NS = "{http://www.w3.org/2005/07/scxml}"
PF_NS = "{urn:x-plateflow:statechart}"
INTERNAL_KINDS = {"execution_started": "execution_started", "execution_progress": "progress"}


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="plateflow diagram")
    add_diagram_arguments(parser)
    return diagram_command(parser.parse_args(argv))


# --- a table with hostile names: escaping must keep every format parseable -------------


class OddState(StrEnum):
    NODE = "node"  # a DOT keyword
    END = "end"  # a Mermaid keyword
    SPACED = "with space"
    QUOTED = 'say "hi" \\ & <b>'
    PUNCT = "a:b;c#d%%e-->f"
    ACCENTED = "naïve état"
    DIGIT = "1st"
    STAR = "[*]"

    @property
    def is_terminal(self) -> bool:
        return self is OddState.STAR


class OddEvent(StrEnum):
    GO = "go now"
    DOTTED = "a.b"
    WILD = "*"
    BREAK = "line\nbreak"
    PLAIN = "plain"


_O, _OE = OddState, OddEvent
ODD_TABLE: Any = (
    Row(_O.NODE, _OE.GO, _O.END, "go"),
    Row(_O.END, _OE.DOTTED, _O.SPACED, 'quote " and back \\ slash'),
    Row(_O.SPACED, _OE.WILD, None, "stay <here> & there"),
    Row(_O.SPACED, _OE.GO, _O.QUOTED, "go"),
    Row(_O.QUOTED, _OE.BREAK, _O.PUNCT, "two\nlines"),
    Row(_O.PUNCT, _OE.PLAIN, _O.ACCENTED, "plain"),
    Row(_O.ACCENTED, _OE.GO, _O.DIGIT, "go"),
    Row(_O.DIGIT, _OE.PLAIN, _O.STAR, "finish", True),
    Row(_O.NODE, _OE.PLAIN, _O.STAR, "finish", True),
)

TABLES: dict[str, Any] = {"plate": PLATE_TABLE, "batch": BATCH_TABLE, "odd": ODD_TABLE}
INITIAL: dict[str, str] = {"plate": "idle", "batch": "idle", "odd": "node"}


def states_of(table: Any) -> list[str]:
    return [s.value for s in type(table[0].source)]


def terminal_of(table: Any) -> set[str]:
    return {s.value for s in type(table[0].source) if s.is_terminal}


def edge_text(row: Any) -> str:
    if row.convergence:
        return f"{row.event.value} (convergence)"
    if row.dest is None:
        return f"{row.event.value} (internal)"
    return str(row.event.value)


# --- journals from the real core -------------------------------------------------------------


def scenario_run_continue() -> Batch:
    """Three plates, run batch, continue policy: one completes, one fails to compile,
    one is cancelled before its execution was accepted."""
    batch = make_batch(3, policy=CompileFailurePolicy.CONTINUE)
    for fact in [
        BatchStarted(),
        CompileAccepted(plate_id="p0", job_id="b.0.c"),
        CompileAccepted(plate_id="p1", job_id="b.1.c"),
        CompileSucceeded(plate_id="p2", job_id="b.2.c", artifact_id="a2"),  # overtook accept
        CompileSucceeded(plate_id="p0", job_id="b.0.c", artifact_id="a0"),
        CompileFailed(plate_id="p1", job_id="b.1.c", error="bad step"),
        ExecutionAccepted(plate_id="p0", execution_id="b.0.x"),
        ExecutionStarted(plate_id="p0", execution_id="b.0.x"),
        ExecutionProgress(plate_id="p0", execution_id="b.0.x", done=1, total=2),
        ExecutionProgress(plate_id="p0", execution_id="b.0.x", done=2, total=2),
        ExecutionProgress(plate_id="p0", execution_id="b.0.x", done=2, total=2),  # duplicate
        ExecutionSucceeded(plate_id="p0", execution_id="b.0.x"),
        ExecutionSucceeded(plate_id="p0", execution_id="b.0.x"),  # stale: settled
        CancelRequested(plate_id="p2"),
        ExecutionCancelled(plate_id="p2", execution_id="b.2.x"),
    ]:
        batch.handle(fact)
    return batch


def scenario_compile_only_cancel() -> Batch:
    """Compile-only: p0 settles in compiled, then a batch cancel cancels p1."""
    batch = make_batch(2, mode=BatchMode.COMPILE_ONLY)
    for fact in [
        BatchStarted(),
        CompileSucceeded(plate_id="p0", job_id="b.0.c", artifact_id="a0"),
        CancelRequested(),
        CompileCancelled(plate_id="p1", job_id="b.1.c"),
    ]:
        batch.handle(fact)
    return batch


def odd_plate_ids_journal() -> Journal:
    ids = ['say "hi"', "end note", "a:b;c#d", "line\nbreak", "<b>&amp;", "x\\y"]
    batch = Batch("odd batch\n", ids, clock=ticking_clock())
    batch.handle(BatchStarted())
    batch.handle(CompileFailed(plate_id="a:b;c#d", job_id="odd batch\n.2.c", error="e"))
    return batch.journal


def ex(i: int) -> str:
    return f"b.{i}.x"


def job(i: int) -> str:
    return f"b.{i}.c"


SEED_FLOWS: dict[str, tuple[int, BatchMode, CompileFailurePolicy, list[Fact]]] = {
    "compile-execute-succeeded": (
        2,
        BatchMode.RUN,
        CompileFailurePolicy.ABORT,
        [
            BatchStarted(),
            *[CompileAccepted(plate_id=f"p{i}", job_id=job(i)) for i in range(2)],
            *[CompileSucceeded(plate_id=f"p{i}", job_id=job(i), artifact_id="a") for i in range(2)],
            *[ExecutionAccepted(plate_id=f"p{i}", execution_id=ex(i)) for i in range(2)],
            ExecutionStarted(plate_id="p0", execution_id=ex(0)),
            ExecutionProgress(plate_id="p0", execution_id=ex(0), done=1, total=1),
            ExecutionProgress(plate_id="p1", execution_id=ex(1), done=1, total=1),  # implied start
            *[ExecutionSucceeded(plate_id=f"p{i}", execution_id=ex(i)) for i in range(2)],
        ],
    ),
    "compile-failure-aborts": (
        3,
        BatchMode.RUN,
        CompileFailurePolicy.ABORT,
        [
            BatchStarted(),
            CompileAccepted(plate_id="p0", job_id=job(0)),
            CompileSucceeded(plate_id="p2", job_id=job(2), artifact_id="a"),
            CompileFailed(plate_id="p1", job_id=job(1), error="boom"),
            CompileCancelled(plate_id="p0", job_id=job(0)),  # stale: already aborted
        ],
    ),
    "cancel-while-executing": (
        2,
        BatchMode.RUN,
        CompileFailurePolicy.ABORT,
        [
            BatchStarted(),
            *[CompileSucceeded(plate_id=f"p{i}", job_id=job(i), artifact_id="a") for i in range(2)],
            ExecutionStarted(plate_id="p0", execution_id=ex(0)),
            CancelRequested(),
            ExecutionCancelled(plate_id="p0", execution_id=ex(0)),
            CancelTimedOut(plate_id="p1"),
        ],
    ),
    "compile-only": (
        2,
        BatchMode.COMPILE_ONLY,
        CompileFailurePolicy.ABORT,
        [
            BatchStarted(),
            CompileSucceeded(plate_id="p0", job_id=job(0), artifact_id="a"),
            CompileAccepted(plate_id="p1", job_id=job(1)),
            CompileSucceeded(plate_id="p1", job_id=job(1), artifact_id="a"),
        ],
    ),
    "engine-lost": (
        2,
        BatchMode.RUN,
        CompileFailurePolicy.ABORT,
        [BatchStarted(), CompileAccepted(plate_id="p0", job_id=job(0)), EngineLost()],
    ),
}


# --- the checked-in files ---------------------------------------------------------------------


def test_the_checked_in_charts_match_the_code() -> None:
    assert check_charts(CHARTS) == []
    expected = {f"{m}.{ext}" for m in MACHINES for ext in FORMATS.values()}
    assert expected <= {path.name for path in CHARTS.iterdir()}


def test_diagram_check_passes_on_the_checked_in_charts(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("--check", "-o", str(CHARTS)) == 0
    assert "every chart matches" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(f"{m}.{e}" for m in MACHINES for e in FORMATS.values()))
def test_diagram_check_names_a_file_that_differs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    copy = tmp_path / "statecharts"
    shutil.copytree(CHARTS, copy)
    path = copy / name
    text = path.read_text(encoding="utf-8")
    if name.endswith(".svg"):  # an SVG drawn from another DOT source carries another digest
        text = re.sub(r"sha256:[0-9a-f]{64}", "sha256:" + "0" * 64, text)
    else:
        lines = text.split("\n")
        lines[3] += " "
        text = "\n".join(lines)
    path.write_bytes(text.encode("utf-8"))
    assert run("--check", "-o", str(copy)) == 1
    err = capsys.readouterr().err
    assert f"{path}: differs" in err
    assert sum(line.endswith(")") and "differs" in line for line in err.splitlines()) == 1
    path.unlink()
    assert run("--check", "-o", str(copy)) == 1
    assert f"{path}: missing" in capsys.readouterr().err


def test_diagram_check_restricted_to_one_machine_and_format(tmp_path: Path) -> None:
    copy = tmp_path / "charts"
    shutil.copytree(CHARTS, copy)
    (copy / "batch.dot").write_text("digraph {}\n", encoding="utf-8")
    assert run("--check", "plate", "--format", "dot", "-o", str(copy)) == 0
    assert run("--check", "batch", "--format", "mermaid", "-o", str(copy)) == 0
    assert run("--check", "batch", "-o", str(copy)) == 1


def test_diagram_check_uses_statecharts_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="statecharts is not a directory"):
        run("--check")
    shutil.copytree(CHARTS, tmp_path / "statecharts")
    assert run("--check") == 0


def test_a_crlf_checkout_is_reported_byte_for_byte(tmp_path: Path) -> None:
    copy = tmp_path / "charts"
    shutil.copytree(CHARTS, copy)
    path = copy / "plate.mmd"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert check_charts(copy) == [f"{path}: differs from what the code generates (from line 1)"]


def test_generating_writes_every_chart_and_the_result_passes_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run() == 0  # no arguments: every machine and format into ./statecharts
    written = sorted(p.name for p in (tmp_path / "statecharts").iterdir())
    assert written == sorted(f"{m}.{e}" for m in MACHINES for e in FORMATS.values())
    assert capsys.readouterr().out.count("wrote ") == 8
    assert run("--check") == 0
    for name in written:
        if not name.endswith(".svg"):  # text charts: byte for byte what is checked in
            assert (tmp_path / "statecharts" / name).read_bytes() == (CHARTS / name).read_bytes()


@pytest.mark.parametrize("fmt", ["mermaid", "dot", "scxml"])
@pytest.mark.parametrize("machine", list(MACHINES))
def test_rendering_is_deterministic(machine: str, fmt: str) -> None:
    table = MACHINES[machine]
    assert render(table, fmt) == render(tuple(table), fmt)
    assert render(table, fmt).endswith("\n")
    assert "\r" not in render(table, fmt)


# --- the chart's content comes from the table ----------------------------------------------------


def test_the_initial_state_is_where_the_core_starts_and_terminals_have_no_rows() -> None:
    batch = make_batch(2)
    assert batch.state.value == INITIAL["batch"]
    assert {batch.plate_state(p).value for p in batch.plate_ids} == {INITIAL["plate"]}
    for table in (PLATE_TABLE, BATCH_TABLE):
        with_rows = {row.source.value for row in table}
        assert terminal_of(table) == set(states_of(table)) - with_rows
        assert states_of(table)[0] == table[0].source.value


# --- DOT: drawn by the real Graphviz --------------------------------------------------------------


def dot_binary() -> str:
    found = shutil.which("dot")
    assert found is not None, "Graphviz `dot` must be installed to check the DOT charts"
    return found


def draw(source: str) -> str:
    done = subprocess.run(
        [dot_binary(), "-Tsvg"],
        input=source.encode("utf-8"),
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b"", done.stderr.decode()  # not even a warning
    return done.stdout.decode("utf-8")


def node_titles(svg: str) -> set[str]:
    root = ET.fromstring(svg.split("\n", 1)[1] if svg.startswith("<?xml") else svg)
    ns = "{http://www.w3.org/2000/svg}"
    return {
        title.text or ""
        for group in root.iter(f"{ns}g")
        if group.get("class") == "node"
        for title in group.iter(f"{ns}title")
    }


def dot_sources() -> list[tuple[str, str]]:
    sources = [(f"{name}.dot", to_dot(table)) for name, table in TABLES.items()]
    sources += [(p.name, p.read_text(encoding="utf-8")) for p in sorted(CHARTS.glob("*.dot"))]
    run_journal = scenario_run_continue().journal
    sources += [
        (f"{m}.dot annotated", to_dot(MACHINES[m], annotate(MACHINES[m], run_journal)))
        for m in MACHINES
    ]
    odd = odd_plate_ids_journal()
    sources.append(("odd plate ids", to_dot(PLATE_TABLE, annotate(PLATE_TABLE, odd))))
    return sources


@pytest.mark.parametrize(("name", "source"), dot_sources(), ids=lambda v: str(v)[:30])
def test_every_dot_chart_is_drawn_by_graphviz(name: str, source: str) -> None:
    svg = draw(source)
    table = TABLES.get(name.split(".")[0], PLATE_TABLE)
    assert node_titles(svg) == {escape_id(s) for s in states_of(table)} | {"_start"}


def test_dot_shows_every_row_with_its_kind() -> None:
    for table in TABLES.values():
        dot = to_dot(table)
        edges = [
            line
            for line in dot.splitlines()
            if " -> " in line and not line.startswith('    "_start"')
        ]
        assert len(edges) == len(table)
        for line, row in zip(edges, table, strict=True):
            assert line.startswith(f'    "{escape_id(row.source.value)}" -> ')
            assert ('color="#b03a2e"' in line) is row.convergence, line
            assert ("style=dashed" in line) is (row.dest is None), line
        start = f'"_start" -> "{escape_id(type(table[0].source)(states_of(table)[0]).value)}"'
        assert start in dot
        for state in terminal_of(table):
            assert f'"{escape_id(state)}" [label=' in dot
            assert re.search(rf'"{re.escape(escape_id(state))}" \[[^\n]*peripheries=2', dot)


def test_the_checked_in_svgs_are_drawings_of_every_state() -> None:
    for machine, table in MACHINES.items():
        svg = (CHARTS / f"{machine}.svg").read_text(encoding="utf-8")
        assert node_titles(svg) == {escape_id(s) for s in states_of(table)} | {"_start"}


def test_svg_without_graphviz_is_a_clear_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UsageError, match="Graphviz 'dot' was not found on PATH"):
        to_svg(PLATE_TABLE)
    with pytest.raises(UsageError, match="not found"):
        run("plate", "--format", "svg")
    # nothing is half-written: every chart is rendered before the first file
    with pytest.raises(UsageError, match="not found"):
        run("-o", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    # checking an SVG needs no Graphviz: it compares the DOT digest
    assert check_charts(CHARTS, formats=["svg"]) == []


def test_a_failing_dot_binary_is_a_usage_error(tmp_path: Path) -> None:
    fake = tmp_path / "fakedot"
    fake.write_text("#!/bin/sh\necho 'syntax error in line 1' >&2\nexit 3\n", encoding="utf-8")
    fake.chmod(0o755)
    with pytest.raises(UsageError, match=r"failed \(exit 3\): syntax error in line 1"):
        to_svg(PLATE_TABLE, dot=str(fake))


# --- Mermaid: a parser of the subset we emit ---------------------------------------------------

_M_DECLARE = re.compile(rf'    state "(?P<label>[^"\n]*)" as (?P<id>{ID.pattern})')
_M_START = re.compile(rf"    \[\*\] --> (?P<id>{ID.pattern})")
_M_END = re.compile(rf"    (?P<id>{ID.pattern}) --> \[\*\]")
_M_TEXT = r"(?:[^:;#\"\n]|#\d+;)+"
_M_EDGE = re.compile(rf"    (?P<src>{ID.pattern}) --> (?P<dst>{ID.pattern}) : (?P<text>{_M_TEXT})")
_M_CLASSDEF = re.compile(r"    classDef (?P<name>\w+) [\w:,.\-]+")
_M_CLASS = re.compile(rf"    class (?P<id>{ID.pattern}) (?P<name>\w+)")
_M_NOTE = re.compile(rf"    note right of (?P<id>{ID.pattern})")
_M_NOTE_TEXT = re.compile(rf"        (?P<text>{_M_TEXT})")
_M_COMMENT = re.compile(r"    %%[^\n]*")


def decode(text: str) -> str:
    return re.sub(r"#(\d+);", lambda m: chr(int(m.group(1))), text)


def parse_mermaid(source: str) -> dict[str, Any]:
    """Parse our stateDiagram-v2 subset; any line outside it fails the test."""
    lines = source.split("\n")
    assert lines[0] == "stateDiagram-v2"
    assert lines[-1] == "", "ends with a newline"
    chart: dict[str, Any] = {
        "states": {},
        "initial": [],
        "final": [],
        "edges": [],
        "notes": {},
        "classes": {},
        "classdefs": set(),
    }
    declared: dict[str, str] = chart["states"]
    note: str | None = None

    def known(ident: str) -> str:
        assert ident in declared, f"{ident} used before it was declared"
        return ident

    for number, line in enumerate(lines[1:-1], start=2):
        if note is not None:
            if line == "    end note":
                note = None
                continue
            match = _M_NOTE_TEXT.fullmatch(line)
            assert match, f"line {number}: bad note text {line!r}"
            chart["notes"][note] = decode(match["text"])
            continue
        if _M_COMMENT.fullmatch(line):
            continue
        if match := _M_DECLARE.fullmatch(line):
            assert match["id"] not in declared, f"line {number}: declared twice"
            declared[match["id"]] = decode(match["label"])
        elif match := _M_START.fullmatch(line):
            chart["initial"].append(known(match["id"]))
        elif match := _M_END.fullmatch(line):
            chart["final"].append(known(match["id"]))
        elif match := _M_EDGE.fullmatch(line):
            edge = (known(match["src"]), known(match["dst"]), decode(match["text"]))
            chart["edges"].append(edge)
        elif match := _M_CLASSDEF.fullmatch(line):
            chart["classdefs"].add(match["name"])
        elif match := _M_CLASS.fullmatch(line):
            assert match["name"] in chart["classdefs"], f"line {number}: undefined class"
            chart["classes"][known(match["id"])] = match["name"]
        elif match := _M_NOTE.fullmatch(line):
            note = known(match["id"])
        else:
            pytest.fail(f"line {number} is not in the Mermaid subset we emit: {line!r}")
    assert note is None, "unterminated note"
    return chart


@pytest.mark.parametrize("name", list(TABLES))
def test_mermaid_shows_every_state_and_row_of_the_table(name: str) -> None:
    table = TABLES[name]
    chart = parse_mermaid(to_mermaid(table))
    assert chart["states"] == {escape_id(s): s for s in states_of(table)}
    assert chart["initial"] == [escape_id(INITIAL[name])]
    terminal = [escape_id(s) for s in states_of(table) if s in terminal_of(table)]
    assert chart["final"] == terminal
    assert chart["classes"] == dict.fromkeys(terminal, "terminal")
    expected = [
        (
            escape_id(row.source.value),
            escape_id((row.dest or row.source).value),
            edge_text(row),
        )
        for row in table
    ]
    assert chart["edges"] == expected
    assert chart["notes"] == {}


def test_the_mermaid_parser_rejects_what_mermaid_would_choke_on() -> None:
    good = to_mermaid(PLATE_TABLE)
    for bad in [
        good.replace(": selected", ": selected: twice"),  # a colon ends the label
        good.replace(": selected", ": a;b"),  # a semicolon ends the statement
        good.replace("as idle", "as end"),  # and the later uses of idle are undeclared
        good.replace('"queued"', '"que"ued"'),
        good.replace("    [*] --> idle\n", "    [*] --> idle\n    note left of idle\n"),
    ]:
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            parse_mermaid(bad)
    with pytest.raises(AssertionError):
        parse_mermaid(good.replace("    [*] --> idle", "    [*] --> nowhere"))


def test_mermaid_escapes_labels_into_entity_codes() -> None:
    source = to_mermaid(ODD_TABLE)
    label = "say #34;hi#34; #92; #38; #60;b#62;"
    assert f'state "{label}" as {escape_id(OddState.QUOTED)}' in source
    assert escape_id(OddState.QUOTED) == "Xsay_20__22_hi_22__20__5c__20__26__20__3c_b_3e_"
    assert "Xline_a_break (internal)" not in source  # events are shown verbatim, not as ids
    assert "line#10;break" in source


# --- SCXML: loaded into python-statemachine ----------------------------------------------------


def scxml_class(table: Any) -> Any:
    return load_statechart(to_scxml(table), format="scxml")


def configuration(chart: Any) -> str:
    ids = [state.id for state in chart.configuration]
    assert len(ids) == 1, ids
    return str(ids[0])


def send(chart: Any, event: str) -> None:
    allowed = {e.id for e in chart.allowed_events}
    assert escape_id(event) in allowed, f"{event!r} not allowed in {configuration(chart)!r}"
    chart.send(escape_id(event))


@pytest.mark.parametrize("name", list(TABLES))
def test_scxml_has_the_structure_of_the_table(name: str) -> None:
    table = TABLES[name]
    root = ET.fromstring(to_scxml(table).split("\n", 1)[1])
    assert root.tag == f"{SCXML_NS}scxml"
    assert root.get("initial") == escape_id(INITIAL[name])
    finals = [e.get("id") for e in root if e.tag == f"{SCXML_NS}final"]
    assert finals == [escape_id(s) for s in states_of(table) if s in terminal_of(table)]
    seen = []
    for state in root:
        assert state.get(f"{PF_NS}name") is not None
        for transition in state:
            seen.append(
                (
                    state.get("id"),
                    transition.get("event"),
                    transition.get("target"),
                    transition.get(f"{PF_NS}label"),
                    transition.get(f"{PF_NS}convergence") == "true",
                )
            )
    expected = [
        (
            escape_id(row.source.value),
            escape_id(row.event.value),
            None if row.dest is None else escape_id(row.dest.value),
            row.label.replace("\n", "\\u000a"),
            row.convergence,
        )
        for row in table
    ]
    assert sorted(seen, key=str) == sorted(expected, key=str)


def paths_to_every_state(table: Any) -> dict[str, list[str]]:
    """The shortest event path from the initial state to each state, by the table."""
    start = states_of(table)[0]
    paths = {start: []}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        for row in table:
            if row.source.value == state and row.dest is not None and row.dest.value not in paths:
                paths[row.dest.value] = [*paths[state], row.event.value]
                queue.append(row.dest.value)
    assert set(paths) == set(states_of(table)), "every state is reachable"
    return paths


@pytest.mark.parametrize("name", list(TABLES))
def test_the_loaded_scxml_makes_the_same_moves_as_our_machine_for_every_state_and_event(
    name: str,
) -> None:
    table = TABLES[name]
    states, events = type(table[0].source), type(table[0].event)
    ours = TableMachine(name, table, states, states(INITIAL[name]))
    chart_class = scxml_class(table)
    for state, path in paths_to_every_state(table).items():
        for event in events:
            chart = chart_class()
            for step in path:
                send(chart, step)
            assert configuration(chart) == escape_id(state)
            row = ours.row(states(state), event)
            allowed = {e.id for e in chart.allowed_events}
            assert (escape_id(event.value) in allowed) is (row is not None), (state, event)
            if row is None:
                with pytest.raises(InvalidTransition):
                    ours.fire("s", states(state), event, None)
                continue
            if row.convergence:
                with pytest.raises(ConvergenceViolation):
                    ours.fire("s", states(state), event, None)
                new = ours.converge("s", states(state), event, None)
            else:
                new = ours.fire("s", states(state), event, None)
            chart.send(escape_id(event.value))
            assert configuration(chart) == escape_id(new.value), (state, event)
            assert chart.is_terminated is new.is_terminal


@functools.cache
def chart_class(machine: str) -> Any:
    return scxml_class(MACHINES[machine])


def event_of(change: Change, table: Any) -> str:
    """The trigger the core fired for a change: the note names it, or it settled."""
    events = {row.event.value for row in table}
    return change.note if change.note in events else f"converge_{change.new.value}"


def replay_through_charts(batch: Batch, facts: Iterable[Fact]) -> None:
    """Feed the facts to the core, and the moves it made to SCXML charts; same states."""
    plates = {pid: chart_class("plate")() for pid in batch.plate_ids}
    whole = chart_class("batch")()
    for fact in facts:
        batch.handle(fact)
        record = batch.journal[-1]
        for change in record.changes:
            if change.old == change.new:
                continue  # a compile-only plate settling in compiled: no move
            if change.plate_id is None:
                send(whole, event_of(change, BATCH_TABLE))
            else:
                send(plates[change.plate_id], event_of(change, PLATE_TABLE))
        internal = INTERNAL_KINDS.get(fact.kind)
        if internal and record.disposition is Disposition.APPLIED:
            send(plates[str(record.plate_id)], internal)
        for pid, chart in plates.items():
            assert configuration(chart) == escape_id(batch.plate_state(pid).value), fact
        assert configuration(whole) == escape_id(batch.state.value), fact


@pytest.mark.parametrize("flow", list(SEED_FLOWS))
def test_seed_flows_reach_the_same_states_in_the_loaded_scxml(flow: str) -> None:
    n, mode, policy, facts = SEED_FLOWS[flow]
    batch = make_batch(n, mode=mode, policy=policy)
    replay_through_charts(batch, facts)
    expected = {
        "compile-execute-succeeded": ("completed", ["completed", "completed"]),
        "compile-failure-aborts": ("failed", ["cancelled", "failed", "cancelled"]),
        "cancel-while-executing": ("cancelled", ["cancelled", "cancelled"]),
        "compile-only": ("completed", ["compiled", "compiled"]),
        "engine-lost": ("failed", ["failed", "failed"]),
    }[flow]
    assert (batch.state.value, [batch.plate_state(p).value for p in batch.plate_ids]) == expected


# --- annotation from a journal ------------------------------------------------------------------


def test_annotation_counts_exactly_the_edges_a_run_batch_took() -> None:
    journal = scenario_run_continue().journal
    plates = annotate(PLATE_TABLE, journal)
    assert plates.machine == "plate"
    assert plates.batch_id == "b"
    assert plates.records == 15
    assert dict(plates.taken) == {
        ("idle", "selected"): 3,
        ("queued", "compile_accepted"): 3,  # p2's was implied by its compile success
        ("compiling", "compile_succeeded"): 2,
        ("compiled", "execution_accepted"): 1,
        ("executing", "execution_started"): 1,
        ("executing", "progress"): 2,  # the repeated 2/2 was a duplicate
        ("executing", "converge_completed"): 1,
        ("compiling", "converge_failed"): 1,
        ("compiled", "converge_cancelled"): 1,
    }
    assert dict(plates.final) == {"p0": "completed", "p1": "failed", "p2": "cancelled"}
    batch = annotate(BATCH_TABLE, journal)
    assert dict(batch.taken) == {
        ("idle", "start"): 1,
        ("compiling", "all_compiled"): 1,
        ("executing", "converge_failed"): 1,
    }
    assert dict(batch.final) == {"b": "failed"}


def test_annotation_of_a_compile_only_cancel() -> None:
    journal = scenario_compile_only_cancel().journal
    plates = annotate(PLATE_TABLE, journal)
    assert dict(plates.taken) == {
        ("idle", "selected"): 2,
        ("queued", "compile_accepted"): 1,
        ("compiling", "compile_succeeded"): 1,
        ("queued", "converge_cancelled"): 1,
    }
    assert dict(plates.final) == {"p0": "compiled", "p1": "cancelled"}
    assert plates.subjects_in("compiled") == ["p0"]
    batch = annotate(BATCH_TABLE, journal)
    assert dict(batch.taken) == {
        ("idle", "start"): 1,
        ("compiling", "cancel"): 1,
        ("cancelling", "converge_cancelled"): 1,
    }


def test_annotated_charts_show_the_counts_and_where_each_plate_ended() -> None:
    journal = scenario_run_continue().journal
    plates = annotate(PLATE_TABLE, journal)
    chart = parse_mermaid(to_mermaid(PLATE_TABLE, plates))
    labels = {(src, text) for src, _, text in chart["edges"]}
    assert ("idle", "selected \u00d73") in labels
    assert ("executing", "progress (internal) \u00d72") in labels
    assert ("compiled", "converge_cancelled (convergence) \u00d71") in labels
    assert ("idle", "converge_failed (convergence)") in labels  # not taken: no count
    assert chart["notes"] == {
        "completed": "final state of plate p0",
        "failed": "final state of plate p1",
        "cancelled": "final state of plate p2",
    }
    batch = parse_mermaid(to_mermaid(BATCH_TABLE, annotate(BATCH_TABLE, journal)))
    assert batch["notes"] == {"failed": "final state of batch b"}
    dot = to_dot(PLATE_TABLE, plates)
    assert 'label="idle -> queued' not in dot
    assert '"completed" [label="completed\\nfinal state of plate p0"' in dot
    assert 'label="selected \u00d73", tooltip="batch started (plate selected)", penwidth=3' in dot
    root = ET.fromstring(to_scxml(PLATE_TABLE, plates).split("\n", 1)[1])
    assert root.get(f"{PF_NS}batch") == "b"
    taken = {
        (s.get("id"), t.get("event")): int(t.get(f"{PF_NS}taken") or -1) for s in root for t in s
    }
    assert taken[("queued", "compile_accepted")] == 3
    assert taken[("idle", "converge_failed")] == 0
    finals = {s.get("id"): json.loads(s.get(f"{PF_NS}final") or "[]") for s in root}
    assert finals["failed"] == ["p1"]
    assert finals["idle"] == []


def test_annotated_scxml_still_loads_and_runs() -> None:
    plates = annotate(PLATE_TABLE, scenario_run_continue().journal)
    chart = load_statechart(to_scxml(PLATE_TABLE, plates), format="scxml")()
    for event in ["selected", "compile_accepted", "converge_failed"]:
        send(chart, event)
    assert chart.is_terminated


def test_a_long_list_of_plates_is_counted_not_listed() -> None:
    batch = make_batch(25)
    batch.handle(CancelRequested())
    plates = annotate(PLATE_TABLE, batch.journal)
    assert plates.count("idle", "converge_cancelled") == 25
    note = parse_mermaid(to_mermaid(PLATE_TABLE, plates))["notes"]["cancelled"]
    listed = ", ".join(f"p{i}" for i in range(20))
    assert note == f"final state of 25 plates ({listed} and 5 more)"


def test_odd_plate_ids_keep_every_annotated_chart_parseable() -> None:
    journal = odd_plate_ids_journal()
    plates = annotate(PLATE_TABLE, journal)
    assert plates.final["a:b;c#d"] == "failed"
    assert plates.subjects_in("cancelled") == [p for p in journal.header.plate_ids if p[0] != "a"]
    chart = parse_mermaid(to_mermaid(PLATE_TABLE, plates))
    assert chart["notes"]["failed"] == "final state of plate a:b;c#d"
    assert "line\nbreak" in chart["notes"]["cancelled"]
    batch = parse_mermaid(to_mermaid(BATCH_TABLE, annotate(BATCH_TABLE, journal)))
    assert batch["notes"] == {"failed": "final state of batch odd batch\n"}
    for table in (PLATE_TABLE, BATCH_TABLE):
        scxml = to_scxml(table, annotate(table, journal))
        ET.fromstring(scxml.split("\n", 1)[1])
        load_statechart(scxml, format="scxml")
        draw(to_dot(table, annotate(table, journal)))


def test_annotate_refuses_a_journal_the_tables_cannot_explain() -> None:
    journal = scenario_compile_only_cancel().journal
    bad = list(journal.records)
    first = bad[0]
    bad[0] = first._replace(
        changes=(*first.changes, Change("p0", PlateState.QUEUED, PlateState.EXECUTING, "x"))
    )
    with pytest.raises(JournalError, match=r"record 0: plate 'p0' moved 'queued' -> 'executing'"):
        annotate(PLATE_TABLE, Journal(journal.header, bad))
    bad[0] = first._replace(
        changes=(Change("p0", PlateState.COMPILED, PlateState.FAILED, "settled"),)
    )
    with pytest.raises(JournalError, match="moved from 'compiled', but the records before"):
        annotate(PLATE_TABLE, Journal(journal.header, bad))
    bad[0] = first._replace(changes=(Change("p7", PlateState.IDLE, PlateState.QUEUED, "s"),))
    with pytest.raises(JournalError, match="plate 'p7' is not in the journal's header"):
        annotate(PLATE_TABLE, Journal(journal.header, bad))
    started = Record(
        seq=9,
        time=0.0,
        fact=ExecutionStarted(plate_id="p0", execution_id="b.0.x"),
        disposition=Disposition.APPLIED,
        detail="",
        changes=(),
    )
    with pytest.raises(JournalError, match="in state 'compiled', where the plate table has no"):
        annotate(PLATE_TABLE, Journal(journal.header, [*journal.records[:2], started]))


def test_an_annotation_belongs_to_one_machine() -> None:
    plates = annotate(PLATE_TABLE, scenario_compile_only_cancel().journal)
    for renderer in (to_mermaid, to_dot, to_scxml):
        with pytest.raises(UsageError, match="for the plate machine, not the batch machine"):
            renderer(BATCH_TABLE, plates)
    with pytest.raises(UsageError, match="takes PLATE_TABLE or BATCH_TABLE"):
        annotate(ODD_TABLE, scenario_compile_only_cancel().journal)


# --- property: any facts, any journal --------------------------------------------------------


def honest_next(batch: Batch, i: int, done: int) -> Fact:
    """The fact a well-behaved engine (or host) would send next for plate ``i``."""
    pid, j, x = f"p{i}", f"b.{i}.c", f"b.{i}.x"
    state = batch.plate_state(pid)
    if state is PlateState.IDLE:
        return BatchStarted()
    if state is PlateState.QUEUED:
        return CompileAccepted(plate_id=pid, job_id=j)
    if state is PlateState.COMPILING:
        return CompileSucceeded(plate_id=pid, job_id=j, artifact_id="a")
    if state is PlateState.COMPILED:
        return ExecutionAccepted(plate_id=pid, execution_id=x)
    if done == 0:
        return ExecutionStarted(plate_id=pid, execution_id=x)
    if done < 3:
        return ExecutionProgress(plate_id=pid, execution_id=x, done=done, total=3)
    return ExecutionSucceeded(plate_id=pid, execution_id=x)


@st.composite
def any_fact(draw: st.DrawFn, n: int) -> Fact:
    """Any fact at all: stale ids, impossible moves, unknown plates (plate ``n``)."""
    i = draw(st.integers(0, n))
    pid = f"p{i}"
    j, x = ("b.9.c", "b.9.x") if draw(st.integers(0, 9)) == 0 else (f"b.{i}.c", f"b.{i}.x")
    choice = draw(st.integers(0, 15))
    facts: list[Fact] = [
        BatchStarted(),
        CancelRequested(plate_id=draw(st.sampled_from([None, pid]))),
        CancelTimedOut(plate_id=pid),
        EngineLost(),
        CompileAccepted(plate_id=pid, job_id=j),
        CompileSucceeded(plate_id=pid, job_id=j, artifact_id="a"),
        CompileFailed(plate_id=pid, job_id=j, error="e"),
        CompileRejected(plate_id=pid, job_id=j, error="e"),
        CompileCancelled(plate_id=pid, job_id=j),
        ExecutionAccepted(plate_id=pid, execution_id=x),
        ExecutionStarted(plate_id=pid, execution_id=x),
        ExecutionProgress(plate_id=pid, execution_id=x, done=draw(st.integers(0, 3)), total=3),
        ExecutionSucceeded(plate_id=pid, execution_id=x),
        ExecutionFailed(plate_id=pid, execution_id=x, error="e"),
        ExecutionRejected(plate_id=pid, execution_id=x, error="e"),
        ExecutionCancelled(plate_id=pid, execution_id=x),
    ]
    return facts[choice]


Case = tuple[int, BatchMode, CompileFailurePolicy, list[Fact]]


@st.composite
def fact_sequences(draw: st.DrawFn) -> Case:
    """A batch's shape and its facts: mostly what an honest engine sends next, the
    rest anything. A scratch batch is driven while drawing to know what is next."""
    n = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(BatchMode))
    policy = draw(st.sampled_from(CompileFailurePolicy))
    scratch = make_batch(n, mode=mode, policy=policy)
    facts: list[Fact] = []
    for _ in range(draw(st.integers(0, 40))):
        if draw(st.integers(0, 9)) < 7:
            fact = honest_next(scratch, draw(st.integers(0, n - 1)), draw(st.integers(0, 3)))
        else:
            fact = draw(any_fact(n))
        scratch.handle(fact)
        facts.append(fact)
    return n, mode, policy, facts


@given(fact_sequences())
def test_annotated_counts_sum_to_the_state_changes_in_the_journal(
    case: Case,
) -> None:
    n, mode, policy, facts = case
    batch = make_batch(n, mode=mode, policy=policy)
    for fact in facts:
        batch.handle(fact)
    journal = batch.journal
    plates = annotate(PLATE_TABLE, journal)
    moves = {(r.source.value, r.event.value) for r in PLATE_TABLE if r.dest is not None}
    plate_changes = [c for r in journal for c in r.changes if c.plate_id and c.old != c.new]
    assert sum(n for key, n in plates.taken.items() if key in moves) == len(plate_changes)
    applied_internal = [
        r for r in journal if r.fact.kind in INTERNAL_KINDS and r.disposition is Disposition.APPLIED
    ]
    assert sum(n for key, n in plates.taken.items() if key not in moves) == len(applied_internal)
    assert dict(plates.final) == {p: batch.plate_state(p).value for p in batch.plate_ids}
    assert all(n > 0 for n in plates.taken.values())
    whole = annotate(BATCH_TABLE, journal)
    batch_changes = [c for r in journal for c in r.changes if c.plate_id is None]
    assert sum(whole.taken.values()) == len(batch_changes)
    assert dict(whole.final) == {"b": batch.state.value}
    # the same annotation from the journal's JSON Lines form
    stream = io.StringIO()
    journal.write(stream)
    stream.seek(0)
    assert annotate(PLATE_TABLE, Journal.read(stream)) == plates


@given(fact_sequences())
def test_the_loaded_scxml_follows_the_core_through_any_facts(
    case: Case,
) -> None:
    n, mode, policy, facts = case
    replay_through_charts(make_batch(n, mode=mode, policy=policy), facts)


# --- ids ------------------------------------------------------------------------------------------


@given(st.text(), st.text())
def test_escaped_ids_are_identifiers_and_distinct_names_stay_distinct(a: str, b: str) -> None:
    for name in (a, b):
        ident = escape_id(name or "x")
        assert ID.fullmatch(ident), ident
        assert ident not in {"end", "state", "note", "node", "edge", "graph", "class"}
    if a != b and a and b:
        assert escape_id(a) != escape_id(b)


def test_plain_names_are_kept_readable() -> None:
    assert [escape_id(s.value) for s in PlateState] == [s.value for s in PlateState]
    assert escape_id("compile_accepted") == "compile_accepted"
    assert escape_id("end") == "Xend"
    assert escape_id("with space") == "Xwith_20_space"
    assert escape_id("Idle") == "X_49_dle"


# --- the command ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mermaid", "dot", "scxml"])
@pytest.mark.parametrize("machine", list(MACHINES))
def test_one_machine_and_format_prints_to_stdout(
    capsys: pytest.CaptureFixture[str], machine: str, fmt: str
) -> None:
    assert run(machine, "--format", fmt) == 0
    assert capsys.readouterr().out == render(MACHINES[machine], fmt)


def test_svg_to_stdout_is_a_drawing(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("batch", "--format", "svg") == 0
    svg = capsys.readouterr().out
    assert node_titles(svg) == {escape_id(s) for s in states_of(BATCH_TABLE)} | {"_start"}
    assert check_charts(CHARTS, machines=["batch"], formats=["svg"]) == []


def test_output_directory_for_one_machine(tmp_path: Path) -> None:
    assert run("batch", "--format", "mermaid", "-o", str(tmp_path / "new" / "dir")) == 0
    assert [p.name for p in (tmp_path / "new" / "dir").iterdir()] == ["batch.mmd"]


def test_journal_annotates_the_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    batch = scenario_run_continue()
    path = tmp_path / "journal.jsonl"
    batch.journal.save(path)
    assert run("plate", "--format", "mermaid", "--journal", str(path)) == 0
    out = capsys.readouterr().out
    assert out == to_mermaid(PLATE_TABLE, annotate(PLATE_TABLE, batch.journal))
    assert "compile_accepted \u00d73" in out
    assert run("--journal", str(path)) == 0  # alone: the plate machine as Mermaid
    assert capsys.readouterr().out == out
    assert run("batch", "--journal", str(path)) == 0
    assert capsys.readouterr().out == to_mermaid(BATCH_TABLE, annotate(BATCH_TABLE, batch.journal))
    assert run("--format", "scxml", "--journal", str(path)) == 0
    assert 'pf:taken="3"' in capsys.readouterr().out
    assert run("--journal", str(path), "-o", str(tmp_path / "annotated")) == 0
    written = sorted(p.name for p in (tmp_path / "annotated").iterdir())
    assert written == sorted(f"{m}.{e}" for m in MACHINES for e in FORMATS.values())
    dot = (tmp_path / "annotated" / "batch.dot").read_text(encoding="utf-8")
    assert "all_compiled \u00d71" in dot


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--check", "--journal", "j.jsonl"], "cannot be combined with --journal"),
        (["--journal", "missing.jsonl", "plate", "--format", "dot"], "cannot read journal"),
        (["--journal", "bad.jsonl", "plate", "--format", "dot"], r"bad\.jsonl:1: not JSON"),
        (["-o", "afile"], "afile is not a directory"),
        (["--check", "-o", "nowhere"], "nowhere is not a directory"),
    ],
)
def test_user_errors_are_usage_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: Sequence[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text("{nope\n", encoding="utf-8")
    (tmp_path / "afile").write_text("", encoding="utf-8")
    scenario_compile_only_cancel().journal.save(tmp_path / "good.jsonl")
    with pytest.raises(UsageError, match=message):
        run(*argv)


def test_argparse_rejects_unknown_machines_and_formats(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["nosuch"], ["--format", "png"]):
        with pytest.raises(SystemExit) as exit_info:
            run(*argv)
        assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(UsageError, match="unknown chart format 'png'"):
        render(PLATE_TABLE, "png")
    with pytest.raises(UsageError, match="unknown machine 'nosuch'"):
        write_charts("x", machines=["nosuch"])


# --- the docs embed the very charts -----------------------------------------------------------


def test_the_docs_embed_the_generated_mermaid_charts() -> None:
    blocks = re.findall(r"```mermaid\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    journal = scenario_run_continue().journal
    assert blocks == [
        to_mermaid(PLATE_TABLE),
        to_mermaid(BATCH_TABLE),
        to_mermaid(PLATE_TABLE, annotate(PLATE_TABLE, journal)),
    ]


def test_annotation_type_is_comparable() -> None:
    a = annotate(PLATE_TABLE, scenario_compile_only_cancel().journal)
    b = annotate(PLATE_TABLE, scenario_compile_only_cancel().journal)
    assert isinstance(a, Annotation)
    assert a == b
    assert Counter(a.final.values()) == Counter({"compiled": 1, "cancelled": 1})
