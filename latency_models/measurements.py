"""Latency measurement records (format ``cn4.latency/1``) in CSV and JSON Lines.

One record is one measured case: a single Linear layer at one Cn4 level (``op="linear"``), a
whole model under one level map (``op="model"``), or the non-prunable rest of a model
(``op="remainder"``: embedding, conv1d, scan, norms, head). ``cn4 probe`` writes these files,
``cn4 fit`` and the REST service read them. docs/measurements.md describes every field.

Reading validates each record and raises :class:`MeasurementError` naming the data row, the
line and the field. Suspect but usable data produces warnings, returned with the records and
logged: a wide spread between the 10th and 90th percentiles, and duplicates of one case whose
medians disagree. Duplicates are combined into one record by :func:`combine_duplicates`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from search.errors import MeasurementError

logger = logging.getLogger(__name__)

FORMAT_VERSION = "cn4.latency/1"
OPS = ("linear", "model", "remainder")
LEVELS = (0, 1, 2, 3)
DEFAULT_DTYPE = "float32"

# A record whose p90 exceeds its p10 by more than this factor is warned about, because such
# a spread usually means other work shared the machine during the measurement.
SPREAD_WARN_RATIO = 1.5
# Without percentiles, the same warning fires when std_ms / mean_ms exceeds this value.
SPREAD_WARN_CV = 0.25
# Duplicates of one case whose largest and smallest medians differ by more than this factor
# are warned about before they are combined.
DUPLICATE_CONFLICT_FACTOR = 1.25

# File suffixes and the format each one selects.
SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}

# Relative slack for the order check p10 <= median <= p90, so that values rounded when they
# were written do not fail it.
_ORDER_TOLERANCE = 1e-9


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """One measured latency case; times are milliseconds for one call over ``tokens`` tokens.

    ``levels`` (model records only) maps each Linear layer timed separately to
    ``(out_features, in_features, level)``; the model's remainder covers everything else.
    """

    device: str
    op: str
    median_ms: float
    backend: str | None = None
    out_features: int | None = None
    in_features: int | None = None
    tokens: int = 1
    level: int | None = None
    model: str | None = None
    levels: dict[str, tuple[int, int, int]] | None = None
    dtype: str = DEFAULT_DTYPE
    threads: int | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    mean_ms: float | None = None
    std_ms: float | None = None
    repeats: int | None = None
    warmup: int | None = None
    timestamp: str | None = None
    tool_version: str | None = None
    format: str = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.levels is not None:
            object.__setattr__(self, "levels", _normalised_levels(self.levels))
        _validate(self)

    def __hash__(self) -> int:
        # The generated hash would fail on the ``levels`` dict; equal records share a case key.
        return hash((self.case_key(), self.median_ms))

    def case_key(self) -> tuple:
        """Return what identifies the measured case: records with equal keys are duplicates."""
        levels = None if self.levels is None else json.dumps(self.levels, sort_keys=True)
        return (
            self.device,
            self.backend,
            self.op,
            self.model,
            self.out_features,
            self.in_features,
            self.level,
            levels,
            self.tokens,
            self.dtype,
            self.threads,
        )

    def describe(self) -> str:
        """Return a short human-readable name of the case, for messages."""
        parts = [f"device={self.device}"]
        if self.backend is not None:
            parts.append(f"backend={self.backend}")
        parts.append(f"op={self.op}")
        if self.op == "linear":
            parts.append(f"shape={self.out_features}x{self.in_features}")
            parts.append(f"level={self.level}")
        else:
            parts.append(f"model={self.model}")
        parts.append(f"tokens={self.tokens}")
        parts.append(f"dtype={self.dtype}")
        if self.threads is not None:
            parts.append(f"threads={self.threads}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a JSON-ready dict in column order, without unset fields."""
        data: dict[str, Any] = {}
        for name in COLUMNS:
            value = getattr(self, name)
            if value is None:
                continue
            if name == "levels":
                value = {layer: list(entry) for layer, entry in value.items()}
            data[name] = value
        return data

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Measurement:
        """Build a record from a mapping of field names to JSON values or CSV strings.

        Raises :class:`MeasurementError` naming the field for an invalid value, and for an
        unknown field.
        """
        unknown = sorted(set(raw) - set(FIELD_NAMES))
        if unknown:
            raise MeasurementError(
                f"unknown field(s) {unknown}: the fields of {FORMAT_VERSION} are "
                f"{', '.join(COLUMNS)}"
            )
        return _record_from_raw(raw)


