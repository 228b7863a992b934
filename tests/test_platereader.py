"""The plate-reader example domain: plate files, steps, the demo pipeline, synthetic plates."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from plateflow.examples.platereader import (
    GeneratedPlate,
    Hit,
    HitCalls,
    PlateData,
    call_hits,
    demo_pipeline,
    generate_plates,
    normalise,
    pause,
    read_plate,
    subtract_background,
    write_report,
)
from plateflow.pipeline import (
    STEP_UNITS,
    StepCancelled,
    StepContext,
    StepFailed,
    compile_pipeline,
    execute_pipeline,
)

Report = tuple[int, int, str]


class Host:
    """What a host gives a step: a progress sink and a cancellation flag it can flip."""

    def __init__(self, output_dir: Path, *, cancel_when: Callable[[Report], bool] | None = None):
        self.output_dir = output_dir
        self.reports: list[Report] = []
        self.cancelled = False
        self.checks = 0
        self._cancel_when = cancel_when

    def _report(self, done: int, total: int, message: str) -> None:
        self.reports.append((done, total, message))
        if self._cancel_when is not None and self._cancel_when((done, total, message)):
            self.cancelled = True

    def _is_cancelled(self) -> bool:
        self.checks += 1
        return self.cancelled

    def context(self, plate_id: str = "P1", plate_path: str | Path = "") -> StepContext:
        return StepContext(
            plate_id=plate_id,
            plate_path=str(plate_path),
            output_dir=str(self.output_dir),
            _report=self._report,
            _is_cancelled=self._is_cancelled,
        )


def run_demo(plates: list[GeneratedPlate], out: Path, **options: object) -> list[dict[str, object]]:
    compiled = compile_pipeline(demo_pipeline(**options))  # type: ignore[arg-type]
    host = Host(out)
    return [dict(execute_pipeline(compiled, host.context(p.plate_id, p.path))) for p in plates]


def assert_one_monotone_figure(
    reports: list[Report], functions: list[str], steps_done: int | None = None
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


def called(result: dict[str, object]) -> set[str]:
    hits = result["hits"]
    assert isinstance(hits, list)
    return {h["well"] for h in hits}


def write_csv(directory: Path, text: str, name: str = "plate.csv") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


SMALL = """\
well,role,signal
A01,empty,100
A02,empty,110
A03,empty,90
B01,negative,1100
B02,negative,1100
B03,negative,1000
C01,positive,200
C02,positive,200
C03,positive,300
D01,sample,650
D02,sample,1100
D03,sample,700
D04,sample,1050
"""


# --- synthetic plates -------------------------------------------------------------------


def test_generated_plates_are_deterministic_for_a_seed(tmp_path: Path) -> None:
    one = generate_plates(tmp_path / "one", 3, seed=7)
    two = generate_plates(tmp_path / "two", 3, seed=7)
    other = generate_plates(tmp_path / "other", 3, seed=8)
    assert [p.planted_hits for p in one] == [p.planted_hits for p in two]
    assert [p.path.read_bytes() for p in one] == [p.path.read_bytes() for p in two]
    assert [p.path.read_bytes() for p in one] != [p.path.read_bytes() for p in other]
    assert [p.plate_id for p in one] == ["plate-0001", "plate-0002", "plate-0003"]
    assert [p.path.name for p in one] == ["plate-0001.csv", "plate-0002.csv", "plate-0003.csv"]
    # Plates of one batch differ from each other (own background, gain, hits).
    assert len({p.path.read_bytes() for p in one}) == 3


@pytest.mark.parametrize(
    ("wells", "samples", "controls", "empties", "planted"),
    [(384, 320, 60, 4, 6), (96, 80, 12, 4, 2)],
)
def test_generated_layouts(
    tmp_path: Path, wells: int, samples: int, controls: int, empties: int, planted: int
) -> None:
    (plate,) = generate_plates(tmp_path, 1, wells=wells)
    data = read_plate(plate.path, Host(tmp_path).context(plate.plate_id))
    assert len(data.wells) == wells
    assert data.roles.count("sample") == samples
    assert data.roles.count("positive") + data.roles.count("negative") == controls
    assert data.roles.count("empty") == empties
    assert len(plate.planted_hits) == planted
    roles = dict(zip(data.wells, data.roles, strict=True))
    assert all(roles[well] == "sample" for well in plate.planted_hits)
    assert data.wells[-1] == ("P24" if wells == 384 else "H12")


def test_generate_plates_validates_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="wells must be 96 or 384, got 1536"):
        generate_plates(tmp_path, 1, wells=1536)
    with pytest.raises(ValueError, match="hit_rate must be within"):
        generate_plates(tmp_path, 1, hit_rate=1.5)
    with pytest.raises(ValueError, match="count must be an int >= 0"):
        generate_plates(tmp_path / "never", -1)
    assert not (tmp_path / "never").exists()
    assert generate_plates(tmp_path, 2, hit_rate=0.0)[0].planted_hits == ()


# --- the demo pipeline end to end -------------------------------------------------------


@pytest.mark.parametrize("wells", [384, 96])
def test_percent_of_control_finds_every_planted_hit_and_no_false_positive(
    tmp_path: Path, wells: int
) -> None:
    # Tolerance: none. Planted hits are inhibited 70-100 %, inactive samples sit at
    # 0 +- ~8 %, so the 50 % threshold is many standard deviations from both.
    plates = generate_plates(tmp_path / "plates", 12, seed=3, wells=wells)
    results = run_demo(plates, tmp_path / "out")
    for plate, result in zip(plates, results, strict=True):
        assert called(result) == set(plate.planted_hits), plate.plate_id
        assert result["hit_count"] == len(plate.planted_hits)
        z_prime = result["z_prime"]
        assert isinstance(z_prime, float)
        assert 0.5 < z_prime < 1.0


def test_robust_z_finds_every_planted_hit_with_few_false_positives(tmp_path: Path) -> None:
    # Tolerance: at most 1 % of sample wells. |z| >= 3 flags ~0.3 % of normally
    # distributed inactive samples on both sides; that is what robust z does.
    plates = generate_plates(tmp_path / "plates", 12, seed=3)
    results = run_demo(plates, tmp_path / "out", method="robust_z")
    false_positives = 0
    for plate, result in zip(plates, results, strict=True):
        hits = called(result)
        assert set(plate.planted_hits) <= hits, plate.plate_id
        false_positives += len(hits - set(plate.planted_hits))
        z_prime = result["z_prime"]
        assert isinstance(z_prime, float)
        assert z_prime > 0.5
    assert false_positives <= 0.01 * 320 * len(plates)


def test_z_prime_does_not_depend_on_the_normalisation(tmp_path: Path) -> None:
    plates = generate_plates(tmp_path / "plates", 3, seed=5)
    percent = run_demo(plates, tmp_path / "a")
    robust = run_demo(plates, tmp_path / "b", method="robust_z")
    assert [r["z_prime"] for r in percent] == pytest.approx(
        [r["z_prime"] for r in robust], abs=2e-4
    )


def test_the_report_file_matches_the_result(tmp_path: Path) -> None:
    (plate,) = generate_plates(tmp_path / "plates", 1, seed=11)
    (result,) = run_demo(plates=[plate], out=tmp_path / "out")
    report_path = Path(str(result["report"]))
    assert report_path == tmp_path / "out" / "plate-0001.report.json"
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["format"] == "plateflow-platereader-report/1"
    assert report["plate_id"] == result["plate_id"] == "plate-0001"
    assert report["hits"] == result["hits"]
    assert report["hit_count"] == result["hit_count"] == len(plate.planted_hits)
    assert report["qc"]["z_prime"] == result["z_prime"]
    assert report["source"] == str(plate.path)
    assert report["scale"] == "percent_inhibition"
    assert report["threshold"] == 50.0
    assert report["qc"]["wells"] == 384
    assert report["qc"]["samples"] == 320
    assert report["qc"]["negative"]["n"] == 28
    assert report["qc"]["positive"]["n"] == 32
    assert 100 <= report["qc"]["background"] <= 400
    assert all(h["value"] >= 50.0 for h in report["hits"])
    assert not list((tmp_path / "out").glob("*.partial"))


def test_progress_is_monotonic_within_each_step_and_across_steps(tmp_path: Path) -> None:
    (plate,) = generate_plates(tmp_path / "plates", 1)
    spec = demo_pipeline()
    host = Host(tmp_path / "out")
    execute_pipeline(compile_pipeline(spec), host.context(plate.plate_id, plate.path))

    functions = [step.function for step in spec.steps]
    assert STEP_UNITS == 100
    # One total (5 steps x 100), done never decreasing over the whole run, and
    # the runner's report after each step exactly 100, 200, ..., 500.
    assert_one_monotone_figure(host.reports, functions)
    assert host.reports[-1] == (500, 500, functions[-1])

    # Between two step reports, the running step reports its own progress,
    # scaled into its share: within [i * 100, i * 100 + 99], never reaching the
    # next step's share, and finishing (its own done == total) at i * 100 + 99.
    segments: list[list[Report]] = [[]]
    for report in host.reports:
        if report[2] in functions:
            segments.append([])
        else:
            segments[-1].append(report)
    assert segments[-1] == []
    assert len(segments) == len(functions) + 1
    for index, segment in enumerate(segments[:-1]):
        assert segment, "every step reports progress"
        base = index * 100
        counts = [done for done, _, _ in segment]
        assert all(base <= done <= base + 99 for done in counts), (index, counts)
        assert counts[-1] == base + 99
    # 384 wells: 0, every 96, done; scaled into the first step's 0..99.
    reading = f"reading {plate.path}"
    assert segments[0] == [(done, 500, reading) for done in (0, 25, 50, 75, 99)]


# --- cancellation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "message"),
    [(0, "reading"), (1, "subtracting"), (2, "normalising"), (3, "calling hits")],
)
def test_cancelling_inside_a_step_stops_it_there(tmp_path: Path, index: int, message: str) -> None:
    (plate,) = generate_plates(tmp_path / "plates", 1)
    spec = demo_pipeline()
    host = Host(tmp_path / "out", cancel_when=lambda r: r[2].startswith(message))
    with pytest.raises(StepCancelled, match=plate.plate_id):
        execute_pipeline(compile_pipeline(spec), host.context(plate.plate_id, plate.path))
    # The step that saw the cancellation reported its start (the start of its
    # share of the whole: index * 100 of 500) and nothing after it.
    assert host.reports[-1][:2] == (index * 100, 500)
    assert host.reports[-1][2].startswith(message)
    assert [r for r in host.reports if r[2].startswith(message)] == [host.reports[-1]]
    # Only the steps before it finished, and progress stayed one monotone figure.
    functions = [step.function for step in spec.steps]
    assert_one_monotone_figure(host.reports, functions, steps_done=index)
    assert not (tmp_path / "out").exists()


def test_pause_waits_then_returns_its_data_unchanged(tmp_path: Path) -> None:
    host = Host(tmp_path)
    data = PlateData("P1", ("A01",), ("sample",), (1.0,))
    started = time.monotonic()
    assert pause(data, host.context(), seconds=0.05) is data
    assert time.monotonic() - started >= 0.05
    assert host.reports[0] == (0, 50, "pausing")
    assert host.reports[-1] == (50, 50, "pausing")
    assert host.checks >= 2  # it kept checking for cancellation while it waited


def test_pause_is_cancellable_promptly(tmp_path: Path) -> None:
    checks: list[None] = []

    def cancelled_on_third_check() -> bool:
        checks.append(None)
        return len(checks) >= 3

    ctx = StepContext("P1", "", str(tmp_path), lambda *_: None, cancelled_on_third_check)
    started = time.monotonic()
    with pytest.raises(StepCancelled):
        pause("data", ctx, seconds=30.0)
    assert len(checks) == 3
    assert time.monotonic() - started < 10.0


def test_pause_rejects_a_negative_duration(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"pause: seconds -1\.0 must be a finite number >= 0"):
        pause(None, Host(tmp_path).context(), seconds=-1.0)


def test_a_paused_demo_pipeline_can_be_cancelled_while_paused(tmp_path: Path) -> None:
    (plate,) = generate_plates(tmp_path / "plates", 1)
    spec = demo_pipeline(pause_seconds=30.0)
    assert [s.function.rsplit(":", 1)[1] for s in spec.steps][-2:] == ["pause", "write_report"]
    host = Host(tmp_path / "out", cancel_when=lambda r: r[2] == "pausing")
    with pytest.raises(StepCancelled):
        execute_pipeline(compile_pipeline(spec), host.context(plate.plate_id, plate.path))
    # pause is step 5 of 6: its start is 400 of 600, after four finished steps.
    assert host.reports[-1] == (400, 600, "pausing")
    functions = [step.function for step in spec.steps]
    assert_one_monotone_figure(host.reports, functions, steps_done=4)


# --- reading plate files ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        (
            "well,role,value\nB01,negative,1\n",
            "1",
            "the header lacks column(s) signal; expected a header naming well, role, signal",
        ),
        ("well,signal\nB01,1\n", "1", "the header lacks column(s) role"),
        ("well,role,signal\nB01,negative,1\nQ01,sample,2\n", "3", "well 'Q01' is not a well"),
        ("well,role,signal\nA25,negative,1\n", "2", "well 'A25' is not a well name"),
        ("well,role,signal\nA00,negative,1\n", "2", "well 'A00' is not a well name"),
        ("well,role,signal\n,negative,1\n", "2", "well '' is not a well name"),
        (
            "well,role,signal\nB01,negative,1\nB02,positive,abc\n",
            "3",
            "signal 'abc' of well B02 is not a number",
        ),
        ("well,role,signal\nB01,negative,nan\n", "2", "signal 'nan' of well B01 is not a finite"),
        ("well,role,signal\nB01,negative,\n", "2", "signal '' of well B01 is not a number"),
        (
            "well,role,signal\nB01,negative,1\nB02,control,2\n",
            "3",
            "role 'control' is not one of sample, positive, negative, empty",
        ),
        (
            "well,role,signal\nB01,negative,1\nb1,positive,2\n",
            "3",
            "well B01 appears again (first on line 2)",
        ),
        ("well,role,signal\nB01,negative,1,9\n", "2", "expected 3 fields like the header, got 4"),
        ("well,role,signal\nB01,negative\n", "2", "expected 3 fields like the header, got 2"),
        (
            "well,role,signal\nB01,negative,1\nB02,sample,2\nB03,empty,3\n",
            "2-4",
            "no positive control wells; a plate needs positive and negative controls",
        ),
        (
            "well,role,signal\nB01,sample,1\nB02,positive,2\n",
            "2-3",
            "no negative control wells",
        ),
        ("", "1", "the file is empty; expected a header well,role,signal"),
        ("well,role,signal\n\n", "1", "no wells after the header"),
        ("well,role,signal,role\nB01,negative,1,x\n", "1", "names column(s) role more than once"),
    ],
)
def test_a_bad_plate_file_is_rejected_naming_file_line_and_problem(
    tmp_path: Path, text: str, line: str, problem: str
) -> None:
    path = write_csv(tmp_path, text)
    with pytest.raises(ValueError, match="line") as caught:
        read_plate(str(path), Host(tmp_path).context())
    message = str(caught.value)
    assert message.startswith(f"{path}: line {line}: ")
    assert problem in message


def test_a_bad_plate_fails_the_pipeline_with_the_same_message(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "well,role,signal\nB01,negative,1\nB02,positive,lots\n")
    compiled = compile_pipeline(demo_pipeline())
    original = f"{path}: line 3: signal 'lots' of well B02 is not a number"
    with pytest.raises(
        StepFailed,
        match=(
            r"^step 1 \(plateflow\.examples\.platereader:read_plate\) raised ValueError: "
            + re.escape(original)
        ),
    ) as caught:
        execute_pipeline(compiled, Host(tmp_path / "out").context("P1", path))
    # The original is chained, naming the file, the line and the problem.
    cause = caught.value.__cause__
    assert type(cause) is ValueError
    assert str(cause).startswith(original)
    assert str(caught.value).endswith(str(cause))


def test_a_missing_plate_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        read_plate(tmp_path / "nope.csv", Host(tmp_path).context())


def test_read_plate_accepts_common_variations(tmp_path: Path) -> None:
    text = (
        "\ufeffSignal,Well,Role,Compound\n"
        "  1000.5 , d4 ,Negative,DMSO\n"
        "\n"
        "200,A1,positive,staurosporine\n"
        "-3,p24,EMPTY,\n"
        "750,C12,sample,X-1\n"
    )
    path = write_csv(tmp_path, text)
    plate = read_plate(path, Host(tmp_path).context("plate-9"))
    assert plate == PlateData(
        plate_id="plate-9",
        wells=("A01", "C12", "D04", "P24"),
        roles=("positive", "sample", "negative", "empty"),
        values=(200.0, 750.0, 1000.5, -3.0),
        source=str(path),
    )


# --- the steps one by one ---------------------------------------------------------------


def test_the_steps_on_a_small_plate(tmp_path: Path) -> None:
    host = Host(tmp_path)
    ctx = host.context("small")
    raw = read_plate(write_csv(tmp_path, SMALL), ctx)
    assert raw.scale == "raw"

    corrected = subtract_background(raw, ctx)
    assert corrected.background == 100.0  # median of the empty wells
    assert corrected.role_values("negative") == [1000.0, 1000.0, 900.0]
    assert corrected.scale == "background_subtracted"

    percent = normalise(corrected, ctx)
    # negatives' median 1000 -> 0 %, positives' median 100 -> 100 %
    assert percent.scale == "percent_inhibition"
    assert percent.role_values("sample") == pytest.approx([50.0, 0.0, 44.4444, 5.5556], abs=1e-4)

    calls = call_hits(percent, ctx, threshold=50.0)
    assert calls == HitCalls(plate=percent, threshold=50.0, hits=(Hit("D01", 50.0),))
    assert call_hits(percent, ctx, threshold=40.0).hits == (
        Hit("D01", 50.0),
        Hit("D03", pytest.approx(44.4444, abs=1e-4)),  # type: ignore[arg-type]
    )

    result = write_report(calls, ctx, filename="{plate_id}-hits.json")
    assert result == {
        "plate_id": "small",
        "hits": [{"well": "D01", "value": 50.0}],
        "hit_count": 1,
        # means 1066.67 and 233.33 (raw), both standard deviations 57.735
        "z_prime": pytest.approx(1 - 3 * (57.735 + 57.735) / (2500 / 3), abs=1e-4),
        "report": str(tmp_path / "small-hits.json"),
    }
    json.dumps(result, allow_nan=False)


def test_two_executions_of_one_plate_can_write_its_report_at_once(tmp_path: Path) -> None:
    # Regression: both writers used one ``.partial`` file, so one rename found it gone.
    ctx = Host(tmp_path).context("small")
    calls = call_hits(
        normalise(subtract_background(read_plate(write_csv(tmp_path, SMALL), ctx), ctx), ctx), ctx
    )
    out = tmp_path / "out"
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def writer() -> None:
        host = Host(out)
        try:
            barrier.wait(timeout=10)
            for _ in range(50):
                write_report(calls, host.context("small"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert [p.name for p in out.iterdir()] == ["small.report.json"]  # no partial file left
    assert json.loads((out / "small.report.json").read_text())["plate_id"] == "small"


def test_background_comes_from_the_negatives_without_empty_wells(tmp_path: Path) -> None:
    text = "\n".join(line for line in SMALL.splitlines() if ",empty," not in line)
    ctx = Host(tmp_path).context()
    plate = read_plate(write_csv(tmp_path, text), ctx)
    assert subtract_background(plate, ctx).background == 1100.0
    assert subtract_background(plate, ctx, source="negative").background == 1100.0
    with_empties = read_plate(write_csv(tmp_path, SMALL, "b.csv"), ctx)
    assert subtract_background(with_empties, ctx, source="negative").background == 1100.0
    with pytest.raises(ValueError, match="unknown source 'blank'; use one of empty, negative"):
        subtract_background(plate, ctx, source="blank")


def test_robust_z_uses_the_samples_median_and_mad(tmp_path: Path) -> None:
    ctx = Host(tmp_path).context()
    plate = read_plate(write_csv(tmp_path, SMALL), ctx)
    z = normalise(plate, ctx, method="robust_z")
    # samples 650, 1100, 700, 1050: median 875, MAD 200 (deviations 225, 225, 175, 175)
    assert z.role_values("sample") == pytest.approx(
        [(v - 875) / (1.4826 * 200) for v in (650, 1100, 700, 1050)]
    )
    # |z| is 0.759 for D01 and D02 (an inhibitor and an activator), 0.590 for D03 and D04
    assert call_hits(z, ctx, threshold=0.8).hits == ()
    assert [h.well for h in call_hits(z, ctx, threshold=0.7).hits] == ["D01", "D02"]
    assert [h.well for h in call_hits(z, ctx, threshold=0.5).hits] == ["D01", "D02", "D03", "D04"]
    with pytest.raises(ValueError, match="above 0 for robust z"):
        call_hits(z, ctx, threshold=0.0)


def test_normalise_rejects_an_unknown_method_at_execute(tmp_path: Path) -> None:
    (plate,) = generate_plates(tmp_path / "plates", 1)
    spec = demo_pipeline().model_copy(deep=True)
    steps = list(spec.steps)
    steps[2] = steps[2].model_copy(update={"params": {"method": "zscore"}})
    compiled = compile_pipeline(spec.model_copy(update={"steps": tuple(steps)}))
    with pytest.raises(
        StepFailed,
        match=(
            r"^step 3 \(plateflow\.examples\.platereader:normalise\) raised ValueError: "
            r"normalise: unknown method 'zscore'; use one of"
        ),
    ) as caught:
        execute_pipeline(compiled, Host(tmp_path / "out").context(plate.plate_id, plate.path))
    cause = caught.value.__cause__
    assert type(cause) is ValueError
    assert str(cause).startswith("normalise: unknown method 'zscore'; use one of")
    with pytest.raises(ValueError, match="demo_pipeline: unknown method 'zscore'"):
        demo_pipeline(method="zscore")


def test_degenerate_plates_are_rejected_by_normalise(tmp_path: Path) -> None:
    ctx = Host(tmp_path).context("flat")
    flat = PlateData(
        "flat",
        ("A01", "A02", "A03", "A04", "A05"),
        ("negative", "positive", "sample", "sample", "sample"),
        (5.0, 5.0, 1.0, 1.0, 1.0),
    )
    with pytest.raises(ValueError, match="the same median"):
        normalise(flat, ctx)
    with pytest.raises(ValueError, match="no spread"):
        normalise(flat, ctx, method="robust_z")
    with pytest.raises(ValueError, match="has 0 sample wells; robust_z needs at least 3"):
        normalise(
            PlateData("c", ("A01", "A02"), ("negative", "positive"), (5.0, 1.0)),
            ctx,
            method="robust_z",
        )


def test_steps_in_the_wrong_order_say_what_has_to_come_first(tmp_path: Path) -> None:
    ctx = Host(tmp_path).context()
    raw = read_plate(write_csv(tmp_path, SMALL), ctx)
    with pytest.raises(
        ValueError, match="needs percent_inhibition or robust_z values; put normalise"
    ):
        call_hits(raw, ctx)
    with pytest.raises(TypeError, match="write_report reports on the result of call_hits"):
        write_report(raw, ctx)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="subtract_background transforms a PlateData; got str"):
        subtract_background("plate.csv", ctx)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"normalise: .* has percent_inhibition values"):
        normalise(normalise(raw, ctx), ctx)
    with pytest.raises(TypeError, match="read_plate reads a plate file path"):
        read_plate(raw, ctx)  # type: ignore[arg-type]


def test_the_report_name_must_stay_inside_the_output_directory(tmp_path: Path) -> None:
    ctx = Host(tmp_path / "out").context("../escape")
    raw = read_plate(write_csv(tmp_path, SMALL), ctx)
    calls = call_hits(normalise(raw, ctx), ctx)
    with pytest.raises(ValueError, match="must be a plain file name inside the output directory"):
        write_report(calls, ctx)
    with pytest.raises(ValueError, match="must be a plain file name"):
        write_report(calls, Host(tmp_path / "out").context("ok"), filename="..")
    assert not (tmp_path / "out").exists()


def test_plate_data_checks_its_shape() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        PlateData("p", ("A01",), (), (1.0,))
    with pytest.raises(ValueError, match="unknown roles"):
        PlateData("p", ("A01",), ("blank",), (1.0,))


def test_demo_pipeline_shapes() -> None:
    standard = demo_pipeline()
    assert [s.function.rsplit(":", 1)[1] for s in standard.steps] == [
        "read_plate",
        "subtract_background",
        "normalise",
        "call_hits",
        "write_report",
    ]
    assert standard.steps[3].params == {"threshold": 50.0}
    assert demo_pipeline(method="robust_z").steps[3].params == {"threshold": 3.0}
    assert demo_pipeline(threshold=30).steps[3].params == {"threshold": 30.0}
    assert len(demo_pipeline(pause_seconds=0.5).steps) == 6
