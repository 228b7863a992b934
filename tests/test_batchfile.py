"""Batch files: what a valid one means, and how every kind of bad one is reported."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plateflow import BatchMode, CompileFailurePolicy, UsageError, batchfile
from plateflow.batchfile import (
    MAX_NESTING,
    BatchFile,
    BatchFileError,
    DaskEngineSettings,
    LocalEngineSettings,
    PipelineSection,
    PlateEntry,
    StepEntry,
    ZmqEngineSettings,
    engine_kinds,
    engine_settings_for,
    load_batch_file,
    parse_batch_file,
    render_batch_file,
)
from plateflow.cli import main
from plateflow.engines.dask import DaskEngine
from plateflow.engines.local import LocalEngine
from plateflow.engines.zmq.engine import ZmqEngine

STEP = "plateflow.examples.platereader"
PIPELINE = f"""
[pipeline]
name = "p"
[[pipeline.steps]]
function = "{STEP}:read_plate"
[[pipeline.steps]]
function = "{STEP}:normalise"
params = {{ method = "robust_z" }}
"""


def _write(folder: Path, text: str, name: str = "batch.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _plates(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("well,role,signal\n", encoding="utf-8")


def _error(path: Path) -> BatchFileError:
    with pytest.raises(BatchFileError) as caught:
        load_batch_file(path)
    assert isinstance(caught.value, UsageError), "the CLI reports it as a usage error"
    return caught.value


def test_a_minimal_file_gets_the_documented_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plates(tmp_path / "data", "a.csv")
    path = _write(tmp_path, f'[[plates]]\nid = "A"\npath = "data/a.csv"\n{PIPELINE}')
    monkeypatch.chdir("/")  # relative paths resolve against the file's folder, not the cwd
    loaded = load_batch_file(path)
    spec = loaded.spec
    assert spec.mode is BatchMode.RUN
    assert spec.policy is CompileFailurePolicy.ABORT
    assert isinstance(spec.engine, ZmqEngineSettings)
    assert spec.engine.runtime_dir is None
    assert spec.engine.start_server
    assert (spec.status_interval, spec.progress_interval, spec.cancel_grace) == (1.0, 0.1, 10.0)
    assert loaded.name == "batch"
    assert loaded.output_dir == tmp_path.resolve() / "output"
    assert loaded.journal == loaded.output_dir / "journal.jsonl"
    assert [(p.plate_id, p.path) for p in loaded.plates] == [
        ("A", str(tmp_path.resolve() / "data" / "a.csv"))
    ]
    assert [s.function for s in loaded.pipeline.steps] == [
        f"{STEP}:read_plate",
        f"{STEP}:normalise",
    ]
    assert loaded.pipeline.steps[1].params == {"method": "robust_z"}
    assert loaded.pipeline.name == "p"


def test_every_field_is_read(tmp_path: Path) -> None:
    _plates(tmp_path / "in", "p1.csv", "p2.csv", "p3.csv")
    _plates(tmp_path / "extra", "x.csv")
    path = _write(
        tmp_path,
        f"""
name = "screen"
mode = "compile_only"
policy = "continue"
output_dir = "out"
journal = "logs/j.jsonl"
status_interval = 0.25
progress_interval = 0.5
cancel_grace = 3

[[plates]]
glob = "in/*.csv"