FIELD_NAMES = tuple(f.name for f in fields(Measurement))
# Column order of written files: the format first, then identity, dimensions and statistics.
COLUMNS = (
    "format",
    "device",
    "backend",
    "op",
    "model",
    "out_features",
    "in_features",
    "level",
    "levels",
    "tokens",
    "dtype",
    "threads",
    "median_ms",
    "p10_ms",
    "p90_ms",
    "mean_ms",
    "std_ms",
    "repeats",
    "warmup",
    "timestamp",
    "tool_version",
)
assert sorted(COLUMNS) == sorted(FIELD_NAMES)
REQUIRED_COLUMNS = ("format", "device", "op", "median_ms")
_INT_FIELDS = ("out_features", "in_features", "tokens", "level", "threads", "repeats", "warmup")
_FLOAT_FIELDS = ("median_ms", "p10_ms", "p90_ms", "mean_ms", "std_ms")
_TEXT_FIELDS = ("format", "device", "backend", "op", "model", "dtype", "timestamp", "tool_version")


class MeasurementFile(NamedTuple):
    """Records read from one file or upload, and the warnings raised while reading it."""

    records: list[Measurement]
    warnings: list[str]


# ---------------------------------------------------------------------------------------------
# Validation of one record


def _validate(record: Measurement) -> None:
    if record.format != FORMAT_VERSION:
        raise MeasurementError(
            f"format={record.format!r} is not supported: this cn4 reads {FORMAT_VERSION!r}; "
            "write the file with a matching cn4 version or convert it"
        )
    if not record.device or not record.device.strip():
        raise MeasurementError("device is missing: name the device the case was measured on")
    if record.op not in OPS:
        raise MeasurementError(f"op={record.op!r} is unknown: use one of {', '.join(OPS)}")

    _check_latency("median_ms", record.median_ms, required=True)
    for name in ("p10_ms", "p90_ms", "mean_ms"):
        _check_latency(name, getattr(record, name), required=False)
    if record.std_ms is not None and not (math.isfinite(record.std_ms) and record.std_ms >= 0):
        raise MeasurementError(
            f"std_ms={record.std_ms} is invalid: give a finite, non-negative standard deviation"
        )
    _check_percentile_order(record)

    _check_count("tokens", record.tokens, minimum=1, required=True)
    _check_count("threads", record.threads, minimum=1, required=False)
    _check_count("repeats", record.repeats, minimum=1, required=False)
    _check_count("warmup", record.warmup, minimum=0, required=False)

    if not record.dtype:
        raise MeasurementError(f"dtype is empty: give the weight dtype, e.g. {DEFAULT_DTYPE}")
    if record.timestamp is not None:
        try:
            datetime.fromisoformat(record.timestamp)
        except ValueError:
            raise MeasurementError(
                f"timestamp={record.timestamp!r} is invalid: give an ISO 8601 time such as "
                "2026-12-04T20:15:00+00:00"
            ) from None

    if record.op == "linear":
        _validate_linear(record)
    else:
        _validate_whole_model(record)


