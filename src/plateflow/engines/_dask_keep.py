"""Keeping a Dask engine's submissions alive on the scheduler across its client's death.

Theory of operation: Dask keeps a task only while some client wants its key,
and the scheduler drops every want of a client the moment its connection
closes, so the work of a host that dies is cancelled with it. A published
dataset is a want that belongs to the scheduler instead (the publish extension
registers the dataset's keys under a pseudo-client named after the dataset), so
it outlives every client, and any other client can fetch it, futures included.

The engine keeps each submission published for exactly as long as it holds the
submission's future, and the publish is awaited before the submission is
acknowledged: whatever a host was told was accepted can be found again. The
submissions go into *slots*, datasets named ``<namespace>/<8 hex>`` holding up
to ``slot_size`` submissions each, republished whole when one changes. Not one
dataset per submission, because the scheduler never removes the pseudo-client
of a dataset name, even once unpublished (about 0.6 KB each): slots are reused,
so an engine leaves one such name per ``slot_size`` submissions it kept at once.

Republishing has one trap: the scheduler releases a dataset's old keys before
it takes its new ones, so a key that only the slot wants and that stays in it
would be forgotten in between. Hence the rule: every key in a slot is also
wanted by this client, whose futures are released only after the round that
removed them from their slots. (A taken-over slot's futures are ours as soon
as they are fetched.) All the traffic goes through one task, one round at a
time, each round carrying every change queued since the last, so the scheduler
sees each slot's states in order. Keeping alive is best effort: a request that
fails is logged and wakes the engine's liveness check; it never fails a submission.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from distributed import futures_of
from distributed.publish import PublishExtension
from pydantic import JsonValue

from plateflow.errors import UsageError

__all__ = ["Keeper", "Kept", "adoptable", "identity", "running", "supported", "task_key"]

_log = logging.getLogger("plateflow.engines.dask")
_futures_of: Any = futures_of  # not annotated in distributed

_NAMESPACE: Final = re.compile(r"plateflow-[0-9a-f]{12}")
"""What an engine's namespace (its event topic, and the prefix of its datasets) looks like."""

_Phase = Literal["compile", "execute"]


def supported() -> bool:
    """Whether this distributed can keep work alive safely.

    Before its publish extension was overhauled (dask/distributed#9217, in
    2026), republishing a dataset with ``override=True`` left the keys it no
    longer named wanted for ever, and several datasets could not be published
    or fetched in one request. With such a version nothing is kept: work does
    not outlive the host (and ``identity()`` says so).
    """
    return "names" in inspect.signature(PublishExtension.put).parameters


def task_key(phase: _Phase, submission_id: str, plate_id: str) -> tuple[str, str, str]:
    """The Dask key of a submission: the batch's id names the batch, the plate its plate."""
    return (f"plateflow-{phase}", submission_id, plate_id)


def identity(address: str | None, namespace: str, survives: bool) -> dict[str, JsonValue]:
    return {"engine": "dask", "scheduler": address, "namespace": namespace, "survives": survives}


def adoptable(found: object, address: str | None) -> str | None:
    """The namespace to take over from an engine identity, or None if nothing outlived it.

    ``address`` is the adopting engine's scheduler (None: it starts its own
    LocalCluster). Raises :class:`UsageError` when the identity is not a dask
    engine's, or names work on another scheduler.
    """
    if not isinstance(found, dict) or found.get("engine") != "dask":
        raise UsageError(f"not the identity of a dask engine: {found!r:.200}")
    namespace = found.get("namespace")
    if not isinstance(namespace, str) or _NAMESPACE.fullmatch(namespace) is None:
        raise UsageError(f"a dask engine identity with no valid namespace: {namespace!r:.80}")
    if found.get("survives") is not True:
        return None  # its LocalCluster died with it
    scheduler = found.get("scheduler")
    where = f"the work to adopt is on the dask scheduler {scheduler!r:.200}"
    if address is None:
        raise UsageError(
            f"{where}, but this engine would start a LocalCluster of its own: "
            "give DaskEngine that scheduler's address"
        )
    if not isinstance(scheduler, str) or _normal(scheduler) != _normal(address):
        raise UsageError(f"{where}, not on this engine's {address}")
    return namespace


def _normal(address: str) -> str:
    address = address.strip()
    return address if "://" in address else f"tcp://{address}"


