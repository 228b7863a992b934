"""Step functions the engine tests run in real worker processes.

Every step that waits does so with a bound (``timeout``), so a worker the test
forgot can never outlive the test run by long. Steps that wait report
``pid=<pid>`` as a progress message first, so a test knows which process to
signal and that the step is running.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pydantic import JsonValue

from plateflow.pipeline.run import StepContext

_TICK = 0.01  # how often a waiting step looks at its condition


def _announce(ctx: StepContext) -> None:
    ctx.progress(0, 1, f"pid={os.getpid()}")


def load(data: object, ctx: StepContext) -> dict[str, JsonValue]:
    return {"plate": ctx.plate_id, "path": str(data)}


def count(data: object, ctx: StepContext, n: int = 3) -> object:
    for i in range(1, n + 1):
        ctx.progress(i, n, f"item {i}")
    return data


def finish(data: object, ctx: StepContext) -> dict[str, JsonValue]:
    return {"plate": ctx.plate_id, "ok": True}


def whoami(data: object, ctx: StepContext) -> dict[str, JsonValue]:
    """The result names the worker process that ran the plate."""
    return {"plate": ctx.plate_id, "pid": os.getpid()}


def explode(data: object, ctx: StepContext, message: str = "boom") -> object:
    raise ValueError(message)


def crash(data: object, ctx: StepContext, code: int = 3) -> object:
    os._exit(code)


def wait_for_cancel(data: object, ctx: StepContext, timeout: float = 30.0) -> object:
    """Run until cancelled (raises StepCancelled via check_cancelled)."""
    _announce(ctx)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ctx.check_cancelled()
        time.sleep(_TICK)
    raise TimeoutError("wait_for_cancel was never cancelled")


def wait_for_file(data: object, ctx: StepContext, path: str, timeout: float = 30.0) -> object:
    """Run until ``path`` exists: the test's gate for 'still running'."""
    _announce(ctx)
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(_TICK)
    return data


def stubborn(data: object, ctx: StepContext, timeout: float = 30.0) -> object:
    """Ignore cancellation and SIGTERM: only SIGKILL stops it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _announce(ctx)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(_TICK)
    return data


def undecodable(data: object, ctx: StepContext, what: str = "error") -> object:
    """Text with a lone surrogate, as a file name that is not UTF-8 decodes to."""
    name = b"plate-\xff.csv".decode("utf-8", "surrogateescape")
    if what == "progress":
        ctx.progress(1, 2, f"reading {name}")
        return {"done": True}
    if what == "result":
        return {"file": name}
    raise FileNotFoundError(f"no such file: {name}")


def gated_mark(
    data: object, ctx: StepContext, folder: str, pause: float = 0.0, timeout: float = 30.0
) -> dict[str, JsonValue]:
    """Do the plate's work once: append ``<pid>`` as a line to ``folder/<plate>.marks``.

    It first announces its pid, then waits until ``folder/<plate>.go`` exists
    (the test's gate: a plate whose gate is closed is "still running"), then
    works for ``pause`` seconds. The marks file tells how often the work ran.
    """
    _announce(ctx)
    gate = Path(folder, f"{ctx.plate_id}.go")
    deadline = time.monotonic() + timeout
    while not gate.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate} never appeared")
        time.sleep(_TICK)
    time.sleep(pause)
    with open(Path(folder, f"{ctx.plate_id}.marks"), "a", encoding="utf-8") as marks:
        marks.write(f"{os.getpid()}\n")
    return {"plate": ctx.plate_id, "pid": os.getpid()}


def tick_until_cancelled(
    data: object, ctx: StepContext, directory: str, every: float = 0.05, timeout: float = 30.0
) -> object:
    """Append a line (the Unix time) to ``<directory>/<plate id>.ticks`` every ``every``
    seconds until cancelled: while the file grows, the plate's work is running."""
    _announce(ctx)
    path = Path(directory) / f"{ctx.plate_id}.ticks"
    deadline = time.monotonic() + timeout
    with path.open("a", encoding="utf-8") as marks:
        while time.monotonic() < deadline:
            ctx.check_cancelled()
            marks.write(f"{time.time():.6f}\n")
            marks.flush()
            time.sleep(every)
    raise TimeoutError("tick_until_cancelled was never cancelled")


def mark(data: object, ctx: StepContext, directory: str) -> object:
    """Append one line to ``<directory>/<plate id>``: a count of how often the plate ran."""
    with open(Path(directory) / ctx.plate_id, "a", encoding="utf-8") as out:
        out.write(f"ran in {os.getpid()}\n")
    return data
