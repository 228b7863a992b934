"""Compile (resolve, validate, fingerprint) and execute pipelines."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from plateflow.errors import UsageError
from plateflow.examples.platereader import demo_pipeline
from plateflow.pipeline import (
    DEFAULT_ALLOWED_MODULES,
    STEP_UNITS,
    PipelineError,
    PipelineSpec,
    StepCancelled,
    StepContext,
    StepFailed,
    StepSpec,
    compile_pipeline,
    execute_pipeline,
    fingerprint,
)

PLATEREADER = "plateflow.examples.platereader"
HELPER = "plateflow_test_steps"
HELPER_SOURCE = '''
"""Step functions for the pipeline tests, importable from a directory on sys.path."""

from __future__ import annotations

from shutil import rmtree  # imported, not defined here: never a step

from plateflow.pipeline import StepCancelled

CALLS = []
NOT_A_FUNCTION = 3
GIVE_UP = StepCancelled("gave up")


class Step:
    """A class is callable, but it is not a step function."""

    def __init__(self, data, ctx):
        self.data = data

    def __call__(self, data, ctx):
        return data


A_CALLABLE = Step(None, None)


def start(path, ctx, *, label: str = "start"):
    CALLS.append("start")
    return {"path": path, "plate": ctx.plate_id, "labels": [label]}


def add(data, ctx, *, amount: int = 1):
    CALLS.append("add")
    return {**data, "total": data.get("total", 0) + amount}


def ratio(data, ctx, *, value: float = 1.0, strict: bool = False):
    CALLS.append("ratio")
    return {**data, "value": value, "strict": strict}


def needs(data, ctx, *, required: int):
    return {**data, "required": required}


def identity(data, ctx):
    return data


def a_set(data, ctx):
    return {"wells": {"A01", "A02"}}


def not_finite(data, ctx, *, value: str = "nan"):
    return {"qc": {"z_prime": [1.0, float(value)]}}


def counts(data, ctx, *, n: int = 4):
    CALLS.append("counts")
    for i in range(n + 1):
        ctx.progress(i, n, f"item {i}")
    ctx.progress(n + 1, n, "overshoot")
    return data


def odd_reports(data, ctx):
    ctx.progress(-3, 10, "below zero")
    ctx.progress(5, 0, "no total")
    ctx.progress(5, -2, "negative total")
    return data


def explode(data, ctx, *, message: str = "boom"):
    CALLS.append("explode")
    ctx.progress(1, 2, "halfway")
    raise ValueError(message)


def give_up(data, ctx):
    raise GIVE_UP


def _private(data, ctx):
    return data
'''


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A step module outside plateflow, on sys.path for this test only; yields its name."""
    (tmp_path / f"{HELPER}.py").write_text(HELPER_SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield HELPER
    sys.modules.pop(HELPER, None)


def spec(*steps: tuple[str, dict[str, object]] | str) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "steps": [
                {"function": s} if isinstance(s, str) else {"function": s[0], "params": s[1]}
                for s in steps
            ]
        }
    )


def context(
    reports: list[tuple[int, int, str]] | None = None, cancelled: list[bool] | None = None
) -> StepContext:
    sink = reports if reports is not None else []
    flag = cancelled if cancelled is not None else [False]
    return StepContext(
        plate_id="P1",
        plate_path="/plates/P1.csv",
        output_dir="/unused",
        _report=lambda done, total, message: sink.append((done, total, message)),
        _is_cancelled=lambda: flag[0],
    )


def assert_one_monotone_figure(
    reports: list[tuple[int, int, str]], functions: list[str], steps_done: int | None = None
) -> None:
    """One figure for the whole pipeline: a single total of n * 100, ``done`` never
    decreasing, and after step i the runner's own report of exactly (i + 1) * 100."""
    total = len(functions) * 100
    assert {t for _, t, _ in reports} == {total}
    dones = [done for done, _, _ in reports]
    assert dones == sorted(dones)
    finished = functions[: len(functions) if steps_done is None else steps_done]
    assert [r for r in reports if r[2] in functions] == [
        ((i + 1) * 100, total, f) for i, f in enumerate(finished)
    ]


