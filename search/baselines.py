"""Baseline level allocations: uniform levels, a greedy allocation and an OWL-style one.

The search enqueues every baseline that fits the constraints as its first trials, so its best
trial is at least as good as each of them on the search objective.

- **Uniform**: every eligible layer at the same level.
- **Greedy**: starting from each layer's least lossy allowed level, repeatedly take the level
  change with the smallest increase of quality loss per predicted millisecond saved, until the
  budget is met, then (for a sparsity target) per zeroed weight added. The per-layer loss of a
  level is measured: KL to the dense model on a few calibration windows with only that layer
  pruned (a single-layer swap), so it needs ``len(layers) x len(levels)`` short evaluations.
  Summing single-layer losses ignores interactions between layers, which is why it is a
  baseline and a seed, never the reported result.
- **OWL-style**: Outlier Weighed Layerwise sparsity (Yin et al., ICML 2024) gives layers with
  fewer activation outliers more sparsity. A layer's outlier ratio is the share of its Wanda
  scores ``|W_ij| * ||X_j||_2`` above ``OWL_OUTLIER_FACTOR`` times their mean. OWL scores
  whole blocks and moves sparsity continuously within ``±λ``; here each Linear is scored on
  its own and the target is rounded to the allowed levels, so λ is one whole level.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from search.budget import Budget, LatencyTable, sparsity, uniform_map
from search.models import LayerInfo

logger = logging.getLogger(__name__)

# OWL's outlier threshold M: a score counts as an outlier above M times the layer's mean score.
OWL_OUTLIER_FACTOR = 5.0
# Spread of the OWL-style targets around their centre, in levels (one level = 0.25 sparsity).
OWL_SPREAD_LEVELS = 1.0
# Step of the centre level when searching for the least sparse OWL-style allocation that fits.
OWL_CENTRE_STEP = 0.02


def fits(
    level_map: Mapping[str, int],
    table: LatencyTable,
    budget: Budget,
    sparsity_target: float | None,
) -> bool:
    """Return whether ``level_map`` meets the budget and sparsity target, as predicted."""
    if budget.ms is not None:
        try:
            latency = table.predict(level_map)
        except LookupError:
            return False
        if not latency <= budget.ms:
            return False
    if sparsity_target is not None and sparsity(table.layers, level_map) < sparsity_target:
        return False
    return True


def uniform_allocations(
    table: LatencyTable, levels: Sequence[int], budget: Budget, sparsity_target: float | None
) -> dict[str, dict[str, int]]:
    """Return ``{"uniform-n": level_map}`` for every allowed uniform level that fits."""
    allocations = {}
    for level in sorted(levels):
        level_map = uniform_map(table.layers, level)
        if fits(level_map, table, budget, sparsity_target):
            allocations[f"uniform-{level}"] = level_map
    return allocations


def single_layer_losses(
    layers: Sequence[LayerInfo], levels: Sequence[int], loss: Callable[[dict[str, int]], float]
) -> dict[str, dict[int, float]]:
    """Measure ``loss`` with one layer at each allowed level and every other layer dense."""
    dense = uniform_map(layers, 0)
    losses: dict[str, dict[int, float]] = {}
    for layer in layers:
        row = {0: 0.0}
        for level in levels:
            if level == 0:
                continue
            row[level] = float(loss({**dense, layer.name: level}))
        losses[layer.name] = row
    return losses


def greedy_allocation(
    table: LatencyTable,
    levels: Sequence[int],
    losses: Mapping[str, Mapping[int, float]],
    budget: Budget,
    sparsity_target: float | None,
    *,
    start: Mapping[str, int] | None = None,
) -> dict[str, int] | None:
    """Return the greedy allocation (see the module docstring), or None when it cannot fit.

    ``start`` replaces the least lossy levels as the starting point, which turns the greedy
    into a repair of an infeasible configuration.
    """
    allowed = sorted(levels)
    layers = {layer.name: layer for layer in table.layers}

    def loss_of(name: str, level: int) -> float:
        value = losses[name].get(level, math.inf)
        return value if math.isfinite(value) else math.inf

    current = {}
    for name in layers:
        predictable = [n for n in allowed if math.isfinite(table.layer_ms[name][n])]
        if not predictable:
            return None
        if start is not None and start.get(name) in predictable:
            current[name] = int(start[name])
        else:
            current[name] = min(predictable, key=lambda n: (loss_of(name, n), n))

    # Phase 1: meet the latency budget, cheapest loss per millisecond saved first.
    if budget.ms is not None:
        while table.predict(current) > budget.ms:
            best = None
            for name, level in current.items():
                now_ms = table.layer_ms[name][level]
                for other in allowed:
                    saved = now_ms - table.layer_ms[name][other]
                    if other == level or not saved > 0:
                        continue
                    rate = (loss_of(name, other) - loss_of(name, level)) / saved
                    if best is None or rate < best[0]:
                        best = (rate, name, other)
            if best is None:
                return None
            current[best[1]] = best[2]

    # Phase 2: meet the sparsity target without breaking the budget, per zeroed weight.
    if sparsity_target is not None:
        while sparsity(table.layers, current) < sparsity_target:
            best = None
            for name, level in current.items():
                for other in allowed:
                    if other <= level:
                        continue
                    candidate = {**current, name: other}
                    if budget.ms is not None and not table.predict(candidate) <= budget.ms:
                        continue
                    added = layers[name].weights * (other - level)
                    rate = (loss_of(name, other) - loss_of(name, level)) / added
                    if best is None or rate < best[0]:
                        best = (rate, name, other)
            if best is None:
                return None
            current[best[1]] = best[2]
    return current


def outlier_ratios(
    model: torch.nn.Module, layers: Sequence[LayerInfo], stats: Mapping[str, object]
) -> dict[str, float]:
    """Return each layer's OWL outlier ratio from its weight and calibration input norms.

    ``stats[name].hessian`` is the sum of ``x xᵀ`` over calibration tokens, so its diagonal
    contains the squared input norms ``||X_j||²`` that Wanda scores use.
    """
    modules = dict(model.named_modules())
    ratios = {}
    for layer in layers:
        weight = modules[layer.name].weight.detach().double()
        norms = torch.diagonal(stats[layer.name].hessian).clamp(min=0).sqrt()
        scores = weight.abs() * norms.to(weight.dtype).unsqueeze(0)
        threshold = OWL_OUTLIER_FACTOR * scores.mean()
        ratios[layer.name] = float((scores > threshold).double().mean())
    return ratios


def owl_allocation(
    table: LatencyTable,
    levels: Sequence[int],
    ratios: Mapping[str, float],
    budget: Budget,
    sparsity_target: float | None,
) -> dict[str, int] | None:
    """Return the least sparse OWL-style allocation that fits, or None when none does.

    Layer ``l`` gets the target level ``c + λ (1 - 2 t_l)``, where ``t_l`` in [0, 1] is its
    outlier ratio rescaled over the model's layers, rounded to the nearest allowed level. The
    centre ``c`` rises in small steps until the allocation fits.
    """
    allowed = sorted(levels)
    names = [layer.name for layer in table.layers]
    low, high = min(ratios.values()), max(ratios.values())
    spread = high - low
    scaled = {
        name: (ratios[name] - low) / spread if spread > 0 else 0.5 for name in names
    }

    def nearest_allowed(target: float) -> int:
        return min(allowed, key=lambda n: (abs(n - target), n))

    centre = allowed[0] - OWL_SPREAD_LEVELS
    while centre <= allowed[-1] + OWL_SPREAD_LEVELS + 1e-9:
        level_map = {
            name: nearest_allowed(centre + OWL_SPREAD_LEVELS * (1 - 2 * scaled[name]))
            for name in names
        }
        if fits(level_map, table, budget, sparsity_target):
            return level_map
        centre += OWL_CENTRE_STEP
    return None


def swap_neighbours(
    level_map: Mapping[str, int],
    table: LatencyTable,
    levels: Sequence[int],
    losses: Mapping[str, Mapping[int, float]],
    budget: Budget,
    sparsity_target: float | None,
) -> list[dict[str, int]]:
    """Return the configurations one move from ``level_map`` that fit, most promising first.

    A move lowers one layer to its next lower allowed level, alone or while raising another
    layer to its next higher allowed level. Moves are ranked by the summed change of the
    single-layer losses, a cheap estimate; the search measures them end to end.
    """
    allowed = sorted(levels)

    def step(level: int, direction: int) -> int | None:
        index = allowed.index(level) + direction if level in allowed else -1
        return allowed[index] if 0 <= index < len(allowed) else None

    def change(name: str, new: int) -> float:
        row = losses[name]
        return row.get(new, math.inf) - row.get(level_map[name], math.inf)

    ranked = []
    for lowered, level in level_map.items():
        down = step(level, -1)
        if down is None:
            continue
        moves = [({lowered: down}, change(lowered, down))]
        for raised, other in level_map.items():
            up = step(other, +1)
            if raised != lowered and up is not None:
                moves.append(
                    ({lowered: down, raised: up}, change(lowered, down) + change(raised, up))
                )
        for move, estimate in moves:
            candidate = {**level_map, **move}
            if math.isfinite(estimate) and fits(candidate, table, budget, sparsity_target):
                ranked.append((estimate, sorted(move.items()), candidate))
    ranked.sort(key=lambda item: (item[0], item[1]))
    return [candidate for _, _, candidate in ranked]
