"""The ``plateflow`` command (placeholder until the CLI issue lands)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("plateflow", file=sys.stderr)
    return 0
