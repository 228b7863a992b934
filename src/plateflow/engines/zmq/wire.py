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
  within a bounded time.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from plateflow.core.facts import Fact
from plateflow.jobs import CompileJob

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "CancelRequest",
    "CompileRequest",
    "Event",
    "ExecuteRequest",
    "FactEvent",
    "HeartbeatEvent",
    "PingRequest",
    "Reply",
    "Request",
    "ServerInfoRequest",
    "ShutdownRequest",
    "StatusRequest",
    "WireError",
    "WireSubmission",
    "decode_event",
    "decode_reply",
    "decode_request",
    "encode",
]

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
"""Frames larger than this (1 MiB) are refused before they are parsed."""


_FROM_WIRE: Final[dict[str, bool]] = {"wire": True}
"""The validation context of a decoded frame (compared by identity)."""


class WireError(ValueError):
    """A frame that is not a valid message; the text says what was wrong, and where."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = PROTOCOL_VERSION

    @model_validator(mode="before")
    @classmethod
    def _version_on_the_wire(cls, data: Any, info: ValidationInfo) -> Any:
        """Decoding a frame, ``v`` must be there and be the integer 1 (not true, not 1.0).

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

    plate_id: str = Field(min_length=1, max_length=512)
    phase: Literal["compile", "execute"]
    submission_id: str = Field(min_length=1, max_length=512)


# --- requests (client -> server, on the control socket) -------------------------------


class _Request(_Message):
    id: str = Field(min_length=1, max_length=128)
    """The correlation id; the reply carries it back."""


class PingRequest(_Request):
    type: Literal["ping"] = "ping"


class CompileRequest(_Request):
    type: Literal["compile"] = "compile"
    job_id: str = Field(min_length=1, max_length=512)
    job: CompileJob


class ExecuteRequest(_Request):
    type: Literal["execute"] = "execute"
    execution_id: str = Field(min_length=1, max_length=512)
    job: CompileJob
    artifact_id: str = Field(min_length=1, max_length=512)


class StatusRequest(_Request):
    type: Literal["status"] = "status"
    submissions: tuple[WireSubmission, ...] = Field(max_length=100_000)


class CancelRequest(_Request):
    type: Literal["cancel"] = "cancel"
    submission: WireSubmission


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


Event = Annotated[FactEvent | HeartbeatEvent, Field(discriminator="type")]

_REQUEST: TypeAdapter[Request] = TypeAdapter(Request)
_EVENT: TypeAdapter[Event] = TypeAdapter(Event)
_REPLY: TypeAdapter[Reply] = TypeAdapter(Reply)
_M = TypeVar("_M")


def encode(message: BaseModel) -> bytes:
    """One message as the bytes of one frame."""
    return message.model_dump_json().encode("utf-8")


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "message"
    return f"{where}: {error['msg']}"


def _check_frame(frame: bytes, max_bytes: int) -> dict[str, Any]:
    if len(frame) > max_bytes:
        raise WireError(f"message of {len(frame)} bytes exceeds the limit of {max_bytes}")
    try:
        raw = json.loads(frame)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"not a JSON document: {exc}") from exc
    if not isinstance(raw, dict):
        raise WireError(f"expected a JSON object, got {type(raw).__name__}")
    return raw


def _fast(adapter: TypeAdapter[_M], frame: bytes, max_bytes: int) -> _M | None:
    """The common case in one pass (pydantic parses the JSON); None means look closer.

    The slow path below parses with :mod:`json` first so that what is wrong
    with a bad frame can be said precisely; a good frame never needs it.
    """
    if len(frame) > max_bytes:
        raise WireError(f"message of {len(frame)} bytes exceeds the limit of {max_bytes}")
    try:
        return adapter.validate_json(frame, context=_FROM_WIRE)
    except ValidationError:
        return None


def decode_request(frame: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Request:
    """Validate one control frame; raise :class:`WireError` saying what is wrong."""
    request = _fast(_REQUEST, frame, max_bytes)
    if request is not None:
        return request
    raw = _check_frame(frame, max_bytes)
    request_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    version = raw.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # not True, not 1.0
        raise WireError(
            f"protocol version {version!r} is not supported (this server speaks "
            f"{PROTOCOL_VERSION})",
            request_id=request_id,
        )
    try:
        return _REQUEST.validate_python(raw)
    except ValidationError as exc:
        raise WireError(f"invalid request: {_first_error(exc)}", request_id=request_id) from exc


def decode_reply(frame: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Reply:
    reply = _fast(_REPLY, frame, max_bytes)
    if reply is not None:
        return reply
    raw = _check_frame(frame, max_bytes)
    try:
        return Reply.model_validate(raw, context=_FROM_WIRE)
    except ValidationError as exc:
        raise WireError(f"invalid reply: {_first_error(exc)}") from exc


def decode_event(frame: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Event:
    event = _fast(_EVENT, frame, max_bytes)
    if event is not None:
        return event
    raw = _check_frame(frame, max_bytes)
    try:
        return _EVENT.validate_python(raw, context=_FROM_WIRE)
    except ValidationError as exc:
        raise WireError(f"invalid event: {_first_error(exc)}") from exc
