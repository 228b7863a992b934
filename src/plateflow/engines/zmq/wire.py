"""The wire protocol of the embedded execution server: JSON, validated, versioned.

Theory of operation: every frame on every socket is one JSON document that
pydantic validates against a discriminated union *before* anything acts on
it; nothing is ever unpickled. Every message carries the protocol version
``v``; a peer refuses a version it does not speak instead of guessing.

Sockets:

- **control** — the server binds a ROUTER, clients connect DEALERs. A client
  sends one frame, a :data:`Request`; the server answers with one frame, a
  :class:`Reply` carrying the request's ``id`` (the correlation id). A
  malformed, oversized, unknown-type or wrong-version request gets an
  ``ok=false`` reply naming what was wrong, and changes nothing.
- **events** — the server binds a PUB, clients connect SUBs. Every
  :class:`Event` carries the server's id (new on every server start) and a
  sequence number that increases by one per event, so a client detects a
  gap or a restarted server and reconciles with one ``status`` request.
  Heartbeats are events too, so a client notices a dead or frozen server
  within a bounded time. The last event of a server is :class:`StoppingEvent`,
  with the reason: its clients' work is lost, not cancelled.

Every frame is decoded by :mod:`plateflow.core.decoding`, which bounds its
size, nesting and integers and insists on strict UTF-8, so a decoded string
can always be encoded again (into a reply, a log, a journal).

Who may cancel: a ``compile`` or ``execute`` request carries the client's
``session``, a secret the client chose; a ``cancel`` is carried out only for
the session that submitted, or with the server's token.

Who still wants the work: a session holds a *lease* on the server, renewed by
``lease`` requests that also say how soon that client gives the server up
(its heartbeat timeout). A session whose lease lapses, whose client has
given the server up, or which sends ``release``, has its unfinished work
stopped; a server started for a client exits once nobody holds a lease.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from plateflow.core.decoding import decode_object, first_error, try_validate_json
from plateflow.core.facts import Fact
from plateflow.errors import DecodeError
from plateflow.jobs import MAX_PLATE_ID_LENGTH, CompileJob

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "CancelRequest",
    "CompileRequest",
    "Event",
    "ExecuteRequest",
    "FactEvent",
    "HeartbeatEvent",
    "LeaseRequest",
    "PingRequest",
    "ReleaseRequest",
    "Reply",
    "Request",
    "ServerInfoRequest",
    "ShutdownRequest",
    "StatusRequest",
    "StoppingEvent",
    "WireError",
    "WireSubmission",
    "decode_event",
    "decode_reply",
    "decode_request",
    "encode",
]

PROTOCOL_VERSION: Final = 3
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
"""Frames larger than this (1 MiB) are refused before they are parsed."""
MAX_ID_LENGTH: Final = MAX_PLATE_ID_LENGTH
"""Plate ids, submission ids and artifact ids on the wire: at most this many characters."""
MAX_REQUEST_ID_LENGTH: Final = 128
"""A request's ``id`` (the correlation id): at most this many characters."""
MAX_REASON_LENGTH: Final = 2_000
"""A :class:`StoppingEvent`'s reason is cut to this many characters."""
MAX_SECONDS: Final = 86_400.0 * 365
"""A duration on the wire (a loss timeout): at most a year."""


_FROM_WIRE: Final[dict[str, bool]] = {"wire": True}
"""The validation context of a decoded frame (compared by identity)."""


class WireError(DecodeError):
    """A frame that is not a valid message; the text says what was wrong, and where.

    ``request_id`` is the id of a request whose ``id`` could still be read, so
    that the error reply can carry it (None: the reply's ``id`` is null).
    """

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__("frame", message)
        self.args = (message,)
        self.request_id = request_id


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    v: Literal[3] = PROTOCOL_VERSION

    @model_validator(mode="before")
    @classmethod
    def _version_on_the_wire(cls, data: Any, info: ValidationInfo) -> Any:
        """Decoding a frame, ``v`` must be there and be the integer 3 (not 3.0).

        Built in code, a message may leave ``v`` to its default.
        """
        if info.context is _FROM_WIRE and isinstance(data, dict):
            version = data.get("v")
            if type(version) is not int or version != PROTOCOL_VERSION:
                raise ValueError(f"protocol version {version!r} is not supported")
        return data


class WireSubmission(BaseModel):
    """One submission, as the wire names it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    plate_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    phase: Literal["compile", "execute"]
    submission_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)


# --- requests (client -> server, on the control socket) -------------------------------


class _Request(_Message):
    id: str = Field(min_length=1, max_length=MAX_REQUEST_ID_LENGTH)
    """The correlation id; the reply carries it back."""


class PingRequest(_Request):
    type: Literal["ping"] = "ping"


Session = Annotated[str, Field(min_length=16, max_length=128)]
"""A client's secret for its submissions: who may cancel them (random, >= 96 bits)."""
_Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]


def _fits_the_wire(job: CompileJob) -> CompileJob:
    if len(job.plate_id) > MAX_ID_LENGTH:
        raise ValueError(
            f"plate_id of {len(job.plate_id)} characters; the limit is {MAX_ID_LENGTH}"
        )
    return job


_Job = Annotated[CompileJob, AfterValidator(_fits_the_wire)]
"""A :class:`CompileJob` whose plate id fits the wire."""


class CompileRequest(_Request):
    type: Literal["compile"] = "compile"
    session: Session
    job_id: _Id
    job: _Job


class ExecuteRequest(_Request):
    type: Literal["execute"] = "execute"
    session: Session
    execution_id: _Id
    job: _Job
    artifact_id: _Id


