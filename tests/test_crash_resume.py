"""A host killed with SIGKILL at any point of its batch is resumed by a new process.

Real processes, real signals: ``crash_host.py run`` runs a 30-plate batch with
its journal written as it goes; the test kills it with SIGKILL as soon as the
journal holds ``k`` records (``k`` drawn by Hypothesis over the whole run, so
the kill lands anywhere from before the first compile to after the batch
settled); ``crash_host.py resume`` takes the batch over. Then, across both
processes: the journal holds exactly one terminal record per plate; the
resumed host's ``on_resumed`` and ``on_plate_completed`` cover every plate
exactly once, and its batch callback comes once; and no plate's work ran twice
(each run of a plate appends a line to its marker file).

Examples per profile: ``dev`` 5, ``ci`` 20, ``nightly`` 200.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from plateflow.core import Journal, Reason, replay

TESTS_DIR = Path(__file__).parent
PLATES = 30
EXAMPLES = {"dev": 5, "ci": 20, "nightly": 200}.get(os.environ.get("HYPOTHESIS_PROFILE", ""), 5)
RUN_TIMEOUT = 60.0
"""Bound on one host process (a run or a resume)."""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    return env


@dataclass
class Crash:
    """One example's folder: journal, markers, outputs."""

    folder: Path

    @property
    def journal(self) -> Path:
        return self.folder / "journal.jsonl"

    @property
    def markers(self) -> Path:
        return self.folder / "markers"

    def host(self, command: str, engine: str, *extra: str) -> list[str]:
        return [
            sys.executable,
            str(TESTS_DIR / "crash_host.py"),
            command,
            str(self.journal),
            "--engine",
            engine,
            "--plates",
            str(PLATES),
            "--markers",
            str(self.markers),
            "--output",
            str(self.folder / "out"),
            *extra,
        ]

    def records(self) -> int:
        try:
            return max(0, self.journal.read_bytes().count(b"\n") - 1)
        except FileNotFoundError:
            return 0

    def calls(self) -> list[dict[str, object]]:
        path = Path(f"{self.journal}.calls")
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def marks(self, plate: str) -> int:
        path = self.markers / plate
        return len(path.read_text().splitlines()) if path.exists() else 0