# --- resolution -------------------------------------------------------------------------


def test_the_demo_pipeline_compiles_with_the_default_allowed_modules() -> None:
    assert PLATEREADER in DEFAULT_ALLOWED_MODULES
    compiled = compile_pipeline(demo_pipeline())
    assert [f.__name__ for f in compiled.functions] == [
        "read_plate",
        "subtract_background",
        "normalise",
        "call_hits",
        "write_report",
    ]


def test_a_module_off_the_allowed_list_is_rejected_before_it_is_imported(helper: str) -> None:
    with pytest.raises(PipelineError) as caught:
        compile_pipeline(spec(f"{helper}:start"))
    message = str(caught.value)
    assert f"module {helper!r} is not allowed" in message
    assert PLATEREADER in message
    assert "allowed_modules" in message
    assert helper not in sys.modules
    assert isinstance(caught.value, UsageError)


def test_os_system_cannot_be_named() -> None:
    with pytest.raises(PipelineError, match=r"step 2 \(os:system\): module 'os' is not allowed"):
        compile_pipeline(spec(f"{PLATEREADER}:read_plate", "os:system"))


def test_allowed_modules_match_whole_dotted_prefixes() -> None:
    compile_pipeline(demo_pipeline(), allowed_modules=["plateflow.examples"])
    with pytest.raises(PipelineError, match="not allowed"):
        compile_pipeline(demo_pipeline(), allowed_modules=["plateflow.ex"])


def test_allowed_modules_can_be_extended_to_a_helper_module(helper: str) -> None:
    compiled = compile_pipeline(
        spec(f"{helper}:start", (f"{helper}:add", {"amount": 4})),
        allowed_modules=[*DEFAULT_ALLOWED_MODULES, helper],
    )
    result = execute_pipeline(compiled, context())
    assert result == {"path": "/plates/P1.csv", "plate": "P1", "labels": ["start"], "total": 4}


def test_an_unimportable_allowed_module_is_reported() -> None:
    with pytest.raises(PipelineError, match=r"cannot import 'plateflow\.examples\.nope'"):
        compile_pipeline(spec("plateflow.examples.nope:step"), allowed_modules=["plateflow"])


@pytest.mark.parametrize(
    "name",
    [
        "no_such_step",  # unknown
        "_well_name",  # private
        "ROLES",  # not callable
        "Hit",  # a class: callable, but not a step function
        "json",  # a module the step module imported
    ],
)
def test_only_public_functions_resolve(name: str) -> None:
    with pytest.raises(PipelineError) as caught:
        compile_pipeline(spec(f"{PLATEREADER}:{name}"))
    assert str(caught.value) == (
        f"step 1 ({PLATEREADER}:{name}): {PLATEREADER!r} defines no public step function {name!r}"
    )


@pytest.mark.parametrize(
    "name",
    [
        "_private",  # private
        "NOT_A_FUNCTION",  # not callable
        "rmtree",  # a function the module only imported (from shutil)
        "Step",  # a class defined in the module
        "A_CALLABLE",  # a callable instance
    ],
)
def test_only_functions_the_helper_defines_resolve(helper: str, name: str) -> None:
    with pytest.raises(PipelineError) as caught:
        compile_pipeline(spec(f"{helper}:{name}"), allowed_modules=[helper])
    assert str(caught.value) == (
        f"step 1 ({helper}:{name}): {helper!r} defines no public step function {name!r}"
    )
    # The names are there and callable (but one) - refused for what they are.
    module = importlib.import_module(helper)
    assert callable(getattr(module, name)) == (name != "NOT_A_FUNCTION")


# --- parameters -------------------------------------------------------------------------


def test_an_unknown_parameter_is_rejected_naming_the_step() -> None:
    bad = spec(
        f"{PLATEREADER}:read_plate",
        (f"{PLATEREADER}:subtract_background", {}),
        (f"{PLATEREADER}:normalise", {"methd": "robust_z"}),
    )
    with pytest.raises(PipelineError) as caught:
        compile_pipeline(bad)
    message = str(caught.value)
    assert message.startswith(f"step 3 ({PLATEREADER}:normalise): parameters do not fit")
    assert "'methd'" in message


