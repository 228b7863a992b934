"""The documentation site builds strictly, its links resolve, and its programs run.

Every Python block in ``docs/`` that is a complete program is preceded by a
marker comment, ``<!-- test: run NAME -->``. Each marked block is written to a
file of its own and run as a script in a fresh process (so the local engine's
worker processes can re-import it), and must exit 0; the checks in ``CHECKS``
then look at what it printed. Blocks that are fragments carry no marker.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MARKED = re.compile(r"<!-- test: run (?P<name>[a-z0-9-]+) -->\n```python\n(?P<code>.*?)```", re.S)
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _examples() -> dict[str, tuple[Path, str]]:
    found: dict[str, tuple[Path, str]] = {}
    for page in sorted(DOCS.glob("*.md")):
        for match in MARKED.finditer(page.read_text(encoding="utf-8")):
            name = match["name"]
            assert name not in found, f"example name {name!r} is used twice"
            found[name] = (page, match["code"])
    return found


EXAMPLES = _examples()


# --- what each example must print -----------------------------------------------------


def _check_minimal_host(lines: list[str]) -> None:
    assert sorted(lines[:-1]) == [
        "plate-0001: completed (hits: 6)",
        "plate-0002: completed (hits: 6)",
    ]
    assert lines[-1].startswith("batch completed: ")


def _check_qt_style_host(lines: list[str]) -> None:
    rows = dict(line.split(": ", 1) for line in lines if line.startswith("plate-"))
    assert rows == {
        "plate-0001": "completed, 6 hits, planted found: True",
        "plate-0002": "cancelled",
        "plate-0003": "completed, 6 hits, planted found: True",
        "plate-0004": "completed, 6 hits, planted found: True",
    }
    assert "batch cancelled: 3 completed, 1 cancelled" in lines
    assert "progress bar: 100%" in lines
    (calls,) = [line for line in lines if line.startswith("callbacks: ")]
    match = re.fullmatch(r"callbacks: (\d+), off the GUI thread: 0", calls)
    assert match is not None, calls
    # Per plate at least: its moves, its report; per batch: start, states, summary, finish.
    assert int(match[1]) >= 4 * 6 + 6


def _check_first_batch(lines: list[str]) -> None:
    assert lines[:3] == [
        "plate-0001 completed: 6 hits, 6 planted, all found: True",
        "plate-0002 completed: 6 hits, 6 planted, all found: True",
        "plate-0003 completed: 6 hits, 6 planted, all found: True",
    ]
    assert lines[3] == "batch completed"
    story = lines[lines.index("how plate-0002 got there:") + 1 :]
    assert story[0].startswith("  batch_started: idle -> queued")
    assert story[-1].startswith("  execution_succeeded: executing -> completed")


def _check_custom_engine(lines: list[str]) -> None:
    assert sorted(lines[:-1]) == [
        "a: completed {'rows': 1}",
        "b: completed {'rows': 2}",
        "c: failed {'error': 'c.csv: no such file', 'exit_code': None}",
    ]
    assert lines[-1] == "batch failed: 2 completed, 1 failed"


def _check_crash_and_resume(lines: list[str]) -> None:
    match = re.fullmatch(r"resumed: (\d) plates had settled before the crash", lines[0])
    assert match is not None, lines
    before = int(match[1])
    assert 1 <= before < 6
    after = lines[1:-1]
    assert len(after) == 6 - before
    assert all(line.endswith(": completed") for line in after), after
    assert lines[-1] == "batch completed"


CHECKS: dict[str, Callable[[list[str]], None]] = {
    "crash-and-resume": _check_crash_and_resume,
    "minimal-host": _check_minimal_host,
    "qt-style-host": _check_qt_style_host,
    "first-batch": _check_first_batch,
    "custom-engine": _check_custom_engine,
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_the_example_runs(name: str, tmp_path: Path) -> None:
    page, code = EXAMPLES[name]
    script = tmp_path / f"{name.replace('-', '_')}.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, f"{page.name}: {name}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    CHECKS[name](done.stdout.splitlines())


def test_every_check_has_its_example() -> None:
    assert sorted(CHECKS) == sorted(EXAMPLES)


def test_every_complete_program_in_the_docs_is_marked_to_run() -> None:
    marked = {code for _, code in EXAMPLES.values()}
    unmarked = [
        f"{page.name}: {code.splitlines()[0]}"
        for page in sorted(DOCS.glob("*.md"))
        for code in PYTHON_BLOCK.findall(page.read_text(encoding="utf-8"))
        if 'if __name__ == "__main__":' in code and code not in marked and "PySide6" not in code
    ]
    assert unmarked == []


# --- the site and its links -------------------------------------------------------------


def test_every_relative_link_in_the_docs_resolves() -> None:
    spec = importlib.util.spec_from_file_location("check_links", DOCS / "check_links.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main() == 0


def test_the_site_builds_strictly_without_warnings(tmp_path: Path) -> None:
    site = tmp_path / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    warnings = [line for line in output.splitlines() if "WARNING" in line]
    assert warnings == [], output
    # Every page of the nav was built, and the statecharts are Mermaid diagrams.
    for page in sorted(DOCS.glob("*.md")):
        built = site / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert built.is_file(), f"{page.name} was not built"
    charts = (site / "statecharts" / "index.html").read_text(encoding="utf-8")
    assert charts.count('<pre class="mermaid">') == 3


def test_the_fact_tables_in_concepts_are_generated_from_the_code() -> None:
    """docs/concepts.md's classification is the fact tables' own rendering; it cannot drift."""
    from plateflow.fact_tables import BEGIN, END, fact_tables_markdown

    page = (DOCS / "concepts.md").read_text(encoding="utf-8")
    assert page.count(BEGIN) == 1
    assert page.count(END) == 1
    block = page[page.index(BEGIN) + len(BEGIN) : page.index(END)]
    assert block == "\n\n" + fact_tables_markdown() + "\n", (
        "docs/concepts.md's fact tables differ from plateflow.core.tables: run "
        "`python -m plateflow.fact_tables docs/concepts.md`"
    )
