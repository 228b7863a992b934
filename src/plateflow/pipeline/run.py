"""Compile and execute pipelines.

Theory of operation: *compile* turns a spec into something that can run:
every step's function is resolved — only from modules on the allowed list,
so a batch file or a wire message can never name ``os:system`` — and its
parameters are checked against the function's signature, so a typo fails at
compile time for the whole batch instead of halfway through an execution.
The result is fingerprinted by content. *Execute* calls the steps in order,
threading each step's return value into the next, with a context through
which steps report progress and observe cancellation.

A step function is ``def step(data, ctx, **params)``: ``data`` is the previous
step's return value (the plate path for the first step), ``ctx`` a
:class:`StepContext`. The last step returns a JSON-able mapping: the
execution's result.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, cast

from pydantic import JsonValue, TypeAdapter, ValidationError

from plateflow.core.decoding import decode_json, valid_text
from plateflow.errors import DecodeError, UsageError
from plateflow.pipeline.spec import PipelineSpec, StepSpec

__all__ = [
    "DEFAULT_ALLOWED_MODULES",
    "STEP_UNITS",
    "CompiledPipeline",
    "PipelineError",
    "StepCancelled",
    "StepContext",
    "StepFailed",
    "compile_pipeline",
    "execute_pipeline",
    "fingerprint",
]

DEFAULT_ALLOWED_MODULES: tuple[str, ...] = ("plateflow.examples.platereader",)
"""Modules step functions may come from unless the caller allows others."""

_FORMAT = "plateflow-pipeline/1"
_RESULT: TypeAdapter[dict[str, JsonValue]] = TypeAdapter(dict[str, JsonValue])
_MAX_RESULT_BYTES = 16 << 20
"""A result larger than this (16 MiB of JSON) is refused: it has to cross the wire."""


class PipelineError(UsageError):
    """A pipeline cannot be compiled or its result is unusable; names the step."""


class StepCancelled(Exception):
    """Raised by :meth:`StepContext.check_cancelled` once the execution was cancelled."""


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a step can know and do besides transforming its data."""

    plate_id: str
    plate_path: str
    output_dir: str
    _report: Callable[[int, int, str], None]
    _is_cancelled: Callable[[], bool]

    def progress(self, done: int, total: int, message: str = "") -> None:
        """Report progress within the running step (``done`` of ``total``)."""
        self._report(done, total, valid_text(str(message)))

    @property
    def cancelled(self) -> bool:
        return self._is_cancelled()

    def check_cancelled(self) -> None:
        """Raise :class:`StepCancelled` if the execution was cancelled; call it in long loops."""
        if self._is_cancelled():
            raise StepCancelled(self.plate_id)


@dataclass(frozen=True, slots=True)
class CompiledPipeline:
    """A spec whose steps are resolved and checked, with its content fingerprint."""

    spec: PipelineSpec
    fingerprint: str
    functions: tuple[Callable[..., Any], ...]


def fingerprint(spec: PipelineSpec) -> str:
    """The content hash of a spec: equal specs, equal fingerprints."""
    canonical = json.dumps(
        {"format": _FORMAT, "spec": spec.model_dump(mode="json")},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


_SIMPLE_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "float": (int, float),
    "str": str,
    "bool": bool,
}


