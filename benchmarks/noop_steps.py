"""No-op pipeline steps for ``bench_e2e.py``, resolved by the server's worker processes.

The server allows this module with ``--allow noop_steps``; its workers import it because
the benchmark puts ``benchmarks/`` on the ``PYTHONPATH`` of the server it starts (the fork
server passes its ``sys.path`` on to every worker). Nothing here is part of the package.
"""

from __future__ import annotations

import time
from typing import Any


def noop(data: Any, ctx: Any) -> dict[str, Any]:
    """Do nothing; return the wall-clock time the step finished (``time.time()``).

    The host subtracts ``t`` from its own ``time.time()`` in ``on_plate_completed``: the
    latency from the worker's result to the host callback, across three processes on one
    machine (one clock).
    """
    return {"plate": ctx.plate_id, "t": time.time()}
