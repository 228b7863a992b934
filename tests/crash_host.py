"""A host process for the crash tests (tests/test_crash_resume.py), not a test module.

    python crash_host.py run JOURNAL --engine KIND --plates N --markers DIR [options]
    python crash_host.py resume JOURNAL --engine KIND [--resubmit-lost] [options]

``run`` runs a batch whose plates each pause, then append one line to
``DIR/<plate id>`` (so the test can count how often a plate's work ran), with
the journal written to JOURNAL as it goes. ``resume`` takes the batch over from
JOURNAL. Every host callback that matters is appended, flushed, as one JSON
line to ``JOURNAL.calls``, with the pid of the process that heard it: the test
kills the process at any moment and reads what each process was told.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import JsonValue

from plateflow import BaseBatchHost, Plate, SyncBatchWorkflowService
from plateflow.core import BatchSummary, PlateOutcome, ResumedBatch
from plateflow.engines.base import Engine
from plateflow.pipeline.spec import PipelineSpec, StepSpec

ALLOWED = ("steps_for_tests", "plateflow.examples.platereader")


class LoggingHost(BaseBatchHost):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self._out = path.open("a", encoding="utf-8")

    def _log(self, name: str, **fields: Any) -> None:
        self._out.write(json.dumps({"pid": os.getpid(), "name": name, **fields}) + "\n")
        self._out.flush()

    def on_resumed(self, resumed: ResumedBatch) -> None:
        self._log(
            "on_resumed",
            settled=[s.plate_id for s in resumed.settled],
            unsettled=list(resumed.unsettled),
        )

    def on_plate_completed(self, plate_id: str, outcome: PlateOutcome, result: JsonValue) -> None:
        self._log("on_plate_completed", plate=plate_id, outcome=outcome.value)

    def on_all_plates_completed(self, summary: BatchSummary) -> None:
        self._log("on_all_plates_completed", outcome=summary.outcome.value)

    def emit_error(self, message: str, *, code: str = "", plate_id: str | None = None) -> None:
        self._log("emit_error", message=message, code=code, plate=plate_id)


def _engine(args: argparse.Namespace) -> Engine:
    if args.engine == "zmq":
        from plateflow.engines.zmq.engine import ZmqEngine

        server_args = ["--workers", "2", "--heartbeat", "0.2", "--output-dir", args.output]
        for module in ALLOWED:
            server_args += ["--allow", module]
        return ZmqEngine(Path(args.runtime_dir), server_args=server_args, heartbeat_timeout=5.0)
    if args.engine == "dask":
        from plateflow.engines.dask import DaskEngine

        return DaskEngine(args.scheduler, allowed_modules=ALLOWED, output_dir=args.output)
    from plateflow.engines.local import LocalEngine

    return LocalEngine(
        max_workers=2, allowed_modules=ALLOWED, output_dir=args.output, ledger_dir=args.ledger
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["run", "resume"])
    parser.add_argument("journal", type=Path)
    parser.add_argument("--engine", choices=["zmq", "dask", "local"], required=True)
    parser.add_argument("--plates", type=int, default=30)
    parser.add_argument("--markers", default="")
    parser.add_argument("--pause", type=float, default=0.05)
    parser.add_argument("--output", default="")
    parser.add_argument("--runtime-dir", default="")
    parser.add_argument("--scheduler", default="")
    parser.add_argument("--ledger", default=None)
    parser.add_argument("--resubmit-lost", action="store_true")
    args = parser.parse_args()
    host = LoggingHost(Path(f"{args.journal}.calls"))
    with SyncBatchWorkflowService(host, _engine(args), status_interval=0.5) as service:
        if args.command == "resume":
            summary = service.resume(args.journal, resubmit_lost=args.resubmit_lost)
        else:
            pipeline = PipelineSpec(
                name="crash",
                steps=(
                    StepSpec(
                        function="plateflow.examples.platereader:pause",
                        params={"seconds": args.pause},
                    ),
                    StepSpec(function="steps_for_tests:mark", params={"directory": args.markers}),
                    StepSpec(function="steps_for_tests:finish"),
                ),
            )
            plates = [Plate(f"p{i:02d}", f"/data/p{i:02d}") for i in range(args.plates)]
            summary = service.run_plates(plates, pipeline=pipeline, journal=args.journal)
    print(summary.outcome.value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
