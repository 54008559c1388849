"""A per-device cost model fitted to latency measurements (format ``cn4.costmodel/1``).

The model is additive, as kernel-level predictors such as nn-Meter (MobiSys 2021) are. A whole
model's latency is its fixed part (the remainder: embedding, conv1d, scan, norms, head) plus
the sum of its Linear layers, each at its own Cn4 level. Layer latency comes from

1. an exact lookup of the measured ``(out_features, in_features, level, tokens)`` case, else
2. a regression per ``(level, tokens)`` on estimated bytes moved: latency =
   c0 + c1 * weight_bytes + c2 * activation_bytes, with non-negative coefficients fitted by
   least squares on relative error. It is used only when at least ``MIN_REGRESSION_SHAPES``
   shapes were measured at that level and tokens, and only for weight sizes within the
   measured range widened by ``EXTRAPOLATION_MARGIN``.

Every level has its own lookups and regression, so a level measured slower than dense is
predicted slower: nothing assumes that sparsity helps. A case with no basis raises
:class:`CostModelError` naming the measurement that would supply one.

Whole-model records validate the fit. Per (model, tokens), the uniform level maps and a share
``1 - holdout`` of the mixed ones calibrate an additive correction (at least one record does
when the model has no remainder record). The other mixed maps are held out, and ``fit_report``
gives their accuracy: shares within 5% and 10%, MAPE and the Spearman rank correlation.
docs/measurements.md describes the input records and these rules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from latency_models.measurements import (
    LEVELS,
    Measurement,
    combine_duplicates,
    read_measurements,
)
from search.errors import CostModelError

logger = logging.getLogger(__name__)

FORMAT_VERSION = "cn4.costmodel/1"
REGRESSION_FEATURES = ("intercept", "weight_bytes", "activation_bytes")
# A regression with three coefficients needs at least three distinct shapes to be determined.
MIN_REGRESSION_SHAPES = 3
# The regression may predict weight sizes down to 1/1.25 of the smallest measured one and up
# to 1.25x the largest. Further out, a cache boundary may change the bandwidth unseen.
EXTRAPOLATION_MARGIN = 1.25
# Share of each model's mixed level maps held out for the fit report by default.
DEFAULT_HOLDOUT = 0.75
# Bytes per weight value of each dtype name that measurements use.
DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "fp32": 4,
    "float16": 2,
    "fp16": 2,
    "bfloat16": 2,
    "bf16": 2,
    "int8": 1,
}


def weight_bytes(out_features: int, in_features: int, level: int, value_bytes: int) -> float:
    """Estimate the bytes a Linear at Cn4 ``level`` reads for its weights per call.

    Dense (level 0) reads every value. Level n reads the 4 - n kept values of each group of 4
    along the input dimension plus one index byte per group.
    """
    groups = out_features * math.ceil(in_features / 4)
    if level == 0:
        return float(out_features * in_features * value_bytes)
    return float(groups * ((4 - level) * value_bytes + 1))


def activation_bytes(out_features: int, in_features: int, tokens: int, value_bytes: int) -> float:
    """Estimate the bytes of input read and output written by one call over ``tokens``."""
    return float(tokens * (in_features + out_features) * value_bytes)


@dataclass(frozen=True)
class LayerEntry:
    """A measured Linear case of the lookup table."""

    out_features: int
    in_features: int
    level: int
    tokens: int
    median_ms: float
    repeats: int | None = None

    def __post_init__(self) -> None:
        _require_int("out_features", self.out_features, 1)
        _require_int("in_features", self.in_features, 1)
        _require_level(self.level)
        _require_int("tokens", self.tokens, 1)
        _require_finite("median_ms", self.median_ms, positive=True)
        if self.repeats is not None:
            _require_int("repeats", self.repeats, 1)


@dataclass(frozen=True)
class LevelRegression:
    """Latency of unmeasured shapes at one level and token count, from bytes moved.

    ``coefficients`` multiply ``REGRESSION_FEATURES``: ms, ms per weight byte and ms per
    activation byte. ``fit_mape`` is the in-sample mean absolute percentage error.
    """

    level: int
    tokens: int
    coefficients: tuple[float, float, float]
    weight_bytes_min: float
    weight_bytes_max: float
    shapes: int
    fit_mape: float

    def __post_init__(self) -> None:
        _require_level(self.level)
        _require_int("tokens", self.tokens, 1)
        if len(self.coefficients) != len(REGRESSION_FEATURES):
            raise ValueError(
                f"coefficients={list(self.coefficients)} is invalid: give one per feature "
                f"{list(REGRESSION_FEATURES)}"
            )
        for coefficient in self.coefficients:
            _require_finite("coefficients", coefficient, positive=False)
        _require_finite("weight_bytes_min", self.weight_bytes_min, positive=True)
        _require_finite("weight_bytes_max", self.weight_bytes_max, positive=True)
        _require_int("shapes", self.shapes, MIN_REGRESSION_SHAPES)

    def features(self, out_features: int, in_features: int, value_bytes: int) -> np.ndarray:
        return np.array(
            [
                1.0,
                weight_bytes(out_features, in_features, self.level, value_bytes),
                activation_bytes(out_features, in_features, self.tokens, value_bytes),
            ]
        )

    def covers(self, size: float) -> bool:
        """Return whether ``size`` weight bytes lie inside the allowed prediction range."""
        low = self.weight_bytes_min / EXTRAPOLATION_MARGIN
        high = self.weight_bytes_max * EXTRAPOLATION_MARGIN
        return low <= size <= high

    def predict(self, out_features: int, in_features: int, value_bytes: int) -> float:
        return float(np.dot(self.coefficients, self.features(out_features, in_features, value_bytes)))


@dataclass(frozen=True)
class FixedPart:
    """The non-prunable part of one model at one token count.

    ``remainder_ms`` is the measured remainder (``None`` without a remainder record).
    ``correction_ms`` is the median of measured minus predicted whole-model latency over the
    ``calibration_records`` model records used to calibrate, 0 when there are none.
    """

    model: str
    tokens: int
    remainder_ms: float | None
    correction_ms: float
    calibration_records: int

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model={self.model!r} is invalid: give the model id")
        _require_int("tokens", self.tokens, 1)
        if self.remainder_ms is not None:
            _require_finite("remainder_ms", self.remainder_ms, positive=True)
        correction = self.correction_ms
        if isinstance(correction, bool) or not isinstance(correction, (int, float)):
            raise ValueError(f"correction_ms={correction!r} is invalid: give a finite number")
        if not math.isfinite(correction):
            raise ValueError(f"correction_ms={correction!r} is invalid: give a finite number")
        _require_int("calibration_records", self.calibration_records, 0)

    @property
    def total_ms(self) -> float:
        # A negative sum would let sparse configurations predict below zero; clamp it.
        return max(0.0, (self.remainder_ms or 0.0) + self.correction_ms)


class CostModel:
    """Latency predictions in ms for one device and backend, fitted with :meth:`fit`."""

    def __init__(
        self,
        *,
        device: str,
        backend: str | None,
        dtype: str,
        threads: int | None,
        layers: Iterable[LayerEntry],
        regressions: Iterable[LevelRegression],
        fixed_parts: Iterable[FixedPart],
        fit_report: dict[str, Any] | None = None,
        warnings: Sequence[str] = (),
        created: str | None = None,
    ) -> None:
        self.device = device
        self.backend = backend
        self.dtype = dtype
        self.threads = threads
        self.value_bytes = _value_bytes(dtype)
        self.layers = {
            (entry.out_features, entry.in_features, entry.level, entry.tokens): entry
            for entry in layers
        }
        self.regressions = {(reg.level, reg.tokens): reg for reg in regressions}
        self.fixed_parts = {(part.model, part.tokens): part for part in fixed_parts}
        self.fit_report: dict[str, Any] = dict(fit_report or {})
        self.warnings = list(warnings)
        self.created = created or datetime.now(timezone.utc).isoformat(timespec="seconds")

    # -----------------------------------------------------------------------------------------
    # Predictions

    @property
    def name(self) -> str:
        backend = self.backend if self.backend is not None else "(no backend)"
        return f"device {self.device!r}, backend {backend!r}"

    def measured_tokens(self) -> list[int]:
        return sorted({key[3] for key in self.layers})

    def measured_levels(self, tokens: int) -> list[int]:
        return sorted({key[2] for key in self.layers if key[3] == tokens})

    def models(self) -> list[str]:
        return sorted({key[0] for key in self.fixed_parts})

    def predict_layer(
        self, out_features: int, in_features: int, level: int, tokens: int = 1
    ) -> float:
        """Predict one Linear layer's latency in ms at Cn4 ``level`` for a call over ``tokens``.

        Raises :class:`CostModelError` when neither a measurement of this case nor a
        regression covering it exists, naming the measurement to add.
        """
        _check_layer_arguments(out_features, in_features, level, tokens)
        entry = self.layers.get((out_features, in_features, level, tokens))
        if entry is not None:
            return entry.median_ms
        case = f"a {out_features}x{in_features} Linear at level {level}, tokens={tokens}"
        fix = (
            f"add op=linear records with out_features={out_features}, "
            f"in_features={in_features}, level={level}, tokens={tokens} (cn4 probe measures them)"
        )
        if tokens not in self.measured_tokens():
            raise CostModelError(
                f"cannot predict {case} on {self.name}: no Linear was measured at "
                f"tokens={tokens} (measured: {self.measured_tokens()}); {fix}"
            )
        if level not in self.measured_levels(tokens):
            raise CostModelError(
                f"cannot predict {case} on {self.name}: level {level} was never measured at "
                f"tokens={tokens} (measured levels: {self.measured_levels(tokens)}); {fix}"
            )
        regression = self.regressions.get((level, tokens))
        if regression is None:
            shapes = sum(1 for key in self.layers if key[2:] == (level, tokens))
            raise CostModelError(
                f"cannot predict {case} on {self.name}: this shape was not measured, and only "
                f"{shapes} shape(s) were measured at level {level}, tokens={tokens}, while the "
                f"regression needs {MIN_REGRESSION_SHAPES}; {fix}"
            )
        size = weight_bytes(out_features, in_features, level, self.value_bytes)
        if not regression.covers(size):
            raise CostModelError(
                f"cannot predict {case} on {self.name}: its {size:.0f} weight bytes lie outside "
                f"the measured range {regression.weight_bytes_min:.0f}.."
                f"{regression.weight_bytes_max:.0f} widened by {EXTRAPOLATION_MARGIN}x; {fix}"
            )
        return regression.predict(out_features, in_features, self.value_bytes)

    def fixed_ms(self, model: str, tokens: int = 1) -> float:
        """Return the fixed part of ``model`` in ms: its remainder plus the calibrated correction."""
        part = self.fixed_parts.get((model, tokens))
        if part is None:
            known = sorted(f"{m} (tokens={t})" for m, t in self.fixed_parts)
            raise CostModelError(
                f"cannot predict model {model!r} at tokens={tokens} on {self.name}: it has no "
                f"remainder record and no model record to calibrate from (known: "
                f"{', '.join(known) or 'none'}); add an op=remainder record for model={model}, "
                f"tokens={tokens} (cn4 probe measures it)"
            )
        return part.total_ms

    def predict_model(
        self,
        layers: Sequence[tuple[int, int, int]] | Mapping[str, tuple[int, int, int]],
        *,
        model: str,
        tokens: int = 1,
    ) -> float:
        """Predict a whole model's latency in ms: its fixed part plus every layer's prediction.

        ``layers`` lists ``(out_features, in_features, level)`` for every Linear not in the
        remainder; a mapping from layer names to such tuples is accepted too.
        """
        entries = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
        total = self.fixed_ms(model, tokens)
        for out_features, in_features, level in entries:
            total += self.predict_layer(out_features, in_features, level, tokens)
        return total

    # -----------------------------------------------------------------------------------------
    # Fitting

    @classmethod
    def fit(
        cls,
        records: Iterable[Measurement],
        *,
        device: str | None = None,
        backend: str | None = None,
        dtype: str | None = None,
        threads: int | None = None,
        holdout: float = DEFAULT_HOLDOUT,
    ) -> CostModel:
        """Fit a cost model to the records of one device, backend, dtype and thread count.

        ``device``, ``backend``, ``dtype`` and ``threads`` select records when the input
        contains several values; each may be left ``None`` when only one value occurs.
        ``holdout`` is the share of each model's mixed level maps kept out of calibration for
        the fit report. Warnings (conflicting duplicates, clamped fixed parts, held-out records
        with no basis) are logged and kept in ``warnings``.
        """
        model = cls._fit_quietly(
            records, device=device, backend=backend, dtype=dtype, threads=threads, holdout=holdout
        )
        for message in model.warnings:
            logger.warning("%s", message)
        logger.info(
            "fitted the cost model of %s: %d layer cases, %d regressions, %d held-out models",
            model.name,
            len(model.layers),
            len(model.regressions),
            model.fit_report["count"],
        )
        return model

    @classmethod
    def _fit_quietly(
        cls,
        records: Iterable[Measurement],
        *,
        device: str | None,
        backend: str | None,
        dtype: str | None,
        threads: int | None,
        holdout: float,
    ) -> CostModel:
        """Fit as :meth:`fit` does, but only collect the warnings: cross-validation refits."""
        if not 0.0 <= holdout <= 1.0:
            raise CostModelError(f"holdout={holdout} is invalid: give a share in [0, 1]")
        selected, selection = _select(list(records), device, backend, dtype, threads)
        combined, warnings = combine_duplicates(selected)

        linear = [r for r in combined if r.op == "linear"]
        remainders = [r for r in combined if r.op == "remainder"]
        whole = [r for r in combined if r.op == "model"]
        value_bytes = _value_bytes(selection["dtype"])
        entries = [
            LayerEntry(r.out_features, r.in_features, r.level, r.tokens, r.median_ms, r.repeats)
            for r in linear
        ]
        regressions = _fit_regressions(entries, value_bytes)
        model = cls(
            device=selection["device"],
            backend=selection["backend"],
            dtype=selection["dtype"],
            threads=selection["threads"],
            layers=entries,
            regressions=regressions.values(),
            fixed_parts=(),
            warnings=warnings,
        )

        calibration, held_out = _split_model_records(whole, remainders, holdout)
        fixed_parts, calibration_warnings = model._calibrate(remainders, calibration)
        model.fixed_parts = {(part.model, part.tokens): part for part in fixed_parts}
        model.warnings.extend(calibration_warnings)

        report, unpredicted = model._evaluate(held_out)
        model.warnings.extend(f"held-out {message}" for message in unpredicted)
        report.update(
            holdout=holdout,
            calibration_records=sum(len(group) for group in calibration.values()),
            records={
                "linear": len(linear),
                "remainder": len(remainders),
                "model": len(whole),
                "combined_duplicates": len(selected) - len(combined),
            },
            lookup_cases=len(entries),
            regressions=len(regressions),
            layer_loo=_leave_one_out(entries, regressions, value_bytes),
        )
        model.fit_report = report
        return model

    def _calibrate(
        self,
        remainders: Sequence[Measurement],
        calibration: Mapping[tuple[str, int], list[Measurement]],
    ) -> tuple[list[FixedPart], list[str]]:
        measured = {(r.model, r.tokens): r.median_ms for r in remainders}
        warnings: list[str] = []
        parts: list[FixedPart] = []
        for key in sorted(set(measured) | set(calibration)):
            model_id, tokens = key
            remainder = measured.get(key)
            residuals = []
            for record in calibration.get(key, []):
                try:
                    layer_sum = sum(
                        self.predict_layer(o, i, level, tokens)
                        for o, i, level in record.levels.values()
                    )
                except CostModelError as exc:
                    warnings.append(
                        f"model record {_levels_digest(record)} not used to calibrate: {exc}"
                    )
                    continue
                residuals.append(record.median_ms - ((remainder or 0.0) + layer_sum))
            if remainder is None and not residuals:
                continue
            correction = statistics.median(residuals) if residuals else 0.0
            part = FixedPart(model_id, tokens, remainder, correction, len(residuals))
            if (remainder or 0.0) + correction < 0:
                warnings.append(
                    f"model {model_id!r} tokens={tokens}: calibrated fixed part "
                    f"{(remainder or 0.0) + correction:.4g} ms is negative and was clamped to 0; "
                    "the layer measurements overestimate this model, so measure them again"
                )
            parts.append(part)
        return parts, warnings

    def _evaluate(self, held_out: Sequence[Measurement]) -> tuple[dict[str, Any], list[str]]:
        measured: list[float] = []
        predicted: list[float] = []
        unpredicted: list[str] = []
        for record in held_out:
            try:
                value = self.predict_model(
                    list(record.levels.values()), model=record.model, tokens=record.tokens
                )
            except CostModelError as exc:
                unpredicted.append(f"model record {_levels_digest(record)}: {exc}")
                continue
            measured.append(record.median_ms)
            predicted.append(value)
        report = accuracy_report(measured, predicted)
        report["unpredicted"] = len(unpredicted)
        report["unpredicted_reasons"] = unpredicted[:10]
        return report, unpredicted

    # -----------------------------------------------------------------------------------------
    # Serialisation

    def to_dict(self) -> dict[str, Any]:
        """Return the fitted model as a JSON-ready dict in the ``cn4.costmodel/1`` format."""
        return {
            "format": FORMAT_VERSION,
            "device": self.device,
            "backend": self.backend,
            "dtype": self.dtype,
            "threads": self.threads,
            "created": self.created,
            "regression_features": list(REGRESSION_FEATURES),
            "layers": [asdict(entry) for entry in sorted(self.layers.values(), key=_layer_order)],
            "regressions": [
                dict(asdict(reg), coefficients=list(reg.coefficients))
                for reg in sorted(self.regressions.values(), key=lambda r: (r.level, r.tokens))
            ],
            "fixed_parts": [
                asdict(part) for part in sorted(self.fixed_parts.values(), key=lambda p: (p.model, p.tokens))
            ],
            "fit_report": self.fit_report,
            "warnings": self.warnings,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostModel:
        """Rebuild a model from :meth:`to_dict` output; rejects other format versions."""
        if not isinstance(data, Mapping):
            raise CostModelError("a cost model file must contain a JSON object")
        version = data.get("format")
        if version != FORMAT_VERSION:
            raise CostModelError(
                f"cost model format {version!r} is not supported: this cn4 reads "
                f"{FORMAT_VERSION!r}; refit it with `cn4 fit MEASUREMENTS --out FILE`"
            )
        try:
            regressions = []
            for raw in data["regressions"]:
                coefficients = tuple(raw["coefficients"])
                regressions.append(LevelRegression(**dict(raw, coefficients=coefficients)))
            return cls(
                device=data["device"],
                backend=data["backend"],
                dtype=data["dtype"],
                threads=data["threads"],
                layers=[LayerEntry(**raw) for raw in data["layers"]],
                regressions=regressions,
                fixed_parts=[FixedPart(**raw) for raw in data["fixed_parts"]],
                fit_report=data.get("fit_report") or {},
                warnings=data.get("warnings") or (),
                created=data.get("created"),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CostModelError(
                f"the cost model is incomplete or damaged ({type(exc).__name__}: {exc}); "
                "refit it with `cn4 fit MEASUREMENTS --out FILE`"
            ) from None

    def save(self, path: str | Path) -> Path:
        """Write the model as JSON to ``path`` and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        """Read a model written by :meth:`save`; raises :class:`CostModelError` if invalid."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CostModelError(f"{path}: cost model file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CostModelError(f"{path}: cannot read the cost model ({exc})") from None
        try:
            return cls.from_dict(data)
        except CostModelError as exc:
            raise CostModelError(f"{path}: {exc}") from None


def read_files(paths: Sequence[str | Path]) -> tuple[list[Measurement], list[str]]:
    """Read and validate measurement files; return their pooled records and the warnings.

    Duplicates are left in place, so that a fit combines them once across all files.
    """
    if not paths:
        raise CostModelError("no measurement files given: pass at least one .csv or .jsonl file")
    records: list[Measurement] = []
    warnings: list[str] = []
    for path in paths:
        result = read_measurements(path, combine=False)
        records.extend(result.records)
        warnings.extend(result.warnings)
    return records, warnings


def fit_files(paths: Sequence[str | Path], *, folds: int = 0, **options: Any) -> CostModel:
    """Read measurement files, pool them and fit a :class:`CostModel` (``options`` go to fit).

    Duplicates across files are combined once, after pooling. Warnings raised while reading
    are kept in the model's ``warnings``. With ``folds`` >= 2, the result of
    :func:`cross_validate` is added to the fit report as ``cross_validation``.
    """
    records, warnings = read_files(paths)
    model = CostModel.fit(records, **options)
    model.warnings[:0] = warnings
    if folds:
        selection = {k: v for k, v in options.items() if k in ("device", "backend", "dtype", "threads")}
        model.fit_report["cross_validation"] = cross_validate(records, folds=folds, **selection)
    return model


def cross_validate(
    records: Iterable[Measurement],
    *,
    folds: int = 5,
    device: str | None = None,
    backend: str | None = None,
    dtype: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Estimate whole-model accuracy by k-fold cross-validation over the mixed level maps.

    The mixed maps are dealt into ``folds`` folds in the order of their level-map hash. Each
    fold is predicted by a model fitted to all other records, with every remaining mixed map
    calibrating (``holdout=0``). Every mixed map is predicted once, so the estimate uses all
    of them, where the fit report uses one split. Returns :func:`accuracy_report` plus
    ``folds`` and ``unpredicted``.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise CostModelError(f"folds={folds!r} is invalid: give an integer >= 2")
    selected, _ = _select(list(records), device, backend, dtype, threads)
    combined, _ = combine_duplicates(selected)
    mixed = sorted(
        (r for r in combined if r.op == "model" and not is_uniform(r)), key=_levels_digest
    )
    folds = min(folds, len(mixed))
    measured: list[float] = []
    predicted: list[float] = []
    unpredicted = 0
    for fold in range(folds):
        tested = mixed[fold::folds]
        tested_ids = {id(record) for record in tested}
        training = [r for r in combined if id(r) not in tested_ids]
        model = CostModel._fit_quietly(
            training, device=None, backend=None, dtype=None, threads=None, holdout=0.0
        )
        for record in tested:
            try:
                value = model.predict_model(record.levels, model=record.model, tokens=record.tokens)
            except CostModelError as exc:
                logger.info("cross-validation could not predict %s: %s", _levels_digest(record), exc)
                unpredicted += 1
                continue
            measured.append(record.median_ms)
            predicted.append(value)
    report = accuracy_report(measured, predicted)
    report.update(folds=folds, unpredicted=unpredicted)
    return report


# ---------------------------------------------------------------------------------------------
# Accuracy metrics


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Return the Spearman rank correlation of ``x`` and ``y`` (ties get average ranks).

    Returns ``None`` for fewer than two pairs or when either side is constant.
    """
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return None
    rank_x = _average_ranks(np.asarray(x, dtype=float))
    rank_y = _average_ranks(np.asarray(y, dtype=float))
    rank_x -= rank_x.mean()
    rank_y -= rank_y.mean()
    denominator = math.sqrt(float(np.dot(rank_x, rank_x)) * float(np.dot(rank_y, rank_y)))
    if denominator == 0:
        return None
    return float(np.dot(rank_x, rank_y)) / denominator


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2.0 + 1.0
        start = stop + 1
    return ranks


