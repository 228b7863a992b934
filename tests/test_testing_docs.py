"""docs/testing.md: its worked example passes when pasted into a file and run with pytest."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_the_worked_example_passes_under_pytest(tmp_path: Path) -> None:
    (example,) = [b for b in _blocks() if "class TableHostMachine" in b]
    (tmp_path / "test_table_host.py").write_text(example, encoding="utf-8")
    env = {**os.environ, "HYPOTHESIS_PROFILE": "dev"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout, done.stdout


def test_the_worked_example_catches_the_bug_the_page_describes(tmp_path: Path) -> None:
    (example,) = [b for b in _blocks() if "class TableHostMachine" in b]
    broken = example.replace(
        '        self.rows[plate_id] = f"{outcome.value} (final)"',
        "        self.rows[plate_id] = self.rows.pop(plate_id + '-executing')",
    )
    assert broken != example
    (tmp_path / "test_table_host.py").write_text(broken, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-k", "TestTable"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "HYPOTHESIS_PROFILE": "dev"},
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "C5 (host faults are contained) broken" in done.stdout
    assert "KeyError" in done.stdout


def test_the_fake_engine_snippet_runs() -> None:
    (snippet,) = [b for b in _blocks() if "FakeEngine({" in b]
    namespace: dict[str, object] = {}
    exec(compile(snippet, str(DOC), "exec"), namespace)
    assert type(namespace["engine"]).__name__ == "FakeEngine"