def run_and_kill(command: Sequence[str], crash: Crash, k: int) -> int | None:
    """Start a host; SIGKILL it once its journal holds ``k`` records. Its exit code when
    it finished first (the kill point lay past the end of the batch), else None."""
    process = subprocess.Popen(
        command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while crash.records() < k:
            if process.poll() is not None:
                return process.returncode
            if time.monotonic() > deadline:
                raise AssertionError(f"the host wrote {crash.records()} of {k} records in time")
            time.sleep(0.001)
        process.kill()
        process.wait(10)
        return None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        assert process.stderr is not None
        process.stderr.close()


def resume(command: Sequence[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    assert done.returncode == 0, done.stderr
    return done


def check_across_the_crash(crash: Crash, *, resubmitted: bool) -> None:
    journal = Journal.load(crash.journal)
    assert journal.torn is None
    batch = replay(journal)
    assert batch.settled
    resumed_at = next(r.seq for r in journal if r.fact.kind == "batch_resumed")
    before = replay(journal, until=resumed_at)
    event(f"plates settled before the kill: {len(before.settled_plates()) // 10 * 10}+")
    plates = [f"p{i:02d}" for i in range(PLATES)]
    # Exactly one terminal record per plate, whichever process wrote it.
    settled = [
        c.plate_id
        for r in journal
        for c in r.changes
        if c.plate_id and c.note.startswith("settled:")
    ]
    assert sorted(settled) == plates
    # The resumed host heard of every plate exactly once, then of the batch once.
    resumer = crash.calls()[-1]["pid"]
    told = [c for c in crash.calls() if c["pid"] == resumer]
    (resumed,) = [c for c in told if c["name"] == "on_resumed"]
    completed = [c["plate"] for c in told if c["name"] == "on_plate_completed"]
    assert told.index(resumed) < min(
        (told.index(c) for c in told if c["name"] == "on_plate_completed"), default=len(told)
    )
    assert sorted([*resumed["settled"], *completed]) == plates  # type: ignore[misc]
    assert sorted(completed) == sorted(resumed["unsettled"])  # type: ignore[type-var]
    assert [c["name"] for c in told].count("on_all_plates_completed") == 1
    assert told[-1]["name"] == "on_all_plates_completed"
    # No work ran twice: a completed plate's ran once, a lost one's never.
    reasons = {s.plate_id: s.reason for s in batch.summary().plates}
    for plate in plates:
        runs = crash.marks(plate)
        assert reasons[plate] in (Reason.SUCCEEDED, Reason.LOST_IN_RESTART), reasons[plate]
        assert runs == (1 if reasons[plate] is Reason.SUCCEEDED else 0), f"{plate} ran {runs}x"
    if resubmitted:
        assert set(reasons.values()) == {Reason.SUCCEEDED}


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """A short private runtime dir (socket paths are limited); any server left is killed."""
    directory = Path(tempfile.mkdtemp(prefix="pfc-"))
    try:
        yield directory
    finally:
        for record in directory.glob("*/server.json"):
            with contextlib.suppress(ProcessLookupError, ValueError, KeyError):
                os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)
        shutil.rmtree(directory, ignore_errors=True)


def _crash_settings() -> settings:
    return settings(
        settings.default,
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def crash_and_resume(
    folder: Path, engine: str, k: int, extra: Sequence[str], *, resubmit: bool = False
) -> None:
    """Run a host, kill it after ``k`` journal records, resume it, check both together."""
    crash = Crash(folder)
    crash.markers.mkdir()
    finished = run_and_kill(crash.host("run", engine, *extra), crash, k)
    if finished is not None:
        assert finished == 0
    if not crash.journal.exists() or b"\n" not in crash.journal.read_bytes():
        return  # killed before the batch began: there is nothing to resume
    resume(crash.host("resume", engine, *extra, *(["--resubmit-lost"] if resubmit else [])))
    check_across_the_crash(crash, resubmitted=resubmit)


@_crash_settings()
@given(k=st.integers(min_value=0, max_value=PLATES * 8))
@example(k=PLATES * 2)  # mid-compile, whatever Hypothesis draws
@example(k=PLATES * 5)  # mid-execution
def test_a_host_killed_anywhere_on_the_zmq_engine_is_resumed_exactly_once(
    k: int, runtime_dir: Path
) -> None:
    rundir = runtime_dir / f"k{k}"
    with tempfile.TemporaryDirectory(prefix="pfc-") as folder:
        crash_and_resume(Path(folder), "zmq", k, ("--runtime-dir", str(rundir)))
    assert not (rundir / "server.json").exists(), "the resumed host stopped the server"


@_crash_settings()
@given(k=st.integers(min_value=0, max_value=PLATES * 8))
@example(k=PLATES * 5)  # mid-execution, whatever Hypothesis draws
def test_a_host_killed_anywhere_on_the_local_engine_resubmits_what_never_ran_once(
    k: int,
) -> None:
    with tempfile.TemporaryDirectory(prefix="pfc-") as folder:
        ledger = ("--ledger", str(Path(folder) / "ledger"))
        crash_and_resume(Path(folder), "local", k, ledger, resubmit=True)


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """A Dask cluster that outlives every host of the test: workers are threads here."""
    from distributed import LocalCluster

    cluster = LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        protocol="tcp",  # the hosts are other processes
        host="127.0.0.1",
        dashboard_address=None,
    )
    try:
        yield str(cluster.scheduler_address)
    finally:
        cluster.close()  # type: ignore[no-untyped-call]


@_crash_settings()
@given(k=st.integers(min_value=0, max_value=PLATES * 8))
@example(k=PLATES * 5)  # mid-execution, whatever Hypothesis draws
def test_a_host_killed_anywhere_on_dask_is_resumed_exactly_once(k: int, scheduler: str) -> None:
    with tempfile.TemporaryDirectory(prefix="pfc-") as folder:
        crash_and_resume(Path(folder), "dask", k, ("--scheduler", scheduler))
