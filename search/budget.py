"""Predicted latency of level maps, the latency budget and the sparsity of a configuration.

A model's predicted latency is the cost model's prediction for every eligible layer at its
level plus the model's non-prunable remainder. The table below queries the cost model once per
(layer, level) so that baselines and bounds can reason layer by layer; whole configurations are
predicted through ``CostModel.predict_model`` so that the number reported is the cost model's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from search.errors import BudgetError, CostModelError, SearchError
from search.models import GROUP_SIZE, LayerInfo
from search.spec import ALL_LEVELS, DEFAULT_BUDGET_SHARE, SearchSpec

logger = logging.getLogger(__name__)


def sparsity(layers: Sequence[LayerInfo], level_map: Mapping[str, int]) -> float:
    """Return the zeroed share of all eligible weights under ``level_map`` (0 to 0.75)."""
    total = sum(layer.weights for layer in layers)
    zeroed = sum(layer.weights * level_map.get(layer.name, 0) for layer in layers)
    return zeroed / (GROUP_SIZE * total) if total else 0.0


def uniform_map(layers: Sequence[LayerInfo], level: int) -> dict[str, int]:
    """Return the level map that puts every eligible layer at ``level``."""
    return {layer.name: level for layer in layers}


@dataclass(frozen=True)
class Budget:
    """The latency budget in force (ms per decoded token, or None) and where it came from."""

    ms: float | None
    source: str
    ratio: float | None


class LatencyTable:
    """Per-layer predicted latencies of one model on one device, for the allowed levels.

    ``layer_ms[name][level]`` is the cost model's prediction for that layer alone, or NaN where
    the cost model has no basis for it (``missing`` has the reason). A configuration that
    uses such a level cannot be predicted, and its trial fails.
    """

    def __init__(
        self, cost_model, layers: Sequence[LayerInfo], levels: Sequence[int], *, model_id: str
    ) -> None:
        self.cost_model = cost_model
        self.layers = list(layers)
        self.levels = tuple(sorted(set(levels)))
        self.model_id = model_id
        self.layer_ms: dict[str, dict[int, float]] = {}
        self.missing: dict[tuple[str, int], str] = {}
        for layer in self.layers:
            row = {}
            for level in sorted(set(self.levels) | {0}):
                try:
                    row[level] = float(
                        cost_model.predict_layer(layer.out_features, layer.in_features, level)
                    )
                except CostModelError as exc:
                    row[level] = math.nan
                    self.missing[(layer.name, level)] = str(exc)
            self.layer_ms[layer.name] = row

    def predict(self, level_map: Mapping[str, int]) -> float:
        """Return the predicted latency of ``level_map`` in ms per decoded token.

        Raises CostModelError where the cost model has no basis for a layer at its level.
        """
        shapes = [
            (layer.out_features, layer.in_features, int(level_map.get(layer.name, 0)))
            for layer in self.layers
        ]
        return float(self.cost_model.predict_model(shapes, model=self.model_id))

    def dense_ms(self) -> float:
        """Return the predicted latency with every eligible layer dense (level 0)."""
        try:
            return self.predict(uniform_map(self.layers, 0))
        except CostModelError as exc:
            raise SearchError(
                f"the cost model cannot predict the dense model ({exc}): measure level 0 of "
                "every layer shape, or give the budget in ms with budget_ms"
            ) from exc

    def fastest_levels(self) -> dict[str, int]:
        """Return each layer's fastest allowed level (sparse levels may predict slower)."""
        fastest = {}
        for layer in self.layers:
            row = self.layer_ms[layer.name]
            known = [level for level in self.levels if math.isfinite(row[level])]
            if not known:
                reasons = [self.missing.get((layer.name, level), "") for level in self.levels]
                raise SearchError(
                    f"the cost model predicts no allowed level {list(self.levels)} of layer "
                    f"{layer.name} ({layer.out_features}x{layer.in_features}): "
                    f"{reasons[0]}. Measure this shape or fit the cost model on more records"
                )
            fastest[layer.name] = min(known, key=lambda level: (row[level], level))
        return fastest

    def minimum_ms(self) -> float:
        """Return the lowest predicted latency any allowed configuration reaches."""
        return self.predict(self.fastest_levels())


def resolve_budget(spec: SearchSpec, table: LatencyTable) -> Budget:
    """Return the budget in force for ``spec``, raising BudgetError when no configuration fits.

    The bound is the configuration with every layer at its fastest allowed level. With no budget
    and no sparsity target, the budget lies ``DEFAULT_BUDGET_SHARE`` of the way from that bound
    to the dense latency. The sparsity target is checked against every layer at its highest
    allowed level.
    """
    minimum = table.minimum_ms()
    if spec.budget_ms is not None:
        budget = Budget(ms=float(spec.budget_ms), source="budget_ms", ratio=None)
    elif spec.budget_ratio is not None:
        ratio = spec.budget_ratio
        budget = Budget(ms=ratio * table.dense_ms(), source="budget_ratio", ratio=ratio)
    elif spec.uses_default_budget:
        dense = table.dense_ms()
        budget_ms = minimum + DEFAULT_BUDGET_SHARE * max(dense - minimum, 0.0)
        budget = Budget(ms=budget_ms, source="default", ratio=budget_ms / dense)
    else:
        budget = Budget(ms=None, source="none", ratio=None)

    if budget.ms is not None and budget.ms < minimum:
        if budget.source == "budget_ms":
            given = f"budget_ms={budget.ms:.4g}"
            fix = f"raise the budget to at least {minimum:.4g} ms"
        else:
            given = f"budget_ratio={budget.ratio} ({budget.ms:.4g} ms)"
            lowest_ratio = minimum / table.dense_ms()
            fix = f"raise the budget ratio to at least {math.ceil(lowest_ratio * 1000) / 1000:.3f}"
        if max(spec.levels) < max(ALL_LEVELS):
            fix += f" or allow level {max(ALL_LEVELS)}"
        raise BudgetError(
            f"{given} is below the lowest predicted latency any allowed configuration "
            f"reaches, {minimum:.4g} ms per token (levels {list(spec.levels)}): {fix}"
        )

    if spec.sparsity_target is not None:
        highest = uniform_map(table.layers, max(spec.levels))
        reachable = sparsity(table.layers, highest)
        if spec.sparsity_target > reachable + 1e-12:
            raise BudgetError(
                f"sparsity_target={spec.sparsity_target} is above the highest sparsity the "
                f"allowed levels {list(spec.levels)} reach, {reachable:.4g}: lower the target or "
                "allow higher levels"
            )
    return budget


def constraint_values(
    latency_ms: float, share: float, *, budget: Budget, sparsity_target: float | None
) -> dict[str, float]:
    """Return Optuna constraint values (feasible when every value is <= 0)."""
    values = {}
    if budget.ms is not None:
        values["latency_ms_over_budget"] = latency_ms - budget.ms
    if sparsity_target is not None:
        values["sparsity_under_target"] = sparsity_target - share
    return values


def describe_violation(values: Mapping[str, float], latency_ms: float, share: float,
                       budget: Budget, sparsity_target: float | None) -> str | None:
    """Return why a configuration is infeasible, or None when it is feasible."""
    reasons = []
    if values.get("latency_ms_over_budget", 0.0) > 0:
        reasons.append(
            f"predicted latency {latency_ms:.4g} ms is over the budget {budget.ms:.4g} ms"
        )
    if values.get("sparsity_under_target", 0.0) > 0:
        reasons.append(f"sparsity {share:.4g} is under the target {sparsity_target:.4g}")
    return "; ".join(reasons) or None
