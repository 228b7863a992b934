"""What every benchmark here reports the same way: the machine, the commit, the log line."""

from __future__ import annotations

import cProfile
import os
import platform
import pstats
import re
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(message: str = "") -> None:
    """The readable table goes to stderr; stdout keeps only the final JSON line."""
    print(message, file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return []


def machine_info(**extra: Any) -> dict[str, Any]:
    """CPU, Python and platform, the load average now, and what the caller adds."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "loadavg_1_5_15_at_end": loadavg(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "arch": platform.machine(),
        **extra,
    }


def source_info(watched: str, dirty_key: str) -> dict[str, Any]:
    """The commit measured, and whether ``watched`` had uncommitted changes (others edit it)."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip()

    dirty = bool(git("status", "--porcelain", "--", watched))
    return {"commit": git("rev-parse", "--short", "HEAD"), dirty_key: dirty}


_STDLIB = re.compile(r"python3\.\d+/")


def profile_entries(
    profiler: cProfile.Profile, per: float
) -> list[tuple[str, float, float, float]]:
    """Every profiled function as (``path:line(name)``, calls, own µs, cumulative µs), each
    divided by ``per`` (plates or facts); paths are cut after site-packages/, src/ or the
    standard library's python3.X/."""
    stats = pstats.Stats(profiler)
    entries = []
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = filename
        for marker in ("site-packages/", "src/"):
            if marker in filename:
                where = filename.split(marker, 1)[1]
                break
        else:
            stdlib = _STDLIB.search(filename)
            if stdlib is not None:
                where = filename[stdlib.end() :]
        entries.append(
            (f"{where}:{line}({func})", ncalls / per, tottime * 1e6 / per, cumtime * 1e6 / per)
        )
    return entries
