"""Batch files: a whole batch (plates, pipeline, policy, engine) in one TOML file.

Theory of operation: a batch file is read in three stages, each with its own
kind of error, so a user always learns *where* the file is wrong. ``tomllib``
parses the text (a syntax error names the line and column); pydantic validates
the document against :class:`BatchFile` with unknown keys forbidden (an error
names the field path, e.g. ``plates[2].path``, and suggests the key that was
probably meant); then :func:`load_batch_file` resolves it against the file's
folder — relative paths, globs, plate files that must exist, plate ids that
must be unique, step modules the engine must allow — naming the field path
again. Nothing runs before all three stages passed.

The engine section is a discriminated union on ``kind``. Each kind is one
model with a ``build(output_dir)`` method that makes the engine; adding an
engine kind is adding one model to :data:`EngineSettings`. Engines are
imported inside ``build``, so reading a batch file never loads ZeroMQ or Dask.
"""

from __future__ import annotations

import difflib
import glob as globbing
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)

from plateflow.core import BatchMode, CompileFailurePolicy
from plateflow.core.decoding import MAX_INT_DIGITS, one_line
from plateflow.engines.base import Engine
from plateflow.errors import UsageError
from plateflow.pipeline import DEFAULT_ALLOWED_MODULES, PipelineSpec, StepSpec
from plateflow.service import Plate

__all__ = [
    "MAX_BATCH_FILE_BYTES",
    "MAX_NESTING",
    "AnyEngineSettings",
    "BatchFile",
    "BatchFileError",
    "DaskEngineSettings",
    "EngineSettings",
    "LoadedBatch",
    "LocalEngineSettings",
    "PipelineSection",
    "PlateEntry",
    "StepEntry",
    "ZmqEngineSettings",
    "check_scheduler_address",
    "engine_kinds",
    "engine_settings_for",
    "load_batch_file",
    "parse_batch_file",
    "render_batch_file",
]

_STEP_NAME: Final = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_TOML_POSITION: Final = re.compile(r"\(at line (\d+), column (\d+)\)$")
_SCHEDULER_HOST_PORT: Final = re.compile(
    r"^(?:tcp|tls|ucx)://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
    r":(?P<port>\d{1,5})/?$"
)
_SCHEDULER_INPROC: Final = re.compile(r"^inproc://\S+$")
_BARE_HOST_PORT: Final = re.compile(r"^[A-Za-z0-9.\[\]:-]+:\d{1,5}$")
_MAX_PROBLEMS: Final = 10
"""At most this many validation problems are listed; the rest are counted."""
MAX_BATCH_FILE_BYTES: Final = 16 << 20
"""A batch file larger than this (16 MiB) is refused before it is parsed."""
MAX_NESTING: Final = 64
"""Tables and arrays nested deeper than this are refused."""
_BOM: Final = "\ufeff"
_INT_BOUND: Final = 10**MAX_INT_DIGITS
_QUOTED: Final = re.compile(r""""(?:[^"\\\n]|\\.)*"|'[^'\n]*'""")
_DOTTED: Final = re.compile(r"[A-Za-z0-9_-]+(?:[ \t]*\.[ \t]*[A-Za-z0-9_-]+)*")

Seconds = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
"""A positive, finite number of seconds; a TOML string such as ``"2"`` is refused."""