[[plates]]
id = "extra"
path = "extra/x.csv"
{PIPELINE}
[engine]
kind = "local"
workers = 2
allow = ["tests.steps_for_tests"]
cancel_grace = 0.5
""",
    )
    loaded = load_batch_file(path)
    base = tmp_path.resolve()
    assert loaded.name == "screen"
    assert loaded.spec.mode is BatchMode.COMPILE_ONLY
    assert loaded.spec.policy is CompileFailurePolicy.CONTINUE
    assert loaded.output_dir == base / "out"
    assert loaded.journal == base / "logs" / "j.jsonl"
    assert [p.plate_id for p in loaded.plates] == ["p1", "p2", "p3", "extra"]
    engine = loaded.spec.engine
    assert isinstance(engine, LocalEngineSettings)
    assert (engine.workers, engine.cancel_grace) == (2, 0.5)
    assert engine.allowed_modules == (STEP, "tests.steps_for_tests")
    built = loaded.build_engine()
    assert isinstance(built, LocalEngine)
    assert built.output_dir == str(base / "out")


def test_the_zmq_engine_section_builds_a_zmq_engine_in_its_runtime_dir(tmp_path: Path) -> None:
    _plates(tmp_path, "a.csv")
    path = _write(
        tmp_path,
        f'[[plates]]\nglob = "*.csv"\n{PIPELINE}\n[engine]\nkind = "zmq"\nruntime_dir = "srv"\n'
        "heartbeat_timeout = 5\nstart_server = false\n",
    )
    engine = load_batch_file(path).build_engine()
    assert isinstance(engine, ZmqEngine)
    assert engine.runtime_dir == tmp_path.resolve() / "srv"


def test_the_engine_can_be_swapped_keeping_workers_and_allowed_modules() -> None:
    zmq = ZmqEngineSettings(workers=3, allow=("tests.steps_for_tests",))
    local = engine_settings_for("local", zmq)
    assert isinstance(local, LocalEngineSettings)
    assert (local.workers, local.allow) == (3, ("tests.steps_for_tests",))
    assert engine_settings_for("zmq", zmq) is zmq
    assert engine_kinds() == ("zmq", "local", "dask")
    with pytest.raises(UsageError, match="unknown engine kind 'slurm'"):
        engine_settings_for("slurm")


# --- kind = "dask" ---------------------------------------------------------------------------


def _dask_file(folder: Path, engine: str) -> Path:
    _plates(folder, "a.csv")
    return _write(
        folder, f'[[plates]]\nglob = "*.csv"\n{PIPELINE}\n[engine]\nkind = "dask"\n{engine}'
    )


class _Recorded:
    """Stands in for DaskEngine: what ``build`` passes, without starting anything."""

    def __init__(self, scheduler_address: str | None = None, **options: Any) -> None:
        self.scheduler_address = scheduler_address
        self.options = options


def test_the_dask_section_without_a_scheduler_builds_a_local_cluster_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _dask_file(
        tmp_path,
        "workers = 3\nthreads_per_worker = 2\nprocesses = false\nconnect_timeout = 4\n"
        'liveness_interval = 0.5\nliveness_timeout = 1.5\nallow = ["tests.steps_for_tests"]\n',
    )
    loaded = load_batch_file(path)
    engine = loaded.spec.engine
    assert isinstance(engine, DaskEngineSettings)
    assert engine.scheduler is None
    assert (engine.workers, engine.threads_per_worker, engine.processes) == (3, 2, False)
    assert (engine.connect_timeout, engine.liveness_interval, engine.liveness_timeout) == (
        4.0,
        0.5,
        1.5,
    )
    monkeypatch.setattr("plateflow.engines.dask.DaskEngine", _Recorded)
    built = loaded.build_engine()
    assert isinstance(built, _Recorded)
    assert built.scheduler_address is None
    assert built.options == {
        "n_workers": 3,
        "threads_per_worker": 2,
        "processes": False,
        "allowed_modules": (STEP, "tests.steps_for_tests"),
        "output_dir": str(tmp_path.resolve() / "output"),
        "connect_timeout": 4.0,
        "liveness_interval": 0.5,
        "liveness_timeout": 1.5,
    }


def test_the_dask_defaults_are_the_engines(tmp_path: Path) -> None:
    engine = load_batch_file(_dask_file(tmp_path, "")).spec.engine
    assert isinstance(engine, DaskEngineSettings)
    assert engine.scheduler is None
    assert engine.workers is None  # one per CPU
    assert (engine.threads_per_worker, engine.processes) == (1, True)
    assert (engine.connect_timeout, engine.liveness_interval, engine.liveness_timeout) == (
        10.0,
        1.0,
        3.0,
    )


@pytest.mark.parametrize(
    "address",
    [
        "tcp://10.0.0.5:8786",
        "tcp://scheduler.example.org:8786",
        "tcp://[::1]:8786",
        "tls://scheduler:8786",
        "ucx://10.0.0.5:13337",
        "inproc://10.0.0.5/4242/1",
    ],
)
def test_a_dask_scheduler_address_builds_an_engine_for_that_scheduler(
    tmp_path: Path, address: str
) -> None:
    loaded = load_batch_file(_dask_file(tmp_path, f'scheduler = "{address}"\n'))
    built = loaded.build_engine()  # only made: nothing connects before start
    assert isinstance(built, DaskEngine)
    assert built.scheduler_address == address
    assert built.output_dir == str(tmp_path.resolve() / "output")


@pytest.mark.parametrize(
    ("engine", "problem"),
    [
        (
            'scheduler = "localhost:8786"',
            "engine.scheduler: not a Dask scheduler address; did you mean 'tcp://localhost:8786'?",
        ),
        (
            'scheduler = "http://scheduler:8786"',
            "engine.scheduler: not a Dask scheduler address; write it as tcp://host:port",
        ),
        ('scheduler = "tcp://scheduler"', "engine.scheduler: not a Dask scheduler address"),
        ('scheduler = "tcp://scheduler:0"', "engine.scheduler: not a Dask scheduler address"),
        ('scheduler = "tcp://scheduler:65536"', "engine.scheduler: not a Dask scheduler address"),
        ('scheduler = "tcp://a b:1"', "engine.scheduler: not a Dask scheduler address"),
        ('scheduler = ""', "engine.scheduler: String should have at least 1 character"),
        ("scheduler = 8786", "engine.scheduler: Input should be a valid string"),
        ("workers = 0", "engine.workers: Input should be greater than or equal to 1 (got 0)"),
        ('workers = "2"', "engine.workers: Input should be a valid integer"),
        ("threads_per_worker = 0", "engine.threads_per_worker: Input should be greater than"),
        ("threads_per_worker = 1.5", "engine.threads_per_worker: Input should be a valid integer"),
        ('processes = "no"', "engine.processes: Input should be a valid boolean"),
        ("processes = 0", "engine.processes: Input should be a valid boolean"),
        ("connect_timeout = 0", "engine.connect_timeout: Input should be greater than 0 (got 0)"),
        ("liveness_interval = -1", "engine.liveness_interval: Input should be greater than 0"),
        ("liveness_timeout = inf", "engine.liveness_timeout: Input should be a finite number"),
        ('liveness_timeout = "3"', "engine.liveness_timeout: Input should be a valid number"),
        ('allow = "mine"', "engine.allow: Input should be a valid tuple"),
        ("allow = [1]", "engine.allow[0]: Input should be a valid string"),
        (
            "n_workers = 2",
            "engine.n_workers: unknown key 'n_workers'; did you mean 'workers'? (allowed here: "
            "workers, allow, kind, scheduler, threads_per_worker, processes, connect_timeout, "
            "liveness_interval, liveness_timeout)",
        ),
        ('runtime_dir = "srv"', "engine.runtime_dir: unknown key 'runtime_dir'"),
        (
            'scheduler = "tcp://10.0.0.5:8786"\nworkers = 4\nprocesses = false',
            "engine: workers, processes configure the LocalCluster started when no scheduler "
            "is given; with scheduler = 'tcp://10.0.0.5:8786' the cluster is yours",
        ),
    ],
)
def test_a_bad_dask_section_names_its_field_path(tmp_path: Path, engine: str, problem: str) -> None:
    error = _error(_dask_file(tmp_path, engine + "\n"))
    assert len(error.problems) == 1, error.problems
    assert error.problems[0].startswith(problem), error.problems


def test_dask_settings_move_to_a_scheduler_without_their_local_cluster_keys() -> None:
    zmq = ZmqEngineSettings(workers=3, allow=("tests.steps_for_tests",))
    dask = engine_settings_for("dask", zmq)
    assert isinstance(dask, DaskEngineSettings)
    assert (dask.workers, dask.allow, dask.scheduler) == (3, ("tests.steps_for_tests",), None)
    local = DaskEngineSettings(workers=2, processes=False, liveness_timeout=1.0)
    remote = local.with_scheduler("tcp://10.0.0.5:8786")
    assert remote.scheduler == "tcp://10.0.0.5:8786"
    assert (remote.workers, remote.threads_per_worker, remote.processes) == (None, 1, True)
    assert remote.liveness_timeout == 1.0, "the other settings stay"
    with pytest.raises(ValueError, match=re.escape("did you mean 'tcp://10.0.0.5:8786'")):
        local.with_scheduler("10.0.0.5:8786")


def test_a_rendered_dask_section_reads_back_equal() -> None:
    for engine in (
        DaskEngineSettings(workers=2, processes=False, liveness_interval=0.25),
        DaskEngineSettings(scheduler="tls://[fe80::1]:8786", allow=("mine",)),
    ):
        batch = BatchFile(
            plates=(PlateEntry(glob="*.csv"),),
            pipeline=PipelineSection(steps=(StepEntry(function=f"{STEP}:read_plate"),)),
            engine=engine,
        )
        text = render_batch_file(batch)
        assert 'kind = "dask"' in text
        assert parse_batch_file(text) == batch


def test_a_toml_syntax_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, 'name = "x"\nmode = \n')
    error = _error(path)
    assert str(error).startswith(f"{path}: line 2, column 8: invalid TOML")
    assert error.problems == ("line 2, column 8: invalid TOML: Invalid value",)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('mode = "fast"', "mode: Input should be 'compile_only' or 'run' (got 'fast')"),
        ('policy = "retry"', "policy: Input should be 'abort' or 'continue' (got 'retry')"),
        ("status_interval = 0", "status_interval: Input should be greater than 0 (got 0)"),
        ("progress_interval = nan", "progress_interval: Input should be a finite number"),
        ('[engine]\nworkers = "4"', "engine.workers: Input should be a valid integer"),
        ("[engine]\nkind = 'local'\nworkers = 0", "engine.workers: Input should be greater than"),
        (
            "[engine]\nkind = 'slurm'",
            "engine.kind: unknown kind 'slurm'; use one of zmq, local, dask",
        ),
    ],
)
def test_a_bad_value_names_its_field_path(tmp_path: Path, text: str, problem: str) -> None:
    _plates(tmp_path, "a.csv")
    body = f'{text}\n[[plates]]\nid = "a"\npath = "a.csv"\n{PIPELINE}'
    if text.startswith("[engine]"):  # the engine table goes last, after the others
        body = f'[[plates]]\nid = "a"\npath = "a.csv"\n{PIPELINE}\n{text}\n'
    error = _error(_write(tmp_path, body))
    assert len(error.problems) == 1, error.problems
    assert error.problems[0].startswith(problem), error.problems


def test_nested_errors_name_the_list_index(tmp_path: Path) -> None:
    text = f"""
