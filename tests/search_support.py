"""Helpers for the search tests: a described device written as a cn4.latency/1 file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from latency_models.measurements import Measurement, write_measurements
from latency_models.probe import model_id
from search.models import eligible_layers

# Milliseconds per weight of a Linear at each level on the described device: level 3 is the
# fastest, and every sparse level is faster than dense.
DEFAULT_MS_PER_WEIGHT = {0: 1.0e-4, 1: 0.85e-4, 2: 0.6e-4, 3: 0.4e-4}
DEFAULT_REMAINDER_MS = 0.5


def write_device_file(
    path: Path,
    loaded,
    *,
    ms_per_weight: Mapping[int, float] = DEFAULT_MS_PER_WEIGHT,
    remainder_ms: float = DEFAULT_REMAINDER_MS,
    skip: set[tuple[int, int, int]] = frozenset(),
) -> Path:
    """Write linear records for every eligible shape and level, and a remainder record.

    ``skip`` lists ``(out_features, in_features, level)`` cases to leave unmeasured.
    """
    shapes = sorted({(i.out_features, i.in_features) for i in eligible_layers(loaded.model)})
    records = []
    for out_features, in_features in shapes:
        for level, rate in sorted(ms_per_weight.items()):
            if (out_features, in_features, level) in skip:
                continue
            records.append(
                Measurement(
                    device="described",
                    backend="test",
                    op="linear",
                    out_features=out_features,
                    in_features=in_features,
                    level=level,
                    median_ms=rate * out_features * in_features,
                )
            )
    records.append(
        Measurement(
            device="described",
            backend="test",
            op="remainder",
            model=model_id(loaded),
            median_ms=remainder_ms,
        )
    )
    return write_measurements(records, path)


def predicted_ms(loaded, level_map: Mapping[str, int], ms_per_weight=DEFAULT_MS_PER_WEIGHT,
                 remainder_ms: float = DEFAULT_REMAINDER_MS) -> float:
    """Return what the described device predicts for ``level_map``, computed independently."""
    total = remainder_ms
    for info in eligible_layers(loaded.model):
        total += ms_per_weight[level_map.get(info.name, 0)] * info.out_features * info.in_features
    return total