class BatchFileError(UsageError):
    """A batch file that cannot be used. The message names the file and every problem.

    ``problems`` holds one line per problem, each starting with where it is
    (``line 3, column 7`` or a field path such as ``plates[1].path``).
    """

    def __init__(self, source: str | Path, problems: Sequence[str]) -> None:
        self.source = str(source)
        self.problems = tuple(problems)
        if len(self.problems) == 1:
            message = f"{self.source}: {self.problems[0]}"
        else:
            listed = "\n".join(f"  {p}" for p in self.problems)
            message = f"{self.source}: {len(self.problems)} problems\n{listed}"
        super().__init__(message)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlateEntry(_Section):
    """One ``[[plates]]`` entry: either ``id`` + ``path``, or a ``glob``.

    A glob adds one plate per matching file (sorted by path), whose id is the
    file's name without its suffix. Relative paths and globs are resolved
    against the batch file's folder.
    """

    id: str | None = Field(default=None, min_length=1, max_length=512)
    path: str | None = Field(default=None, min_length=1)
    glob: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> PlateEntry:
        if self.glob is not None:
            if self.path is not None or self.id is not None:
                raise ValueError(
                    "give either id and path (one plate) or glob (a plate per file), not both"
                )
        elif self.path is None or self.id is None:
            missing = " and ".join(n for n in ("id", "path") if getattr(self, n) is None)
            raise ValueError(f"a plate needs {missing} (or a glob instead)")
        return self


class StepEntry(_Section):
    """One ``[[pipeline.steps]]`` entry: ``function = "package.module:function"`` and ``params``."""

    function: str
    params: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("function")
    @classmethod
    def _step_name(cls, value: str) -> str:
        if not _STEP_NAME.match(value):
            raise ValueError(
                f"{value!r} does not name a step; write it as package.module:function "
                "(e.g. plateflow.examples.platereader:read_plate)"
            )
        return value


class PipelineSection(_Section):
    """The ``[pipeline]`` table: an optional name and at least one step."""

    name: str = Field(default="pipeline", min_length=1)
    steps: tuple[StepEntry, ...] = Field(min_length=1)

    def to_spec(self) -> PipelineSpec:
        return PipelineSpec(
            name=self.name,
            steps=tuple(StepSpec(function=s.function, params=s.params) for s in self.steps),
        )


class _EngineBase(_Section):
    workers: int | None = Field(default=None, strict=True, ge=1)
    """Worker processes at most (default: the number of CPUs)."""
    allow: tuple[str, ...] = ()
    """Modules, besides plateflow's example domain, that pipeline steps may come from."""

    @property
    def allowed_modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*DEFAULT_ALLOWED_MODULES, *self.allow]))


class ZmqEngineSettings(_EngineBase):
    """``kind = "zmq"``: the embedded ZeroMQ execution server (``plateflow serve``).

    The engine attaches to the server running in ``runtime_dir`` or, with
    ``start_server``, starts one there (writing reports into the batch's output
    folder, with ``workers`` and ``allow``) and stops it at the end. A server
    that was already running keeps its own output folder and allowed modules.
    A server it starts stops the batch's work and exits ``lease_grace`` seconds
    after the run dies without stopping it.
    """

    kind: Literal["zmq"] = "zmq"
    runtime_dir: str | None = Field(default=None, min_length=1)
    """Where the server lives (default ``$PLATEFLOW_RUNTIME_DIR``, else the user's runtime dir)."""
    start_server: bool = Field(default=True, strict=True)
    heartbeat_timeout: Seconds = 3.0
    startup_timeout: Seconds = 20.0
    request_timeout: Seconds = 10.0
    lease_grace: Seconds = 60.0
    """Seconds the server keeps the batch's work without hearing from the run."""

    def build(self, *, output_dir: Path, base: Path, state_dir: Path | None = None) -> Engine:
        from plateflow.engines.zmq.engine import ZmqEngine

        args = ["--output-dir", str(output_dir)]
        if self.workers is not None:
            args += ["--workers", str(self.workers)]
        for module in self.allow:
            args += ["--allow", module]
        runtime_dir = _resolve(base, self.runtime_dir) if self.runtime_dir else None
        return ZmqEngine(
            runtime_dir,
            start_server=self.start_server,
            server_args=args,
            heartbeat_timeout=self.heartbeat_timeout,
            request_timeout=self.request_timeout,
            startup_timeout=self.startup_timeout,
            lease_grace=self.lease_grace,
        )


