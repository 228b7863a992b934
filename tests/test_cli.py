"""The command line: the demo, batch files, Ctrl-C, status, journals, the CLI host."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from distributed import Scheduler, Worker

from plateflow import BaseBatchHost, BatchState, Journal, PlateOutcome, PlateState, replay
from plateflow.batchfile import (
    AnyEngineSettings,
    BatchFile,
    DaskEngineSettings,
    LocalEngineSettings,
    PipelineSection,
    PlateEntry,
    StepEntry,
    ZmqEngineSettings,
    render_batch_file,
)
from plateflow.cli import CliHost, main
from plateflow.examples.platereader import demo_pipeline, generate_plates
from processes import descendants, still_alive_after


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


# --- plateflow run -----------------------------------------------------------------------

RESULT_KEYS = {
    "format",
    "batch_file",
    "name",
    "batch_id",
    "mode",
    "engine",
    "outcome",
    "exit_code",
    "duration",
    "counts",
    "reasons",
    "output_dir",
    "journal",
    "plates",
}
PLATE_KEYS = {"plate_id", "path", "outcome", "reason", "duration", "error", "result"}


def _batch(
    folder: Path,
    *,
    plates: int = 2,
    pause: float = 0.0,
    corrupt: bool = False,
    engine: AnyEngineSettings | None = None,
    **fields: Any,
) -> Path:
    """A batch file over synthetic plates in ``folder``, running the demo pipeline."""
    generated = generate_plates(folder / "plates", plates, wells=96)
    if corrupt:
        generated[-1].path.write_text("well,role,signal\nA01,sample,saturated\n", encoding="utf-8")
    pipeline = demo_pipeline(pause_seconds=pause)
    batch = BatchFile(
        name="test",
        plates=(PlateEntry(glob="plates/*.csv"),),
        pipeline=PipelineSection(
            steps=tuple(StepEntry(function=s.function, params=s.params) for s in pipeline.steps)
        ),
        engine=engine or LocalEngineSettings(workers=2),
        **fields,
    )
    path = folder / "batch.toml"
    path.write_text(render_batch_file(batch), encoding="utf-8")
    return path


def _check_result_schema(result: dict[str, Any]) -> None:
    assert set(result) == RESULT_KEYS
    assert result["format"] == "plateflow-run-result/1"
    assert isinstance(result["duration"], float)
    for plate in result["plates"]:
        assert set(plate) == PLATE_KEYS
        assert isinstance(plate["duration"], float)
        assert isinstance(plate["result"], dict)
        assert all(not isinstance(v, list | dict) for v in plate["result"].values())


def test_run_completes_with_exit_0_and_a_json_result_on_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = _batch(tmp_path)
    assert main(["run", str(batch), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout holds the JSON and nothing else
    _check_result_schema(result)
    assert result["outcome"] == "completed"
    assert result["exit_code"] == 0
    assert result["mode"] == "run"
    assert result["engine"] == "local"
    assert result["counts"] == {"completed": 2}
    assert result["reasons"] == {"succeeded": 2}
    assert [p["plate_id"] for p in result["plates"]] == ["plate-0001", "plate-0002"]
    for plate in result["plates"]:
        assert plate["outcome"] == "completed"
        assert plate["reason"] == "succeeded"
        assert plate["error"] is None
        assert plate["result"]["hit_count"] >= 0
        assert Path(plate["result"]["report"]).is_file()
    journal = Path(result["journal"])
    assert journal == tmp_path.resolve() / "output" / "journal.jsonl"
    assert replay(Journal.load(journal)).state == "completed"
    assert "test: executing" in captured.err, "progress goes to stderr"
    assert "Traceback" not in captured.err
    assert multiprocessing.active_children() == []


def test_run_exits_1_when_a_plate_fails_and_quiet_writes_nothing_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = _batch(tmp_path, plates=3, corrupt=True)
    assert main(["run", str(batch), "-q", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.err == ""
    result = json.loads(captured.out)
    _check_result_schema(result)
    assert result["outcome"] == "failed"
    assert result["exit_code"] == 1
    (failed,) = [p for p in result["plates"] if p["outcome"] == "failed"]
    assert failed["plate_id"] == "plate-0003"
    assert failed["reason"] == "execution_failed"
    assert "signal 'saturated'" in failed["error"]


def test_run_without_json_prints_a_human_summary_and_verbose_shows_every_move(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = _batch(tmp_path, plates=1)
    assert main(["run", str(batch), "-v"]) == 0
    captured = capsys.readouterr()
    assert "batch completed: 1 completed" in captured.out
    assert "plate-0001   completed" in captured.out
    assert f"journal in {tmp_path.resolve() / 'output' / 'journal.jsonl'}" in captured.out
    for state in ("queued", "compiling", "compiled", "executing"):
        assert f"plate-0001 {state}" in captured.err
    assert "\x1b[" not in captured.err, "no colour and no live view when stderr is not a terminal"


def test_compile_only_compiles_every_plate_and_executes_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = _batch(tmp_path, corrupt=True)  # a bad file only fails at execution
    assert main(["run", str(batch), "--compile-only", "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    _check_result_schema(result)
    assert result["mode"] == "compile_only"
    assert result["outcome"] == "completed"
    assert result["counts"] == {"compiled": 2}
    assert all(set(p["result"]) == {"artifact_id"} for p in result["plates"])
    assert not list((tmp_path / "output").glob("*.report.json"))


def test_the_journal_option_writes_a_journal_that_journal_show_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = _batch(tmp_path, plates=2, corrupt=True)
    journal = tmp_path / "logs" / "run.jsonl"
    assert main(["run", str(batch), "--journal", str(journal)]) == 1
    assert f"journal in {journal}" in capsys.readouterr().out
    assert not (tmp_path / "output" / "journal.jsonl").exists()
    assert replay(Journal.load(journal)).state == "failed"
    assert main(["journal", "show", str(journal), "--plate", "plate-0002"]) == 0
    out = capsys.readouterr().out
    assert "plate-0002:" in out
    assert "executing->failed" in out
    assert "signal 'saturated'" in out


def test_cancel_after_cancels_the_batch_and_exits_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = _batch(tmp_path, pause=60.0, cancel_grace=5.0)
    started = time.monotonic()
    assert main(["run", str(batch), "--cancel-after", "0.5", "--json"]) == 130
    assert time.monotonic() - started < 30, "the cancel stopped the 60 s pauses"
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    _check_result_schema(result)
    assert result["outcome"] == "cancelled"
    assert result["exit_code"] == 130
    assert {p["outcome"] for p in result["plates"]} == {"cancelled"}
    assert "0.5 s passed: cancelling the batch" in captured.err
    assert replay(Journal.load(result["journal"])).state == "cancelled"
    assert multiprocessing.active_children() == []


# --- errors: one line, exit 2, no traceback -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('name = "x"\nmode =\n', "batch.toml: line 2, column 7: invalid TOML: Invalid value"),
        ("{plates}\n[engine]\nkind = 'local'\nworkers = -1\n", "engine.workers: Input should be"),
        ('policy = "abort"\nretries = 3\n{plates}', "retries: unknown key 'retries'"),
        (
            '[[plates]]\nid = "a"\npath = "missing.csv"\n',
            "plates[0].path: plate file {folder}/missing.csv does not exist",
        ),
        ("", "plates: required, but missing"),
    ],
    ids=["toml-syntax", "bad-field", "unknown-key", "missing-plate-file", "missing-section"],
)
def test_a_bad_batch_file_is_one_clear_error_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    (tmp_path / "a.csv").write_text("well,role,signal\n", encoding="utf-8")
    plates = '[[plates]]\nid = "a"\npath = "a.csv"\n'
    pipeline = '[[pipeline.steps]]\nfunction = "plateflow.examples.platereader:read_plate"\n'
    path = tmp_path / "batch.toml"
    path.write_text(text.replace("{plates}", plates) + pipeline, encoding="utf-8")
    assert main(["run", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"plateflow: error: {path}: ")
    assert expected.format(folder=tmp_path.resolve()) in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "output").exists(), "nothing ran, nothing was written"


def test_a_missing_batch_file_and_a_bad_flag_value_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert capsys.readouterr().err == f"plateflow: error: {tmp_path / 'nope.toml'}: no such file\n"
    batch = _batch(tmp_path, plates=1)
    assert main(["run", str(batch), "--cancel-after", "-1"]) == 2
    assert "--cancel-after must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse's own usage errors exit 2 as well
        main(["run", str(batch), "--engine", "nonsense"])
    assert exited.value.code == 2


def test_an_engine_that_cannot_be_reached_exits_3_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = ZmqEngineSettings(runtime_dir="nowhere", start_server=False)
    batch = _batch(tmp_path, plates=1, engine=engine)
    assert main(["run", str(batch)]) == 3
    captured = capsys.readouterr()
    assert captured.err.startswith("plateflow: error: the engine is unavailable: ")
    assert "no plateflow server is running in" in captured.err
    assert "Traceback" not in captured.err
    assert not list(tmp_path.glob("output/*.json*")), "no journal: no batch started"


# --- plateflow run on Dask ------------------------------------------------------------------

# Short liveness and connect bounds: a test never waits the defaults out.
DASK_BOUNDS: dict[str, Any] = {
    "connect_timeout": 5.0,
    "liveness_interval": 0.5,
    "liveness_timeout": 2.0,
}


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _plateflow(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "plateflow", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "NO_COLOR": "1"},
        check=False,
    )


def _check_dask_result(result: dict[str, Any], folder: Path, plates: int) -> None:
    _check_result_schema(result)
    assert result["engine"] == "dask"
    assert result["outcome"] == "completed"
    assert result["exit_code"] == 0
    assert result["counts"] == {"completed": plates}
    assert result["reasons"] == {"succeeded": plates}
    assert [p["plate_id"] for p in result["plates"]] == [
        f"plate-{i:04d}" for i in range(1, plates + 1)
    ]
    for plate in result["plates"]:
        assert plate["outcome"] == "completed"
        assert plate["error"] is None
        assert plate["result"]["hit_count"] >= 0
        report = Path(plate["result"]["report"])
        assert report.parent == folder.resolve() / "output", "the workers wrote to output_dir"
        assert report.is_file()
    assert replay(Journal.load(result["journal"])).state == "completed"


def test_run_on_a_dask_local_cluster_the_engine_starts_exits_0_with_a_json_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Worker threads of this process (processes = false): a real LocalCluster, cheap to start.
    engine = DaskEngineSettings(workers=2, processes=False, **DASK_BOUNDS)
    batch = _batch(tmp_path, plates=3, engine=engine)
    assert main(["run", str(batch), "--engine", "dask", "--json"]) == 0
    captured = capsys.readouterr()
    _check_dask_result(json.loads(captured.out), tmp_path, 3)
    assert "test: executing" in captured.err
    assert "Traceback" not in captured.err
    # The engine stopped the cluster it started (distributed tracks its live servers).
    servers = [*Scheduler._instances, *Worker._instances]
    assert all(server.status.name == "closed" for server in servers), servers


def test_engine_dask_overrides_the_batch_files_engine_with_worker_processes(
    tmp_path: Path,
) -> None:
    # The file asks for the local engine; --engine dask runs it on a LocalCluster of worker
    # processes instead, keeping the file's workers (one).
    batch = _batch(tmp_path, plates=1, engine=LocalEngineSettings(workers=1))
    done = _plateflow("run", str(batch), "--engine", "dask", "--json", "-q")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    _check_dask_result(json.loads(done.stdout), tmp_path, 1)


@pytest.mark.parametrize("given_by", ["batch-file", "flag"])
def test_an_unreachable_dask_scheduler_exits_3_with_one_line_naming_it(
    tmp_path: Path, given_by: str
) -> None:
    address = f"tcp://127.0.0.1:{_closed_port()}"
    bounds = {**DASK_BOUNDS, "connect_timeout": 0.5}
    if given_by == "flag":  # the file's LocalCluster keys give way to the scheduler
        engine = DaskEngineSettings(workers=2, processes=False, **bounds)
        flags = ["--scheduler", address]
    else:
        engine = DaskEngineSettings(scheduler=address, **bounds)
        flags = []
    batch = _batch(tmp_path, plates=1, engine=engine)
    started = time.monotonic()
    done = _plateflow("run", str(batch), "--json", *flags, timeout=60.0)
    assert done.returncode == 3, done.stderr
    assert time.monotonic() - started < 30, "the connect timeout bounded the attempt"
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("plateflow: error: the engine is unavailable: ")
    assert f"cannot connect to the dask scheduler at {address}" in line
    assert not list(tmp_path.glob("output/*.json*")), "no journal: no batch started"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--engine", "local", "--scheduler", "tcp://127.0.0.1:8786"],
            "--scheduler names a Dask scheduler, so it cannot go with --engine local; "
            "use --engine dask, or leave --engine out",
        ),
        (
            ["--engine", "zmq", "--scheduler", "tcp://127.0.0.1:8786"],
            "so it cannot go with --engine zmq",
        ),
        (
            ["--scheduler", "127.0.0.1:8786"],
            "--scheduler '127.0.0.1:8786': not a Dask scheduler address; "
            "did you mean 'tcp://127.0.0.1:8786'?",
        ),
        (["--engine", "dask", "--scheduler", "http://x:1"], "--scheduler 'http://x:1': not a"),
    ],
    ids=["with-local", "with-zmq", "no-protocol", "bad-protocol"],
)
def test_a_scheduler_flag_that_cannot_apply_is_a_usage_error_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    batch = _batch(tmp_path, plates=1)
    assert main(["run", str(batch), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("plateflow: error: ")
    assert message in captured.err
    assert len(captured.err.splitlines()) == 1
    assert not (tmp_path / "output").exists(), "nothing ran, nothing was written"


def test_commands_other_than_a_dask_run_never_load_dask(tmp_path: Path) -> None:
    batch = _batch(tmp_path, plates=1)
    script = (
        "import sys\n"
        "from plateflow.cli import main\n"
        f"assert main(['run', {str(batch)!r}, '--engine', 'local', '-q']) == 0\n"
        f"assert main(['run', {str(batch)!r}, '--scheduler', 'tcp://h:1', '--engine', 'local'])"
        " == 2\n"
        "dask = ('dask', 'distributed')\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] in dask)[:5])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize("exists", [False, True])
def test_status_without_a_server_is_a_clear_error_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], exists: bool
) -> None:
    runtime_dir = tmp_path / "rt"
    if exists:
        runtime_dir.mkdir(mode=0o700)
        (runtime_dir / "server.json").write_text("{}", encoding="utf-8")  # stale, no lock held
    assert main(["status", "--runtime-dir", str(runtime_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plateflow: error: no plateflow server is running in ")
    assert str(runtime_dir) in err
    assert "Traceback" not in err
    assert runtime_dir.exists() is exists, "status creates nothing"


def test_serve_refuses_a_negative_keep_finished_and_its_help_states_the_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from plateflow.engines.local import DEFAULT_KEEP_FINISHED

    runtime_dir = tmp_path / "rt"
    assert main(["serve", "--runtime-dir", str(runtime_dir), "--keep-finished", "-1"]) == 2
    err = capsys.readouterr().err
    assert err == "plateflow: error: --keep-finished must be 0 (remember all) or more, got -1\n"
    assert not runtime_dir.exists(), "nothing was started"
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default {DEFAULT_KEEP_FINISHED:,};" in help_text


def test_help_lists_every_command_without_loading_the_statecharts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "run", "status", "journal", "serve", "diagram"):
        assert command in out
    assert "130 cancelled" in out


# --- real processes: Ctrl-C and the embedded server --------------------------------------------


class _Process:
    """A ``plateflow`` subprocess in its own session, its stderr read line by line."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "NO_COLOR": "1"}
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "plateflow", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: a terminal's Ctrl-C reaches all
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.err: list[str] = []
        self.out: list[str] = []
        self.readers = [
            threading.Thread(target=self._read_err, daemon=True),
            threading.Thread(target=self._read_out, daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read_err(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def _read_out(self) -> None:
        assert self.popen.stdout is not None
        self.out.append(self.popen.stdout.read())

    def wait_for_line(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.err.append(line)
            if text in line:
                return
        self._stop()
        raise AssertionError(f"no line with {text!r} within {timeout} s:\n{''.join(self.err)}")

    def _stop(self) -> None:
        self.popen.kill()
        self.popen.wait(5)
        for reader in self.readers:
            reader.join(5)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()

    def ctrl_c(self) -> None:
        os.killpg(self.popen.pid, signal.SIGINT)

    def finish(self, timeout: float = 60.0) -> tuple[int, str, str]:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self._stop()
            raise
        for reader in self.readers:
            reader.join(5)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()
        while (line := self.lines.get(timeout=5)) is not None:
            self.err.append(line)
        return code, "".join(self.out), "".join(self.err)


def test_ctrl_c_cancels_the_batch_cleanly_and_exits_130(tmp_path: Path) -> None:
    batch = _batch(tmp_path, pause=60.0, cancel_grace=5.0)
    process = _Process("run", str(batch))
    process.wait_for_line("test: executing")
    process.ctrl_c()
    code, out, err = process.finish()
    assert code == 130, err
    assert "interrupted: cancelling the batch" in err
    assert "batch cancelled: 2 cancelled" in out
    assert "Traceback" not in err
    journal = Journal.load(tmp_path / "output" / "journal.jsonl")
    assert replay(journal).state == "cancelled"


def test_a_batch_on_the_embedded_server_shows_in_status_and_ctrl_c_stops_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime_dir = tmp_path / "server"
    batch = _batch(
        tmp_path, pause=60.0, cancel_grace=5.0, engine=ZmqEngineSettings(runtime_dir="server")
    )
    process = _Process("run", str(batch), "--json")
    try:
        process.wait_for_line("test: executing")
        deadline = time.monotonic() + 30  # the batch executes; its workers pick the work up
        while True:
            assert main(["status", "--runtime-dir", str(runtime_dir), "--json"]) == 0
            info = json.loads(capsys.readouterr().out)
            if info["running_submissions"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert info["running"] + info["queued"] == 2
        assert {s["phase"] for s in info["running_submissions"]} == {"execute"}
        assert main(["status", "--runtime-dir", str(runtime_dir)]) == 0
        human = capsys.readouterr().out
        assert human.startswith(f"server {info['server_id']} (pid {info['pid']})")
        assert "plate-0001" in human
        assert "queued" in human
    finally:
        process.ctrl_c()
        code, out, err = process.finish()
    assert code == 130, err
    result = json.loads(out)
    assert result["outcome"] == "cancelled"
    assert result["engine"] == "zmq"
    assert (runtime_dir / "server.log").exists()
    assert not (runtime_dir / "server.json").exists(), "the server the run started was stopped"
    assert main(["status", "--runtime-dir", str(runtime_dir)]) == 2


# --- the CLI host on its own ------------------------------------------------------------------


class _Terminal(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def _drive(host: CliHost) -> None:
    """A two-plate batch, callback by callback, as the service would call them."""
    host.emit_progress_started(2)
    host.update_button_states(BatchState.COMPILING)
    for plate in ("p1", "p2"):
        host.emit_orchestrator_state(plate, PlateState.COMPILING)
    host.update_button_states(BatchState.EXECUTING)
    host.emit_orchestrator_state("p1", PlateState.EXECUTING)
    host.on_plate_completed("p1", PlateOutcome.COMPLETED, {"hit_count": 3, "hits": []})
    host.emit_error("worker lost", code="x", plate_id="p2")
    host.on_plate_completed("p2", PlateOutcome.FAILED, {"error": "boom\nmore", "exit_code": -9})


def test_the_cli_host_is_a_batch_host_writing_plain_lines_off_a_terminal() -> None:
    stream = io.StringIO()
    host = CliHost(stream)
    assert isinstance(host, BaseBatchHost)
    assert not host.live
    assert not host.colour
    _drive(host)
    text = stream.getvalue()
    assert "batch: executing" in text
    assert "p1 completed in " in text
    assert "p2 failed in " in text
    assert ": boom" in text
    assert "error: p2: worker lost" in text
    assert "\x1b" not in text
    assert host.plates["p2"].error == "boom\nmore"
    assert host.plates["p1"].duration is not None


def test_the_cli_host_draws_a_live_view_in_colour_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    stream = _Terminal()
    host = CliHost(stream, title="screen")
    assert host.live
    assert host.colour
    _drive(host)
    text = stream.getvalue()
    assert "\x1b[32m" in text, "completed plates are green"
    assert "\x1b[F" in text or "F\x1b[J" in text, "the view is redrawn in place"
    assert "screen  executing" in text
    assert "█" in text


def test_no_color_turns_colour_off_but_keeps_the_live_view(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("TERM", "xterm")
    stream = _Terminal()
    host = CliHost(stream)
    assert host.live
    assert not host.colour
    _drive(host)
    assert not re.search(r"\x1b\[[\d;]*m", stream.getvalue()), "no colour codes"
    assert "\x1b[J" in stream.getvalue()


def test_the_quiet_cli_host_writes_only_errors() -> None:
    stream = io.StringIO()
    _drive(CliHost(stream, verbosity=-1))
    (line,) = stream.getvalue().splitlines()
    assert line.endswith("error: p2: worker lost")


# --- signals and resume ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "said"),
    [(signal.SIGTERM, "terminated (SIGTERM)"), (signal.SIGHUP, "hung up (SIGHUP)")],
)
def test_sigterm_and_sighup_cancel_write_summary_and_journal_and_stop_the_server(
    tmp_path: Path, signum: int, said: str
) -> None:
    runtime_dir = tmp_path / "server"
    batch = _batch(
        tmp_path,
        plates=3,
        pause=60.0,
        cancel_grace=5.0,
        engine=ZmqEngineSettings(runtime_dir="server", workers=2),
    )
    process = _Process("run", str(batch))
    try:
        process.wait_for_line("test: executing")
        server = json.loads((runtime_dir / "server.json").read_text())["pid"]
        processes = {server, *descendants(server)}
        assert len(processes) >= 3, "the server and its two workers at least"
    except BaseException:
        process._stop()
        raise
    process.popen.send_signal(signum)
    code, out, err = process.finish()
    assert code == 128 + signum, err
    assert f"{said}: cancelling the batch" in err
    assert "batch cancelled: 3 cancelled" in out
    assert "Traceback" not in err
    journal = Journal.load(tmp_path / "output" / "journal.jsonl")
    assert journal.torn is None
    assert replay(journal).state == "cancelled"
    assert still_alive_after(processes, 10.0) == set(), "the run's server and workers stopped"
    assert not (runtime_dir / "server.json").exists()


@pytest.mark.parametrize("kind", ["zmq", "local"])
def test_a_killed_run_is_resumed_from_its_journal_and_reports_every_plate_once(
    tmp_path: Path, kind: str
) -> None:
    engine: AnyEngineSettings = (
        ZmqEngineSettings(runtime_dir="server", workers=2)
        if kind == "zmq"
        else LocalEngineSettings(workers=2)
    )
    batch = _batch(tmp_path, plates=4, pause=1.5, engine=engine)
    journal_path = tmp_path / "output" / "journal.jsonl"
    process = _Process("run", str(batch))
    process.wait_for_line(f"journal: {journal_path}")
    deadline = time.monotonic() + 60
    while b'"execution_started"' not in journal_path.read_bytes():  # the engine has the work
        if time.monotonic() > deadline:
            process._stop()
            raise AssertionError("no execution started within 60 s")
        time.sleep(0.01)
    process.popen.kill()
    code, _out, _err = process.finish()
    assert code == -signal.SIGKILL
    before = Journal.load(journal_path)
    assert not replay(before).settled

    resumed = _Process("resume", str(journal_path), "--json", "--resubmit-lost")
    code, out, err = resumed.finish()
    assert code == 0, err
    assert f"resuming from {journal_path}" in err
    result = json.loads(out)
    assert result["outcome"] == "completed"
    assert sorted(p["plate_id"] for p in result["plates"]) == [
        f"plate-{i:04d}" for i in range(1, 5)
    ]
    after = Journal.load(journal_path)
    assert after.records[: len(before)] == before.records
    settled = [
        c.plate_id for r in after for c in r.changes if c.plate_id and c.note.startswith("settled:")
    ]
    assert sorted(settled) == sorted(after.header.plate_ids), "one terminal record per plate"
    assert [r.fact.kind for r in after].count("batch_resumed") == 1
    runtime_dir = tmp_path / "server"
    assert not (runtime_dir / "server.json").exists(), "the resumed run stopped the server"


def test_resume_refuses_a_journal_not_written_by_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers import make_batch

    saved = tmp_path / "saved.jsonl"
    make_batch().journal.save(saved)
    assert main(["resume", str(saved)]) == 2
    assert "was not written by `plateflow run`" in capsys.readouterr().err
    assert main(["resume", str(tmp_path / "missing.jsonl")]) == 2