def _validate_linear(record: Measurement) -> None:
    _check_count("out_features", record.out_features, minimum=1, required=True)
    _check_count("in_features", record.in_features, minimum=1, required=True)
    if record.level is None:
        raise MeasurementError("level is missing: a linear record needs its Cn4 level 0..3")
    _check_level("level", record.level)
    if record.model is not None or record.levels is not None:
        raise MeasurementError(
            "model and levels belong to model and remainder records: leave them empty for "
            "op=linear"
        )


def _validate_whole_model(record: Measurement) -> None:
    if not record.model or not record.model.strip():
        raise MeasurementError(f"model is missing: an op={record.op} record needs a model id")
    for name in ("out_features", "in_features", "level"):
        if getattr(record, name) is not None:
            raise MeasurementError(
                f"{name}={getattr(record, name)} is set on an op={record.op} record: leave it "
                "empty (per-layer shapes and levels of a model record go in levels)"
            )
    if record.op == "remainder":
        if record.levels is not None:
            raise MeasurementError(
                "levels is set on an op=remainder record: the remainder has no prunable layers"
            )
        return
    if not record.levels:
        raise MeasurementError(
            "levels is missing: an op=model record needs "
            '{"layer_name": [out_features, in_features, level], ...}'
        )
    for layer, entry in record.levels.items():
        out_features, in_features, level = entry
        _check_count(f"levels[{layer!r}] out_features", out_features, minimum=1, required=True)
        _check_count(f"levels[{layer!r}] in_features", in_features, minimum=1, required=True)
        _check_level(f"levels[{layer!r}] level", level)


def _normalised_levels(levels: Any) -> dict[str, tuple[int, int, int]]:
    """Return ``levels`` as a dict of tuples, so that lists from JSON compare equal."""
    if not isinstance(levels, Mapping):
        raise MeasurementError(
            f"levels={levels!r} is invalid: give a mapping "
            '{"layer_name": [out_features, in_features, level], ...}'
        )
    normalised = {}
    for layer, entry in levels.items():
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise MeasurementError(
                f"levels[{layer!r}]={entry!r} is invalid: give [out_features, in_features, level]"
            )
        normalised[str(layer)] = tuple(entry)
    return normalised


def _check_latency(name: str, value: float | None, *, required: bool) -> None:
    if value is None:
        if required:
            raise MeasurementError(f"{name} is missing: give the latency in milliseconds")
        return
    if not (math.isfinite(value) and value > 0):
        raise MeasurementError(
            f"{name}={value} is invalid: give a finite, positive latency in milliseconds"
        )


def _check_percentile_order(record: Measurement) -> None:
    median = record.median_ms
    slack = median * _ORDER_TOLERANCE
    if record.p10_ms is not None and record.p10_ms > median + slack:
        raise MeasurementError(
            f"p10_ms={record.p10_ms} is above median_ms={median}: check the column order"
        )
    if record.p90_ms is not None and record.p90_ms < median - slack:
        raise MeasurementError(
            f"p90_ms={record.p90_ms} is below median_ms={median}: check the column order"
        )


def _check_count(name: str, value: int | None, *, minimum: int, required: bool) -> None:
    if value is None:
        if required:
            raise MeasurementError(f"{name} is missing: give an integer >= {minimum}")
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MeasurementError(f"{name}={value!r} is invalid: give an integer >= {minimum}")


def _check_level(name: str, value: int) -> None:
    if isinstance(value, bool) or value not in LEVELS:
        raise MeasurementError(
            f"{name}={value!r} is unknown: a Cn4 level is 0, 1, 2 or 3 (zeros per group of 4)"
        )


# ---------------------------------------------------------------------------------------------
# Conversion of raw cells (CSV strings or JSON values) to typed fields


def _record_from_raw(raw: Mapping[str, Any]) -> Measurement:
    values: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        text = _to_text(raw.get(name))
        if text is not None:
            values[name] = text
    for name in _INT_FIELDS:
        number = _to_int(name, raw.get(name))
        if number is not None:
            values[name] = number
    for name in _FLOAT_FIELDS:
        number = _to_float(name, raw.get(name))
        if number is not None:
            values[name] = number
    levels = _to_levels(raw.get("levels"))
    if levels is not None:
        values["levels"] = levels
    for name in ("format", "device", "op"):
        if name not in values:
            raise MeasurementError(f"{name} is missing: every record needs {name}")
    if "median_ms" not in values:
        raise MeasurementError("median_ms is missing: give the median latency in milliseconds")
    return Measurement(**values)


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _to_text(value: Any) -> str | None:
    if _is_empty(value):
        return None
    return str(value).strip()


def _to_int(name: str, value: Any) -> int | None:
    if _is_empty(value):
        return None
    if isinstance(value, bool):
        raise MeasurementError(f"{name}={value!r} is invalid: give an integer")
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MeasurementError(f"{name}={value!r} is invalid: give an integer") from None
    if not (math.isfinite(number) and number == int(number)):
        raise MeasurementError(f"{name}={value!r} is invalid: give an integer")
    return int(number)


def _to_float(name: str, value: Any) -> float | None:
    if _is_empty(value):
        return None
    if isinstance(value, bool):
        raise MeasurementError(f"{name}={value!r} is invalid: give a number of milliseconds")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MeasurementError(
            f"{name}={value!r} is invalid: give a number of milliseconds"
        ) from None