class LocalEngineSettings(_EngineBase):
    """``kind = "local"``: worker processes of the ``plateflow`` process itself, no server."""

    kind: Literal["local"] = "local"
    cancel_grace: Seconds = 2.0
    """Seconds a cancelled worker has to stop by itself before it is terminated."""

    def build(self, *, output_dir: Path, base: Path, state_dir: Path | None = None) -> Engine:
        from plateflow.engines.local import LocalEngine

        return LocalEngine(
            max_workers=self.workers,
            allowed_modules=self.allowed_modules,
            output_dir=str(output_dir),
            cancel_grace=self.cancel_grace,
            ledger_dir=str(state_dir) if state_dir is not None else None,
        )


def check_scheduler_address(address: str) -> str:
    """``address`` when it is a Dask scheduler address; else :class:`ValueError` saying why.

    Accepted: ``tcp://host:port``, ``tls://host:port``, ``ucx://host:port``
    (a host name, an IPv4 address or an IPv6 address in brackets; a port from
    1 to 65535) and ``inproc://…``. Only the form is checked, not whether a
    scheduler answers there.
    """
    match = _SCHEDULER_HOST_PORT.match(address)
    if match is not None and 1 <= int(match["port"]) <= 65535:
        return address
    if _SCHEDULER_INPROC.match(address):
        return address
    hint = (
        "write it as tcp://host:port, with a port from 1 to 65535 (or tls://, ucx://, "
        "inproc://), e.g. tcp://10.0.0.5:8786"
    )
    if "://" not in address and _BARE_HOST_PORT.match(address):
        hint = f"did you mean 'tcp://{address}'? A scheduler address names its protocol"
    raise ValueError(f"not a Dask scheduler address; {hint}")


_LOCAL_CLUSTER_KEYS: Final = ("workers", "threads_per_worker", "processes")
"""The ``kind = "dask"`` keys that configure the LocalCluster started without a scheduler."""


class DaskEngineSettings(_EngineBase):
    """``kind = "dask"``: a Dask cluster, at ``scheduler`` or a LocalCluster of its own.

    With ``scheduler`` the engine connects to that scheduler and leaves it
    running. Without it the engine starts a ``LocalCluster`` (``workers``
    workers, default one per CPU, each with ``threads_per_worker`` threads,
    worker processes unless ``processes = false``) and stops it at the end;
    those three keys are refused next to ``scheduler``, which they cannot
    configure.
    """

    kind: Literal["dask"] = "dask"
    scheduler: str | None = Field(default=None, min_length=1)
    """The scheduler's address (``tcp://host:port``, ...); none: a LocalCluster."""
    threads_per_worker: int = Field(default=1, strict=True, ge=1)
    processes: bool = Field(default=True, strict=True)
    """Workers as processes (the default) or as threads of the ``plateflow`` process."""
    connect_timeout: Seconds = 10.0
    """Seconds to reach the scheduler before the engine counts as unavailable."""
    liveness_interval: Seconds = 1.0
    liveness_timeout: Seconds = 3.0
    """The scheduler must answer within this many seconds of each check, or the engine is lost."""

    @field_validator("scheduler")
    @classmethod
    def _scheduler_address(cls, value: str | None) -> str | None:
        return None if value is None else check_scheduler_address(value)

    @model_validator(mode="after")
    def _cluster_keys_need_no_scheduler(self) -> DaskEngineSettings:
        given = [
            k
            for k in _LOCAL_CLUSTER_KEYS
            if k in self.model_fields_set and getattr(self, k) is not None
        ]
        if self.scheduler is not None and given:
            raise ValueError(
                f"{', '.join(given)} configure the LocalCluster started when no scheduler "
                f"is given; with scheduler = {self.scheduler!r} the cluster is yours, so "
                "leave them out"
            )
        return self

    def with_scheduler(self, address: str) -> DaskEngineSettings:
        """These settings on the scheduler at ``address``, without the LocalCluster keys.

        Raises :class:`ValueError` (from :func:`check_scheduler_address`) for an
        address that is not one.
        """
        check_scheduler_address(address)
        kept = self.model_dump(exclude_unset=True, exclude=set(_LOCAL_CLUSTER_KEYS))
        return DaskEngineSettings.model_validate({**kept, "scheduler": address})

    def build(self, *, output_dir: Path, base: Path, state_dir: Path | None = None) -> Engine:
        from plateflow.engines.dask import DaskEngine

        local: dict[str, Any] = {}
        if self.scheduler is None:
            local = {
                "n_workers": self.workers,
                "threads_per_worker": self.threads_per_worker,
                "processes": self.processes,
            }
        return DaskEngine(
            self.scheduler,
            allowed_modules=self.allowed_modules,
            output_dir=str(output_dir),
            connect_timeout=self.connect_timeout,
            liveness_interval=self.liveness_interval,
            liveness_timeout=self.liveness_timeout,
            **local,
        )


