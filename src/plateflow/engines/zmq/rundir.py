"""Where an embedded server lives: a private runtime directory and its files.

Theory of operation: a server and its clients on one machine find each other
through a directory only the user can enter (0700). The server binds IPC
sockets there, writes ``server.json`` (its endpoints and id) once it is
listening, keeps ``token`` (needed to shut it down) readable only by the
user, and holds ``server.lock`` for as long as it lives, so a client can tell
a live server from a stale ``server.json`` left by a crashed one. Clients
that start a server take ``start.lock`` first, so two clients never start
two servers.

Layout::

    <dir>/control.sock   ROUTER (requests)           ipc://<dir>/control.sock
    <dir>/events.sock    PUB (facts, heartbeats)     ipc://<dir>/events.sock
    <dir>/server.json    {"server_id", "pid", "control", "events", "protocol",
                          "heartbeat_interval", "started_at"}
    <dir>/token          the shutdown token (0600)
    <dir>/server.lock    flock held by the live server
    <dir>/start.lock     flock held by a client while it starts a server

Servers live in many runtime dirs (a batch file may choose its own), so each
one also *registers* while it runs: ``<default runtime dir>/servers/<server
id>.json`` names its runtime dir and pid, and is removed when it stops.
:func:`registered` lists the live ones, skipping (and removing) the records
of servers that died without cleaning up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from plateflow.core.decoding import decode_object
from plateflow.errors import DecodeError, UsageError

__all__ = [
    "Registration",
    "ServerRecord",
    "default_runtime_dir",
    "ensure_private_dir",
    "exclusive_lock",
    "read_record",
    "read_token",
    "register",
    "registered",
    "server_alive",
    "unregister",
    "write_private",
    "write_record",
]

_log = logging.getLogger(__name__)

ENV_VAR = "PLATEFLOW_RUNTIME_DIR"
_MAX_RECORD_BYTES = 64 * 1024
"""``server.json`` is a few hundred bytes; anything far larger is not ours."""


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """What ``server.json`` says about a running server."""

    server_id: str
    pid: int
    control: str
    events: str
    protocol: int
    heartbeat_interval: float
    started_at: float
    workers: int | None = None
    """How many submissions the server runs at once (None: a record that does not say)."""


def default_runtime_dir() -> Path:
    """``$PLATEFLOW_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/plateflow``, else a per-user temp dir."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "plateflow"
    return Path(tempfile.gettempdir()) / f"plateflow-{os.getuid()}"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` as 0700, or check an existing one is ours and private."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"runtime dir {path} is not a plain directory")
    if info.st_uid != os.getuid():
        raise UsageError(f"runtime dir {path} belongs to another user (uid {info.st_uid})")
    if info.st_mode & 0o077:
        raise UsageError(
            f"runtime dir {path} is accessible to other users (mode {info.st_mode & 0o777:o}); "
            "make it 0700 or choose another"
        )
    return path


def write_private(path: Path, text: str) -> None:
    """Write a file atomically, readable only by the user."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.replace(tmp, path)


def write_record(directory: Path, record: ServerRecord) -> None:
    write_private(directory / "server.json", json.dumps(asdict(record)))


def read_record(directory: Path) -> ServerRecord | None:
    """The server record, or None when there is none or it cannot be read."""
    try:
        raw = decode_object(
            (directory / "server.json").read_bytes(),
            max_bytes=_MAX_RECORD_BYTES,
            what="server.json",
        )
        return ServerRecord(**raw)
    except (OSError, DecodeError, TypeError):
        return None


def read_token(directory: Path) -> str:
    return (directory / "token").read_text(encoding="utf-8").strip()


def server_alive(directory: Path) -> bool:
    """True while some process holds ``server.lock`` (a live server)."""
    path = directory / "server.lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: Path, *, blocking: bool = True) -> Iterator[int]:
    """Hold an exclusive flock on ``path`` (created 0600) for the ``with`` block.

    With ``blocking=False`` raises ``BlockingIOError`` when someone else holds it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield fd
    finally:
        os.close(fd)  # closing releases the lock


# --- the registry of running servers ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Registration:
    """A running server, as its registry record names it."""

    server_id: str
    pid: int
    runtime_dir: str
    started_at: float
    owned: bool = False
    """Whether it exits once no client holds a lease (a server a client started)."""


def registry_dir() -> Path:
    """Where servers register: ``servers/`` in the default runtime dir."""
    return default_runtime_dir() / "servers"


def register(record: ServerRecord, directory: Path, *, owned: bool) -> Path | None:
    """Register a listening server; the path to remove at exit, or None if it could not be.

    Registering is a courtesy to ``plateflow status``: a failure is logged and
    changes nothing else.
    """
    entry = Registration(
        server_id=record.server_id,
        pid=record.pid,
        runtime_dir=str(directory),
        started_at=record.started_at,
        owned=owned,
    )
    try:
        ensure_private_dir(default_runtime_dir())
        where = ensure_private_dir(registry_dir())
        path = where / f"{record.server_id}.json"
        write_private(path, json.dumps(asdict(entry)))
    except (OSError, UsageError) as exc:
        _log.warning("could not register the server for `plateflow status`: %s", exc)
        return None
    return path


def unregister(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's: the runtime dir check below decides
    return True


def registered() -> list[Registration]:
    """The registered servers still running, oldest first; stale records are removed.

    A record is stale when its pid is gone, or its runtime dir no longer has a
    live server with that id (a pid can be reused).
    """
    where = registry_dir()
    try:
        paths = sorted(where.glob("*.json"))
    except OSError:
        return []
    found: list[Registration] = []
    for path in paths:
        try:
            raw = decode_object(path.read_bytes(), max_bytes=_MAX_RECORD_BYTES, what=path.name)
            entry = Registration(**raw)
        except (OSError, DecodeError, TypeError):
            continue  # being written, or not ours: leave it alone
        directory = Path(entry.runtime_dir)
        try:
            record = read_record(directory)
            live = (
                _pid_alive(entry.pid)
                and server_alive(directory)
                and record is not None
                and record.server_id == entry.server_id
            )
        except OSError:
            live = False
        if not live:
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        found.append(entry)
    found.sort(key=lambda entry: entry.started_at)
    return found