[[plates]]
id = "a"
path = "a.csv"
[[plates]]
id = "b"
[pipeline]
[[pipeline.steps]]
function = "{STEP}:read_plate"
[[pipeline.steps]]
function = "read_plate"
[[pipeline.steps]]
function = "{STEP}:call_hits"
params = {{ when = 1979-05-27 }}
"""
    error = _error(_write(tmp_path, text))
    assert error.problems[0] == "plates[1]: a plate needs path (or a glob instead)"
    assert error.problems[1].startswith(
        "pipeline.steps[1].function: 'read_plate' does not name a step; write it as "
        "package.module:function"
    )
    assert error.problems[2].startswith("pipeline.steps[2].params.when")
    assert str(error).startswith(f"{tmp_path / 'batch.toml'}: 3 problems\n  plates[1]: ")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('polcy = "abort"', "polcy: unknown key 'polcy'; did you mean 'policy'?"),
        ("[engine]\nruntime_directory = 'x'", "engine.runtime_directory: unknown key"),
        (
            "[engine]\nkind = 'local'\nruntime_dir = 'x'",
            "engine.runtime_dir: unknown key 'runtime_dir' (allowed here: workers, allow, kind, "
            "cancel_grace)",
        ),
        ("[[plates]]\nid = 'b'\npath = 'a.csv'\ncolour = 'red'", "plates[1].colour: unknown key"),
    ],
)
def test_unknown_keys_are_errors(tmp_path: Path, text: str, problem: str) -> None:
    _plates(tmp_path, "a.csv")
    body = f'[[plates]]\nid = "a"\npath = "a.csv"\n{PIPELINE}'
    body = f"{body}\n{text}\n" if text.startswith("[") else f"{text}\n{body}"
    error = _error(_write(tmp_path, body))
    assert error.problems[0].startswith(problem), error.problems
    if "did you mean" not in problem:
        assert "allowed here:" in error.problems[0]


def test_the_engine_tag_is_left_out_of_field_paths(tmp_path: Path) -> None:
    error = _error(
        _write(tmp_path, f'[[plates]]\nglob = "*"\n{PIPELINE}\n[engine]\nheartbeat_timeout = -1\n')
    )
    assert error.problems == ("engine.heartbeat_timeout: Input should be greater than 0 (got -1)",)


def test_missing_sections_are_named(tmp_path: Path) -> None:
    error = _error(_write(tmp_path, 'name = "x"\n'))
    assert error.problems == ("plates: required, but missing", "pipeline: required, but missing")


def test_a_missing_plate_file_a_glob_without_match_and_a_duplicate_id_are_errors(
    tmp_path: Path,
) -> None:
    _plates(tmp_path / "in", "a.csv")
    (tmp_path / "folder.csv").mkdir()
    text = f"""
