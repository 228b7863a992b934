"""The ``plateflow`` command: a thin layer over the public API.

``plateflow demo [DIR]`` writes synthetic plates with planted hits (and one
corrupted plate), runs them through compile-then-execute on the local engine
with a host that prints what happens, then explains the failed plate from the
journal. ``plateflow journal show FILE`` prints each plate's story.
``plateflow serve`` runs the embedded ZeroMQ execution server until it is
shut down (SIGTERM, Ctrl-C or a shutdown request carrying its token).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pydantic import JsonValue

from plateflow import (
    BaseBatchHost,
    BatchSummary,
    CompileFailurePolicy,
    Engine,
    Journal,
    JournalError,
    Plate,
    PlateOutcome,
    SyncBatchWorkflowService,
    UsageError,
)
from plateflow.engines.local import LocalEngine
from plateflow.engines.zmq.engine import ZmqEngine
from plateflow.examples.platereader import demo_pipeline, generate_plates

__all__ = ["main"]


class _PrintingHost(BaseBatchHost):
    """The CLI is a host like any other: it only overrides what it shows."""

    def __init__(self, planted: dict[str, tuple[str, ...]]) -> None:
        super().__init__()
        self._planted = planted

    def emit_error(self, message: str, *, code: str = "", plate_id: str | None = None) -> None:
        print(f"  error: {message}", file=sys.stderr)

    def on_plate_completed(self, plate_id: str, outcome: PlateOutcome, result: JsonValue) -> None:
        line = f"  {plate_id:<12} {outcome.value:<10}"
        if isinstance(result, dict) and isinstance(result.get("hits"), list):
            found = {h["well"] for h in result["hits"] if isinstance(h, dict)}  # type: ignore[union-attr]
            planted = set(self._planted.get(plate_id, ()))
            line += f" hits {len(found):>2}  planted {len(planted)} found {len(planted & found)}"
        elif isinstance(result, dict) and "error" in result:
            line += f" {str(result['error']).splitlines()[0][:200]}"
        print(line)

    def on_all_plates_completed(self, summary: BatchSummary) -> None:
        counts = ", ".join(f"{n} {o.value}" for o, n in summary.counts.items())
        print(f"batch {summary.outcome.value}: {counts}")


def _demo(args: argparse.Namespace) -> int:
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="plateflow-demo-"))
    generated = generate_plates(folder / "plates", args.plates, seed=args.seed, wells=96)
    broken = generated[min(4, len(generated) - 1)]
    broken.path.write_text("well,role,signal\nA01,sample,saturated\n", encoding="utf-8")
    planted = {g.plate_id: g.planted_hits for g in generated}
    print(f"{len(generated)} plates in {folder / 'plates'} ({broken.plate_id} is corrupted)")
    engine: Engine
    if args.engine == "zmq":
        # A private server for the demo: started in the demo's folder, stopped at the end.
        rundir = folder / "server"
        rundir.mkdir(mode=0o700, exist_ok=True)
        engine = ZmqEngine(rundir, server_args=["--output-dir", str(folder / "reports")])
    else:
        engine = LocalEngine(output_dir=str(folder / "reports"))
    print(f"engine: {args.engine}", file=sys.stderr)
    host = _PrintingHost(planted)
    with SyncBatchWorkflowService(
        host, engine, policy=CompileFailurePolicy(args.policy), status_interval=0.5
    ) as service:
        service.run_plates(
            [Plate(g.plate_id, str(g.path)) for g in generated], pipeline=demo_pipeline()
        )
        batch = service.service.batch
    assert batch is not None
    journal = folder / "journal.jsonl"
    batch.journal.save(journal)
    print(f"\nwhy did {broken.plate_id} end {batch.plate_state(broken.plate_id).value}?")
    _print_story(batch.journal, broken.plate_id)
    print(f"\nreports in {folder / 'reports'}; journal in {journal}")
    return 0


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


def _serve(args: argparse.Namespace) -> int:
    # Imported here so that the other commands never load ZeroMQ.
    from plateflow.engines.zmq.server import (
        DEFAULT_ALLOWED_MODULES,
        ExecutionServer,
        ServerRecord,
    )

    allowed = tuple(dict.fromkeys([*DEFAULT_ALLOWED_MODULES, *args.allow]))
    server = ExecutionServer(
        args.runtime_dir,
        tcp_port=args.tcp_port,
        max_workers=args.workers,
        allowed_modules=allowed,
        output_dir=args.output_dir,
        heartbeat_interval=args.heartbeat,
    )

    def ready(record: ServerRecord) -> None:
        print(f"plateflow serve: server {record.server_id} (pid {record.pid})", file=sys.stderr)
        print(f"  record  {server.runtime_dir / 'server.json'}", file=sys.stderr)
        print(f"  control {record.control}", file=sys.stderr)
        print(f"  events  {record.events}", file=sys.stderr, flush=True)

    server.run(on_ready=ready)
    print("plateflow serve: stopped", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plateflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo batch and explain its failed plate")
    demo.add_argument("dir", nargs="?", help="where to write plates, reports and the journal")
    demo.add_argument("--plates", type=int, default=8, help="how many plates (default 8)")
    demo.add_argument("--seed", type=int, default=1, help="seed of the synthetic plates")
    demo.add_argument("--policy", choices=[p.value for p in CompileFailurePolicy], default="abort")
    demo.add_argument(
        "--engine",
        choices=["zmq", "local"],
        default="zmq",
        help="zmq: the embedded execution server (default); local: worker processes in-process",
    )
    demo.set_defaults(run=_demo)
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
    serve.set_defaults(run=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (UsageError, JournalError, OSError) as exc:
        print(f"plateflow: error: {exc}", file=sys.stderr)
        return 2