async def running(
    client: Any, ask: Callable[..., Any], execution_ids: list[str], timeout: float
) -> dict[str, tuple[str, int | None]]:
    """Execution id -> (worker, pid) of those running: ``ask`` runs on every worker.

    Nothing is known to run when the workers cannot be asked; an execution
    found so still says "started" when it starts, or has already.
    """
    if not execution_ids:
        return {}
    try:
        answers = await asyncio.wait_for(client.run(ask, execution_ids, on_error="ignore"), timeout)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        _log.warning("dask engine: cannot ask the workers what runs: %s", exc)
        return {}
    found: dict[str, tuple[str, int | None]] = {}
    for answer in answers.values() if isinstance(answers, dict) else ():
        for sid, where in answer.items() if isinstance(answer, dict) else ():
            if isinstance(where, (list, tuple)) and len(where) == 2:
                pid = where[1] if isinstance(where[1], int) else None
                found[str(sid)] = (str(where[0]), pid)
    return found


@dataclass(frozen=True, slots=True)
class Kept:
    """A submission found published: its future (now bound to this client), plate, artifact."""

    future: Any
    plate_id: str
    artifact: str | None
    """For an execution: the artifact id (compile fingerprint) it runs."""


class Keeper:
    """Keeps one engine's submissions published, in slots of up to ``slot_size``.

    Used on the client's event loop only. ``enabled`` is false for an engine
    that owns its cluster: nothing can outlive that, so nothing is published
    and a future to let go is released at once.
    """

    def __init__(
        self,
        client: Any,
        namespace: str,
        *,
        enabled: bool,
        timeout: float,
        on_trouble: Callable[[], None],
        slot_size: int = 32,
    ) -> None:
        self._client = client
        self.namespace = namespace
        self.enabled = enabled
        self._timeout = timeout
        self._on_trouble = on_trouble
        self._slot_size = slot_size
        self._slots: dict[str, dict[str, Any]] = {}
        """Slot name -> its entries ("phase/submission id" -> what is published for it)."""
        self._slot_of: dict[str, str] = {}
        self._room: dict[str, None] = {}
        """Slots with room for one more entry (an ordered set)."""
        self._dirty: set[str] = set()
        self._release: list[Any] = []
        """Futures to release once the slots without them have been sent."""
        self._sent: asyncio.Future[None] | None = None
        self._worker: asyncio.Task[None] | None = None

    # --- keeping and letting go --------------------------------------------------------

    async def keep(
        self, phase: _Phase, submission_id: str, future: Any, artifact: str | None = None
    ) -> None:
        """Publish one submission; returns once the scheduler has it (or the attempt failed)."""
        if not self.enabled:
            return
        entry = f"{phase}/{submission_id}"
        slot = next(iter(self._room), None)
        if slot is None:
            slot = f"{self.namespace}/{uuid.uuid4().hex[:8]}"
            self._slots[slot] = {}
            self._room[slot] = None
        entries = self._slots[slot]
        entries[entry] = {"future": future, "artifact": artifact}
        self._slot_of[entry] = slot
        if len(entries) >= self._slot_size:
            del self._room[slot]
        self._dirty.add(slot)
        await asyncio.shield(self._next_round())

    def drop(
        self, submissions: Iterable[tuple[_Phase, str]], release: Iterable[Any] = ()
    ) -> asyncio.Future[None]:
        """Stop keeping these; release ``release`` once that reached the scheduler.

        The returned future is done when the round that sent it is over. Until
        then the futures stay ours: a slot republished while it still names a
        key that only the slot wants would have the scheduler forget that key
        (it releases a slot's old keys before it takes the new ones).
        """
        if not self.enabled:
            for future in release:
                future.release()
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        for phase, sid in submissions:
            slot = self._slot_of.pop(f"{phase}/{sid}", None)
            if slot is not None:
                del self._slots[slot][f"{phase}/{sid}"]
                self._room[slot] = None
                self._dirty.add(slot)
        self._release.extend(release)
        return self._next_round()

    async def settled(self) -> None:
        """Wait until everything queued so far has been sent."""
        worker = self._worker
        if worker is not None:
            await asyncio.shield(worker)

    async def clear(self) -> None:
        """Unpublish every slot of the namespace, this engine's or left by a crashed one."""
        if not self.enabled:
            return
        await self.settled()
        try:
            names = await self._listed()
        except Exception as exc:
            _log.warning("dask engine: cannot list what %s published: %s", self.namespace, exc)
            return
        self._slots.clear()
        self._slot_of.clear()
        self._room.clear()
        if names:
            await self._request(self._client.unpublish_dataset(names), f"unpublish {len(names)}")

    def _next_round(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        if self._sent is None:
            self._sent = loop.create_future()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._send_all(), name="plateflow-dask-keeper")
        return self._sent

    async def _send_all(self) -> None:
        # One round at a time, each with every change queued since the last: the
        # scheduler sees each slot's states in order.
        while True:
            dirty, release, sent = self._dirty, self._release, self._sent
            self._dirty, self._release, self._sent = set(), [], None
            if not dirty and not release:
                if sent is not None and not sent.done():
                    sent.set_result(None)
                return
            # An empty slot is unpublished but kept for reuse: the scheduler never forgets
            # a dataset name (a pseudo-client per name stays in Scheduler.clients).
            puts = {n: dict(self._slots[n]) for n in sorted(dirty) if self._slots.get(n)}
            gone = [n for n in sorted(dirty) if n in self._slots and not self._slots[n]]
            if puts:
                count = sum(len(entries) for entries in puts.values())
                await self._request(
                    self._client.publish_dataset(puts, override=True), f"publish {count}"
                )
            if gone:
                await self._request(self._client.unpublish_dataset(gone), f"unpublish {len(gone)}")
            for future in release:
                future.release()
            if sent is not None and not sent.done():
                sent.set_result(None)

    async def _request(self, awaitable: Any, what: str) -> None:
        try:
            await asyncio.wait_for(awaitable, self._timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.warning("dask engine: %s (datasets of %s) failed: %s", what, self.namespace, exc)
            self._on_trouble()

    # --- finding again -----------------------------------------------------------------

    async def _listed(self) -> list[str]:
        names = await asyncio.wait_for(self._client.list_datasets(), self._timeout)
        prefix = f"{self.namespace}/"
        return [n for n in names if isinstance(n, str) and n.startswith(prefix)]

    async def recover(self, timeout: float) -> dict[tuple[_Phase, str], Kept]:
        """Take over every slot of the namespace: what it keeps, by (phase, submission id).

        The futures now belong to this client, and the slots to this keeper.
        Whatever is not what this module publishes (damaged, or someone else's)
        is let go.
        """
        if not self.enabled:
            return {}
        names = await self._listed()
        values = await asyncio.wait_for(
            self._client.get_dataset(names, default=None) if names else _nothing(), timeout
        )
        found: dict[tuple[_Phase, str], Kept] = {}
        junk: list[Any] = []
        for name, value in zip(names, values, strict=True):
            entries = self._slots.setdefault(name, {})
            items = list(value.items()) if isinstance(value, Mapping) else []
            for entry, item in items:
                if entry in self._slot_of:
                    continue  # this engine's own: kept already
                kept = _kept(entry, item)
                if kept is None:
                    junk.extend(_futures_of(item))
                    continue
                entries[entry] = item
                self._slot_of[entry] = name
                found[_split(entry)] = kept
            if len(entries) < self._slot_size:
                self._room[name] = None
            if not entries or any(e not in entries for e, _ in items):
                self._dirty.add(name)  # republished without what is not ours, or unpublished
        if junk or self._dirty:
            self.drop((), junk)
        return found


async def _nothing() -> list[Any]:
    return []


def _split(entry: str) -> tuple[_Phase, str]:
    phase, _, sid = entry.partition("/")
    return ("compile" if phase == "compile" else "execute", sid)


def _kept(entry: object, item: object) -> Kept | None:
    if not isinstance(entry, str) or not isinstance(item, Mapping):
        return None
    phase, _, sid = entry.partition("/")
    if phase not in ("compile", "execute") or not sid:
        return None
    future, artifact = item.get("future"), item.get("artifact")
    key = getattr(future, "key", None)
    if not isinstance(key, tuple) or len(key) != 3 or not isinstance(key[2], str):
        return None
    if key != task_key(_split(entry)[0], sid, key[2]):
        return None
    if artifact is not None and not isinstance(artifact, str):
        return None
    return Kept(future, key[2], artifact)