[[plates]]
id = "a"
path = "in/a.csv"
[[plates]]
id = "gone"
path = "in/gone.csv"
[[plates]]
glob = "nothing/*.csv"
[[plates]]
glob = "in/*.csv"
[[plates]]
id = "dir"
path = "folder.csv"
{PIPELINE}"""
    error = _error(_write(tmp_path, text))
    base = tmp_path.resolve()
    assert error.problems == (
        f"plates[1].path: plate file {base / 'in' / 'gone.csv'} does not exist",
        f"plates[2].glob: 'nothing/*.csv' matches no file (in {base})",
        "plates[3].glob (a.csv): plate id 'a' is already used by plates[0]",
        f"plates[4].path: {base / 'folder.csv'} is not a file",
    )


def test_a_plate_gives_either_a_path_or_a_glob(tmp_path: Path) -> None:
    error = _error(_write(tmp_path, f'[[plates]]\nid = "a"\nglob = "*.csv"\n{PIPELINE}'))
    assert error.problems == (
        "plates[0]: give either id and path (one plate) or glob (a plate per file), not both",
    )


def test_steps_from_a_module_the_engine_does_not_allow_are_refused(tmp_path: Path) -> None:
    _plates(tmp_path, "a.csv")
    text = '[[plates]]\nglob = "*.csv"\n[[pipeline.steps]]\nfunction = "os:remove"\n'
    error = _error(_write(tmp_path, text))
    assert error.problems == (
        "pipeline.steps[0].function: module 'os' is not allowed; add it to allow in [engine] "
        f"(allowed now: {STEP})",
    )
    allowed = _write(tmp_path, text + '[engine]\nkind = "local"\nallow = ["os"]\n', "ok.toml")
    assert load_batch_file(allowed).pipeline.steps[0].function == "os:remove"


@pytest.mark.parametrize(
    ("setup", "problem"),
    [
        ("missing", "no such file"),
        ("directory", "is a directory, not a batch file"),
        ("latin1", "not UTF-8 text (byte 6): a batch file is TOML, UTF-8"),
    ],
)
def test_unreadable_files_are_reported(tmp_path: Path, setup: str, problem: str) -> None:
    path = tmp_path / "batch.toml"
    if setup == "directory":
        path.mkdir()
    elif setup == "latin1":
        path.write_bytes(b'name="\xe9"\n')
    error = _error(path)
    assert error.problems == (problem,)
    assert str(error) == f"{path}: {problem}"


def test_many_problems_are_capped(tmp_path: Path) -> None:
    plates = "".join(f'[[plates]]\nid = "p{i}"\n' for i in range(15))
    error = _error(_write(tmp_path, plates + PIPELINE))
    assert len(error.problems) == 11
    assert error.problems[-1] == "... and 5 more"


def test_a_rendered_batch_file_reads_back_equal(tmp_path: Path) -> None:
    batch = BatchFile(
        name='quotes " and \\ and é',
        policy=CompileFailurePolicy.CONTINUE,
        output_dir="reports",
        status_interval=0.5,
        plates=(PlateEntry(id="a b", path="plates/a b.csv"), PlateEntry(glob="more/*.csv")),
        pipeline=PipelineSection(
            steps=(
                StepEntry(function=f"{STEP}:read_plate"),
                StepEntry(
                    function=f"{STEP}:normalise",
                    params={"method": "robust_z", "odd key": [1, 2.5, True, {"x": "y"}]},
                ),
            )
        ),
        engine=LocalEngineSettings(workers=2),
    )
    text = render_batch_file(batch, comment="a comment\nover two lines")
    assert text.startswith("# a comment\n# over two lines\n")
    assert parse_batch_file(text) == batch
    with pytest.raises(ValueError, match="TOML has no null"):
        render_batch_file(
            batch.model_copy(
                update={
                    "pipeline": PipelineSection(
                        steps=(StepEntry(function=f"{STEP}:pause", params={"seconds": None}),)
                    )
                }
            )
        )


# --- every input: a BatchFile or a BatchFileError naming the file -------------------------------
#
# A batch file is written by hand, generated, or hostile. parse_batch_file must return a
# BatchFile or raise BatchFileError naming the source, whatever the text; load_batch_file
# adds the file's bytes (size, UTF-8). Nothing else may escape: the CLI turns exactly
# BatchFileError into "exit 2, one line".

SOURCE = "hostile.toml"
VALID = f'[[plates]]\nid = "a"\npath = "a.csv"\n{PIPELINE}'
"""A batch file that parses (paths are only checked by load_batch_file)."""


def _parsed(text: str) -> BatchFile | BatchFileError:
    """What parse_batch_file made of ``text``: the file, or the error (checked for its form)."""
    try:
        return parse_batch_file(text, source=SOURCE)
    except BatchFileError as exc:
        error = exc
    assert error.source == SOURCE
    assert error.problems, "an error lists at least one problem"
    assert str(error).startswith(f"{SOURCE}: ")
    return error


def _same(first: BatchFile | BatchFileError, second: BatchFile | BatchFileError) -> bool:
    if isinstance(first, BatchFileError) and isinstance(second, BatchFileError):
        return first.problems == second.problems
    return first == second


def _nest(form: str, depth: int) -> str:
    """TOML whose document nests exactly ``depth`` tables and arrays (the root table is 1)."""
    if form == "array":
        return "x = " + "[" * (depth - 1) + "]" * (depth - 1) + "\n"
    if form == "inline table":
        return "x = " + "{ a = " * (depth - 1) + "1" + " }" * (depth - 1) + "\n"
    if form == "dotted key":
        return ".".join(["a"] * depth) + " = 1\n"
    if form == "table header":
        return "[" + ".".join(["a"] * (depth - 1)) + "]\n"
    assert form == "array of tables"
    return "[[" + ".".join(["a"] * (depth - 2)) + "]]\n"


FORMS = ["array", "inline table", "dotted key", "table header", "array of tables"]
NESTED = f"invalid TOML: nested deeper than {MAX_NESTING} tables and arrays"


def _depth_of(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth_of(v) for v in value), default=0)
    return 0


@pytest.mark.parametrize("form", FORMS)
def test_the_nesting_helper_builds_what_it_says(form: str) -> None:
    for depth in (3, 4, 5, 20):
        assert _depth_of(tomllib.loads(_nest(form, depth))) == depth


@pytest.mark.parametrize("form", FORMS)
def test_nesting_of_max_nesting_is_allowed_and_one_more_refused(form: str) -> None:
    """The root table counts as the first level; every way TOML nests is bounded alike."""
    at_limit = _parsed(_nest(form, MAX_NESTING))
    assert isinstance(at_limit, BatchFileError)  # x or a is no key of a batch file, but...
    assert NESTED not in at_limit.problems  # ...the nesting itself was fine
    beyond = _parsed(_nest(form, MAX_NESTING + 1))
    assert isinstance(beyond, BatchFileError)
    assert beyond.problems == (NESTED,)


LONG_KEY = f"line 1: a dotted key of more than {MAX_NESTING} parts"
"""Keys and headers are refused before tomllib, whose time is quadratic in their parts."""


@pytest.mark.parametrize("form", FORMS)
def test_nesting_far_beyond_the_bound_is_refused_the_same_way(form: str) -> None:
    """tomllib recurses on arrays and inline tables: its RecursionError is said as nesting;
    a dotted key or header that long is refused before tomllib sees it."""
    refused = _parsed(_nest(form, 10_000))
    assert isinstance(refused, BatchFileError)
    assert refused.problems in ((NESTED,), (LONG_KEY,))


def _with_param(value: str) -> str:
    return VALID.replace('params = { method = "robust_z" }', f"params = {{ n = {value} }}")


@pytest.mark.parametrize("sign", ["", "-", "+"])
def test_an_integer_of_4300_digits_is_a_value_and_one_more_is_refused(sign: str) -> None:
    """Python's int-to-str bound: every accepted number can be printed and sent again."""
    ok = _parsed(_with_param(sign + "9" * 4300))
    assert isinstance(ok, BatchFile), ok
    assert ok.pipeline.steps[1].params == {"n": int(sign + "9" * 4300)}
    refused = _parsed(_with_param(sign + "9" * 4301))
    assert isinstance(refused, BatchFileError)
    assert refused.problems == ("invalid TOML: an integer of more than 4300 digits",)
    assert _same(refused, _parsed(f"name = {sign}{'9' * 5000}\n{VALID}"))


