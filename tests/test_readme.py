"""The README's code works when pasted, and its quick start names real commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_host_example_works_when_pasted_into_a_file(tmp_path: Path) -> None:
    (host_example,) = [b for b in _blocks() if "BaseBatchHost" in b]
    assert len(host_example.strip().splitlines()) <= 30, "the minimal host stays under 30 lines"
    script = tmp_path / "host.py"
    script.write_text(host_example, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "batch completed"
    assert sorted(line.split()[0] for line in lines[:-1]) == [
        "plate-0001",
        "plate-0002",
        "plate-0003",
    ]
    assert all(" completed hits: " in line for line in lines[:-1])


def test_readme_core_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (code,) = [b for b in _blocks() if "BatchStarted" in b]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    assert capsys.readouterr().out.splitlines() == ["A01 completed", "A02 completed", "completed"]
    assert (tmp_path / "b1.jsonl").read_text(encoding="utf-8").count("\n") == 1 + 5


def test_ci_runs_the_readme_test_command() -> None:
    readme = README.read_text(encoding="utf-8")
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "./dev test" in readme
    assert ci.strip().splitlines()[-1] == "./dev test"