@pytest.mark.parametrize(
    ("function", "params", "expected"),
    [
        ("call_hits", {"threshold": "high"}, "parameter 'threshold' should be float, got 'high'"),
        ("call_hits", {"threshold": True}, "parameter 'threshold' should be float, got True"),
        ("call_hits", {"threshold": None}, "parameter 'threshold' should be float, got None"),
        ("normalise", {"method": 3}, "parameter 'method' should be str, got 3"),
        ("pause", {"seconds": [1]}, "parameter 'seconds' should be float, got [1]"),
    ],
)
def test_a_parameter_of_the_wrong_simple_type_is_rejected(
    function: str, params: dict[str, object], expected: str
) -> None:
    with pytest.raises(PipelineError) as caught:
        compile_pipeline(spec((f"{PLATEREADER}:{function}", params)))
    assert str(caught.value) == f"step 1 ({PLATEREADER}:{function}): {expected}"


def test_int_and_bool_parameters_are_checked_in_a_helper_module(helper: str) -> None:
    allowed = [helper]
    with pytest.raises(PipelineError, match=r"parameter 'amount' should be int, got 2\.5"):
        compile_pipeline(spec((f"{helper}:add", {"amount": 2.5})), allowed_modules=allowed)
    with pytest.raises(PipelineError, match="parameter 'amount' should be int, got False"):
        compile_pipeline(spec((f"{helper}:add", {"amount": False})), allowed_modules=allowed)
    with pytest.raises(PipelineError, match="parameter 'strict' should be bool, got 1"):
        compile_pipeline(spec((f"{helper}:ratio", {"strict": 1})), allowed_modules=allowed)
    # An int is a fine float, and a bool a fine bool.
    compile_pipeline(
        spec((f"{helper}:ratio", {"value": 2, "strict": True})), allowed_modules=allowed
    )


def test_a_missing_required_parameter_is_rejected(helper: str) -> None:
    with pytest.raises(PipelineError) as caught:
        compile_pipeline(spec(f"{helper}:start", f"{helper}:needs"), allowed_modules=[helper])
    message = str(caught.value)
    assert message.startswith(f"step 2 ({helper}:needs): parameters do not fit the function")
    assert "'required'" in message


def test_a_parameter_cannot_replace_the_data_or_the_context(helper: str) -> None:
    with pytest.raises(PipelineError, match="parameters do not fit"):
        compile_pipeline(spec((f"{helper}:add", {"ctx": 1})), allowed_modules=[helper])


# --- fingerprints -----------------------------------------------------------------------


def test_fingerprint_is_stable_for_equal_specs() -> None:
    first, second = demo_pipeline(), demo_pipeline()
    assert first is not second
    assert fingerprint(first) == fingerprint(second)
    assert compile_pipeline(first).fingerprint == fingerprint(second)
    assert len(fingerprint(first)) == 64
    assert int(fingerprint(first), 16) >= 0
    # Through JSON and back (a batch file, a wire message) the spec keeps its fingerprint.
    assert fingerprint(PipelineSpec.model_validate_json(first.model_dump_json())) == fingerprint(
        first
    )


def test_fingerprint_ignores_the_order_params_were_written_in(helper: str) -> None:
    one = spec((f"{helper}:ratio", {"value": 2.0, "strict": True}))
    two = spec((f"{helper}:ratio", {"strict": True, "value": 2.0}))
    assert fingerprint(one) == fingerprint(two)


def test_fingerprint_changes_with_a_param_the_steps_or_the_name() -> None:
    base = fingerprint(demo_pipeline())
    assert fingerprint(demo_pipeline(threshold=40.0)) != base
    assert fingerprint(demo_pipeline(method="robust_z")) != base
    assert fingerprint(demo_pipeline(pause_seconds=1.0)) != base
    reordered = demo_pipeline().model_copy(update={"steps": tuple(reversed(demo_pipeline().steps))})
    assert fingerprint(reordered) != base
    renamed = demo_pipeline().model_copy(update={"name": "other"})
    assert fingerprint(renamed) != base