def _allowed(module: str, allowed_modules: Collection[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed_modules)


def _resolve(index: int, step: StepSpec, allowed_modules: Collection[str]) -> Callable[..., Any]:
    where = f"step {index + 1} ({step.function})"
    module_name, _, function_name = step.function.partition(":")
    if not _allowed(module_name, allowed_modules):
        raise PipelineError(
            f"{where}: module {module_name!r} is not allowed; allowed modules are "
            f"{sorted(allowed_modules)} (configure allowed_modules to add one)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PipelineError(f"{where}: cannot import {module_name!r}: {exc}") from exc
    function = getattr(module, function_name, None)
    # Only plain functions defined in the allowed module itself: never a class, and
    # never something the module merely imported (``from shutil import rmtree``).
    if (
        function_name.startswith("_")
        or not inspect.isfunction(function)
        or function.__module__ != module_name
    ):
        raise PipelineError(
            f"{where}: {module_name!r} defines no public step function {function_name!r}"
        )
    try:
        signature = inspect.signature(function)
        signature.bind(None, None, **step.params)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"{where}: parameters do not fit the function: {exc}") from exc
    for name, value in step.params.items():
        parameter = signature.parameters.get(name)
        annotation = parameter.annotation if parameter is not None else None
        type_name = (
            annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        )
        expected = _SIMPLE_TYPES.get(type_name)
        if expected is not None and (
            not isinstance(value, expected) or (isinstance(value, bool) and type_name != "bool")
        ):
            raise PipelineError(f"{where}: parameter {name!r} should be {type_name}, got {value!r}")
    return cast(Callable[..., Any], function)


def compile_pipeline(
    spec: PipelineSpec, *, allowed_modules: Collection[str] = DEFAULT_ALLOWED_MODULES
) -> CompiledPipeline:
    """Resolve and check every step; raise :class:`PipelineError` naming the first bad one."""
    functions = tuple(_resolve(i, step, allowed_modules) for i, step in enumerate(spec.steps))
    return CompiledPipeline(spec=spec, fingerprint=fingerprint(spec), functions=functions)


STEP_UNITS = 100
"""Progress units per step: a pipeline of n steps reports ``done`` out of ``n * 100``."""


class StepFailed(Exception):
    """A step raised; the message names the step. The original is chained."""


def execute_pipeline(compiled: CompiledPipeline, ctx: StepContext) -> dict[str, JsonValue]:
    """Run the steps in order and return the last step's mapping (the result).

    Progress is reported as one monotone figure for the whole pipeline: each
    step is worth :data:`STEP_UNITS`, and a step's own ``ctx.progress(done,
    total)`` is scaled into its share. Raises :class:`StepCancelled` when the
    execution was cancelled, :class:`StepFailed` naming the step when one raised.
    """
    data: Any = ctx.plate_path
    steps = compiled.spec.steps
    total = len(steps) * STEP_UNITS
    for index, (step, function) in enumerate(zip(steps, compiled.functions, strict=True)):
        ctx.check_cancelled()
        base = index * STEP_UNITS
        step_ctx = StepContext(
            plate_id=ctx.plate_id,
            plate_path=ctx.plate_path,
            output_dir=ctx.output_dir,
            _report=_scaled(ctx, base, total),
            _is_cancelled=ctx._is_cancelled,
        )
        try:
            data = function(data, step_ctx, **step.params)
        except StepCancelled:
            raise
        except Exception as exc:
            raise StepFailed(
                valid_text(f"step {index + 1} ({step.function}) raised {type(exc).__name__}: {exc}")
            ) from exc
        ctx.progress(base + STEP_UNITS, total, step.function)
    last = steps[-1].function
    if not isinstance(data, Mapping):
        raise PipelineError(
            f"the last step ({last}) returned {type(data).__name__}; it must return a "
            "JSON mapping (the execution's result)"
        )
    try:
        result = _RESULT.validate_python(dict(data))
        # The result crosses process boundaries as JSON: it must read back within
        # every bound of plateflow's one decoder (strict text, depth, digits).
        text = json.dumps(result, allow_nan=False, ensure_ascii=False)
        decode_json(text, max_bytes=_MAX_RESULT_BYTES, what="the result")
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise PipelineError(
            f"the last step ({last}) returned a result that is not JSON at {where}: {error['msg']}"
        ) from exc
    except DecodeError as exc:
        raise PipelineError(
            valid_text(f"the last step ({last}) returned a result plateflow cannot carry: {exc}")
        ) from exc
    except (ValueError, RecursionError) as exc:
        raise PipelineError(
            valid_text(f"the last step ({last}) returned a result that is not JSON: {exc}")
        ) from exc
    return result


def _scaled(ctx: StepContext, base: int, total: int) -> Callable[[int, int, str], None]:
    high = base

    def report(done: int, step_total: int, message: str) -> None:
        nonlocal high
        units = done * STEP_UNITS // step_total if step_total > 0 else 0
        # Within the step's share, never reaching the next step's, and never backwards.
        high = max(high, base + min(max(units, 0), STEP_UNITS - 1))
        ctx.progress(high, total, message)

    return report