AnyEngineSettings = ZmqEngineSettings | LocalEngineSettings | DaskEngineSettings
"""Every engine kind. To add one: a model with ``kind: Literal[...]`` and ``build``, here."""

EngineSettings = Annotated[AnyEngineSettings, Field(discriminator="kind")]
"""The ``[engine]`` table: one of :data:`AnyEngineSettings`, chosen by ``kind``."""


def engine_kinds() -> tuple[str, ...]:
    """The values ``[engine] kind`` accepts, in the order of :data:`EngineSettings`."""
    return tuple(_tag(model) for model in _union_models(EngineSettings) if _tag(model))


def engine_settings_for(kind: str, like: AnyEngineSettings | None = None) -> AnyEngineSettings:
    """Default settings of engine ``kind``, keeping ``workers`` and ``allow`` of ``like``.

    ``like`` itself when it already is of that kind. Raises :class:`UsageError`
    for an unknown kind.
    """
    if like is not None and like.kind == kind:
        return like
    for model in _union_models(EngineSettings):
        if _tag(model) == kind:
            common = {} if like is None else {"workers": like.workers, "allow": like.allow}
            settings = model.model_validate(common)
            assert isinstance(settings, AnyEngineSettings)
            return settings
    raise UsageError(f"unknown engine kind {kind!r}; use one of {', '.join(engine_kinds())}")


class BatchFile(_Section):
    """A whole batch file, as validated (paths not yet resolved)."""

    name: str | None = Field(default=None, min_length=1)
    """A label for the batch (default: the file's name without ``.toml``)."""
    mode: BatchMode = BatchMode.RUN
    policy: CompileFailurePolicy = CompileFailurePolicy.ABORT
    output_dir: str = Field(default="output", min_length=1)
    journal: str | None = Field(default=None, min_length=1)
    """Where the journal is written (default ``<output_dir>/journal.jsonl``)."""
    status_interval: Seconds = 1.0
    progress_interval: Seconds = 0.1
    cancel_grace: Seconds = 10.0
    """Seconds the engine has to confirm a cancel before the plate settles anyway."""
    plates: tuple[PlateEntry, ...]
    pipeline: PipelineSection
    engine: EngineSettings = Field(default_factory=ZmqEngineSettings)

    @field_validator("plates")
    @classmethod
    def _some_plates(cls, value: tuple[PlateEntry, ...]) -> tuple[PlateEntry, ...]:
        if not value:
            raise ValueError("a batch needs at least one [[plates]] entry")
        return value

    @field_validator("engine", mode="before")
    @classmethod
    def _default_kind(cls, value: object) -> object:
        if isinstance(value, dict) and "kind" not in value:
            return {"kind": ZmqEngineSettings.model_fields["kind"].default, **value}
        return value


@dataclass(frozen=True, slots=True)
class LoadedBatch:
    """A batch file validated and resolved against its folder: ready to run."""

    source: Path
    spec: BatchFile
    name: str
    plates: tuple[Plate, ...]
    pipeline: PipelineSpec
    output_dir: Path
    journal: Path

    @property
    def base(self) -> Path:
        """The folder relative paths in the file are resolved against."""
        return self.source.parent

    def build_engine(
        self, settings: AnyEngineSettings | None = None, *, state_dir: Path | None = None
    ) -> Engine:
        """The engine the file asks for (or ``settings`` instead), not yet started.

        ``state_dir``: where an engine keeps what must outlive the process (the local
        engine's ledger, so that a killed run can be resumed); the other engines keep
        that state elsewhere and ignore it.
        """
        return (settings or self.spec.engine).build(
            output_dir=self.output_dir, base=self.base, state_dir=state_dir
        )


# --- reading ------------------------------------------------------------------------------


def parse_batch_file(text: str, *, source: str | Path = "<batch file>") -> BatchFile:
    """Parse and validate batch-file text; paths are not resolved, nothing is checked on disk.

    Raises :class:`BatchFileError` naming the line (TOML syntax) or the field
    path (validation) of each problem. A leading byte-order mark is skipped;
    text with a lone surrogate, a number of more than 4,300 digits or
    nesting deeper than :data:`MAX_NESTING` is refused.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BatchFileError(
            source, [f"not valid Unicode text: a lone surrogate at character {exc.start}"]
        ) from None
    long_key = _long_dotted_key(text)
    if long_key is not None:  # tomllib's time grows with the square of a key's parts
        raise BatchFileError(
            source, [f"line {long_key}: a dotted key of more than {MAX_NESTING} parts"]
        )
    try:
        raw = tomllib.loads(text.removeprefix(_BOM))
    except RecursionError:
        raise BatchFileError(
            source, [f"invalid TOML: nested deeper than {MAX_NESTING} tables and arrays"]
        ) from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        position = _TOML_POSITION.search(message)
        if position is None:
            raise BatchFileError(source, [f"invalid TOML: {message}"]) from None
        detail = message[: position.start()].rstrip()
        line, column = position.groups()
        raise BatchFileError(
            source, [f"line {line}, column {column}: invalid TOML: {detail}"]
        ) from None
    except ValueError:  # tomllib lets int() refuse a number of more than 4,300 digits
        raise BatchFileError(
            source, ["invalid TOML: an integer of more than 4300 digits"]
        ) from None
    problem = _beyond_bounds(raw)
    if problem is not None:
        raise BatchFileError(source, [f"invalid TOML: {problem}"])
    try:
        return BatchFile.model_validate(raw)
    except ValidationError as exc:
        raise BatchFileError(source, _problems(exc)) from None


def _long_dotted_key(text: str) -> int | None:
    """The number of the first line with a dotted key of more than :data:`MAX_NESTING`
    parts (such a key would be refused for its nesting anyway), or None.

    Linear in the text: only a line with that many dots is looked at closely,
    with its quoted strings (whose dots are not a key's) taken out first.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        if line.count(".") <= MAX_NESTING:
            continue
        bare = _QUOTED.sub("q", line)
        if any(chain.group().count(".") > MAX_NESTING for chain in _DOTTED.finditer(bare)):
            return number
    return None


def _beyond_bounds(value: object) -> str | None:
    """What in a parsed document breaks a bound (without recursion), or None.

    Tables and arrays may nest :data:`MAX_NESTING` deep; an integer may have
    4,300 digits (tomllib takes hexadecimal, octal and binary ones of any
    length, which no error message could print).
    """
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, int) and not isinstance(item, bool):
            if abs(item) >= _INT_BOUND:
                return "an integer of more than 4300 digits"
            continue
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level + 1 > MAX_NESTING:
            return f"nested deeper than {MAX_NESTING} tables and arrays"
        stack.extend((child, level + 1) for child in children)
    return None