@pytest.mark.parametrize("digits", ["0x" + "f" * 5000, "0o" + "7" * 6000, "0b" + "1" * 20_000])
def test_a_huge_hex_octal_or_binary_parameter_is_refused(digits: str) -> None:
    with pytest.raises(BatchFileError, match="digits"):
        parse_batch_file(_with_param(digits), source=SOURCE)


@pytest.mark.parametrize("field", ["name", "status_interval", "mode"])
def test_a_huge_hex_integer_in_a_typed_field_is_a_batch_file_error(field: str) -> None:
    with pytest.raises(BatchFileError):
        parse_batch_file(f"{field} = 0x{'f' * 5000}\n{VALID}", source=SOURCE)


_CONTROL = [chr(c) for c in [*range(0x20), 0x7F] if chr(c) not in "\t\n\r"]
"""Control characters TOML refuses everywhere (CR only alone, as CRLF is a newline)."""


@pytest.mark.parametrize("char", _CONTROL, ids=[f"U+{ord(c):04X}" for c in _CONTROL])
def test_control_characters_and_nul_are_refused_naming_line_and_column(char: str) -> None:
    for text, column in ((f'name = "a{char}"\n', 10), (f"# a{char}\n", 4), (f"x = 1{char}\n", 6)):
        refused = _parsed(text + VALID)
        assert isinstance(refused, BatchFileError), (char, text)
        (problem,) = refused.problems
        assert problem.startswith(f"line 1, column {column}: invalid TOML: "), problem
        assert "\n" not in problem


