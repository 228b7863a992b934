"""Finding, waiting for and killing the processes a test started (Linux /proc)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Running (a zombie is not: it only waits for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (its workers, their fork server...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def server_pids(directory: Path) -> list[int]:
    """Live ``plateflow serve`` processes whose runtime dir is ``directory``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                args = handle.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "serve" in args and "--runtime-dir" in args:
            where = args[args.index("--runtime-dir") + 1 :][:1]
            if where == [str(directory)] and pid_alive(int(entry)):
                found.append(int(entry))
    return found


def kill_quietly(pids: Iterable[int]) -> None:
    """SIGKILL each (after a SIGCONT, in case it is stopped); gone ones are no error."""
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def still_alive_after(pids: Iterable[int], seconds: float) -> set[int]:
    """The pids still alive after waiting up to ``seconds`` for them all to end."""
    deadline = time.monotonic() + seconds
    while (alive := {p for p in pids if pid_alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive
