"""A real, stdlib-only example domain: plate-reader wells → normalisation → hits → report.

High-content screening reads one signal per well of a microplate. Control wells
bracket the assay window: *negative* controls are the uninhibited signal (0 %
inhibition), *positive* controls the fully inhibited one (100 %), *empty* wells
the reader's background. A compound in a *sample* well is a hit when it pulls
its signal strongly towards the positive controls.

Plate file format
-----------------
A UTF-8 CSV file (an Excel byte-order mark is tolerated) whose first line is a
header naming at least the columns ``well``, ``role`` and ``signal``, in any
order; other columns are ignored. Every further non-blank line is one well:

``well``
    ``A01`` .. ``P24``: a row letter ``A``-``P`` and a column ``1``-``24``
    (``A1`` and lower case are accepted and normalised to ``A01``). 96-well
    plates use ``A01`` .. ``H12``, 384-well plates ``A01`` .. ``P24``. A well
    appears at most once; wells may be missing (readers often skip them).
``role``
    ``sample``, ``positive``, ``negative`` or ``empty``.
``signal``
    A finite number (the raw reader value).

A plate needs at least one positive and one negative control well. A file that
breaks any of these rules makes :func:`read_plate` raise :class:`ValueError`
naming the file, the line and the problem. Example::

    well,role,signal
    A01,empty,212.40
    B01,negative,10413.77
    B02,positive,1180.02
    B03,sample,9875.31

The steps
---------
Every step is ``def step(data, ctx, **params)`` (see :mod:`plateflow.pipeline`)
and checks the type of ``data``, so steps in the wrong order fail with a message
saying which step has to come first. The standard pipeline
(:func:`demo_pipeline`) is :func:`read_plate` → :func:`subtract_background` →
:func:`normalise` → :func:`call_hits` → :func:`write_report`; :func:`pause` is a
real step that only waits (cancellably), for demonstrations of cancellation and
of slow executions.

Controls are summarised by their *median* for normalisation, so one bad control
well does not move every value on the plate; the Z'-factor (Zhang et al., 1999)
uses means and standard deviations, as it is defined. Z' is invariant under the
affine maps that background subtraction and both normalisations apply, so the
report's Z' is the assay's whatever the pipeline did before.

:func:`generate_plates` writes synthetic plates in this format with planted
hits, for the demo, the tests and the benchmarks.

Callables bound at module level are resolvable as pipeline steps by name, so
this module imports modules, not functions or classes, except under
``TYPE_CHECKING``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import pathlib
import random
import re
import statistics
import tempfile
import threading
import time
import typing

if typing.TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

    from pydantic import JsonValue

    from plateflow.pipeline import PipelineSpec, StepContext

__all__ = [
    "ROLES",
    "GeneratedPlate",
    "Hit",
    "HitCalls",
    "PlateData",
    "call_hits",
    "demo_pipeline",
    "generate_plates",
    "normalise",
    "pause",
    "read_plate",
    "subtract_background",
    "write_report",
]

ROLES: tuple[str, ...] = ("sample", "positive", "negative", "empty")
"""The roles a well can have, as written in a plate file."""

REPORT_FORMAT = "plateflow-platereader-report/1"
"""The ``format`` field of every report :func:`write_report` writes."""

_ROW_LETTERS = "ABCDEFGHIJKLMNOP"
_MAX_COLUMN = 24
_WELL = re.compile(r"^([A-Pa-p])(\d{1,2})$")
_HEADER = ("well", "role", "signal")
_PROGRESS_EVERY = 96
"""Steps report progress every this many wells (and once at the end)."""
_MAD_TO_SD = 1.4826
"""Scales a median absolute deviation to a standard deviation for normal data."""

_RAW = "raw"
_BACKGROUND_SUBTRACTED = "background_subtracted"
_PERCENT_INHIBITION = "percent_inhibition"
_ROBUST_Z = "robust_z"
_METHODS = {"percent_of_control": _PERCENT_INHIBITION, "robust_z": _ROBUST_Z}
_BACKGROUND_SOURCES = ("empty", "negative")
_STEP = "plateflow.examples.platereader:{}"


@dataclasses.dataclass(frozen=True, slots=True)
class PlateData:
    """One plate's wells, in row-major order, and what their values currently mean.

    ``scale`` is ``"raw"``, ``"background_subtracted"``, ``"percent_inhibition"``
    or ``"robust_z"``; ``background`` is what :func:`subtract_background`
    subtracted (0 before it ran); ``source`` is the file the plate came from.
    """

    plate_id: str
    wells: tuple[str, ...]
    roles: tuple[str, ...]
    values: tuple[float, ...]
    source: str = ""
    scale: str = _RAW
    background: float = 0.0

    def __post_init__(self) -> None:
        if not len(self.wells) == len(self.roles) == len(self.values):
            raise ValueError(
                f"plate {self.plate_id!r}: wells, roles and values differ in length "
                f"({len(self.wells)}, {len(self.roles)}, {len(self.values)})"
            )
        unknown = sorted(set(self.roles) - set(ROLES))
        if unknown:
            raise ValueError(f"plate {self.plate_id!r}: unknown roles {unknown}; roles are {ROLES}")

    def role_values(self, role: str) -> list[float]:
        """The values of the wells with ``role``, in well order."""
        return [v for r, v in zip(self.roles, self.values, strict=True) if r == role]


@dataclasses.dataclass(frozen=True, slots=True)
class Hit:
    """A sample well called as a hit, with its normalised value."""

    well: str
    value: float


@dataclasses.dataclass(frozen=True, slots=True)
class HitCalls:
    """What :func:`call_hits` returns: the normalised plate and its hits in well order."""

    plate: PlateData
    threshold: float
    hits: tuple[Hit, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class GeneratedPlate:
    """A plate file written by :func:`generate_plates` and the hits planted in it."""

    plate_id: str
    path: pathlib.Path
    planted_hits: tuple[str, ...]


# --- reading ------------------------------------------------------------------------------


def _well_name(text: str) -> str | None:
    """``"a1"`` → ``"A01"``; ``None`` when ``text`` is not a well of a 384-well plate."""
    match = _WELL.match(text.strip())
    if match is None:
        return None
    column = int(match.group(2))
    if not 1 <= column <= _MAX_COLUMN:
        return None
    return f"{match.group(1).upper()}{column:02d}"


def _well_order(well: str) -> tuple[int, int]:
    return _ROW_LETTERS.index(well[0]), int(well[1:])


def _ticks(ctx: StepContext, total: int, message: str) -> Iterator[int]:
    """Indices ``0 .. total-1``, checking cancellation before each and reporting progress.

    Progress goes out as ``(0, total)`` first, every :data:`_PROGRESS_EVERY`
    items, and as ``(total, total)`` once the caller has consumed every index.
    """
    ctx.progress(0, total, message)
    for index in range(total):
        ctx.check_cancelled()
        if index and index % _PROGRESS_EVERY == 0:
            ctx.progress(index, total, message)
        yield index
    ctx.progress(total, total, message)


def read_plate(path: str | os.PathLike[str], ctx: StepContext) -> PlateData:
    """Parse and validate a plate file (the format is in the module docstring).

    The plate id is the context's. Wells come out in row-major order whatever
    the file's order. Raises :class:`ValueError` naming the file, the line and
    the problem when the file breaks the format.
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            f"read_plate reads a plate file path (the first step's data); got {type(path).__name__}"
        )
    name = os.fspath(path)
    with open(name, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        lines = [(reader.line_num, row) for row in reader if any(f.strip() for f in row)]

    def fail(line: int | str, problem: str) -> typing.NoReturn:
        raise ValueError(f"{name}: line {line}: {problem}")

    if not lines:
        fail(1, f"the file is empty; expected a header {','.join(_HEADER)}")
    header_line, header = lines[0]
    columns = [c.strip().lower() for c in header]
    missing = [c for c in _HEADER if c not in columns]
    if missing:
        fail(
            header_line,
            f"the header lacks column(s) {', '.join(missing)}; expected a header naming "
            f"{', '.join(_HEADER)} (got {','.join(header)!r})",
        )
    duplicated = sorted({c for c in _HEADER if columns.count(c) > 1})
    if duplicated:
        fail(header_line, f"the header names column(s) {', '.join(duplicated)} more than once")
    well_at, role_at, signal_at = (columns.index(c) for c in _HEADER)
    if len(lines) == 1:
        fail(header_line, "no wells after the header")

    first_seen: dict[str, int] = {}
    rows: list[tuple[str, str, float]] = []
    body = lines[1:]
    for index in _ticks(ctx, len(body), f"reading {name}"):
        line, fields = body[index]
        if len(fields) != len(header):
            fail(line, f"expected {len(header)} fields like the header, got {len(fields)}")
        well = _well_name(fields[well_at])
        if well is None:
            fail(line, f"well {fields[well_at]!r} is not a well name like A01 .. P24")
        if well in first_seen:
            fail(line, f"well {well} appears again (first on line {first_seen[well]})")
        first_seen[well] = line
        role = fields[role_at].strip().lower()
        if role not in ROLES:
            fail(line, f"role {fields[role_at]!r} is not one of {', '.join(ROLES)}")
        text = fields[signal_at].strip()
        try:
            signal = float(text)
        except ValueError:
            fail(line, f"signal {text!r} of well {well} is not a number")
        if not math.isfinite(signal):
            fail(line, f"signal {text!r} of well {well} is not a finite number")
        rows.append((well, role, signal))

    last_line = body[-1][0]
    for control in ("negative", "positive"):
        if not any(role == control for _, role, _ in rows):
            fail(
                f"{body[0][0]}-{last_line}",
                f"no {control} control wells; a plate needs positive and negative controls",
            )
    rows.sort(key=lambda row: _well_order(row[0]))
    return PlateData(
        plate_id=ctx.plate_id,
        wells=tuple(r[0] for r in rows),
        roles=tuple(r[1] for r in rows),
        values=tuple(r[2] for r in rows),
        source=name,
    )


# --- transforming -------------------------------------------------------------------------


def _require_plate(step: str, data: object, scales: Iterable[str], before: str) -> PlateData:
    if not isinstance(data, PlateData):
        raise TypeError(f"{step} transforms a PlateData; got {type(data).__name__}; {before}")
    wanted = tuple(scales)
    if data.scale not in wanted:
        raise ValueError(
            f"{step}: plate {data.plate_id!r} has {data.scale} values; it needs "
            f"{' or '.join(wanted)} values; {before}"
        )
    return data


def _transform(
    plate: PlateData, ctx: StepContext, message: str, function: typing.Callable[[float], float]
) -> tuple[float, ...]:
    values = plate.values
    return tuple(function(values[i]) for i in _ticks(ctx, len(values), message))


def subtract_background(plate: PlateData, ctx: StepContext, *, source: str = "empty") -> PlateData:
    """Subtract the median of the ``empty`` wells (or of the negatives if there are none).

    ``source="negative"`` always uses the negative controls. Any other
    ``source`` raises :class:`ValueError`.
    """
    plate = _require_plate(
        "subtract_background", plate, [_RAW], "put it right after read_plate, once"
    )
    if source not in _BACKGROUND_SOURCES:
        raise ValueError(
            f"subtract_background: unknown source {source!r}; use one of "
            f"{', '.join(_BACKGROUND_SOURCES)}"
        )
    reference = plate.role_values(source) or plate.role_values("negative")
    background = statistics.median(reference)
    values = _transform(plate, ctx, "subtracting background", lambda v: v - background)
    return dataclasses.replace(
        plate, values=values, scale=_BACKGROUND_SUBTRACTED, background=background
    )


def normalise(
    plate: PlateData, ctx: StepContext, *, method: str = "percent_of_control"
) -> PlateData:
    """Normalise every well's value.

    ``"percent_of_control"``: percent inhibition, 0 % at the negative controls'
    median and 100 % at the positive controls'. ``"robust_z"``: ``(v - m) /
    (1.4826 * MAD)`` with the median ``m`` and median absolute deviation of the
    sample wells; inhibitors come out negative. An unknown method, controls
    that do not separate, or samples without spread raise :class:`ValueError`.
    """
    plate = _require_plate(
        "normalise", plate, [_RAW, _BACKGROUND_SUBTRACTED], "put it before call_hits, once"
    )
    scale = _METHODS.get(method)
    if scale is None:
        raise ValueError(f"normalise: unknown method {method!r}; use one of {', '.join(_METHODS)}")
    if scale == _PERCENT_INHIBITION:
        negative = statistics.median(plate.role_values("negative"))
        positive = statistics.median(plate.role_values("positive"))
        window = negative - positive
        if window == 0:
            raise ValueError(
                f"normalise: plate {plate.plate_id!r}: the positive and negative controls "
                f"have the same median ({negative}); percent of control is undefined"
            )
        values = _transform(
            plate,
            ctx,
            "normalising (percent of control)",
            lambda v: 100.0 * (negative - v) / window,
        )
    else:
        samples = plate.role_values("sample")
        if len(samples) < 3:
            raise ValueError(
                f"normalise: plate {plate.plate_id!r} has {len(samples)} sample wells; "
                "robust_z needs at least 3"
            )
        centre = statistics.median(samples)
        spread = _MAD_TO_SD * statistics.median(abs(v - centre) for v in samples)
        if spread == 0:
            raise ValueError(
                f"normalise: plate {plate.plate_id!r}: the sample wells have no spread "
                "(median absolute deviation 0); robust_z is undefined"
            )
        values = _transform(plate, ctx, "normalising (robust z)", lambda v: (v - centre) / spread)
    return dataclasses.replace(plate, values=values, scale=scale)


def call_hits(plate: PlateData, ctx: StepContext, *, threshold: float = 50.0) -> HitCalls:
    """Call the sample wells whose normalised value reaches ``threshold``.

    On percent inhibition a hit has a value ``>= threshold``; on robust z
    scores ``abs(value) >= threshold`` (3 is usual there), which also catches
    activators. A threshold that is not finite, or not positive for robust z,
    raises :class:`ValueError`.
    """
    plate = _require_plate(
        "call_hits", plate, [_PERCENT_INHIBITION, _ROBUST_Z], "put normalise before it"
    )
    if not math.isfinite(threshold) or (plate.scale == _ROBUST_Z and threshold <= 0):
        raise ValueError(
            f"call_hits: threshold {threshold!r} must be a finite number"
            + (" above 0 for robust z scores" if plate.scale == _ROBUST_Z else "")
        )
    hits: list[Hit] = []
    for i in _ticks(ctx, len(plate.wells), "calling hits"):
        value = plate.values[i]
        score = abs(value) if plate.scale == _ROBUST_Z else value
        if plate.roles[i] == "sample" and score >= threshold:
            hits.append(Hit(plate.wells[i], value))
    return HitCalls(plate=plate, threshold=threshold, hits=tuple(hits))


# --- reporting ----------------------------------------------------------------------------


def _rounded(value: float) -> float:
    return round(value, 4)


def _control_stats(values: Sequence[float]) -> dict[str, JsonValue]:
    return {
        "n": len(values),
        "mean": _rounded(statistics.fmean(values)) if values else None,
        "sd": _rounded(statistics.stdev(values)) if len(values) > 1 else None,
        "median": _rounded(statistics.median(values)) if values else None,
    }


def _z_prime(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """``1 - 3 (sd_pos + sd_neg) / |mean_pos - mean_neg|``; ``None`` when undefined."""
    if len(positive) < 2 or len(negative) < 2:
        return None
    separation = abs(statistics.fmean(positive) - statistics.fmean(negative))
    if separation == 0:
        return None
    spread = statistics.stdev(positive) + statistics.stdev(negative)
    return _rounded(1.0 - 3.0 * spread / separation)


def _report_name(filename: str, plate_id: str) -> str:
    # A plain substitution, not str.format: the template comes from a spec.
    name = filename.replace("{plate_id}", plate_id)
    if not name or name in {".", ".."} or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(
            f"write_report: the report file name {name!r} (from filename {filename!r} and "
            f"plate id {plate_id!r}) must be a plain file name inside the output directory"
        )
    return name


def write_report(
    calls: HitCalls, ctx: StepContext, *, filename: str = "{plate_id}.report.json"
) -> dict[str, JsonValue]:
    """Write the plate's JSON report into ``ctx.output_dir`` and return the result.

    ``{plate_id}`` in ``filename`` is replaced by the plate id; the name must
    stay a plain file name. The report holds the plate id, source, method,
    threshold, QC statistics (Z'-factor, control statistics, background) and
    the hits with their values. The result is ``{"plate_id", "hits",
    "hit_count", "z_prime", "report"}`` with ``hits`` as in the report
    (``[{"well", "value"}, ...]``) and ``report`` the file's path. The file is
    replaced atomically.
    """
    if not isinstance(calls, HitCalls):
        raise TypeError(
            f"write_report reports on the result of call_hits; got {type(calls).__name__}; "
            "put call_hits before it"
        )
    ctx.check_cancelled()
    plate = calls.plate
    positive = plate.role_values("positive")
    negative = plate.role_values("negative")
    z_prime = _z_prime(positive, negative)
    hits: list[JsonValue] = [{"well": h.well, "value": _rounded(h.value)} for h in calls.hits]
    report: dict[str, JsonValue] = {
        "format": REPORT_FORMAT,
        "plate_id": plate.plate_id,
        "source": plate.source,
        "scale": plate.scale,
        "threshold": calls.threshold,
        "qc": {
            "z_prime": z_prime,
            "background": _rounded(plate.background),
            "positive": _control_stats(positive),
            "negative": _control_stats(negative),
            "wells": len(plate.wells),
            "samples": plate.roles.count("sample"),
        },
        "hits": hits,
        "hit_count": len(hits),
    }
    path = os.path.join(ctx.output_dir, _report_name(filename, plate.plate_id))
    os.makedirs(ctx.output_dir, exist_ok=True)
    # A partial file of its own: two executions of one plate may write at the same time.
    fd, partial = tempfile.mkstemp(
        dir=ctx.output_dir, prefix=f"{os.path.basename(path)}.", suffix=".partial"
    )
    try:
        with open(fd, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    ctx.progress(1, 1, f"wrote {path}")
    return {
        "plate_id": plate.plate_id,
        "hits": hits,
        "hit_count": len(hits),
        "z_prime": z_prime,
        "report": path,
    }


def pause(data: object, ctx: StepContext, *, seconds: float = 1.0) -> object:
    """Wait ``seconds`` in 10 ms slices, observing cancellation; return ``data`` unchanged.

    A real step for demonstrating cancellation and slow executions: put it
    anywhere in a pipeline. Progress is reported about every 100 ms.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"pause: seconds {seconds!r} must be a finite number >= 0")
    never = threading.Event()
    start = time.monotonic()
    deadline = start + seconds
    total_ms = round(seconds * 1000)
    reported = -1
    ctx.progress(0, total_ms, "pausing")
    while (now := time.monotonic()) < deadline:
        ctx.check_cancelled()
        elapsed_ms = min(total_ms, int((now - start) * 1000))
        if elapsed_ms // 100 > reported:
            reported = elapsed_ms // 100
            ctx.progress(elapsed_ms, total_ms, "pausing")
        never.wait(min(0.01, deadline - now))
    ctx.check_cancelled()
    ctx.progress(total_ms, total_ms, "pausing")
    return data


def demo_pipeline(
    *, method: str = "percent_of_control", threshold: float | None = None, pause_seconds: float = 0
) -> PipelineSpec:
    """The standard pipeline: read → subtract background → normalise → call hits → report.

    ``threshold`` defaults to the method's usual one: 50 (% inhibition) for
    ``"percent_of_control"``, 3 (|z|) for ``"robust_z"``. ``pause_seconds > 0``
    adds a :func:`pause` step before the report, for cancellation demos.
    """
    from plateflow.pipeline.spec import PipelineSpec, StepSpec

    if method not in _METHODS:
        raise ValueError(f"demo_pipeline: unknown method {method!r}; use one of {list(_METHODS)}")
    if threshold is None:
        threshold = 50.0 if method == "percent_of_control" else 3.0
    steps = [
        StepSpec(function=_STEP.format("read_plate")),
        StepSpec(function=_STEP.format("subtract_background"), params={"source": "empty"}),
        StepSpec(function=_STEP.format("normalise"), params={"method": method}),
        StepSpec(function=_STEP.format("call_hits"), params={"threshold": float(threshold)}),
    ]
    if pause_seconds > 0:
        steps.append(StepSpec(function=_STEP.format("pause"), params={"seconds": pause_seconds}))
    steps.append(StepSpec(function=_STEP.format("write_report")))
    return PipelineSpec(name=f"platereader-{method}", steps=tuple(steps))


# --- synthetic plates ---------------------------------------------------------------------

_LAYOUTS = {96: (8, 12), 384: (16, 24)}
_READER_NOISE = 10.0
"""The standard deviation of the reader's additive noise, in signal units."""


def _layout_role(wells: int, row: int, column: int) -> str:
    """The role of a well in the generated layout.

    96 wells: column 1 negatives, column 12 positives, rows A and H of both
    empty. 384 wells: columns 1 and 24 negatives (rows A and P empty),
    columns 2 and 23 positives. Everything else is a sample.
    """
    rows, columns = _LAYOUTS[wells]
    if column in (1, columns):
        if row in (0, rows - 1):
            return "empty"
        if wells == 96:
            return "negative" if column == 1 else "positive"
        return "negative"
    if wells == 384 and column in (2, columns - 1):
        return "positive"
    return "sample"


def generate_plates(
    directory: str | os.PathLike[str],
    count: int,
    *,
    seed: int = 0,
    wells: int = 384,
    hit_rate: float = 0.02,
    noise_cv: float = 0.05,
    prefix: str = "plate",
) -> list[GeneratedPlate]:
    """Write ``count`` synthetic plate files ``{prefix}-NNNN.csv`` into ``directory``.

    Each plate has its own background offset (100-400) and gain (0.8-1.25):
    empty wells read the background, negatives about ``10000 x gain`` above
    it and positives ``1000 x gain``. Inactive samples carry a little true
    activity (inhibition ~ N(0, 3 %)); ``round(hit_rate x samples)`` planted
    hits are inhibited by 70-100 %. Every signal gets multiplicative noise
    with coefficient of variation ``noise_cv`` and a little additive reader
    noise. The same arguments write the same files, byte for byte.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"generate_plates: count must be an int >= 0, got {count!r}")
    if wells not in _LAYOUTS:
        raise ValueError(f"generate_plates: wells must be 96 or 384, got {wells!r}")
    if not 0 <= hit_rate <= 1:
        raise ValueError(f"generate_plates: hit_rate must be within [0, 1], got {hit_rate!r}")
    if not 0 <= noise_cv < 1:
        raise ValueError(f"generate_plates: noise_cv must be within [0, 1), got {noise_cv!r}")
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rows, columns = _LAYOUTS[wells]
    layout = [
        (f"{_ROW_LETTERS[r]}{c:02d}", _layout_role(wells, r, c))
        for r in range(rows)
        for c in range(1, columns + 1)
    ]
    samples = [well for well, role in layout if role == "sample"]
    planted_count = round(hit_rate * len(samples))
    generated: list[GeneratedPlate] = []
    for index in range(count):
        plate_id = f"{prefix}-{index + 1:04d}"
        rng = random.Random(f"plateflow.examples.platereader:{seed}:{wells}:{index}")
        background = rng.uniform(100.0, 400.0)
        gain = rng.uniform(0.8, 1.25)
        negative_level, positive_level = 10_000.0 * gain, 1_000.0 * gain
        planted = frozenset(rng.sample(samples, planted_count))

        path = out / f"{plate_id}.csv"
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(_HEADER)
            for well, role in layout:
                if role == "empty":
                    value = max(0.0, background + rng.gauss(0.0, _READER_NOISE))
                    writer.writerow((well, role, f"{value:.2f}"))
                    continue
                if role == "negative":
                    inhibition = 0.0
                elif role == "positive":
                    inhibition = 1.0
                elif well in planted:
                    inhibition = rng.uniform(0.7, 1.0)
                else:
                    inhibition = rng.gauss(0.0, 0.03)
                level = positive_level + (negative_level - positive_level) * (1.0 - inhibition)
                noisy = level * (1.0 + rng.gauss(0.0, noise_cv)) + rng.gauss(0.0, _READER_NOISE)
                value = max(0.0, background + noisy)
                writer.writerow((well, role, f"{value:.2f}"))
        generated.append(GeneratedPlate(plate_id, path, tuple(sorted(planted, key=_well_order))))
    return generated
