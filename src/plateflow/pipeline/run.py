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

from plateflow.errors import UsageError
from plateflow.pipeline.spec import PipelineSpec, StepSpec

__all__ = [
    "DEFAULT_ALLOWED_MODULES",
    "CompiledPipeline",
    "PipelineError",
    "StepCancelled",
    "StepContext",
    "compile_pipeline",
    "execute_pipeline",
    "fingerprint",
]

DEFAULT_ALLOWED_MODULES: tuple[str, ...] = ("plateflow.examples.platereader",)
"""Modules step functions may come from unless the caller allows others."""

_FORMAT = "plateflow-pipeline/1"
_RESULT: TypeAdapter[dict[str, JsonValue]] = TypeAdapter(dict[str, JsonValue])


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
        self._report(done, total, message)

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
    if function is None or not callable(function) or function_name.startswith("_"):
        raise PipelineError(f"{where}: {module_name!r} has no public function {function_name!r}")
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


def execute_pipeline(compiled: CompiledPipeline, ctx: StepContext) -> dict[str, JsonValue]:
    """Run the steps in order and return the last step's mapping (the result).

    Progress is reported after each step as ``(steps done, steps)``; a step
    may report finer progress itself. Raises :class:`StepCancelled` when the
    execution was cancelled between or inside steps.
    """
    data: Any = ctx.plate_path
    total = len(compiled.functions)
    for index, (step, function) in enumerate(
        zip(compiled.spec.steps, compiled.functions, strict=True)
    ):
        ctx.check_cancelled()
        data = function(data, ctx, **step.params)
        ctx.progress(index + 1, total, step.function)
    if not isinstance(data, Mapping):
        raise PipelineError(
            f"the last step ({compiled.spec.steps[-1].function}) returned "
            f"{type(data).__name__}; it must return a JSON mapping (the execution's result)"
        )
    try:
        return _RESULT.validate_python(dict(data))
    except ValidationError as exc:
        raise PipelineError(
            f"the last step ({compiled.spec.steps[-1].function}) returned a result that is "
            f"not JSON: {exc.errors()[0]['msg']}"
        ) from exc