def test_an_empty_pipeline_is_not_a_spec() -> None:
    with pytest.raises(ValueError, match="at least 1 item"):
        PipelineSpec(steps=())


def test_a_malformed_function_reference_is_not_a_spec() -> None:
    with pytest.raises(ValueError, match="should match pattern"):
        StepSpec(function="os.system")


# --- execution --------------------------------------------------------------------------


def test_execute_threads_data_through_the_steps_and_reports_each_step(helper: str) -> None:
    steps: tuple[tuple[str, dict[str, object]], ...] = (
        (f"{helper}:start", {"label": "go"}),
        (f"{helper}:add", {"amount": 2}),
        (f"{helper}:add", {"amount": 3}),
        (f"{helper}:ratio", {"value": 0.5}),
    )
    compiled = compile_pipeline(spec(*steps), allowed_modules=[helper])
    reports: list[tuple[int, int, str]] = []
    result = execute_pipeline(compiled, context(reports))
    assert result == {
        "path": "/plates/P1.csv",
        "plate": "P1",
        "labels": ["go"],
        "total": 5,
        "value": 0.5,
        "strict": False,
    }
    assert STEP_UNITS == 100
    assert reports == [((i + 1) * 100, 400, step[0]) for i, step in enumerate(steps)]
    assert_one_monotone_figure(reports, [step[0] for step in steps])


def test_a_steps_own_progress_is_scaled_into_its_share(helper: str) -> None:
    functions = [f"{helper}:start", f"{helper}:counts", f"{helper}:counts"]
    compiled = compile_pipeline(
        spec(functions[0], (functions[1], {"n": 4}), (functions[2], {"n": 3})),
        allowed_modules=[helper],
    )
    reports: list[tuple[int, int, str]] = []
    execute_pipeline(compiled, context(reports))
    assert reports == [
        (100, 300, f"{helper}:start"),
        # 0..4 of 4 in the second step's share; its end (and beyond) stops short of 200.
        (100, 300, "item 0"),
        (125, 300, "item 1"),
        (150, 300, "item 2"),
        (175, 300, "item 3"),
        (199, 300, "item 4"),
        (199, 300, "overshoot"),
        (200, 300, f"{helper}:counts"),
        (200, 300, "item 0"),
        (233, 300, "item 1"),
        (266, 300, "item 2"),
        (299, 300, "item 3"),
        (299, 300, "overshoot"),
        (300, 300, f"{helper}:counts"),
    ]
    assert_one_monotone_figure(reports, functions)


def test_out_of_range_step_progress_stays_at_the_start_of_its_share(helper: str) -> None:
    functions = [f"{helper}:start", f"{helper}:odd_reports"]
    compiled = compile_pipeline(spec(*functions), allowed_modules=[helper])
    reports: list[tuple[int, int, str]] = []
    execute_pipeline(compiled, context(reports))
    assert reports == [
        (100, 200, f"{helper}:start"),
        (100, 200, "below zero"),
        (100, 200, "no total"),
        (100, 200, "negative total"),
        (200, 200, f"{helper}:odd_reports"),
    ]
    assert_one_monotone_figure(reports, functions)


def test_a_step_that_raises_fails_the_pipeline_naming_the_step(helper: str) -> None:
    module = importlib.import_module(helper)
    functions = [f"{helper}:start", f"{helper}:explode", f"{helper}:add"]
    compiled = compile_pipeline(
        spec(functions[0], (functions[1], {"message": "no signal in B02"}), functions[2]),
        allowed_modules=[helper],
    )
    reports: list[tuple[int, int, str]] = []
    module.CALLS.clear()
    with pytest.raises(StepFailed) as caught:
        execute_pipeline(compiled, context(reports))
    assert str(caught.value) == f"step 2 ({helper}:explode) raised ValueError: no signal in B02"
    cause = caught.value.__cause__
    assert type(cause) is ValueError
    assert str(cause) == "no signal in B02"
    assert not isinstance(caught.value, PipelineError)
    # Nothing ran after the failing step, and it got no step-boundary report.
    assert module.CALLS == ["start", "explode"]
    assert reports == [(100, 300, f"{helper}:start"), (150, 300, "halfway")]
    assert_one_monotone_figure(reports, functions, steps_done=1)