def load_batch_file(path: str | Path) -> LoadedBatch:
    """Read, validate and resolve a batch file. Raises :class:`BatchFileError`."""
    source = Path(path)
    try:
        with source.open("rb") as stream:
            data = stream.read(MAX_BATCH_FILE_BYTES + 1)
        if len(data) > MAX_BATCH_FILE_BYTES:
            raise BatchFileError(
                source, [f"larger than {MAX_BATCH_FILE_BYTES} bytes: not a batch file"]
            )
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise BatchFileError(source, ["no such file"]) from None
    except IsADirectoryError:
        raise BatchFileError(source, ["is a directory, not a batch file"]) from None
    except UnicodeDecodeError as exc:
        raise BatchFileError(
            source, [f"not UTF-8 text (byte {exc.start}): a batch file is TOML, UTF-8"]
        ) from None
    except OSError as exc:
        raise BatchFileError(source, [f"cannot read it: {exc.strerror or exc}"]) from None
    spec = parse_batch_file(text, source=source)
    base = source.resolve().parent
    problems: list[str] = []
    plates = _resolve_plates(spec, base, problems)
    _check_steps(spec, problems)
    if problems:
        raise BatchFileError(source, problems)
    output_dir = _resolve(base, spec.output_dir)
    return LoadedBatch(
        source=source.resolve(),
        spec=spec,
        name=spec.name or source.stem,
        plates=tuple(plates),
        pipeline=spec.pipeline.to_spec(),
        output_dir=output_dir,
        journal=_resolve(base, spec.journal) if spec.journal else output_dir / "journal.jsonl",
    )


def _resolve(base: Path, path: str) -> Path:
    return (base / Path(path).expanduser()).resolve()


def _resolve_plates(spec: BatchFile, base: Path, problems: list[str]) -> list[Plate]:
    plates: list[Plate] = []
    seen: dict[str, str] = {}

    def add(plate_id: str, path: Path, where: str) -> None:
        if plate_id in seen:
            problems.append(f"{where}: plate id {plate_id!r} is already used by {seen[plate_id]}")
            return
        seen[plate_id] = where
        plates.append(Plate(plate_id, str(path)))

    for index, entry in enumerate(spec.plates):
        where = f"plates[{index}]"
        if entry.glob is not None:
            pattern = str(base / Path(entry.glob).expanduser())
            matches = sorted(Path(p) for p in globbing.glob(pattern, recursive=True))
            files = [p for p in matches if p.is_file()]
            if not files:
                problems.append(f"{where}.glob: {entry.glob!r} matches no file (in {base})")
            for file in files:
                add(file.stem, file.resolve(), f"{where}.glob ({file.name})")
            continue
        assert entry.id is not None  # the model checked: id and path, or glob
        assert entry.path is not None
        path = _resolve(base, entry.path)
        if not path.exists():
            problems.append(f"{where}.path: plate file {path} does not exist")
        elif not path.is_file():
            problems.append(f"{where}.path: {path} is not a file")
        else:
            add(entry.id, path, where)
    return plates


def _check_steps(spec: BatchFile, problems: list[str]) -> None:
    """Every step's module must be one the engine allows (checked again at compile)."""
    allowed = spec.engine.allowed_modules
    for index, step in enumerate(spec.pipeline.steps):
        module = step.function.partition(":")[0]
        if not any(module == a or module.startswith(a + ".") for a in allowed):
            problems.append(
                f"pipeline.steps[{index}].function: module {module!r} is not allowed; "
                f"add it to allow in [engine] (allowed now: {', '.join(allowed)})"
            )


# --- validation errors, said plainly -------------------------------------------------------


def _problems(exc: ValidationError) -> list[str]:
    lines = [one_line(_problem(error)) for error in exc.errors(include_url=False)]
    if len(lines) > _MAX_PROBLEMS:
        rest = len(lines) - _MAX_PROBLEMS
        lines = [*lines[:_MAX_PROBLEMS], f"... and {rest} more"]
    return lines