def accuracy_report(measured: Sequence[float], predicted: Sequence[float]) -> dict[str, Any]:
    """Summarise predictions against measurements.

    ``within_5pct`` and ``within_10pct`` are shares (0..1) of predictions within 5% and 10%
    of the measurement. ``mape``, ``max_ape`` and ``median_error_pct`` are percentages, and
    ``median_error_pct`` is signed: positive when predictions run high. Metrics are ``None`` when there are no pairs.
    """
    count = len(measured)
    if count == 0:
        return {
            "count": 0,
            "within_5pct": None,
            "within_10pct": None,
            "mape": None,
            "max_ape": None,
            "median_error_pct": None,
            "spearman": None,
        }
    truth = np.asarray(measured, dtype=float)
    guess = np.asarray(predicted, dtype=float)
    errors = (guess - truth) / truth
    absolute = np.abs(errors)
    # A tiny slack keeps an error of exactly 5% inside the 5% band despite rounding.
    return {
        "count": count,
        "within_5pct": float(np.mean(absolute <= 0.05 + 1e-12)),
        "within_10pct": float(np.mean(absolute <= 0.10 + 1e-12)),
        "mape": float(100.0 * absolute.mean()),
        "max_ape": float(100.0 * absolute.max()),
        "median_error_pct": float(100.0 * np.median(errors)),
        "spearman": spearman(truth.tolist(), guess.tolist()),
    }