def test_a_step_cancelled_from_within_passes_through_unchanged(helper: str) -> None:
    module = importlib.import_module(helper)
    compiled = compile_pipeline(
        spec(f"{helper}:start", f"{helper}:give_up", f"{helper}:add"), allowed_modules=[helper]
    )
    reports: list[tuple[int, int, str]] = []
    module.CALLS.clear()
    with pytest.raises(StepCancelled) as caught:
        execute_pipeline(compiled, context(reports))
    assert caught.value is module.GIVE_UP
    assert not isinstance(caught.value, StepFailed)
    assert module.CALLS == ["start"]
    assert reports == [(100, 300, f"{helper}:start")]


def test_a_last_step_that_returns_no_mapping_fails_at_execute(helper: str) -> None:
    compiled = compile_pipeline(spec(f"{helper}:identity"), allowed_modules=[helper])
    with pytest.raises(PipelineError) as caught:
        execute_pipeline(compiled, context())
    assert str(caught.value) == (
        f"the last step ({helper}:identity) returned str; it must return a JSON mapping "
        "(the execution's result)"
    )


def test_a_last_step_that_returns_no_json_fails_at_execute(helper: str) -> None:
    compiled = compile_pipeline(spec(f"{helper}:a_set"), allowed_modules=[helper])
    with pytest.raises(PipelineError) as caught:
        execute_pipeline(compiled, context())
    # The message names where in the result the offending value is.
    assert str(caught.value).startswith(
        f"the last step ({helper}:a_set) returned a result that is not JSON at wells: "
    )


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_last_step_that_returns_a_non_finite_float_fails_at_execute(
    helper: str, value: str
) -> None:
    compiled = compile_pipeline(
        spec(f"{helper}:start", (f"{helper}:not_finite", {"value": value})),
        allowed_modules=[helper],
    )
    with pytest.raises(PipelineError) as caught:
        execute_pipeline(compiled, context())
    message = str(caught.value)
    assert message.startswith(
        f"the last step ({helper}:not_finite) returned a result that is not JSON: "
    )
    assert "Out of range float values are not JSON compliant" in message
    assert isinstance(caught.value, UsageError)
    assert isinstance(caught.value.__cause__, ValueError)


def test_cancellation_between_steps_stops_before_the_next_step(helper: str) -> None:
    module = importlib.import_module(helper)
    compiled = compile_pipeline(
        spec(f"{helper}:start", f"{helper}:add", f"{helper}:ratio"), allowed_modules=[helper]
    )
    cancelled = [False]
    reports: list[tuple[int, int, str]] = []

    def report(done: int, total: int, message: str) -> None:
        reports.append((done, total, message))
        cancelled[0] = done == 100  # the host cancels once the first step is done

    ctx = StepContext("P1", "/plates/P1.csv", "/unused", report, lambda: cancelled[0])
    module.CALLS.clear()
    with pytest.raises(StepCancelled, match="P1"):
        execute_pipeline(compiled, ctx)
    assert module.CALLS == ["start"]
    assert reports == [(100, 300, f"{helper}:start")]


def test_a_pipeline_cancelled_before_it_starts_runs_nothing(helper: str) -> None:
    module = importlib.import_module(helper)
    compiled = compile_pipeline(spec(f"{helper}:start"), allowed_modules=[helper])
    module.CALLS.clear()
    with pytest.raises(StepCancelled):
        execute_pipeline(compiled, context(cancelled=[True]))
    assert module.CALLS == []


def test_a_step_reporting_backwards_never_moves_the_pipeline_figure_back() -> None:
    from plateflow.pipeline.run import _scaled

    seen: list[tuple[int, int, str]] = []
    host = StepContext("P", "p", "o", lambda *a: seen.append(a), lambda: False)
    report = _scaled(host, 100, 300)
    for done in (29, 7, 57, 3):
        report(done, 100, "")
    assert [d for d, _t, _m in seen] == [129, 129, 157, 157]