def _to_levels(value: Any) -> dict[str, tuple[int, int, int]] | None:
    if _is_empty(value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise MeasurementError(
                f"levels is not valid JSON ({exc.msg} at character {exc.pos}): give "
                '{"layer_name": [out_features, in_features, level], ...}'
            ) from None
    if not isinstance(value, Mapping):
        raise MeasurementError(
            f"levels={value!r} is invalid: give a JSON object "
            '{"layer_name": [out_features, in_features, level], ...}'
        )
    levels: dict[str, tuple[int, int, int]] = {}
    for layer, entry in value.items():
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise MeasurementError(
                f"levels[{layer!r}]={entry!r} is invalid: give [out_features, in_features, level]"
            )
        levels[str(layer)] = (
            _to_int(f"levels[{layer!r}] out_features", entry[0]),
            _to_int(f"levels[{layer!r}] in_features", entry[1]),
            _to_int(f"levels[{layer!r}] level", entry[2]),
        )
    return levels


# ---------------------------------------------------------------------------------------------
# Parsing files and uploads


def _located(row: int, line: int | None, exc: MeasurementError) -> MeasurementError:
    where = f"row {row}" if line is None else f"row {row} (line {line})"
    return MeasurementError(f"{where}: {exc}")


def _csv_rows(text: str) -> Iterator[tuple[int, int, dict[str, str]]]:
    """Yield ``(row, line, cells)`` for each non-blank data row of a CSV text."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise MeasurementError(f"line 1: invalid CSV header ({exc})") from None
    header = [name.strip() for name in header]
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise MeasurementError(f"line 1: column(s) {duplicated} appear more than once")
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise MeasurementError(
            f"line 1: required column(s) {missing} are missing; the header needs "
            f"{', '.join(REQUIRED_COLUMNS)} (format is {FORMAT_VERSION!r})"
        )
    unknown = [name for name in header if name not in FIELD_NAMES]
    if unknown:
        raise MeasurementError(
            f"line 1: unknown column(s) {unknown}: the columns of {FORMAT_VERSION} are "
            f"{', '.join(COLUMNS)}"
        )

    row = 0
    previous_line = reader.line_num
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise MeasurementError(
                f"row {row + 1} (line {previous_line + 1}): invalid CSV ({exc})"
            ) from None
        line = previous_line + 1
        previous_line = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        row += 1
        if len(cells) > len(header):
            raise MeasurementError(
                f"row {row} (line {line}): {len(cells)} cells for {len(header)} columns; "
                "quote cells that contain commas, such as levels"
            )
        yield row, line, dict(zip(header, cells))


def _jsonl_rows(text: str) -> Iterator[tuple[int, int, Mapping[str, Any]]]:
    """Yield ``(row, line, object)`` for each non-blank line of a JSON Lines text."""
    row = 0
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        row += 1
        try:
            value = json.loads(content)
        except json.JSONDecodeError as exc:
            raise MeasurementError(
                f"row {row} (line {line}): invalid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(value, dict):
            raise MeasurementError(
                f"row {row} (line {line}): expected a JSON object per line, got "
                f"{type(value).__name__}"
            )
        yield row, line, value


def _json_array_rows(text: str) -> Iterator[tuple[int, None, Mapping[str, Any]]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MeasurementError(
            f"invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(value, list):
        raise MeasurementError(
            "expected a JSON array of records or JSON Lines (one object per line)"
        )
    for row, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise MeasurementError(f"row {row}: expected a JSON object, got {type(item).__name__}")
        yield row, None, item


def _rows(text: str, fmt: str) -> Iterator[tuple[int, int | None, Mapping[str, Any]]]:
    if fmt == "csv":
        return _csv_rows(text)
    if fmt == "jsonl":
        return _jsonl_rows(text)
    if fmt == "json":
        # A .json file may hold one array of records, or JSON Lines under another suffix.
        if text.lstrip().startswith("["):
            return _json_array_rows(text)
        return _jsonl_rows(text)
    raise MeasurementError(f"format {fmt!r} is unknown: use csv, jsonl or json")


def sniff_format(text: str) -> str:
    """Guess ``csv``, ``jsonl`` or ``json`` from the first non-blank character of ``text``."""
    start = text.lstrip()[:1]
    if start == "[":
        return "json"
    if start == "{":
        return "jsonl"
    return "csv"


def parse_measurements(
    text: str | bytes,
    fmt: str | None = None,
    *,
    combine: bool = True,
    source: str | None = None,
) -> MeasurementFile:
    """Parse and validate measurement records from the text of a CSV or JSON Lines file.

    ``fmt`` is ``"csv"``, ``"jsonl"`` or ``"json"``; ``None`` guesses it from the content.
    Bytes are decoded as UTF-8 (a byte-order mark is allowed). Raises
    :class:`MeasurementError` naming the data row (1-based), the line and the field of the
    first invalid record. With ``combine``, duplicates of one case are merged by
    :func:`combine_duplicates`. Errors and warnings start with ``source`` (a file name or an
    upload name) when it is given; warnings are also logged.
    """
    prefix = f"{source}: " if source else ""
    try:
        records, warnings = _parse(text, fmt, combine)
    except MeasurementError as exc:
        raise MeasurementError(f"{prefix}{exc}") from None
    warnings = [f"{prefix}{message}" for message in warnings]
    for message in warnings:
        logger.warning("%s", message)
    return MeasurementFile(records, warnings)


def _parse(
    text: str | bytes, fmt: str | None, combine: bool
) -> tuple[list[Measurement], list[str]]:
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise MeasurementError(
                f"the measurement file is not valid UTF-8 (byte {exc.start}): save it as UTF-8"
            ) from None
    elif text.startswith("\ufeff"):
        text = text[1:]
    if fmt is None:
        fmt = sniff_format(text)
    fmt = fmt.lower().lstrip(".")
    if fmt == "ndjson":
        fmt = "jsonl"

    records: list[Measurement] = []
    warnings: list[str] = []
    locations: list[str] = []
    for row, line, raw in _rows(text, fmt):
        try:
            # CSV headers were checked for unknown columns already.
            record = _record_from_raw(raw) if fmt == "csv" else Measurement.from_dict(raw)
        except MeasurementError as exc:
            raise _located(row, line, exc) from None
        where = f"row {row}" if line is None else f"row {row} (line {line})"
        records.append(record)
        locations.append(where)
        spread = spread_warning(record)
        if spread:
            warnings.append(f"{where}: {spread}")
    if not records:
        raise MeasurementError(
            f"no measurement records found: the file needs at least one data row "
            f"({FORMAT_VERSION})"
        )

    if combine:
        records, duplicate_warnings = combine_duplicates(records, locations=locations)
        warnings.extend(duplicate_warnings)
    return records, warnings


def read_measurements(path: str | Path, *, combine: bool = True) -> MeasurementFile:
    """Read and validate a measurement file; the suffix selects the format.

    ``.csv`` is CSV with a header row; ``.jsonl`` and ``.ndjson`` are JSON Lines; ``.json`` is
    JSON Lines or one JSON array of records. Errors and warnings name the file, the data row
    and the line.
    """
    path = Path(path)
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise MeasurementError(
            f"{path}: suffix {path.suffix!r} is not a measurement format: use .csv, .jsonl "
            "or .json"
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MeasurementError(f"{path}: measurement file not found") from None
    except OSError as exc:
        raise MeasurementError(f"{path}: cannot read the measurement file ({exc})") from None
    return parse_measurements(data, fmt, combine=combine, source=str(path))


# ---------------------------------------------------------------------------------------------
# Warnings and duplicates


def spread_warning(record: Measurement) -> str | None:
    """Return a warning when the record's run-to-run spread is high, else ``None``."""
    if record.p10_ms is not None and record.p90_ms is not None:
        ratio = record.p90_ms / record.p10_ms
        if ratio > SPREAD_WARN_RATIO:
            return (
                f"high spread for {record.describe()}: p90/p10 = {ratio:.2f} "
                f"(p10_ms={record.p10_ms:g}, median_ms={record.median_ms:g}, "
                f"p90_ms={record.p90_ms:g}) is above {SPREAD_WARN_RATIO}; the machine was "
                "probably busy, so measure again"
            )
        return None
    if record.std_ms is not None and record.mean_ms is not None:
        variation = record.std_ms / record.mean_ms
        if variation > SPREAD_WARN_CV:
            return (
                f"high spread for {record.describe()}: std_ms/mean_ms = {variation:.2f} is "
                f"above {SPREAD_WARN_CV}; the machine was probably busy, so measure again"
            )
    return None


def combine_duplicates(
    records: Sequence[Measurement], *, locations: Sequence[str] | None = None
) -> tuple[list[Measurement], list[str]]:
    """Merge records of the same case into one; return the records and the warnings.

    Records are duplicates when :meth:`Measurement.case_key` is equal. The merged record takes
    the median of the medians, the smallest p10 and the largest p90, the repeat-weighted mean,
    the pooled standard deviation (when every duplicate has mean, std and repeats), the summed
    repeats and the latest timestamp. A warning names the case when the largest median exceeds
    the smallest by more than ``DUPLICATE_CONFLICT_FACTOR``. First occurrences keep their order.
    """
    groups: dict[tuple, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(record.case_key(), []).append(index)
    combined: list[Measurement] = []
    warnings: list[str] = []
    for indices in groups.values():
        group = [records[i] for i in indices]
        if len(group) == 1:
            combined.append(group[0])
            continue
        medians = [record.median_ms for record in group]
        where = ""
        if locations is not None:
            where = " at " + ", ".join(locations[i] for i in indices)
        merged = _merge(group)
        if max(medians) > DUPLICATE_CONFLICT_FACTOR * min(medians):
            warnings.append(
                f"conflicting duplicates of {group[0].describe()}{where}: medians "
                f"{', '.join(f'{m:g}' for m in medians)} ms differ by more than "
                f"{DUPLICATE_CONFLICT_FACTOR}x; combined to median_ms={merged.median_ms:g} "
                "(the median of the medians), but measure this case again"
            )
        else:
            logger.debug("combined %d duplicates of %s", len(group), group[0].describe())
        combined.append(merged)
    return combined, warnings


def _merge(group: Sequence[Measurement]) -> Measurement:
    median = statistics.median(record.median_ms for record in group)
    p10s = [record.p10_ms for record in group if record.p10_ms is not None]
    p90s = [record.p90_ms for record in group if record.p90_ms is not None]
    # The order check p10 <= median <= p90 must hold for the merged record too.
    p10 = min(min(p10s), median) if p10s else None
    p90 = max(max(p90s), median) if p90s else None

    repeats = None
    if all(record.repeats is not None for record in group):
        repeats = sum(record.repeats for record in group)
    mean = std = None
    if repeats is not None and all(record.mean_ms is not None for record in group):
        mean = sum(record.mean_ms * record.repeats for record in group) / repeats
        if all(record.std_ms is not None for record in group):
            # Pooled variance of the union of all repeats: within plus between the records.
            square_sum = sum(
                record.repeats * (record.std_ms**2 + (record.mean_ms - mean) ** 2)
                for record in group
            )
            std = math.sqrt(square_sum / repeats)

    timestamps = [record.timestamp for record in group if record.timestamp is not None]
    latest = max(timestamps, key=_timestamp_order) if timestamps else None
    return replace(
        group[0],
        median_ms=median,
        p10_ms=p10,
        p90_ms=p90,
        mean_ms=mean,
        std_ms=std,
        repeats=repeats,
        warmup=_common(record.warmup for record in group),
        timestamp=latest,
        tool_version=_common(record.tool_version for record in group),
    )


def _timestamp_order(timestamp: str) -> float:
    parsed = datetime.fromisoformat(timestamp)
    if parsed.tzinfo is None:
        # A time without a zone is taken as UTC when ordering duplicates.
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def _common(values: Iterable[Any]) -> Any:
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


# ---------------------------------------------------------------------------------------------
# Writing


def _csv_cell(name: str, value: Any) -> str:
    if value is None:
        return ""
    if name == "levels":
        return json.dumps({layer: list(entry) for layer, entry in value.items()})
    if isinstance(value, float):
        return repr(value)
    return str(value)


def format_measurements(records: Iterable[Measurement], fmt: str) -> str:
    """Return the records as the text of a ``csv`` or ``jsonl`` file, with the CSV header."""
    fmt = fmt.lower().lstrip(".")
    records = list(records)
    if fmt == "csv":
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        for record in records:
            writer.writerow([_csv_cell(name, getattr(record, name)) for name in COLUMNS])
        return buffer.getvalue()
    if fmt in ("jsonl", "ndjson", "json"):
        return "".join(json.dumps(record.to_dict()) + "\n" for record in records)
    raise MeasurementError(f"format {fmt!r} is unknown: use csv or jsonl")


def write_measurements(
    records: Iterable[Measurement], path: str | Path, *, append: bool = False
) -> Path:
    """Write records to ``path`` as CSV (``.csv``) or JSON Lines (``.jsonl``, ``.json``).

    With ``append``, records are added to an existing file. A CSV header is written only when
    the file is new or empty, and an existing CSV header must match :data:`COLUMNS`.
    """
    path = Path(path)
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise MeasurementError(
            f"{path}: suffix {path.suffix!r} is not a measurement format: use .csv or .jsonl"
        )
    text = format_measurements(records, fmt)
    existing = append and path.exists() and path.stat().st_size > 0
    if existing and fmt == "csv":
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if tuple(name.strip() for name in header) != COLUMNS:
            raise MeasurementError(
                f"{path}: cannot append, because its header {header} differs from the "
                f"{FORMAT_VERSION} columns; write to a new file"
            )
        text = text.split("\n", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    if existing:
        # Start on a new line when the file does not end with one.
        with path.open("rb") as check:
            check.seek(-1, 2)
            if check.read(1) != b"\n":
                text = "\n" + text
    with path.open("a" if existing else "w", newline="") as handle:
        handle.write(text)
    return path