# ---------------------------------------------------------------------------------------------
# Fitting helpers


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: give an integer >= {minimum}")


def _require_level(value: Any) -> None:
    if isinstance(value, bool) or value not in LEVELS:
        raise ValueError(f"level={value!r} is invalid: a Cn4 level is 0, 1, 2 or 3")


def _require_finite(name: str, value: Any, *, positive: bool) -> None:
    number_like = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if not number_like or not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "positive" if positive else "non-negative"
        raise ValueError(f"{name}={value!r} is invalid: give a finite, {bound} number")


def _value_bytes(dtype: str) -> int:
    size = DTYPE_BYTES.get(dtype.lower())
    if size is None:
        # NOTE: an unknown dtype is costed as 4 bytes per value. Each regression is per level,
        # so this scales its coefficients but does not change its predictions.
        logger.info("dtype %r is not in DTYPE_BYTES; assuming 4 bytes per value", dtype)
        return 4
    return size


def _check_layer_arguments(out_features: int, in_features: int, level: int, tokens: int) -> None:
    for name, value, minimum in (
        ("out_features", out_features, 1),
        ("in_features", in_features, 1),
        ("tokens", tokens, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise CostModelError(f"{name}={value!r} is invalid: give an integer >= {minimum}")
    if isinstance(level, bool) or level not in LEVELS:
        raise CostModelError(
            f"level={level!r} is invalid: a Cn4 level is 0, 1, 2 or 3 (zeros per group of 4)"
        )


def _select(
    records: list[Measurement],
    device: str | None,
    backend: str | None,
    dtype: str | None,
    threads: int | None,
) -> tuple[list[Measurement], dict[str, Any]]:
    """Keep the records of one device, backend, dtype and thread count, or explain the choice."""
    if not records:
        raise CostModelError("no measurement records to fit: give at least one file with records")
    selection: dict[str, Any] = {}
    remaining = records
    for name, wanted, option in (
        ("device", device, "--device"),
        ("backend", backend, "--backend"),
        ("dtype", dtype, "--dtype"),
        ("threads", threads, "--threads"),
    ):
        present = sorted({getattr(r, name) for r in remaining}, key=lambda v: (v is None, str(v)))
        if wanted is None:
            if len(present) > 1:
                raise CostModelError(
                    f"the measurements contain several {name} values {present}: choose one with "
                    f"{option} (or the {name}= argument of CostModel.fit)"
                )
            wanted = present[0]
        elif wanted not in present:
            raise CostModelError(
                f"{name}={wanted!r} has no measurements; the files contain {name} values {present}"
            )
        remaining = [r for r in remaining if getattr(r, name) == wanted]
        selection[name] = wanted
    return remaining, selection


def _nonnegative_least_squares(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Solve min ||A x - b|| subject to x >= 0 by trying every subset of columns.

    With three columns that is seven small solves, and the best feasible subset is the exact
    non-negative solution (the optimum has some active set, and its free part is the
    unconstrained solution on that set).
    """
    columns = features.shape[1]
    scale = np.abs(features).max(axis=0)
    scale[scale == 0] = 1.0
    scaled = features / scale
    best: np.ndarray | None = None
    best_residual = math.inf
    for mask in range(1, 2**columns):
        chosen = [c for c in range(columns) if mask >> c & 1]
        solution, *_ = np.linalg.lstsq(scaled[:, chosen], targets, rcond=None)
        if np.any(solution < 0):
            continue
        full = np.zeros(columns)
        full[chosen] = solution
        residual = float(np.sum((scaled @ full - targets) ** 2))
        if residual < best_residual - 1e-15:
            best, best_residual = full, residual
    if best is None:
        return np.zeros(columns)
    return best / scale


def _fit_regression(
    entries: Sequence[LayerEntry], level: int, tokens: int, value_bytes: int
) -> LevelRegression:
    sizes = [weight_bytes(e.out_features, e.in_features, level, value_bytes) for e in entries]
    features = np.array(
        [
            [1.0, size, activation_bytes(e.out_features, e.in_features, tokens, value_bytes)]
            for e, size in zip(entries, sizes)
        ]
    )
    targets = np.array([e.median_ms for e in entries])
    # Dividing each row by its target minimises relative error, so small layers count as much
    # as large ones.
    coefficients = _nonnegative_least_squares(features / targets[:, None], np.ones(len(entries)))
    fitted = features @ coefficients
    fit_mape = float(100.0 * np.mean(np.abs(fitted - targets) / targets))
    return LevelRegression(
        level=level,
        tokens=tokens,
        coefficients=tuple(float(c) for c in coefficients),
        weight_bytes_min=min(sizes),
        weight_bytes_max=max(sizes),
        shapes=len(entries),
        fit_mape=fit_mape,
    )


def _group_entries(entries: Iterable[LayerEntry]) -> dict[tuple[int, int], list[LayerEntry]]:
    groups: dict[tuple[int, int], list[LayerEntry]] = {}
    for entry in entries:
        groups.setdefault((entry.level, entry.tokens), []).append(entry)
    return groups


def _fit_regressions(
    entries: Sequence[LayerEntry], value_bytes: int
) -> dict[tuple[int, int], LevelRegression]:
    regressions = {}
    for (level, tokens), group in sorted(_group_entries(entries).items()):
        if len(group) < MIN_REGRESSION_SHAPES:
            logger.info(
                "no regression for level %d, tokens=%d: %d shape(s) measured, %d needed",
                level,
                tokens,
                len(group),
                MIN_REGRESSION_SHAPES,
            )
            continue
        regressions[(level, tokens)] = _fit_regression(group, level, tokens, value_bytes)
    return regressions


def _leave_one_out(
    entries: Sequence[LayerEntry],
    regressions: Mapping[tuple[int, int], LevelRegression],
    value_bytes: int,
) -> dict[str, Any]:
    """Refit each regression without each measured shape and predict that shape.

    Shapes that the reduced regression may not cover (outside its widened range) are skipped,
    as predictions would be.
    """
    measured: list[float] = []
    predicted: list[float] = []
    for key, group in _group_entries(entries).items():
        if key not in regressions or len(group) <= MIN_REGRESSION_SHAPES:
            continue
        level, tokens = key
        for index, entry in enumerate(group):
            rest = group[:index] + group[index + 1 :]
            reduced = _fit_regression(rest, level, tokens, value_bytes)
            size = weight_bytes(entry.out_features, entry.in_features, level, value_bytes)
            if not reduced.covers(size):
                continue
            measured.append(entry.median_ms)
            predicted.append(reduced.predict(entry.out_features, entry.in_features, value_bytes))
    report = accuracy_report(measured, predicted)
    return {key: report[key] for key in ("count", "within_10pct", "mape", "max_ape")}


def _levels_digest(record: Measurement) -> str:
    """Return a stable short id of a model record's level map."""
    text = json.dumps(record.levels, sort_keys=True)
    return f"{record.model}#{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def is_uniform(record: Measurement) -> bool:
    """Return whether a model record runs all of its several layers at one level."""
    levels = {level for _, _, level in record.levels.values()}
    return len(record.levels) > 1 and len(levels) == 1


def _split_model_records(
    whole: Sequence[Measurement], remainders: Sequence[Measurement], holdout: float
) -> tuple[dict[tuple[str, int], list[Measurement]], list[Measurement]]:
    """Split model records into calibration groups per (model, tokens) and held-out records.

    Uniform level maps always calibrate: a search picks mixed maps, so those are what the
    report should judge, and ``cn4 probe`` derives the remainder from the uniform maps. Mixed
    maps are ordered by a hash of their level map, so the split is reproducible and
    independent of file order. The first ``floor((1 - holdout) * n)`` of them calibrate too.
    A model with no remainder record and no calibration record yet gets one.
    """
    with_remainder = {(r.model, r.tokens) for r in remainders}
    groups: dict[tuple[str, int], list[Measurement]] = {}
    for record in whole:
        groups.setdefault((record.model, record.tokens), []).append(record)
    calibration: dict[tuple[str, int], list[Measurement]] = {}
    held_out: list[Measurement] = []
    for key, group in sorted(groups.items()):
        uniform = [record for record in group if is_uniform(record)]
        mixed = sorted((r for r in group if not is_uniform(r)), key=_levels_digest)
        count = math.floor((1.0 - holdout) * len(mixed) + 1e-9)
        if key not in with_remainder and not uniform:
            count = max(count, 1)
        calibration[key] = uniform + mixed[:count]
        held_out.extend(mixed[count:])
    return calibration, held_out


def _layer_order(entry: LayerEntry) -> tuple[int, int, int, int]:
    return (entry.tokens, entry.level, entry.out_features, entry.in_features)