def _problem(error: Any) -> str:
    loc: tuple[str | int, ...] = tuple(error["loc"])
    kind: str = error["type"]
    where, parent = _walk(loc)
    if kind == "extra_forbidden":
        key = str(loc[-1])
        allowed = _fields_of(parent)
        hint = ""
        if allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            hint += f" (allowed here: {', '.join(allowed)})"
        return f"{where}: unknown key {key!r}{hint}"
    if kind == "missing":
        return f"{where}: required, but missing"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        kinds = ", ".join(engine_kinds())
        got = error.get("ctx", {}).get("tag")
        what = f"unknown kind {got!r}" if kind == "union_tag_invalid" else "kind is missing"
        return f"{where}.kind: {what}; use one of {kinds}"
    message: str = error["msg"]
    if message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    shown = error.get("input")
    if isinstance(shown, str | int | float | bool) and not isinstance(shown, dict):
        message += f" (got {shown!r})"
    return f"{where}: {message}" if where else message


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``None`` from an annotation."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return annotation


def _union_models(annotation: Any) -> list[type[BaseModel]]:
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [
            a
            for a in (_unwrap(x) for x in typing.get_args(annotation))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
    return []


def _tag(model: type[BaseModel]) -> str:
    field = model.model_fields.get("kind")
    return str(field.default) if field is not None and isinstance(field.default, str) else ""


def _fields_of(annotation: Any) -> list[str]:
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _walk(loc: tuple[str | int, ...]) -> tuple[str, Any]:
    """The field path as a user writes it, and the annotation of the innermost container.

    Discriminated-union tags that pydantic puts into the location
    (``engine.zmq.workers``) are left out (``engine.workers``).
    """
    where = ""
    annotation: Any = BatchFile
    parent: Any = BatchFile
    for part in loc:
        parent = annotation
        current = _unwrap(annotation)
        if isinstance(part, int):
            where += f"[{part}]"
            args = typing.get_args(current)
            annotation = args[0] if args else None
            continue
        models = _union_models(current)
        if models:
            chosen = [m for m in models if _tag(m) == part]
            if chosen:
                annotation = chosen[0]
                continue
        where += f".{part}" if where else part
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            annotation = field.annotation if field is not None else None
        elif typing.get_origin(current) is dict:
            annotation = typing.get_args(current)[1]
        else:
            annotation = None
    return where, parent


# --- writing ------------------------------------------------------------------------------


def render_batch_file(batch: BatchFile, *, comment: str = "") -> str:
    """TOML text for ``batch`` that :func:`parse_batch_file` reads back equal.

    Only set fields are written (defaults stay implicit). ``comment`` becomes
    leading ``#`` lines. Raises :class:`ValueError` for a step parameter TOML
    cannot hold (``None``).
    """
    data = batch.model_dump(mode="json", exclude_unset=True)
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    if lines:
        lines.append("")
    tables = {key: data.pop(key) for key in ("plates", "pipeline", "engine") if key in data}
    lines += [f"{key} = {_toml_value(value)}" for key, value in data.items()]
    for plate in tables.get("plates", []):
        lines += ["", "[[plates]]", *(f"{k} = {_toml_value(v)}" for k, v in plate.items())]
    pipeline = tables.get("pipeline")
    if pipeline is not None:
        steps = pipeline.pop("steps", [])
        lines += ["", "[pipeline]", *(f"{k} = {_toml_value(v)}" for k, v in pipeline.items())]
        for step in steps:
            lines += [
                "",
                "[[pipeline.steps]]",
                *(f"{k} = {_toml_value(v)}" for k, v in step.items()),
            ]
    engine = tables.get("engine")
    if engine is not None:
        if "kind" not in engine:
            engine = {"kind": batch.engine.kind, **engine}
        lines += ["", "[engine]", *(f"{k} = {_toml_value(v)}" for k, v in engine.items())]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if value is None:
        raise ValueError("TOML has no null: a step parameter cannot be None in a batch file")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise ValueError(f"cannot write {type(value).__name__} {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)
