"""The local engine's ledger: what its workers did, on disk, for a host that restarts.

Theory of operation: a :class:`~plateflow.engines.local.LocalEngine` keeps its
state in its host's memory, which a crash takes with it; the worker
processes outlive the crash long enough to finish their current step. So
each worker writes down, per submission, that it *claimed* it (before the
step runs) and then its *outcome* (the terminal fact), and a new engine in a
new process reads that back. The layout::

    LEDGER/owner.json           {"token", "pid", "state"}: the engine that may start work here
    LEDGER/lock                 flock()ed by that engine while it lives
    LEDGER/runs/<key>.start     the claim: submission, pid and process start time of its worker
    LEDGER/runs/<key>.end       the outcome: the terminal fact, as the journal writes facts
    LEDGER/artifacts/<id>.json  a compiled pipeline's spec, so a new engine can execute it

``<key>`` is ``c-`` or ``x-`` (compile, execute) and a hash of the
submission id, so any id makes a safe file name; the record itself names the
submission. Every file is written whole to a temporary name first, then
moved into place: a reader sees all of a record or none of it. A claim and
an outcome are *linked* into place (``os.link`` fails if the name exists),
so the first writer wins and nobody overwrites a record by accident; only
the live owner replaces an outcome, to make it say what it told its host.
Nothing is fsynced: the ledger must survive its host process, not the
machine (after a power cut no worker is left running to wait for), and a
sync per record would cost milliseconds per submission.

Why a claim can be trusted to mean "never ran" when it is missing: a worker
claims, *then* reads ``owner.json``; an adopting engine rewrites
``owner.json``, *then* looks for claims. Of any two such sequences one sees
the other's write, so either the adopter sees the claim (and waits for that
worker's outcome), or the worker sees a new owner and gives its claim back
without running the step. The lock is how an engine tells a dead owner from
a live one: the kernel drops it when the owner dies, however it dies.

A worker of a dead host is named by its pid *and* its start time (from
``/proc``), so a pid the system has since given to another process is never
taken for it; where ``pidfd_open`` exists the engine then holds a descriptor
of that very process, to wait for its exit without polling and to signal it
without any race against pid reuse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import re
import select
import shutil
import signal
import threading
import time
from multiprocessing.connection import wait
from typing import Final, Literal

from pydantic import JsonValue

from plateflow.core.decoding import decode_object, validate_json
from plateflow.core.facts import Fact, fact_adapter
from plateflow.engines.base import (
    TERMINAL_FACTS,
    EngineError,
    Submission,
    cancelled_fact,
    failed_fact,
    submission_key,
)
from plateflow.errors import DecodeError, PlateflowError, UsageError
from plateflow.pipeline.run import fingerprint
from plateflow.pipeline.spec import PipelineSpec

__all__ = ["Claim", "Ledger", "LedgerError", "Orphan", "OwnerWatch", "process_start"]

_MAX_RECORD_BYTES: Final = 64 << 20
"""An outcome holds at most one result (16 MiB as JSON) and its envelope."""
_MAX_SMALL_BYTES: Final = 64 << 10
"""A claim or owner record is a few hundred bytes."""
_ARTIFACT_ID: Final = re.compile(r"[0-9a-f]{64}")
_MAX_SPEC_BYTES: Final = 16 << 20


class LedgerError(PlateflowError):
    """A ledger record cannot be read or written; the message says which and why."""


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """Who claimed a submission: the worker's pid, its start time, its engine's token."""

    plate_id: str
    pid: int
    pid_start: str | None
    token: str


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or None if it is not running.

    A zombie counts as not running. None too where there is no ``/proc``.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and ")", so split after the last one.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode("ascii")


def _write(path: str, data: bytes, *, exclusive: bool) -> bool:
    """Put ``data`` at ``path`` whole; with ``exclusive``, only if nothing is there (else False)."""
    tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as file:
            file.write(data)
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read(_MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LedgerError(f"cannot read {path}: {exc}") from exc


def _log_problem(message: str) -> None:
    logging.getLogger("plateflow.engines.local").warning("%s", message)


def _dump(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("ascii")


class Ledger:
    """One ledger directory, seen from an engine (the owner) or from one of its workers."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._runs = os.path.join(self.path, "runs")
        self._artifacts = os.path.join(self.path, "artifacts")
        self._owner = os.path.join(self.path, "owner.json")
        self._lock_fd = -1

    def __repr__(self) -> str:
        return f"<Ledger {self.path}>"

    @classmethod
    def adoptable(cls, identity: dict[str, JsonValue]) -> Ledger:
        """The ledger a local engine's ``identity`` names, if a new engine may take it over.

        Raises UsageError saying why not: another engine's identity, a missing
        directory, one that is no ledger, or one whose engine still lives.
        """
        path = identity.get("ledger_dir") if isinstance(identity, dict) else None
        if not isinstance(path, str) or not path or set(identity) != {"ledger_dir"}:
            raise UsageError(
                "cannot adopt: not a local engine's identity with a ledger (expected "
                f'{{"ledger_dir": "<path>"}}, got {json.dumps(identity, default=repr)[:200]})'
            )
        ledger = cls(path)
        if not os.path.isdir(ledger.path):
            raise UsageError(f"cannot adopt the ledger {ledger.path}: it is missing")
        if ledger.owner() is None:
            raise UsageError(f"cannot adopt {ledger.path}: it is not a ledger (no owner.json)")
        try:
            if not ledger.lock():
                raise UsageError(f"cannot adopt the ledger {ledger.path}: a live engine holds it")
        except OSError as exc:
            raise UsageError(f"cannot adopt the ledger {ledger.path}: {exc}") from exc
        ledger.unlock()  # the adopting engine takes it for good when it starts
        return ledger

    # --- the owning engine --------------------------------------------------------

    def open(self, token: str, *, adopting: bool) -> bool:
        """Become the ledger's owner (EngineError if another engine is); see :meth:`begin`."""
        try:
            if not adopting:
                os.makedirs(self.path, exist_ok=True)
            if not self.lock():
                raise EngineError(
                    f"the ledger {self.path} is in use by another engine (its lock is held)"
                )
            return self.begin(token, fresh=not adopting)
        except OSError as exc:
            self.unlock()
            raise EngineError(f"cannot use the ledger {self.path}: {exc}") from exc

    def lock(self) -> bool:
        """Take the owner's lock (held until :meth:`unlock` or death); False if taken."""
        fd = os.open(os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            os.close(fd)  # closing the only descriptor releases the flock

    def owner(self) -> dict[str, object] | None:
        """The owner record, or None if there is none (or it cannot be read)."""
        raw = _read(self._owner)
        if raw is None:
            return None
        try:
            return decode_object(raw, max_bytes=_MAX_SMALL_BYTES, what="ledger owner.json")
        except DecodeError:
            return None

    def begin(self, token: str, *, fresh: bool) -> bool:
        """Become the owner (holding the lock); ``fresh`` forgets every earlier record.

        Returns whether the ledger vouches for what it lacks: true for a
        fresh ledger and for one taken over from an owner that died, false
        for one whose owner closed it (and so removed its records).
        """
        closed = not fresh and (self.owner() or {}).get("state") == "closed"
        if fresh:
            for folder in (self._runs, self._artifacts):
                shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(self._runs, exist_ok=True)
        os.makedirs(self._artifacts, exist_ok=True)
        self._set_owner(token, "open")
        return not closed

    def end(self, token: str) -> None:
        """The owner closes normally: remove every record, say so, release the lock."""
        for folder in (self._runs, self._artifacts):
            shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            self._set_owner(token, "closed")
        self.unlock()

    def _set_owner(self, token: str, state: str) -> None:
        record = {"token": token, "pid": os.getpid(), "state": state, "at": time.time()}
        _write(self._owner, _dump(record), exclusive=False)

    # --- per submission -----------------------------------------------------------

    def _file(self, phase: Literal["compile", "execute"], submission_id: str, end: str) -> str:
        digest = hashlib.sha256(submission_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]
        return os.path.join(self._runs, f"{'c' if phase == 'compile' else 'x'}-{digest}.{end}")

    def claim(
        self, submission: Submission, token: str, pid_start: str | None
    ) -> Literal["claimed", "taken", "fenced"]:
        """A worker of engine ``token`` is about to start ``submission``.

        ``taken``: the ledger already has it (an earlier engine's). ``fenced``:
        another engine has taken the ledger over, so this worker's host is gone
        and the claim was given back: the step must not run.
        """
        record = {
            "phase": submission.phase,
            "submission_id": submission.submission_id,
            "plate_id": submission.plate_id,
            "pid": os.getpid(),
            "pid_start": pid_start,
            "token": token,
            "at": time.time(),
        }
        path = self._file(submission.phase, submission.submission_id, "start")
        if not _write(path, _dump(record), exclusive=True):
            return "taken"
        owner = self.owner()
        if owner is None or owner.get("token") != token:
            with contextlib.suppress(OSError):
                os.unlink(path)
            return "fenced"
        return "claimed"

    def claim_of(self, submission: Submission) -> Claim | None:
        """Who claimed ``submission``, or None if nobody did; LedgerError if unreadable."""
        path = self._file(submission.phase, submission.submission_id, "start")
        raw = _read(path)
        if raw is None:
            return None
        try:
            record = decode_object(raw, max_bytes=_MAX_SMALL_BYTES, what=path)
            pid, start, plate_id = record["pid"], record["pid_start"], record["plate_id"]
            if record["submission_id"] != submission.submission_id:
                raise ValueError(f"it names submission {record['submission_id']!r:.80}")
            if type(pid) is not int or pid < 1 or type(plate_id) is not str:
                raise ValueError("its pid or plate_id is not valid")
            if start is not None and type(start) is not str:
                raise ValueError("its pid_start is not text")
            return Claim(plate_id, pid, start, str(record["token"]))
        except (DecodeError, KeyError, ValueError) as exc:
            raise LedgerError(f"the claim {path} cannot be read: {exc}") from exc

    def record(self, fact: Fact, *, exclusive: bool) -> Fact:
        """Write a submission's terminal ``fact``; return the one the ledger now holds.

        ``exclusive``: only if it has none yet (a worker, or an engine settling an
        orphan); otherwise this fact replaces any earlier one (the live owner,
        making the ledger say what it told its host).
        """
        key = submission_key(fact)
        assert key is not None, fact
        assert isinstance(fact, TERMINAL_FACTS), fact
        path = self._file(key[0], key[1], "end")
        if _write(path, fact_adapter.dump_json(fact), exclusive=exclusive):
            return fact
        earlier = self.outcome(Submission("", key[0], key[1]))
        return fact if earlier is None else earlier

    def outcome(self, submission: Submission) -> Fact | None:
        """The terminal fact recorded for ``submission``, or None; LedgerError if unreadable."""
        path = self._file(submission.phase, submission.submission_id, "end")
        raw = _read(path)
        if raw is None:
            return None
        try:
            fact = validate_json(fact_adapter, raw, max_bytes=_MAX_RECORD_BYTES, what=path)
        except (DecodeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            raise LedgerError(f"the outcome {path} cannot be read: {exc}") from exc
        if submission_key(fact) != (submission.phase, submission.submission_id):
            raise LedgerError(f"the outcome {path} is about another submission")
        if not isinstance(fact, TERMINAL_FACTS):
            raise LedgerError(f"the outcome {path} is not a terminal fact: {type(fact).__name__}")
        return fact

    def look_up(self, submission: Submission) -> Fact | tuple[Claim, Orphan] | None:
        """Where ``submission`` is: its outcome, the claim and live worker running it, or None.

        None means no trace: it never started. A claim whose worker has ended
        without an outcome gets one now (failed, saying so), as does a record
        that cannot be read.
        """
        try:
            claim = self.claim_of(submission)
            fact = self.outcome(submission)
        except LedgerError as exc:
            return failed_fact(submission, f"the engine's ledger is unreadable: {exc}")
        if fact is not None or claim is None:
            return fact
        orphan = Orphan.find(claim.pid, claim.pid_start)
        if orphan is not None:
            return claim, orphan
        known = Submission(claim.plate_id, submission.phase, submission.submission_id)
        return self.settle(known, claim.pid, cancelled=False)

    def settle(self, submission: Submission, pid: int, *, cancelled: bool) -> Fact:
        """The outcome of a submission whose worker ``pid`` has ended, recorded.

        What the worker recorded, if it did; otherwise cancelled (we killed it)
        or failed (it died), recorded now unless the worker's record wins the race.
        """
        try:
            fact = self.outcome(submission)
            if fact is None:
                if cancelled:
                    fact = cancelled_fact(submission)
                else:
                    error = f"its worker (pid {pid}) ended without recording an outcome"
                    fact = failed_fact(submission, error)
                fact = self.record(fact, exclusive=True)
        except (OSError, LedgerError) as exc:
            return failed_fact(submission, f"the engine's ledger is unreadable: {exc}")
        return fact

    # --- compiled pipelines ---------------------------------------------------------

    def save_artifact(self, artifact_id: str, spec_json: str) -> None:
        path = os.path.join(self._artifacts, f"{artifact_id}.json")
        if not os.path.exists(path):
            _write(path, spec_json.encode("utf-8"), exclusive=True)

    def artifact(self, artifact_id: str) -> str | None:
        """The spec JSON saved for ``artifact_id``, if its fingerprint is that id; else None."""
        if not _ARTIFACT_ID.fullmatch(artifact_id):
            return None
        try:
            raw = _read(os.path.join(self._artifacts, f"{artifact_id}.json"))
            if raw is None or len(raw) > _MAX_SPEC_BYTES:
                return None
            spec_json = raw.decode("utf-8")
            if fingerprint(PipelineSpec.model_validate_json(spec_json)) != artifact_id:
                raise ValueError("its fingerprint differs")
        except (LedgerError, ValueError) as exc:  # UnicodeDecodeError, ValidationError
            _log_problem(f"the ledger's artifact {artifact_id} is unusable: {exc}")
            return None
        return spec_json


class OwnerWatch:
    """A worker's watch on its owner, the engine's process, from a thread of its own.

    Once the owner is gone the worker starts nothing new. Idle, it exits at
    once. Busy, it exits at once too, unless it has a ledger: then it finishes
    the step, records the outcome for whoever adopts the ledger, and exits.
    The parent's sentinel is a pipe whose other end only the engine's process
    holds (for ``forkserver`` too, whose children are the fork server's), so
    the kernel closes it however that process dies, SIGKILL included.
    """

    EXIT_CODE: Final = 70

    def __init__(self, *, finish_current: bool) -> None:
        self._lock = threading.Lock()
        self._busy = False
        self._gone = False
        self._finish_current = finish_current

    def start(self) -> None:
        parent = multiprocessing.parent_process()
        if parent is None:
            return
        sentinel = parent.sentinel

        def run() -> None:
            wait([sentinel])
            with self._lock:
                self._gone = True
                if self._busy and self._finish_current:
                    return  # end() exits once the outcome is recorded
                os._exit(self.EXIT_CODE)

        threading.Thread(target=run, name="plateflow-owner-watch", daemon=True).start()

    def begin(self) -> bool:
        """About to take a job: False if the owner is gone (then take none)."""
        with self._lock:
            self._busy = not self._gone
            return self._busy

    def end(self) -> None:
        """Done with a job: exit now if the owner went away meanwhile."""
        with self._lock:
            self._busy = False
            if self._gone:
                os._exit(self.EXIT_CODE)


@dataclasses.dataclass(eq=False, slots=True)
class Orphan:
    """A worker process whose engine died: watched, and stopped on request, by identity.

    ``fd`` is a pidfd of the very process (-1 where the system has none: then
    ``alive`` reads ``/proc`` and is polled). ``verified`` is false where the
    start time cannot be read (no ``/proc``): such a process is watched by
    pid alone and never signalled.
    """

    pid: int
    start: str | None
    fd: int = -1
    verified: bool = True

    @classmethod
    def find(cls, pid: int, start: str | None) -> Orphan | None:
        """The worker ``pid`` that started at ``start`` if it still runs, else None."""
        if start is None:  # recorded where /proc is missing: trust the pid, never signal it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return cls(pid, None, verified=False)
        fd = -1
        with contextlib.suppress(AttributeError, OSError):
            fd = os.pidfd_open(pid)
        # Read the start time *after* opening the pidfd: if it still matches, the
        # descriptor names the process that claimed the work, not a successor.
        if process_start(pid) != start:
            if fd >= 0:
                os.close(fd)
            return None
        return cls(pid, start, fd)

    def alive(self) -> bool:
        if self.fd >= 0:
            readable, _, _ = select.select([self.fd], [], [], 0)
            return not readable
        if not self.verified:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
            return True
        return process_start(self.pid) == self.start

    def kill(self) -> bool:
        """SIGKILL this process (never another that now has its pid); False if it cannot."""
        if self.fd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.fd, signal.SIGKILL)
            return True
        if not self.verified:
            return False
        if process_start(self.pid) == self.start:  # a narrow race remains without a pidfd
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        return True

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
