"""The command line: the demo (the README's main job) and reading journals."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from plateflow import Journal, replay
from plateflow.cli import main


@pytest.mark.parametrize("engine", ["zmq", "local"])
def test_demo_runs_the_batch_finds_the_planted_hits_and_explains_the_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], engine: str
) -> None:
    assert main(["demo", str(tmp_path), "--plates", "5", "--engine", engine]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    completed = [line for line in lines if " completed " in line and "planted" in line]
    assert len(completed) == 4
    for line in completed:
        planted, found = int(line.split("planted")[1].split()[0]), int(line.split("found")[1])
        assert found == planted > 0, line
    assert "batch failed: 4 completed, 1 failed" in out
    assert "why did plate-0005 end failed?" in out
    assert "signal 'saturated'" in out, "the story shows why the plate failed"
    journal = Journal.load(tmp_path / "journal.jsonl")
    assert replay(journal).state == "failed"
    assert len(list((tmp_path / "reports").glob("*.report.json"))) == 4
    assert multiprocessing.active_children() == []
    if engine == "zmq":  # the demo's own server was started and stopped again
        assert (tmp_path / "server" / "server.log").exists()
        assert not (tmp_path / "server" / "server.json").exists()


def test_journal_show_prints_every_plates_story(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", str(tmp_path), "--plates", "2"]) == 0
    capsys.readouterr()
    assert main(["journal", "show", str(tmp_path / "journal.jsonl"), "--plate", "plate-0001"]) == 0
    out = capsys.readouterr().out
    assert "plate-0001:" in out
    assert "compiling->compiled" in out
    assert "executing->completed" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file"),
        ("garbage\n", "journal.jsonl:1: not JSON"),
    ],
)
def test_journal_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "journal.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    assert main(["journal", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plateflow: error: ")
    assert message in err
    assert "Traceback" not in err
