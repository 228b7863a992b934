"""The ``plateflow`` command: a thin layer over the public API.

The CLI is a host like any other (:class:`CliHost` subclasses
``BaseBatchHost``), so every batch it runs goes through the same contract a
Qt or notebook host uses.

- ``plateflow demo [DIR]`` writes synthetic plates with planted hits (one
  corrupted) and a batch file into DIR, runs the batch on the embedded
  server, then explains the failed plate from the journal.
- ``plateflow run BATCH.toml`` runs a batch file (see docs/batch-file.md), on
  its engine or the one ``--engine`` / ``--scheduler`` names.
- ``plateflow status`` lists the running embedded servers, or shows what one
  is doing; ``plateflow stop`` stops one.
- ``plateflow journal show FILE`` prints each plate's story.
- ``plateflow serve`` runs the embedded ZeroMQ execution server.
- ``plateflow diagram`` draws the state machines.

Exit codes: 0 the batch completed, 1 it failed, 130 it was cancelled (Ctrl-C
or ``--cancel-after``), 2 a usage error (bad arguments, a bad batch file, a
missing file, no server), 3 the engine could not be started or reached.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

from pydantic import JsonValue

import plateflow
from plateflow import (
    BaseBatchHost,
    Batch,
    BatchMode,
    BatchState,
    BatchSummary,
    CompileFailurePolicy,
    EngineError,
    Journal,
    JournalError,
    JournalWarning,
    PlateOutcome,
    PlateState,
    ProgressSnapshot,
    ResumedBatch,
    SyncBatchWorkflowService,
    UsageError,
)
from plateflow.batchfile import (
    AnyEngineSettings,
    BatchFile,
    DaskEngineSettings,
    LoadedBatch,
    LocalEngineSettings,
    PipelineSection,
    PlateEntry,
    StepEntry,
    ZmqEngineSettings,
    check_scheduler_address,
    engine_kinds,
    engine_settings_for,
    load_batch_file,
    render_batch_file,
)
from plateflow.examples.platereader import GeneratedPlate, demo_pipeline, generate_plates

__all__ = ["EXIT_CODES", "CliHost", "PlateLine", "main"]

EXIT_COMPLETED: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_ENGINE: Final = 3
EXIT_CANCELLED: Final = 130

EXIT_CODES: Final[Mapping[BatchState, int]] = {
    BatchState.COMPLETED: EXIT_COMPLETED,
    BatchState.FAILED: EXIT_FAILED,
    BatchState.CANCELLED: EXIT_CANCELLED,
}
"""The exit code of ``plateflow run`` (and ``demo``'s batch) for each batch outcome."""

RESULT_FORMAT: Final = "plateflow-run-result/1"
"""The ``format`` field of the JSON ``plateflow run --json`` prints."""

_PLAIN_PROGRESS_EVERY: Final = 2.0
"""Seconds between progress lines when stderr is not a terminal."""
_LIVE_REDRAW_EVERY: Final = 0.1
"""Seconds between redraws of the live view (the final state is always drawn)."""

_COLOURS: Final = {
    PlateState.IDLE: "2",
    PlateState.QUEUED: "2",
    PlateState.COMPILING: "34",
    PlateState.COMPILED: "34",
    PlateState.EXECUTING: "36",
    PlateState.COMPLETED: "32",
    PlateState.FAILED: "31",
    PlateState.CANCELLED: "33",
}
_OUTCOME_COLOURS: Final = {
    "completed": "32",
    "compiled": "32",
    "failed": "31",
    "cancelled": "33",
    "cancelling": "33",
}


def _colour_wanted(stream: TextIO) -> bool:
    """Colour only on a terminal, never with ``NO_COLOR`` set (no-color.org) or TERM=dumb."""
    return _is_terminal(stream) and not os.environ.get("NO_COLOR")


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def _clock_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _first_line(text: object, width: int = 200) -> str:
    lines = str(text).strip().splitlines()
    return lines[0][:width] if lines else ""


def _error_of(result: JsonValue) -> str | None:
    if isinstance(result, dict) and "error" in result:
        return str(result["error"])
    if isinstance(result, str) and result and " " in result:  # failure texts have words
        return result
    return None


@dataclass(slots=True)
class PlateLine:
    """What the CLI host knows about one plate of the current batch."""

    plate_id: str
    state: PlateState = PlateState.IDLE
    outcome: PlateOutcome | None = None
    reason: str | None = None
    result: JsonValue = None
    started: float | None = None
    """When the plate left ``queued`` (host clock)."""
    duration: float | None = None
    """Seconds from leaving ``queued`` to settling."""
    done: int = 0
    total: int = 1
    message: str = ""

    @property
    def error(self) -> str | None:
        if self.outcome in (None, PlateOutcome.COMPLETED, PlateOutcome.COMPILED):
            return None
        return _error_of(self.result)


class CliHost(BaseBatchHost):
    """The command line's host: progress and plate states on a text stream.

    On a terminal it draws a live view (a bar for the batch, a table of plate
    states with a bar per plate) in place; on anything else it writes plain,
    time-stamped lines. ``verbosity`` -1 writes only errors, 0 batch states,
    settled plates and a progress line now and then, 1 also every plate move
    and engine status. ``live`` and ``colour`` default to what ``stream``
    supports (colour never with ``NO_COLOR`` set). Any callback order is
    tolerated: an unknown plate is simply added.

    After a batch, :attr:`plates` holds each plate's outcome, reason, result
    and duration, and :attr:`summary` the batch summary.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        verbosity: int = 0,
        live: bool | None = None,
        colour: bool | None = None,
        title: str = "batch",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.verbosity = verbosity
        self.live = _is_terminal(self.stream) if live is None else live
        self.colour = _colour_wanted(self.stream) if colour is None else colour
        self.title = title
        self._clock = clock
        self._lock = threading.RLock()  # a signal handler may write while a callback draws
        self.plates: dict[str, PlateLine] = {}
        self.summary: BatchSummary | None = None
        self.batch_state: BatchState | None = None
        self.errors: list[str] = []
        self._t0 = clock()
        self._finished_at: float | None = None
        self._snapshot: ProgressSnapshot | None = None
        self._drawn = 0
        self._last_draw = float("-inf")
        self._last_plain = float("-inf")

    # --- what a batch took ----------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        end = self._finished_at if self._finished_at is not None else self._clock()
        return max(0.0, end - self._t0)

    def note(self, message: str) -> None:
        """Write one line from outside the batch (e.g. "cancelling"), above the live view."""
        with self._lock:
            self._clear()
            self._write(message)
            self._draw(force=True)

    # --- callbacks ------------------------------------------------------------------------

    def emit_status(self, message: str) -> None:
        if self.verbosity >= 1:
            self._say(message)

    def emit_error(self, message: str, *, code: str = "", plate_id: str | None = None) -> None:
        where = f"{plate_id}: " if plate_id else ""
        self.errors.append(f"{where}{message}")
        self._say(self._paint(f"error: {where}{_first_line(message, 500)}", "31"), always=True)

    def emit_progress_started(self, total: int) -> None:
        with self._lock:
            self.plates = {}
            self.summary = None
            self.batch_state = None
            self._snapshot = None
            self._t0 = self._clock()
            self._finished_at = None
            self._last_plain = self._t0
        if self.verbosity >= 0 and not self.live:
            self._say(f"{self.title}: {total} plates")

    def emit_progress_updated(self, snapshot: ProgressSnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot
            for p in snapshot.plates:
                line = self._plate(p.plate_id)
                line.done, line.total, line.message = p.done, p.total, p.message
            if self.live:
                self._draw()
                return
            now = self._clock()
            if self.verbosity >= 0 and now - self._last_plain >= _PLAIN_PROGRESS_EVERY:
                self._last_plain = now
                self._say(self._progress_text(snapshot))

    def emit_progress_finished(self, snapshot: ProgressSnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot
            self._finished_at = self._clock()
            if self.live:
                self._clear()  # the summary replaces the live view

    def update_item_list(self) -> None:
        pass

    def update_button_states(self, batch_state: BatchState) -> None:
        with self._lock:
            self.batch_state = batch_state
            if self.live:
                if not batch_state.is_terminal:  # the summary follows a terminal state
                    self._draw(force=True)
            elif self.verbosity >= 0:
                colour = _OUTCOME_COLOURS.get(batch_state.value, "1")
                self._say(f"{self.title}: {self._paint(batch_state.value, colour)}")

    def emit_orchestrator_state(self, plate_id: str, state: PlateState) -> None:
        with self._lock:
            line = self._plate(plate_id)
            line.state = state
            if line.started is None and state not in (PlateState.IDLE, PlateState.QUEUED):
                line.started = self._clock()
            if self.live:
                self._draw()
            elif self.verbosity >= 1:
                self._say(f"{plate_id} {self._paint(state.value, _COLOURS[state])}")

    def emit_execution_complete(self, summary: BatchSummary) -> None:
        pass

    def on_plate_completed(self, plate_id: str, outcome: PlateOutcome, result: JsonValue) -> None:
        with self._lock:
            line = self._plate(plate_id)
            line.outcome, line.result = outcome, result
            if outcome is not PlateOutcome.COMPILED:
                line.state = PlateState(outcome.value)
            start = line.started if line.started is not None else self._t0
            line.duration = max(0.0, self._clock() - start)
            if self.live:
                self._draw()
            elif self.verbosity >= 0:
                text = f"{plate_id} {self._paint(outcome.value, _OUTCOME_COLOURS[outcome.value])}"
                text += f" in {line.duration:.2f}s"
                error = line.error
                if error:
                    text += f": {_first_line(error)}"
                self._say(text)

    def on_resumed(self, resumed: ResumedBatch) -> None:
        with self._lock:
            for settled in resumed.settled:
                line = self._plate(settled.plate_id)
                line.outcome, line.result = settled.outcome, settled.result
                line.reason = settled.reason.value
                if settled.outcome is not PlateOutcome.COMPILED:
                    line.state = PlateState(settled.outcome.value)
        if self.verbosity >= 0:
            self._say(
                f"{self.title}: resumed batch {resumed.batch_id} from {resumed.journal}: "
                f"{len(resumed.settled)} plates had settled, {len(resumed.unsettled)} go on"
            )

    def on_all_plates_completed(self, summary: BatchSummary) -> None:
        with self._lock:
            self.summary = summary
            self.batch_state = summary.outcome
            for settlement in summary.plates:
                line = self._plate(settlement.plate_id)
                line.reason = settlement.reason.value
                line.outcome = settlement.outcome
            if self._finished_at is None:
                self._finished_at = self._clock()
            if self.live:
                self._clear()

    # --- drawing --------------------------------------------------------------------------

    def _plate(self, plate_id: str) -> PlateLine:
        line = self.plates.get(plate_id)
        if line is None:
            line = self.plates[plate_id] = PlateLine(plate_id)
        return line

    def _paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour else text

    def _write(self, text: str) -> None:
        with suppress(OSError, ValueError):  # a closed pipe must not break the batch
            self.stream.write(text + "\n")
            self.stream.flush()

    def _say(self, text: str, *, always: bool = False) -> None:
        if self.verbosity < 0 and not always:
            return
        with self._lock:
            if self.live:
                self._clear()
                self._write(text)
                self._draw(force=True)
            else:
                self._write(f"[{self.elapsed:7.2f}s] {text}")

    def _progress_text(self, snapshot: ProgressSnapshot) -> str:
        eta = f", eta {_clock_text(snapshot.eta)}" if snapshot.eta else ""
        return (
            f"progress {snapshot.fraction:4.0%} ({snapshot.settled}/{snapshot.total} settled{eta})"
        )

    def _bar(self, fraction: float, width: int) -> str:
        fraction = min(max(fraction, 0.0), 1.0)
        full = round(fraction * width)
        encoding = (getattr(self.stream, "encoding", None) or "ascii").lower()
        on, off = ("█", "░") if "utf" in encoding else ("#", "-")
        return on * full + off * (width - full)

    @staticmethod
    def _fraction(line: PlateLine) -> float:
        if line.outcome is not None or line.state.is_terminal:
            return 1.0
        if line.state is PlateState.EXECUTING and line.total:
            return min(line.done / line.total, 1.0)
        return 0.0

    def _clear(self) -> None:
        if self._drawn:
            with suppress(OSError, ValueError):
                self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
                self.stream.flush()
            self._drawn = 0

    def _draw(self, *, force: bool = False) -> None:
        if not self.live or self._finished_at is not None or self.verbosity < 0:
            return
        now = self._clock()
        if not force and now - self._last_draw < _LIVE_REDRAW_EVERY:
            return
        self._last_draw = now
        size = shutil.get_terminal_size((100, 24))
        width = max(size.columns - 1, 20)
        rows: list[tuple[str, str | None]] = []
        snapshot = self._snapshot
        plates = list(self.plates.values())
        total = max(len(plates), snapshot.total if snapshot else 0)
        settled = sum(1 for p in plates if p.outcome is not None)
        fraction = sum(self._fraction(p) for p in plates) / total if total else 0.0
        state = self.batch_state.value if self.batch_state else "starting"
        eta = f"  eta {_clock_text(snapshot.eta)}" if snapshot and snapshot.eta else ""
        head = (
            f"{self.title}  {state:<10} {self._bar(fraction, 24)} {fraction:4.0%}  "
            f"{settled}/{total} settled  {_clock_text(self.elapsed)}{eta}"
        )
        rows.append((head, _OUTCOME_COLOURS.get(state, "1")))
        room = max(size.lines - 3, 3)
        order = {s: i for i, s in enumerate([PlateState.EXECUTING, PlateState.COMPILING])}
        shown = sorted(plates, key=lambda p: order.get(p.state, 9))[: room - 1]
        shown_ids = {p.plate_id for p in shown}
        for line in plates:  # keep the file's order among what fits
            if line.plate_id not in shown_ids:
                continue
            part = self._fraction(line)
            text = (
                f"  {line.plate_id:<14} {line.state.value:<10} {self._bar(part, 16)} "
                f"{part:4.0%}  {line.message}"
            )
            rows.append((text, _COLOURS[line.state]))
        hidden = len(plates) - len(shown)
        if hidden > 0:
            counts: dict[str, int] = {}
            for line in plates:
                if line.plate_id not in shown_ids:
                    counts[line.state.value] = counts.get(line.state.value, 0) + 1
            rest = ", ".join(f"{n} {s}" for s, n in counts.items())
            rows.append((f"  ... and {hidden} more ({rest})", "2"))
        self._clear()
        out = [self._paint(text[:width], c) if c else text[:width] for text, c in rows]
        with suppress(OSError, ValueError):
            self.stream.write("\n".join(out) + "\n")
            self.stream.flush()
        self._drawn = len(out)


# --- running a batch ------------------------------------------------------------------------


class _Canceller:
    """Cancels the batch once, from a signal handler, a timer or a callback."""

    def __init__(self, host: CliHost) -> None:
        self.requested = threading.Event()
        self.why = ""
        self._host = host
        self._service: SyncBatchWorkflowService | None = None

    def attach(self, service: SyncBatchWorkflowService) -> None:
        self._service = service

    def __call__(self, why: str) -> None:
        if self.requested.is_set():
            return
        self.why = why
        self.requested.set()
        self._host.note(f"{why}: cancelling the batch (Ctrl-C again to stop waiting)")
        self.resend()

    def resend(self) -> None:
        service = self._service
        if service is not None and self.requested.is_set():
            service.cancel()


class _RunHost(CliHost):
    """CliHost plus two duties: say where the journal is once the batch starts, and send
    a cancel asked for before the batch existed again."""

    canceller: _Canceller | None = None
    journal_note: str | None = None
    """Said once when the batch starts, i.e. once its journal file exists."""
    journal_failed = False
    """Whether the journal file stopped growing (the service said so)."""

    def emit_error(self, message: str, *, code: str = "", plate_id: str | None = None) -> None:
        if code == "journal_write_failed":
            self.journal_failed = True
        super().emit_error(message, code=code, plate_id=plate_id)

    def emit_progress_started(self, total: int) -> None:
        super().emit_progress_started(total)
        note, self.journal_note = self.journal_note, None
        if note is not None and self.verbosity >= 0:
            self.note(note)
        if self.canceller is not None:
            self.canceller.resend()  # posted: handled after the batch has started


_STOP_SIGNALS: Final[dict[int, str]] = {
    signal.SIGINT: "interrupted",
    signal.SIGTERM: "terminated (SIGTERM)",
    signal.SIGHUP: "hung up (SIGHUP)",
}
"""The signals that cancel a running batch, and how the CLI says so."""


@contextmanager
def _signals_cancel(cancel: Callable[[str], None], received: list[int]) -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP cancel the batch; a second one stops waiting for it.

    The first signal's number is appended to ``received``: the command then
    exits with 128 + that number, as a process stopped by it would.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) == 1:
            cancel(_STOP_SIGNALS.get(signum, f"signal {signum}"))
        else:
            raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, handler) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@dataclass(slots=True)
class _Run:
    summary: BatchSummary
    batch: Batch | None
    journal: Path | None
    engine: str
    signal: int | None = None
    """The signal that cancelled the batch, if one did."""


def _prepare_paths(loaded: LoadedBatch, journal: Path) -> None:
    for folder, what in ((loaded.output_dir, "output_dir"), (journal.parent, "journal folder")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the {what} {folder}: {exc.strerror or exc}") from None
    if journal.is_dir():
        raise UsageError(f"the journal {journal} is a directory; name a file")


def _engine_settings(
    loaded: LoadedBatch, engine_kind: str | None, scheduler: str | None
) -> AnyEngineSettings:
    """The batch file's engine, or the one ``--engine`` / ``--scheduler`` asked for.

    ``--scheduler`` implies the Dask engine (the caller refused any other
    ``--engine``) and replaces the file's LocalCluster keys: the cluster at
    that address is configured by whoever runs it.
    """
    kind = engine_kind or ("dask" if scheduler is not None else loaded.spec.engine.kind)
    settings = engine_settings_for(kind, loaded.spec.engine)
    if scheduler is not None:
        assert isinstance(settings, DaskEngineSettings)  # --scheduler was checked against --engine
        settings = settings.with_scheduler(scheduler)
    return settings


def _run_loaded(
    loaded: LoadedBatch,
    host: _RunHost,
    *,
    engine_kind: str | None,
    compile_only: bool,
    journal: Path,
    cancel_after: float | None,
    scheduler: str | None = None,
    resume: bool = False,
    resubmit_lost: bool = False,
) -> _Run:
    """Run (or, with ``resume``, take over from ``journal``) the batch; the journal is
    written as it goes. Ctrl-C, SIGTERM and SIGHUP cancel it cleanly."""
    settings = _engine_settings(loaded, engine_kind, scheduler)
    _prepare_paths(loaded, journal)
    engine = loaded.build_engine(settings, state_dir=journal.with_name(f"{journal.name}.ledger"))
    spec = loaded.spec
    canceller = _Canceller(host)
    host.canceller = canceller
    mode = BatchMode.COMPILE_ONLY if compile_only else spec.mode
    timer = None
    if cancel_after is not None:
        timer = threading.Timer(cancel_after, canceller, args=(f"{cancel_after:g} s passed",))
        timer.daemon = True
    batch: Batch | None = None
    summary: BatchSummary | None = None
    received: list[int] = []
    context: dict[str, JsonValue] = {
        "batch_file": str(loaded.source),
        "engine": settings.kind,
        "scheduler": scheduler,
    }
    host.journal_note = f"{'resuming from' if resume else 'journal:'} {journal}"
    with (
        _signals_cancel(canceller, received),
        SyncBatchWorkflowService(
            host,
            engine,
            policy=spec.policy,
            cancel_grace=spec.cancel_grace,
            status_interval=spec.status_interval,
            progress_interval=spec.progress_interval,
        ) as service,
    ):
        canceller.attach(service)
        if timer is not None:
            timer.start()
        try:
            if resume:
                summary = service.resume(journal, resubmit_lost=resubmit_lost)
            else:
                start = (
                    service.compile_plates if mode is BatchMode.COMPILE_ONLY else service.run_plates
                )
                summary = start(
                    loaded.plates,
                    pipeline=loaded.pipeline,
                    journal=journal,
                    journal_context=context,
                )
        finally:
            batch = service.service.batch
            if timer is not None:
                timer.cancel()
    assert summary is not None  # run_plates returned
    return _Run(
        summary=summary,
        batch=batch,
        journal=journal if batch is not None and not host.journal_failed else None,
        engine=settings.kind,
        signal=received[0] if received else None,
    )


def _result_brief(result: JsonValue) -> dict[str, JsonValue]:
    """The scalar fields of a plate's result (lists and tables are left out)."""
    if isinstance(result, dict):
        return {
            k: v for k, v in result.items() if v is None or isinstance(v, str | int | float | bool)
        }
    if isinstance(result, str):
        return {"artifact_id": result} if _error_of(result) is None else {"error": result}
    return {} if result is None else {"value": result}


def _plate_line(line: PlateLine, planted: Mapping[str, Sequence[str]] | None) -> str:
    outcome = line.outcome.value if line.outcome else line.state.value
    duration = f"{line.duration:.2f}s" if line.duration is not None else "-"
    text = f"  {line.plate_id:<12} {outcome:<10} {duration:>7}"
    result = line.result
    error = line.error
    if error is not None or line.outcome in (PlateOutcome.FAILED, PlateOutcome.CANCELLED):
        why = line.reason or outcome
        return f"{text}  {why}" + (f": {_first_line(error)}" if error else "")
    if isinstance(result, dict) and isinstance(result.get("hits"), list):
        hits = result["hits"]
        assert isinstance(hits, list)
        found = {h["well"] for h in hits if isinstance(h, dict) and isinstance(h.get("well"), str)}
        text += f"  hits {len(found):>2}"
        if planted is not None:
            expected = set(planted.get(line.plate_id, ()))
            return f"{text}  planted {len(expected)} found {len(expected & found)}"
        if isinstance(result.get("report"), str):
            text += f"  {result['report']}"
        return text
    brief = _result_brief(result)
    return text + ("  " + " ".join(f"{k}={v}" for k, v in brief.items()) if brief else "")


def _print_summary(
    host: CliHost,
    run: _Run,
    out: TextIO,
    *,
    planted: Mapping[str, Sequence[str]] | None = None,
) -> None:
    for line in host.plates.values():
        print(_plate_line(line, planted), file=out)
    summary = run.summary
    counts = ", ".join(f"{n} {o.value}" for o, n in summary.counts.items())
    print(f"batch {summary.outcome.value}: {counts} in {host.elapsed:.1f}s", file=out)


def _result_json(loaded: LoadedBatch, host: CliHost, run: _Run, code: int) -> dict[str, Any]:
    summary = run.summary
    reasons = {s.plate_id: s.reason.value for s in summary.plates}
    paths = {p.plate_id: p.path for p in loaded.plates}
    plates = []
    for plate_id, line in host.plates.items():
        plates.append(
            {
                "plate_id": plate_id,
                "path": paths.get(plate_id),
                "outcome": line.outcome.value if line.outcome else None,
                "reason": reasons.get(plate_id, line.reason),
                "duration": round(line.duration, 3) if line.duration is not None else None,
                "error": line.error,
                "result": _result_brief(line.result),
            }
        )
    return {
        "format": RESULT_FORMAT,
        "batch_file": str(loaded.source),
        "name": loaded.name,
        "batch_id": summary.batch_id,
        "mode": summary.mode.value,
        "engine": run.engine,
        "outcome": summary.outcome.value,
        "exit_code": code,
        "duration": round(host.elapsed, 3),
        "counts": {o.value: n for o, n in summary.counts.items()},
        "reasons": {r.value: n for r, n in summary.reasons.items()},
        "output_dir": str(loaded.output_dir),
        "journal": str(run.journal) if run.journal else None,
        "plates": plates,
    }


def _verbosity(args: argparse.Namespace) -> int:
    return -1 if args.quiet else int(args.verbose)


def _check_scheduler_flag(engine: str | None, scheduler: str | None) -> None:
    if scheduler is None:
        return
    if engine not in (None, "dask"):
        raise UsageError(
            f"--scheduler names a Dask scheduler, so it cannot go with --engine {engine}; "
            "use --engine dask, or leave --engine out"
        )
    try:
        check_scheduler_address(scheduler)
    except ValueError as exc:
        raise UsageError(f"--scheduler {scheduler!r}: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    if args.cancel_after is not None and not args.cancel_after >= 0:
        raise UsageError(
            f"--cancel-after must be a number of seconds >= 0, got {args.cancel_after}"
        )
    _check_scheduler_flag(args.engine, args.scheduler)
    loaded = load_batch_file(args.batch)
    journal = args.journal.resolve() if args.journal else loaded.journal
    err = sys.stderr
    host = _RunHost(err, verbosity=_verbosity(args), title=loaded.name)
    run = _run_loaded(
        loaded,
        host,
        engine_kind=args.engine,
        compile_only=args.compile_only,
        journal=journal,
        cancel_after=args.cancel_after,
        scheduler=args.scheduler,
    )
    return _report(args, loaded, host, run, _exit_code(run))


def _exit_code(run: _Run) -> int:
    """The batch outcome's code, or 128 + the signal that stopped the run."""
    if run.signal is not None:
        return 128 + run.signal
    return EXIT_CODES.get(run.summary.outcome, EXIT_FAILED)


def _resume(args: argparse.Namespace) -> int:
    journal = args.journal.resolve()
    app = Journal.load(journal).header.context.get("app")
    if not isinstance(app, dict) or not isinstance(app.get("batch_file"), str):
        raise UsageError(
            f"{journal} was not written by `plateflow run` (its header names no batch file); "
            "resume it from Python with BatchWorkflowService.resume"
        )
    loaded = load_batch_file(Path(str(app["batch_file"])))
    engine, scheduler = app.get("engine"), app.get("scheduler")
    host = _RunHost(sys.stderr, verbosity=_verbosity(args), title=loaded.name)
    run = _run_loaded(
        loaded,
        host,
        engine_kind=engine if isinstance(engine, str) else None,
        compile_only=False,
        journal=journal,
        cancel_after=None,
        scheduler=scheduler if isinstance(scheduler, str) else None,
        resume=True,
        resubmit_lost=args.resubmit_lost,
    )
    return _report(args, loaded, host, run, _exit_code(run))


def _report(
    args: argparse.Namespace, loaded: LoadedBatch, host: CliHost, run: _Run, code: int
) -> int:
    """Print the summary (and the JSON result) of a run or resume; returns ``code``."""
    err = sys.stderr
    if args.json:
        if host.verbosity >= 0:
            _print_summary(host, run, err)
        json.dump(_result_json(loaded, host, run, code), sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif host.verbosity >= 0:
        _print_summary(host, run, sys.stdout)
    if host.verbosity >= 0:
        where = f"reports in {loaded.output_dir}"
        if run.journal:
            where += f"; journal in {run.journal}"
        print(where, file=err if args.json else sys.stdout)
    return code


# --- the demo -------------------------------------------------------------------------------


def _demo_batch(
    generated: Sequence[GeneratedPlate], policy: str, engine: str, folder: Path
) -> BatchFile:
    pipeline = demo_pipeline()
    settings: AnyEngineSettings
    settings = ZmqEngineSettings(runtime_dir="server") if engine == "zmq" else LocalEngineSettings()
    return BatchFile(
        name="demo",
        policy=CompileFailurePolicy(policy),
        output_dir="reports",
        journal="journal.jsonl",
        status_interval=0.5,
        plates=tuple(
            PlateEntry(id=g.plate_id, path=str(Path(g.path).relative_to(folder))) for g in generated
        ),
        pipeline=PipelineSection(
            name=pipeline.name,
            steps=tuple(StepEntry(function=s.function, params=s.params) for s in pipeline.steps),
        ),
        engine=settings,
    )


def _demo(args: argparse.Namespace) -> int:
    if args.plates < 1:
        raise UsageError(f"--plates must be at least 1, got {args.plates}")
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="plateflow-demo-"))
    folder = folder.resolve()
    generated = generate_plates(folder / "plates", args.plates, seed=args.seed, wells=96)
    broken = generated[min(4, len(generated) - 1)]
    broken.path.write_text("well,role,signal\nA01,sample,saturated\n", encoding="utf-8")
    planted = {g.plate_id: g.planted_hits for g in generated}
    batch_file = folder / "batch.toml"
    batch_file.write_text(
        render_batch_file(
            _demo_batch(generated, args.policy, args.engine, folder),
            comment="The plateflow demo batch; run it again with: plateflow run batch.toml",
        ),
        encoding="utf-8",
    )
    print(f"{len(generated)} plates in {folder / 'plates'} ({broken.plate_id} is corrupted)")
    print(f"batch file {batch_file}")
    loaded = load_batch_file(batch_file)
    host = _RunHost(sys.stderr, verbosity=_verbosity(args), title="demo")
    if host.verbosity >= 0:
        print(f"engine: {args.engine}", file=sys.stderr)
    run = _run_loaded(
        loaded,
        host,
        engine_kind=None,
        compile_only=False,
        journal=loaded.journal,
        cancel_after=None,
    )
    print()
    _print_summary(host, run, sys.stdout, planted=planted)
    if run.batch is not None:
        state = run.batch.plate_state(broken.plate_id).value
        print(f"\nwhy did {broken.plate_id} end {state}?")
        _print_story(run.batch.journal, broken.plate_id)
    print(f"\nreports in {loaded.output_dir}; journal in {run.journal}")
    print(f"run the batch again: plateflow run {batch_file}")
    code = EXIT_CODES.get(run.summary.outcome, EXIT_FAILED)
    # The demo's batch fails on purpose (the corrupted plate): that is success for the demo.
    return EXIT_CANCELLED if code == EXIT_CANCELLED else EXIT_COMPLETED


# --- journals -------------------------------------------------------------------------------


def _print_story(journal: Journal, plate: str) -> None:
    start = journal[0].time if len(journal) else 0.0
    for record in journal.story(plate):
        moves = [f"{c.old.value}->{c.new.value}" for c in record.changes if c.plate_id == plate]
        shown = ", ".join(moves) or record.disposition.value
        elapsed = f"+{record.time - start:.3f}s"
        print(f"  #{record.seq:<4} {elapsed:>9} {record.fact.kind:<20} {shown}")
        if record.disposition != "applied":
            print(f"         {record.detail}")
        error = getattr(record.fact, "error", None)
        if error:
            print(f"         {str(error).splitlines()[0][:200]}")


def _journal_show(args: argparse.Namespace) -> int:
    journal = Journal.load(args.file)
    header = journal.header
    print(f"batch {header.batch_id} ({header.mode.value}, {len(header.plate_ids)} plates)")
    plates = [args.plate] if args.plate else list(header.plate_ids)
    for plate in plates:
        if plate not in header.plate_ids:
            raise UsageError(f"{args.file}: no plate {plate!r} in this batch")
        print(f"\n{plate}:")
        _print_story(journal, plate)
    return 0


# --- the server -----------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    # Imported here so that the other commands never load ZeroMQ.
    from plateflow.engines.local import DEFAULT_KEEP_FINISHED
    from plateflow.engines.zmq.server import (
        DEFAULT_ALLOWED_MODULES,
        ExecutionServer,
        ServerRecord,
    )

    allowed = tuple(dict.fromkeys([*DEFAULT_ALLOWED_MODULES, *args.allow]))
    keep_finished: int | None = DEFAULT_KEEP_FINISHED
    if args.keep_finished is not None:
        if args.keep_finished < 0:
            raise UsageError(
                f"--keep-finished must be 0 (remember all) or more, got {args.keep_finished}"
            )
        keep_finished = args.keep_finished or None
    server = ExecutionServer(
        args.runtime_dir,
        tcp_port=args.tcp_port,
        max_workers=args.workers,
        allowed_modules=allowed,
        output_dir=args.output_dir,
        heartbeat_interval=args.heartbeat,
        keep_finished=keep_finished,
        lease_grace=args.lease_grace,
        owned=args.exit_when_unowned,
    )

    def ready(record: ServerRecord) -> None:
        print(f"plateflow serve: server {record.server_id} (pid {record.pid})", file=sys.stderr)
        print(f"  record  {server.runtime_dir / 'server.json'}", file=sys.stderr)
        print(f"  control {record.control}", file=sys.stderr)
        print(f"  events  {record.events}", file=sys.stderr, flush=True)

    server.run(on_ready=ready)
    print(f"plateflow serve: stopped: {server.stop_reason or 'stopped'}", file=sys.stderr)
    return 0


class _NoServer(UsageError):
    """``plateflow status`` or ``stop`` found no server to ask."""


def _runtime_dir(runtime_dir: Path | None) -> Path:
    from plateflow.engines.zmq.engine import default_runtime_dir

    return runtime_dir if runtime_dir is not None else default_runtime_dir()


def _server_info(runtime_dir: Path | None) -> dict[str, JsonValue]:
    # Only looks: takes no lease, starts nothing, creates no runtime dir.
    from plateflow.engines.zmq.engine import ask_info, find_server

    directory = _runtime_dir(runtime_dir)
    record = find_server(directory)
    if record is None:
        raise _NoServer(
            f"no plateflow server is running in {directory} "
            f"(start one with `plateflow serve --runtime-dir {directory}`)"
        )
    try:
        return ask_info(record)
    except EngineError as exc:
        raise _NoServer(str(exc)) from None


def _status_all(as_json: bool) -> int:
    """One line per registered server, wherever its runtime dir is."""
    from plateflow.engines.zmq.engine import ask_info, find_server, list_servers

    rows: list[dict[str, JsonValue]] = []
    for entry in list_servers():
        row: dict[str, JsonValue] = {
            "server_id": entry.server_id,
            "pid": entry.pid,
            "runtime_dir": entry.runtime_dir,
            "owned": entry.owned,
        }
        record = find_server(Path(entry.runtime_dir))
        try:
            if record is None or record.server_id != entry.server_id:
                raise EngineError("it stopped")
            info = ask_info(record, timeout=2.0)
        except EngineError as exc:
            row["error"] = str(exc)
        else:
            leases = info.get("leases")
            row.update(
                leases=len(leases) if isinstance(leases, list) else None,
                running=info.get("running"),
                queued=info.get("queued"),
            )
        rows.append(row)
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not rows:
        raise _NoServer(
            "no plateflow server is running (none is registered; `plateflow status "
            "--runtime-dir DIR` looks in one runtime dir)"
        )
    for row in rows:
        owner = "  owned" if row["owned"] else ""
        if "error" in row:
            state = f"not answering: {row['error']}"
        else:
            state = (
                f"leases {row['leases']}  running {row['running']}  queued {row['queued']}{owner}"
            )
        print(f"{row['server_id']}  pid {row['pid']}  {row['runtime_dir']}  {state}")
    return 0


def _status(args: argparse.Namespace) -> int:
    if args.runtime_dir is None:
        return _status_all(args.json)
    info = _server_info(args.runtime_dir)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0

    def field(name: str) -> str:
        value = info.get(name)
        return "-" if value is None else str(value)

    uptime = info.get("uptime")
    up = _clock_text(float(uptime)) if isinstance(uptime, int | float) else "-"
    print(
        f"server {field('server_id')} (pid {field('pid')}), up {up}, protocol {field('protocol')}"
    )
    rows = [
        ("runtime dir", field("runtime_dir")),
        ("control", field("control")),
        ("events", field("events")),
        ("workers", f"{field('workers')} ({field('processes')} processes alive)"),
        ("output dir", field("output_dir")),
        ("artifacts", field("artifacts")),
        ("running", field("running")),
    ]
    for label, value in rows:
        print(f"  {label:<12} {value}")
    running = info.get("running_submissions")
    for item in running if isinstance(running, list) else []:
        if isinstance(item, dict):
            flag = "  (cancelling)" if item.get("cancelling") else ""
            print(
                f"    {item.get('plate_id')!s:<14} {item.get('phase')!s:<8} "
                f"{item.get('submission_id')!s:<20} pid {item.get('pid')}{flag}"
            )
    print(f"  {'queued':<12} {field('queued')}")
    leases = info.get("leases")
    owned = "; exits when none is left" if info.get("owned") else ""
    print(f"  {'leases':<12} {len(leases) if isinstance(leases, list) else '-'}{owned}")
    for lease in leases if isinstance(leases, list) else []:
        if isinstance(lease, dict):
            print(
                f"    session {lease.get('session')!s:<10} outstanding "
                f"{lease.get('outstanding')!s:<6} expires in {lease.get('expires_in')} s"
            )
    return 0


def _stop(args: argparse.Namespace) -> int:
    from plateflow.engines.zmq.engine import stop_server

    directory = _runtime_dir(args.runtime_dir)
    record = stop_server(directory)
    if record is None:
        raise _NoServer(f"no plateflow server is running in {directory}; nothing to stop")
    print(f"plateflow stop: stopped server {record.server_id} (pid {record.pid}) in {directory}")
    return 0


# --- the statecharts ------------------------------------------------------------------------


def _diagram(argv: Sequence[str]) -> int:
    # The statecharts module is imported only for this command.
    from plateflow.statecharts import add_diagram_arguments, diagram_command

    parser = argparse.ArgumentParser(
        prog="plateflow diagram",
        description="Draw the plate and batch state machines from the tables they run.",
    )
    add_diagram_arguments(parser)
    return int(diagram_command(parser.parse_args(list(argv))))


# --- the parser -----------------------------------------------------------------------------


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true", help="write only errors to stderr")
    group.add_argument(
        "-v", "--verbose", action="count", default=0, help="also every plate move and engine status"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plateflow",
        description="Run batches of plates through compile-then-execute "
        "on explicit state machines.",
        epilog="exit codes: 0 completed, 1 failed, 130 cancelled, 2 usage error, "
        "3 engine unavailable",
    )
    parser.add_argument("--version", action="version", version=f"plateflow {plateflow.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="write synthetic plates and a batch file, run it, explain the failed plate",
        description="Write synthetic plates with planted hits (one corrupted) and a batch "
        "file into DIR, run the batch with live progress, and explain the failed plate.",
    )
    demo.add_argument("dir", nargs="?", help="where to write plates, batch file, reports, journal")
    demo.add_argument("--plates", type=int, default=8, help="how many plates (default 8)")
    demo.add_argument("--seed", type=int, default=1, help="seed of the synthetic plates")
    demo.add_argument(
        "--policy",
        choices=[p.value for p in CompileFailurePolicy],
        default="abort",
        help="on a compile failure: execute nothing (abort, default) or the rest (continue)",
    )
    demo.add_argument(
        "--engine",
        choices=["zmq", "local"],
        default="zmq",
        help="zmq: the embedded execution server (default); local: worker processes in-process",
    )
    _add_output_flags(demo)
    demo.set_defaults(run=_demo)

    run = sub.add_parser(
        "run",
        help="run a batch file",
        description="Run the batch a batch file describes (see docs/batch-file.md). Progress "
        "goes to stderr; the result to stdout. Ctrl-C cancels the batch cleanly.",
    )
    run.add_argument("batch", type=Path, metavar="BATCH.toml", help="the batch file")
    run.add_argument(
        "--compile-only", action="store_true", help="compile every plate, execute none"
    )
    run.add_argument(
        "--engine",
        choices=list(engine_kinds()),
        help="run on this engine instead of the batch file's (keeping its workers and allow)",
    )
    run.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on the Dask scheduler at ADDRESS (tcp://host:port); implies --engine dask",
    )
    run.add_argument("--journal", type=Path, metavar="FILE", help="write the journal here instead")
    run.add_argument(
        "--cancel-after",
        type=float,
        metavar="SECONDS",
        help="cancel the batch after this many seconds",
    )
    run.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    _add_output_flags(run)
    run.set_defaults(run=_run)

    resume = sub.add_parser(
        "resume",
        help="take over a batch whose `plateflow run` died, from its journal",
        description="Resume the batch a killed `plateflow run` left: rebuild it from its "
        "journal, re-attach to the engine's work, and go on (see docs/crashes.md). Plates "
        "that settled before are not run again; work the engine no longer has fails "
        "(lost_in_restart) unless --resubmit-lost.",
    )
    resume.add_argument("journal", type=Path, metavar="JOURNAL", help="the journal file")
    resume.add_argument(
        "--resubmit-lost",
        action="store_true",
        help="submit work the engine no longer has again instead of failing its plate",
    )
    resume.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    _add_output_flags(resume)
    resume.set_defaults(run=_resume)

    status = sub.add_parser(
        "status",
        help="what the running embedded servers are doing",
        description="Without --runtime-dir, list every running embedded execution server "
        "(one line each: id, pid, runtime dir, leases, running and queued submissions); "
        "with it, ask that one server for its state: running and queued executions, "
        "workers, leases. Exit code 2 when no server is running.",
    )
    status.add_argument(
        "--runtime-dir",
        type=Path,
        help="ask the server in this runtime directory only",
    )
    status.add_argument("--json", action="store_true", help="print the answer as JSON")
    status.set_defaults(run=_status)

    stop = sub.add_parser(
        "stop",
        help="stop an embedded server",
        description="Stop the embedded execution server in a runtime directory with its "
        "token, and wait until it is gone; its clients report their work lost. Exit code "
        "2 when no server is running there.",
    )
    stop.add_argument(
        "--runtime-dir",
        type=Path,
        help="the server's runtime directory (default $PLATEFLOW_RUNTIME_DIR, else "
        "$XDG_RUNTIME_DIR/plateflow)",
    )
    stop.set_defaults(run=_stop)

    journal = sub.add_parser("journal", help="read a batch journal")
    journal_sub = journal.add_subparsers(dest="journal_command", required=True)
    show = journal_sub.add_parser("show", help="each plate's story: how it reached its state")
    show.add_argument("file", type=Path)
    show.add_argument("--plate", help="only this plate")
    show.set_defaults(run=_journal_show)

    serve = sub.add_parser("serve", help="run the embedded ZeroMQ execution server")
    serve.add_argument(
        "--runtime-dir",
        type=Path,
        help="private directory for sockets, server.json and token "
        "(default $PLATEFLOW_RUNTIME_DIR, else $XDG_RUNTIME_DIR/plateflow)",
    )
    serve.add_argument(
        "--tcp-port",
        type=int,
        help="listen on TCP 127.0.0.1 (control PORT, events PORT+1; 0 picks free ports) "
        "instead of IPC sockets",
    )
    serve.add_argument("--workers", type=int, help="worker processes at most (default: CPUs)")
    serve.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="MODULE",
        help="also resolve pipeline steps from MODULE (repeatable)",
    )
    serve.add_argument("--output-dir", help="where steps write (default: a temporary dir)")
    serve.add_argument(
        "--heartbeat",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="heartbeat interval (default 0.5)",
    )
    serve.add_argument(
        "--keep-finished",
        type=int,
        metavar="N",
        help="finished submissions remembered for status answers; older ones are "
        "forgotten (default 100,000; 0: all, and memory grows without bound)",
    )
    serve.add_argument(
        "--lease-grace",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a client session's work is stopped when nobody renews its lease for this "
        "long (default 60)",
    )
    serve.add_argument(
        "--exit-when-unowned",
        action="store_true",
        help="exit when no client holds a lease any more (how a client starts its server)",
    )
    serve.set_defaults(run=_serve)

    # Listed for --help; `plateflow diagram ...` is dispatched before parsing (see main).
    sub.add_parser(
        "diagram", help="draw the state machines (plateflow diagram --help)", add_help=False
    )
    return parser


def _say_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """How the command line shows a plateflow warning: one line, no source location."""
    print(f"plateflow: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", JournalWarning)
        warnings.showwarning = _say_warning
        return _main(list(sys.argv[1:] if argv is None else argv))


def _main(arguments: list[str]) -> int:
    try:
        if arguments[:1] == ["diagram"]:
            return _diagram(arguments[1:])
        args = _parser().parse_args(arguments)
        return int(args.run(args))
    except (UsageError, JournalError) as exc:
        print(f"plateflow: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except EngineError as exc:
        # One line whatever the engine's library put into its message.
        print(
            f"plateflow: error: the engine is unavailable: {' '.join(str(exc).split())}",
            file=sys.stderr,
        )
        return EXIT_ENGINE
    except OSError as exc:
        print(f"plateflow: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("plateflow: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