class StatusRequest(_Request):
    type: Literal["status"] = "status"
    submissions: tuple[WireSubmission, ...] = Field(max_length=100_000)


class CancelRequest(_Request):
    """Cancel one submission: for the session that submitted it, or with the server's token."""

    type: Literal["cancel"] = "cancel"
    submission: WireSubmission
    session: Session | None = None
    token: str | None = Field(default=None, min_length=1, max_length=256)


class LeaseRequest(_Request):
    """Take or renew the session's lease; ``loss_timeout`` is how long this client waits
    for an event before it reports the server lost (and with it the session's work)."""

    type: Literal["lease"] = "lease"
    session: Session
    loss_timeout: float = Field(gt=0, le=MAX_SECONDS)


class ReleaseRequest(_Request):
    """Give the session's lease back: its unfinished submissions are stopped.

    ``lost``: the client has already reported that work lost (it gave the server
    up), so it ends ``*_failed`` rather than ``*_cancelled``.
    """

    type: Literal["release"] = "release"
    session: Session
    lost: bool = False


class ServerInfoRequest(_Request):
    type: Literal["server_info"] = "server_info"


class ShutdownRequest(_Request):
    type: Literal["shutdown"] = "shutdown"
    token: str = Field(min_length=1, max_length=256)


Request = Annotated[
    PingRequest
    | CompileRequest
    | ExecuteRequest
    | StatusRequest
    | CancelRequest
    | LeaseRequest
    | ReleaseRequest
    | ServerInfoRequest
    | ShutdownRequest,
    Field(discriminator="type"),
]


# --- replies (server -> client, on the control socket) ----------------------------------


class Reply(_Message):
    """The answer to one request. ``ok=false`` replies carry ``error``; nothing changed."""

    type: Literal["reply"] = "reply"
    id: str | None
    ok: bool
    error: str = ""
    result: JsonValue = None
    facts: tuple[Fact, ...] = ()
    """For ``status``: where each submission is now, as facts."""


# --- events (server -> clients, on the PUB socket) ---------------------------------------


class _Event(_Message):
    server_id: str = Field(min_length=1, max_length=128)
    seq: int = Field(ge=0)


class FactEvent(_Event):
    type: Literal["fact"] = "fact"
    fact: Fact


class HeartbeatEvent(_Event):
    type: Literal["heartbeat"] = "heartbeat"
    interval: float = Field(gt=0)


class StoppingEvent(_Event):
    """The server's last event: it is going away, and the work it still had is lost."""

    type: Literal["stopping"] = "stopping"
    reason: str = Field(max_length=MAX_REASON_LENGTH)


Event = Annotated[FactEvent | HeartbeatEvent | StoppingEvent, Field(discriminator="type")]

_REQUEST: TypeAdapter[Request] = TypeAdapter(Request)
_EVENT: TypeAdapter[Event] = TypeAdapter(Event)
_REPLY: TypeAdapter[Reply] = TypeAdapter(Reply)
_M = TypeVar("_M")


def encode(message: BaseModel) -> bytes:
    """One message as the bytes of one frame."""
    return message.model_dump_json().encode("utf-8")


def _object(frame: bytes, max_bytes: int) -> dict[str, Any]:
    try:
        return decode_object(frame, max_bytes=max_bytes, what="frame")
    except DecodeError as exc:
        raise WireError(exc.reason) from None


def _fast(adapter: TypeAdapter[_M], frame: bytes, max_bytes: int) -> _M | None:
    """The common case in one pass (pydantic parses the JSON); None means look closer.

    The slow path below decodes with :mod:`plateflow.core.decoding` first, so
    that what is wrong with a bad frame can be said precisely; a good frame
    never needs it.
    """
    if len(frame) > max_bytes:
        raise WireError(f"message of {len(frame)} bytes exceeds the limit of {max_bytes}")
    return try_validate_json(adapter, frame, context=_FROM_WIRE)


def _request_id(raw: dict[str, Any]) -> str | None:
    """The ``id`` of a decoded request, if it is a valid one; None (a null reply id) if not."""
    value = raw.get("id")
    if isinstance(value, str) and 1 <= len(value) <= MAX_REQUEST_ID_LENGTH:
        return value
    return None


def decode_request(frame: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Request:
    """Validate one control frame; raise :class:`WireError` saying what is wrong."""
    request = _fast(_REQUEST, frame, max_bytes)
    if request is not None:
        return request
    raw = _object(frame, max_bytes)
    request_id = _request_id(raw)
    version = raw.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # not True, not 3.0
        raise WireError(
            f"protocol version {version!r:.40} is not supported (this server speaks "
            f"{PROTOCOL_VERSION})",
            request_id=request_id,
        )
    try:
        return _REQUEST.validate_python(raw, context=_FROM_WIRE)
    except ValidationError as exc:
        raise WireError(f"invalid request: {first_error(exc)}", request_id=request_id) from exc


def decode_reply(frame: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Reply:
    reply = _fast(_REPLY, frame, max_bytes)
    if reply is not None:
        return reply
    raw = _object(frame, max_bytes)
    try:
        return Reply.model_validate(raw, context=_FROM_WIRE)
    except ValidationError as exc:
        raise WireError(f"invalid reply: {first_error(exc)}") from exc


def decode_event(frame: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Event:
    event = _fast(_EVENT, frame, max_bytes)
    if event is not None:
        return event
    raw = _object(frame, max_bytes)
    try:
        return _EVENT.validate_python(raw, context=_FROM_WIRE)
    except ValidationError as exc:
        raise WireError(f"invalid event: {first_error(exc)}") from exc
