"""Talking to a server without an engine: one request, one reply, for tools.

Theory of operation: ``plateflow status`` and ``plateflow stop`` (and scripts)
only look at a server or tell it to go; they submit nothing, so they take no
lease and start no I/O thread. Each call opens one DEALER, sends one request,
waits for its reply with a deadline and closes the socket again.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from pathlib import Path
from typing import Final

import zmq
from pydantic import BaseModel, JsonValue

from plateflow.engines.base import EngineError
from plateflow.engines.zmq import rundir
from plateflow.engines.zmq.rundir import Registration, ServerRecord
from plateflow.engines.zmq.wire import (
    PROTOCOL_VERSION,
    Reply,
    ServerInfoRequest,
    ShutdownRequest,
    WireError,
    decode_reply,
    encode,
)

__all__ = ["ask_info", "call", "find_server", "list_servers", "stop_server"]

_MAX_REPLY_BYTES: Final = 64 << 20
_ids = itertools.count(1)
_client = uuid.uuid4().hex[:8]


def _new_id() -> str:
    return f"tool-{_client}-{next(_ids)}"


def find_server(runtime_dir: Path | None = None) -> ServerRecord | None:
    """The record of the live server in ``runtime_dir`` (default: the default one), or None.

    Looks only: creates nothing, not even the directory.
    """
    directory = Path(runtime_dir) if runtime_dir is not None else rundir.default_runtime_dir()
    try:
        if not rundir.server_alive(directory):
            return None
    except OSError:
        return None
    return rundir.read_record(directory)


def call(record: ServerRecord, request: BaseModel, *, timeout: float = 5.0) -> Reply:
    """Send one request to the server of ``record``; its reply, or :class:`EngineError`."""
    if record.protocol != PROTOCOL_VERSION:
        raise EngineError(
            f"the plateflow server {record.server_id} speaks protocol {record.protocol}; "
            f"this client speaks {PROTOCOL_VERSION}"
        )
    rid = getattr(request, "id", None)
    context = zmq.Context()
    try:
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(record.control)
            dealer.send(encode(request), zmq.NOBLOCK)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if not dealer.poll(max(1, int(left * 1000)), zmq.POLLIN):
                    break
                try:
                    reply = decode_reply(dealer.recv_multipart()[-1], max_bytes=_MAX_REPLY_BYTES)
                except WireError:
                    continue
                if reply.id == rid:
                    return reply
        except zmq.ZMQError as exc:
            raise EngineError(f"cannot talk to the server at {record.control}: {exc}") from exc
        finally:
            dealer.close(linger=0)
    finally:
        context.term()
    raise EngineError(
        f"the plateflow server {record.server_id} (pid {record.pid}) did not answer "
        f"within {timeout:g} s"
    )


def ask_info(record: ServerRecord, *, timeout: float = 5.0) -> dict[str, JsonValue]:
    """The server's ``server_info`` answer."""
    reply = call(record, ServerInfoRequest(id=_new_id()), timeout=timeout)
    if not reply.ok or not isinstance(reply.result, dict):
        raise EngineError(f"the plateflow server refused server_info: {reply.error}")
    return dict(reply.result)


def stop_server(runtime_dir: Path | None = None, *, timeout: float = 15.0) -> ServerRecord | None:
    """Stop the server in ``runtime_dir`` with its token and wait until it is gone.

    Returns the stopped server's record, or None when none was running there.
    Raises :class:`EngineError` when it refuses or is still alive after ``timeout``.
    The server stops as for any shutdown: its clients report their work lost.
    """
    directory = Path(runtime_dir) if runtime_dir is not None else rundir.default_runtime_dir()
    record = find_server(directory)
    if record is None:
        return None
    try:
        token = rundir.read_token(directory)
    except OSError as exc:
        raise EngineError(f"cannot read the server's token in {directory}: {exc}") from exc
    deadline = time.monotonic() + timeout
    reply = call(record, ShutdownRequest(id=_new_id(), token=token), timeout=timeout)
    if not reply.ok:
        raise EngineError(f"the plateflow server refused to stop: {reply.error}")
    while rundir.server_alive(directory) or _alive(record.pid):
        if time.monotonic() > deadline:
            raise EngineError(
                f"the plateflow server {record.server_id} (pid {record.pid}) was asked to "
                f"stop but is still running after {timeout:g} s"
            )
        time.sleep(0.02)
    return record


def list_servers() -> list[Registration]:
    """Every registered server still running, wherever its runtime dir is."""
    return rundir.registered()


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie does not: its parent has yet to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