def test_a_carriage_return_is_only_allowed_before_a_line_feed() -> None:
    assert isinstance(_parsed(VALID.replace("\n", "\r\n")), BatchFile)
    for text in ('name = "a\r"\n', "# a\rb\n", "x = 1\ry = 2\n"):
        refused = _parsed(text + VALID)
        assert isinstance(refused, BatchFileError), text
        assert refused.problems[0].startswith("line 1, column "), refused.problems


@pytest.mark.parametrize("at", [0, 7, len(VALID) // 2, len(VALID)])
def test_a_lone_surrogate_in_the_text_is_refused_naming_the_character(at: int) -> None:
    refused = _parsed(VALID[:at] + "\udc80" + VALID[at:])
    assert isinstance(refused, BatchFileError)
    assert refused.problems == (f"not valid Unicode text: a lone surrogate at character {at}",)


@pytest.mark.parametrize("escape", [r"\uD800", r"\uDFFF", r"\U0000DC00", r"\U00110000"])
def test_an_escape_that_is_no_character_is_refused(escape: str) -> None:
    refused = _parsed(f'name = "{escape}"\n{VALID}')
    assert isinstance(refused, BatchFileError)
    (problem,) = refused.problems
    assert problem.startswith("line 1, column ")
    assert problem.endswith("invalid TOML: Escaped character is not a Unicode scalar value")


def test_a_leading_byte_order_mark_is_skipped_and_only_one() -> None:
    assert _parsed("\ufeff" + VALID) == _parsed(VALID)
    assert isinstance(_parsed(VALID), BatchFile)
    assert isinstance(_parsed("\ufeff\ufeff" + VALID), BatchFileError)
    assert isinstance(_parsed(VALID + "\ufeff"), BatchFileError)


_TOML_SOUP = st.text(
    st.sampled_from([*"[]{}=\"'.,#\n \t\r\\0123456789_+-:aefinotxuUzTZ", "\x00", "\ufeff"]),
    max_size=80,
)


@given(st.text(st.characters(codec=None), max_size=80) | _TOML_SOUP)
def test_any_text_parses_or_raises_batch_file_error(text: str) -> None:
    """Random text, lone surrogates included, and TOML-looking soup."""
    _parsed(text)


@given(_TOML_SOUP | st.text(max_size=60))
def test_a_byte_order_mark_changes_nothing(text: str) -> None:
    """Whatever the text says, the same text after a BOM says the same (or fails the same)."""
    if not text.startswith("\ufeff"):
        assert _same(_parsed("\ufeff" + text), _parsed(text))


@st.composite
def _hostile_fragment(draw: st.DrawFn) -> str:
    """One line (or a few) that no batch file may hold, wherever it is put."""
    kind = draw(
        st.sampled_from(["nest", "digits", "control", "surrogate", "escape", "bom", "number"])
    )
    if kind == "nest":
        form = draw(st.sampled_from(FORMS[:3]))  # headers would swallow the keys after them
        return _nest(form, draw(st.integers(2, 10_000)))
    if kind == "digits":
        sign = draw(st.sampled_from(["", "-", "+"]))
        return f"x = {sign}{'9' * draw(st.integers(4290, 5000))}\n"
    if kind == "control":
        return f'x = "{draw(st.sampled_from(_CONTROL))}"\n'
    if kind == "surrogate":
        return f'x = "{draw(st.characters(categories=["Cs"]))}"\n'
    if kind == "escape":
        return f'x = "\\u{draw(st.integers(0xD800, 0xDFFF)):04X}"\n'
    if kind == "bom":
        return "\ufeff\ufeff\n"  # one is skipped at the start of the file, two never
    return "x = " + draw(st.sampled_from(["1e999", "nan", "-inf", "1" + "0" * 5000 + ".5"])) + "\n"


@given(_hostile_fragment(), st.data())
def test_a_valid_file_with_a_hostile_line_spliced_in_is_refused(
    fragment: str, data: st.DataObject
) -> None:
    """Spliced between any two lines of a valid file, top level or inside a table."""
    lines = VALID.splitlines(keepends=True)
    at = data.draw(st.integers(0, len(lines)), label="at")
    refused = _parsed("".join([*lines[:at], fragment, *lines[at:]]))
    assert isinstance(refused, BatchFileError)


# --- load_batch_file: the bytes of the file ------------------------------------------------------


def test_a_file_of_exactly_max_batch_file_bytes_loads_and_one_more_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plates(tmp_path, "a.csv")
    path = _write(tmp_path, VALID)
    size = path.stat().st_size
    monkeypatch.setattr(batchfile, "MAX_BATCH_FILE_BYTES", size)
    assert load_batch_file(path).plates[0].plate_id == "a"
    path.write_text(VALID + "#", encoding="utf-8")
    error = _error(path)
    assert error.problems == (f"larger than {size} bytes: not a batch file",)
    assert str(error) == f"{path}: larger than {size} bytes: not a batch file"


def test_a_leading_byte_order_mark_in_the_file_is_skipped(tmp_path: Path) -> None:
    _plates(tmp_path, "a.csv")
    plain = load_batch_file(_write(tmp_path, VALID, "plain.toml"))
    marked = tmp_path / "marked.toml"
    marked.write_bytes(b"\xef\xbb\xbf" + VALID.encode("utf-8"))
    assert load_batch_file(marked).spec == plain.spec


@pytest.mark.parametrize(
    "bad",
    [
        b"\x80",
        b"\xc0\xaf",
        b"\xe0\x80\xaf",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\xff",
        b"\xfe",
    ],
    ids=["continuation", "overlong-2", "overlong-3", "surrogate", "beyond-unicode", "ff", "fe"],
)
def test_bytes_that_are_not_utf8_are_refused_naming_the_file_and_byte(
    tmp_path: Path, bad: bytes
) -> None:
    path = tmp_path / "batch.toml"
    path.write_bytes(b'name = "ab' + bad + b'"\n' + VALID.encode())
    error = _error(path)
    assert error.problems == ("not UTF-8 text (byte 10): a batch file is TOML, UTF-8",)
    assert str(error).startswith(f"{path}: ")


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-32", "utf-32-be"])
def test_a_file_in_utf16_or_utf32_is_refused_naming_the_file(tmp_path: Path, codec: str) -> None:
    path = tmp_path / "batch.toml"
    path.write_bytes(VALID.encode(codec))
    error = _error(path)
    assert len(error.problems) == 1
    assert str(error).startswith(f"{path}: ")


# --- plateflow run of a hostile batch file: exit 2, one line -----------------------------------


def _run_hostile(
    folder: Path, content: bytes, capsys: pytest.CaptureFixture[str]
) -> tuple[Path, str]:
    _plates(folder, "a.csv")
    path = folder / "batch.toml"
    path.write_bytes(content)
    assert main(["run", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert not (folder / "output").exists(), "nothing ran, nothing was written"
    return path, captured.err


_HOSTILE_FILES = {
    "deep-arrays": ("x = " + "[" * 10_000 + "]" * 10_000 + "\n" + VALID).encode(),
    "deep-tables": ("x = " + "{a=" * 10_000 + "1" + "}" * 10_000 + "\n" + VALID).encode(),
    "digits": f"name = {'9' * 5000}\n{VALID}".encode(),
    "nul": b'name = "\x00"\n' + VALID.encode(),
    "escape": b'name = "\\uD800"\n' + VALID.encode(),
    "not-utf8": b'name = "\xed\xa0\x80"\n' + VALID.encode(),
    "two-boms": "\ufeff\ufeff".encode() + VALID.encode(),
    "utf-16": VALID.encode("utf-16"),
}


@pytest.mark.parametrize("content", list(_HOSTILE_FILES.values()), ids=list(_HOSTILE_FILES))
def test_run_of_a_hostile_batch_file_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path, err = _run_hostile(tmp_path, content, capsys)
    assert err.startswith(f"plateflow: error: {path}: ")
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_run_of_an_oversize_batch_file_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batchfile, "MAX_BATCH_FILE_BYTES", 64)
    path, err = _run_hostile(tmp_path, VALID.encode(), capsys)
    assert err == f"plateflow: error: {path}: larger than 64 bytes: not a batch file\n"


def test_run_of_a_file_with_a_huge_hex_integer_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, err = _run_hostile(tmp_path, f"name = 0x{'f' * 5000}\n{VALID}".encode(), capsys)
    assert err.startswith(f"plateflow: error: {path}: ")


def test_run_of_a_file_with_a_newline_in_a_key_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, err = _run_hostile(tmp_path, f'"a\\nb" = 1\n{VALID}'.encode(), capsys)
    assert err.startswith(f"plateflow: error: {path}: ")
    assert len(err.splitlines()) == 1, err
