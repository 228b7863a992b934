"""The ``plateflow`` command: a thin layer over the public API.

``plateflow demo`` runs a batch of plates through the state machines with an
in-process simulated engine and prints what happened; ``plateflow journal
show FILE`` explains a journal written by a batch.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

from plateflow import Batch, CompileFailurePolicy, Journal, JournalError, UsageError
from plateflow._simulator import Simulator
from plateflow.core import BatchStarted, Fact, ReportBatch, ReportPlate

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    plates = [f"plate-{i:02d}" for i in range(1, args.plates + 1)]
    ticks = itertools.count()
    batch = Batch(
        "demo",
        plates,
        policy=CompileFailurePolicy(args.policy),
        clock=lambda: float(next(ticks)) / 10,
    )
    engine = Simulator(fail_execution=args.fail or ["plate-05"])
    print(f"running {len(plates)} plates (simulated in-process engine)", file=sys.stderr)
    fact: Fact | None = BatchStarted()
    while fact is not None:
        decisions = batch.handle(fact)
        engine.submit(decisions)
        for d in decisions:
            if isinstance(d, ReportPlate):
                print(f"  {d.plate_id:<10} {d.outcome.value:<10} {d.reason.value}")
            elif isinstance(d, ReportBatch):
                counts = ", ".join(f"{n} {o.value}" for o, n in d.summary.counts.items())
                print(f"batch {d.summary.outcome.value}: {counts}")
        fact = engine.next_fact()
    for plate in engine.planted:
        print(f"\nwhy did {plate} end {batch.plate_state(plate).value}? its story:")
        for record in batch.journal.story(plate):
            moves = [f"{c.old.value}->{c.new.value}" for c in record.changes if c.plate_id == plate]
            print(f"  #{record.seq:<4} {record.fact.kind:<20} {', '.join(moves) or '-'}")
    if args.journal:
        batch.journal.save(args.journal)
        print(f"journal written to {args.journal}", file=sys.stderr)
    return 0  # the failures were planted: the demo ran as intended


def _journal_show(args: argparse.Namespace) -> int:
    journal = Journal.load(args.file)
    header = journal.header
    print(f"batch {header.batch_id} ({header.mode.value}, {len(header.plate_ids)} plates)")
    plates = [args.plate] if args.plate else list(header.plate_ids)
    for plate in plates:
        if plate not in header.plate_ids:
            raise UsageError(f"{args.file}: no plate {plate!r} in this batch")
        print(f"\n{plate}:")
        for record in journal.story(plate):
            moves = [f"{c.old.value}->{c.new.value}" for c in record.changes if c.plate_id == plate]
            shown = ", ".join(moves) or record.disposition.value
            print(f"  #{record.seq:<4} t={record.time:<8g} {record.fact.kind:<20} {shown}")
            if record.disposition != "applied":
                print(f"         {record.detail}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plateflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a demo batch and print what happened")
    demo.add_argument("--plates", type=int, default=8, help="how many plates (default 8)")
    demo.add_argument(
        "--fail",
        action="append",
        metavar="PLATE",
        help="a plate whose execution fails (repeatable; default plate-05)",
    )
    demo.add_argument("--policy", choices=[p.value for p in CompileFailurePolicy], default="abort")
    demo.add_argument("--journal", type=Path, help="write the batch journal here (JSON Lines)")
    demo.set_defaults(run=_demo)
    journal = sub.add_parser("journal", help="read a batch journal")
    journal_sub = journal.add_subparsers(dest="journal_command", required=True)
    show = journal_sub.add_parser("show", help="each plate's story: how it reached its state")
    show.add_argument("file", type=Path)
    show.add_argument("--plate", help="only this plate")
    show.set_defaults(run=_journal_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (UsageError, JournalError, OSError) as exc:
        print(f"plateflow: error: {exc}", file=sys.stderr)
        return 2
