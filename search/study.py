"""The latency-budgeted Cn4 level search: an Optuna study driven by ask and tell.

Each eligible Linear is one categorical parameter over the allowed levels. A trial's
configuration is first predicted by the device's cost model. A configuration over the latency
budget (or under the sparsity target) is infeasible and is reported to the study as PRUNED
without being measured, because its quality cannot make it the winner. A feasible one is
assembled from the variant cache and its quality measured end to end (KL to the dense model on
calibration windows, or perplexity), which is the value the study minimises. Constraints go
through ``trial.set_constraint``, so the TPE sampler steers towards feasible configurations
(Optuna 5.1: feasible when every value is <= 0).

The baselines (every fitting uniform level, a greedy and an OWL-style allocation; see
:mod:`search.baselines`) are enqueued as the first trials, so the best feasible trial is at
least as good as each of them on the objective (unless ``spec.trials`` is smaller than their
count). An infeasible proposal is followed by its greedy repair, and each new best by its most
promising one-move neighbours. After the search, the winner, the dense model and the baselines
are scored on held-out evaluation windows for the report.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.baselines import (
    greedy_allocation,
    outlier_ratios,
    owl_allocation,
    single_layer_losses,
    swap_neighbours,
    uniform_allocations,
)
from search.budget import (
    Budget,
    LatencyTable,
    constraint_values,
    describe_violation,
    resolve_budget,
    sparsity,
)
from search.errors import Cn4Error, CostModelError, SearchError
from search.models import LayerInfo, LoadedModel, eligible_layers, load_checkpoint
from search.objective import QualityEvaluator, level_key
from search.spec import SearchSpec

logger = logging.getLogger(__name__)

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# Trials still running in other workers count towards the total, so workers sharing a study
# do not overshoot it.
COUNTED_STATES = (*FINISHED_STATES, TrialState.RUNNING)
# TPE's random start-up trials; the enqueued baselines count among them.
TPE_STARTUP_TRIALS = 10
# Neighbours of each new best configuration enqueued for measurement.
NEIGHBOURS_PER_BEST = 3


@dataclass
class SearchContext:
    """Everything a trial needs: the model, its layers, the evaluator and the latency table."""

    spec: SearchSpec
    loaded: LoadedModel
    layers: list[LayerInfo]
    evaluator: QualityEvaluator
    table: LatencyTable
    budget: Budget
    device: dict[str, Any]
    cost_model: Any
    calibration_windows: Any
    timings: dict[str, float]
    # Single-layer losses behind the greedy baseline and the repair of infeasible proposals.
    losses: dict[str, dict[int, float]] | None = None

    @property
    def directions(self) -> list[str]:
        return ["minimize", "minimize"] if self.spec.multi_objective else ["minimize"]


def run_search(
    spec: SearchSpec,
    *,
    out_dir: Path | None,
    on_trial: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    progress: bool = False,
) -> dict:
    """Run the search of ``spec`` and return its report (also written to ``out_dir``).

    ``on_trial(record)`` is called after every trial with its number, state, levels, quality,
    predicted latency, sparsity, feasibility, reason and seed name. ``should_stop()`` is polled
    between trials; when it returns true the search ends early and keeps its finished trials.
    ``storage`` is an Optuna RDB URL shared by several workers. Each worker runs trials until the
    study contains ``spec.trials`` of them. Without ``storage`` the study is in memory. With
    ``out_dir``, ``report.json``, ``summary.txt`` and the pruned checkpoint under ``model/`` are
    written.

    Raises BudgetError when the budget is under the lowest predicted latency any allowed
    configuration reaches, or the sparsity target over the highest reachable sparsity.
    """
    from search.report import build_report, write_report

    started = time.perf_counter()
    context = prepare_search(spec, progress=progress)
    seeds = compute_seeds(context, progress=progress)

    study = create_study(context, storage=storage, study_name=study_name)
    enqueue_seeds(study, seeds)
    stopped = run_trials(
        study, context, on_trial=on_trial, should_stop=should_stop, progress=progress
    )

    report = build_report(
        context,
        study,
        seeds=seeds,
        stopped=stopped,
        wall_time_s=time.perf_counter() - started,
        out_dir=out_dir,
    )
    if out_dir is not None:
        write_report(report, Path(out_dir))
    return report


# ---------------------------------------------------------------------------------------------
# Setting up


def prepare_search(spec: SearchSpec, *, progress: bool = False) -> SearchContext:
    """Load the model, texts, variants and cost model of ``spec``, and check its budget."""
    from search.data import calibration_text, evaluation_text, read_text, token_windows

    timings: dict[str, float] = {}
    started = time.perf_counter()
    loaded = load_checkpoint(spec.model)
    layers = eligible_layers(loaded.model)
    if not layers:
        raise SearchError(
            f"model {spec.model!r} has no eligible Linear layers: Cn4 needs input dimensions "
            "divisible by 4"
        )

    cost_model, device = resolve_device(spec.device, loaded, spec.levels, progress=progress)
    table = LatencyTable(cost_model, layers, spec.levels, model_id=device["model_id"])
    budget = resolve_budget(spec, table)
    timings["load_s"] = time.perf_counter() - started

    started = time.perf_counter()
    calibration = (
        read_text(spec.calibration_text) if spec.calibration_text else calibration_text()
    )
    evaluation = read_text(spec.evaluation_text) if spec.evaluation_text else evaluation_text()
    tokenizer = loaded.tokenizer
    calibration_windows = token_windows(
        tokenizer, calibration, window=spec.window, count=spec.calibration_windows, seed=spec.seed
    )
    evaluation_windows = token_windows(
        tokenizer, evaluation, window=spec.window, count=spec.evaluation_windows, seed=spec.seed
    )
    cache = prepare_variants(loaded, layers, spec, calibration_windows, progress=progress)
    timings["variants_s"] = time.perf_counter() - started

    evaluator = QualityEvaluator(
        loaded.model,
        cache,
        calibration=calibration_windows,
        evaluation=evaluation_windows,
        objective=spec.objective,
        proxy_count=spec.proxy_windows,
    )
    return SearchContext(
        spec=spec,
        loaded=loaded,
        layers=layers,
        evaluator=evaluator,
        table=table,
        budget=budget,
        device=device,
        cost_model=cost_model,
        calibration_windows=calibration_windows,
        timings=timings,
    )


def prepare_variants(
    loaded: LoadedModel, layers, spec: SearchSpec, windows, *, progress: bool = False
):
    """Return a variant cache with every (layer, allowed level) pruned by ``spec.method``.

    Calibration statistics are collected only when a variant is missing from the on-disk cache.
    """
    from search.calibration import collect_layer_stats
    from search.data import tokens_fingerprint
    from search.variants import VariantCache

    cache = VariantCache(
        model_fingerprint=loaded.fingerprint,
        calibration_fingerprint=tokens_fingerprint(windows),
        method=spec.method,
    )
    names = [layer.name for layer in layers]
    missing = cache.missing(names, spec.levels)
    if not missing:
        return cache
    stats = None
    if spec.method != "magnitude":
        stats = collect_layer_stats(loaded.model, windows, names)
    bar = _progress_bar(len(missing), 0, enabled=progress, desc="pruning", unit="variant")
    try:
        cache.prepare(
            loaded.model, names, spec.levels, stats,
            progress=(lambda done, total: bar.update(done - bar.n)) if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    return cache


def resolve_device(
    device: str, loaded: LoadedModel, levels, *, progress: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Return the cost model ``device`` names and a description of where it came from.

    ``device`` is ``"local"`` (this machine, probed and fitted once, then cached), a measurement
    file (``.csv``, ``.jsonl``, ``.ndjson``, or ``.json`` holding records) or a fitted cost
    model (``.json`` written by ``cn4 fit``).
    """
    from latency_models.cost_model import CostModel, fit_files
    from latency_models.probe import model_id

    if device == "local":
        from latency_models.local import local_cost_model

        cost_model = local_cost_model(
            loaded, levels=tuple(sorted(set(levels) | {0})), progress=progress
        )
        kind, source = "local", None
    else:
        path = Path(device).expanduser()
        if not path.is_file():
            raise SearchError(
                f"device {device!r} is not 'local' and no such file exists: give 'local', a "
                "measurement file (.csv, .jsonl) or a cost model JSON written by cn4 fit"
            )
        kind, source = _device_file_kind(path), str(path)
        cost_model = CostModel.load(path) if kind == "cost_model" else fit_files([path])

    known = cost_model.models()
    identity = model_id(loaded)
    if identity not in known:
        if len(known) != 1:
            raise SearchError(
                f"the cost model of device {device!r} has no remainder for this model "
                f"(id {identity}) and knows {len(known)} models {known}: measure this model "
                "with cn4 probe, or give measurements of this model only"
            )
        logger.warning(
            "device %s measured model %s, not this checkpoint's id %s: using its remainder",
            device, known[0], identity,
        )
        identity = known[0]
    info = {
        "kind": kind,
        "source": source,
        "name": cost_model.name,
        "model_id": identity,
        "fit_report": dict(cost_model.fit_report),
        "warnings": list(getattr(cost_model, "warnings", [])),
    }
    return cost_model, info


def _device_file_kind(path: Path) -> str:
    """Tell a fitted cost model JSON from a measurement file by its ``format`` field."""
    import json

    from latency_models.cost_model import FORMAT_VERSION

    if path.suffix.lower() != ".json":
        return "measurements"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        # JSON Lines in a .json file is not one JSON document: it is a measurement file.
        return "measurements"
    if isinstance(data, dict) and data.get("format") == FORMAT_VERSION:
        return "cost_model"
    return "measurements"


def is_local_device(context: SearchContext) -> bool:
    return context.device["kind"] == "local"


# ---------------------------------------------------------------------------------------------
# Seeds


def compute_seeds(context: SearchContext, *, progress: bool = False) -> dict[str, dict[str, int]]:
    """Return the baseline allocations that fit, by name, in the order they are enqueued."""
    spec, table, budget = context.spec, context.table, context.budget
    started = time.perf_counter()
    seeds = dict(uniform_allocations(table, spec.levels, budget, spec.sparsity_target))

    swaps = len(context.layers) * len([n for n in spec.levels if n > 0])
    bar = _progress_bar(swaps, 0, enabled=progress, desc="layer losses", unit="swap")

    def measured_loss(level_map: dict[str, int]) -> float:
        loss = context.evaluator.proxy_loss(level_map)
        if bar is not None:
            bar.update(1)
        return loss

    try:
        losses = single_layer_losses(context.layers, spec.levels, measured_loss)
    finally:
        if bar is not None:
            bar.close()
    context.losses = losses
    greedy = greedy_allocation(table, spec.levels, losses, budget, spec.sparsity_target)
    if greedy is not None:
        seeds["greedy"] = greedy

    ratios = owl_outlier_ratios(context)
    owl = owl_allocation(table, spec.levels, ratios, budget, spec.sparsity_target)
    if owl is not None:
        seeds["owl"] = owl
    context.timings["seeds_s"] = time.perf_counter() - started
    logger.info("baselines that fit: %s", ", ".join(seeds) or "none")
    return seeds


def owl_outlier_ratios(context: SearchContext) -> dict[str, float]:
    """Return each layer's OWL outlier ratio on the proxy calibration windows."""
    from search.calibration import collect_layer_stats

    names = [layer.name for layer in context.layers]
    stats = collect_layer_stats(context.loaded.model, context.evaluator.proxy_windows, names)
    return outlier_ratios(context.loaded.model, context.layers, stats)


# ---------------------------------------------------------------------------------------------
# The study


def create_study(
    context: SearchContext, *, storage: str | None, study_name: str | None
) -> optuna.Study:
    """Create (or join, with shared storage) the study, with a seeded constrained TPE sampler.

    A worker that joins a study with trials in it offsets the sampler seed by their count, so
    workers sharing a study with the same spec do not propose the same sequence.
    """
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        sampler=_sampler(context.spec.seed),
        directions=context.directions,
        load_if_exists=storage is not None,
    )
    if storage is not None:
        existing = len(study.get_trials(deepcopy=False))
        if existing:
            study.sampler = _sampler(context.spec.seed + existing)
        study.set_user_attr("spec", context.spec.to_dict())
    return study


def _sampler(seed: int) -> optuna.samplers.TPESampler:
    with warnings.catch_warnings():
        # Multivariate TPE is marked experimental; it models the layers jointly.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=TPE_STARTUP_TRIALS
        )


def enqueue_seeds(study: optuna.Study, seeds: Mapping[str, Mapping[str, int]]) -> None:
    """Enqueue each baseline once; a configuration already in the study is not enqueued again."""
    for name, level_map in seeds.items():
        if in_study(study, level_map):
            continue
        study.enqueue_trial(dict(level_map), user_attrs={"seed_name": name}, skip_if_exists=True)


def counted_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED_STATES))


def run_trials(
    study: optuna.Study,
    context: SearchContext,
    *,
    on_trial: Callable[[dict], None] | None,
    should_stop: Callable[[], bool] | None,
    progress: bool,
) -> bool:
    """Ask, evaluate and tell trials until the study has ``spec.trials``; return if stopped."""
    total = context.spec.trials
    done = counted_trials(study)
    bar = _progress_bar(total, done, enabled=progress, desc="search", unit="trial")
    best = None
    try:
        while counted_trials(study) < total:
            if should_stop is not None and should_stop():
                logger.info("search stopped on request after %d trials", counted_trials(study))
                return True
            trial = study.ask()
            level_map = {
                layer.name: trial.suggest_categorical(layer.name, list(context.spec.levels))
                for layer in context.layers
            }
            record = evaluate_trial(study, trial, level_map, context)
            if record["feasible"] and (best is None or record["quality"] < best):
                best = record["quality"]
                enqueue_neighbours(study, record, context)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(_progress_text(study, context), refresh=False)
            if on_trial is not None:
                on_trial(record)
    finally:
        if bar is not None:
            bar.close()
    return False


def evaluate_trial(
    study: optuna.Study, trial: optuna.Trial, level_map: dict[str, int], context: SearchContext
) -> dict:
    """Predict, constrain, measure and tell one trial; return its record."""
    spec = context.spec
    share = sparsity(context.layers, level_map)
    trial.set_user_attr("sparsity", share)

    try:
        latency = context.table.predict(level_map)
    except CostModelError as exc:
        return fail_trial(study, trial, f"predicted latency is missing: {exc}")
    if not math.isfinite(latency):
        return fail_trial(study, trial, f"predicted latency is {latency}, not a number of ms")
    trial.set_user_attr("predicted_latency_ms", latency)

    constraints = constraint_values(
        latency, share, budget=context.budget, sparsity_target=spec.sparsity_target
    )
    for key, value in constraints.items():
        trial.set_constraint(key, value)
    reason = describe_violation(
        constraints, latency, share, context.budget, spec.sparsity_target
    )
    if reason is not None:
        trial.set_user_attr("reason", reason)
        study.tell(trial, state=TrialState.PRUNED)
        enqueue_repair(study, trial.number, level_map, context)
        return trial_record(study, trial.number)

    try:
        quality = context.evaluator.objective(level_map)
    except Cn4Error as exc:
        return fail_trial(study, trial, f"quality measurement failed: {exc}")
    return tell_quality(study, trial, quality, latency, context)


def enqueue_repair(
    study: optuna.Study, number: int, level_map: dict[str, int], context: SearchContext
) -> None:
    """Enqueue the greedy repair of an infeasible proposal as a coming trial.

    The sampler learns from the infeasible trial. The repair raises the levels of the layers
    with the least loss per millisecond saved until the configuration fits, so the region the
    sampler proposed is measured too. A repair already in the study is not enqueued again.
    """
    if context.losses is None:
        return
    spec = context.spec
    repaired = greedy_allocation(
        context.table, spec.levels, context.losses, context.budget, spec.sparsity_target,
        start=level_map,
    )
    if repaired is None or repaired == level_map or in_study(study, repaired):
        return
    study.enqueue_trial(repaired, user_attrs={"seed_name": f"repair-{number}"}, skip_if_exists=True)


def enqueue_neighbours(study: optuna.Study, record: dict, context: SearchContext) -> None:
    """Enqueue the most promising one-move neighbours of a new best configuration.

    TPE samples each layer's level from per-layer densities and rarely proposes the exact
    trade of one layer's level against another's that improves a good configuration, so
    these trades are measured directly.
    """
    if context.losses is None:
        return
    spec = context.spec
    neighbours = swap_neighbours(
        record["levels"], context.table, spec.levels, context.losses, context.budget,
        spec.sparsity_target,
    )
    added = 0
    for level_map in neighbours:
        if added == NEIGHBOURS_PER_BEST:
            break
        if in_study(study, level_map):
            continue
        study.enqueue_trial(
            level_map, user_attrs={"seed_name": f"neighbour-{record['number']}"},
            skip_if_exists=True,
        )
        added += 1


def in_study(study: optuna.Study, level_map: Mapping[str, int]) -> bool:
    """Return whether a trial (finished, running or waiting) already has these levels."""
    key = level_key(level_map)
    for frozen in study.get_trials(deepcopy=False):
        params = frozen.system_attrs.get("fixed_params", frozen.params)
        if level_key(params) == key:
            return True
    return False


def tell_quality(
    study: optuna.Study,
    trial: optuna.Trial,
    quality: float | None,
    latency: float,
    context: SearchContext,
) -> dict:
    """Tell a measured trial, or fail it when the quality is missing or not finite."""
    if quality is None or not math.isfinite(quality):
        return fail_trial(study, trial, f"quality is {quality}, not a finite number")
    trial.set_user_attr("quality", quality)
    values = [quality, latency] if context.spec.multi_objective else quality
    study.tell(trial, values)
    return trial_record(study, trial.number)


def fail_trial(study: optuna.Study, trial: optuna.Trial, reason: str) -> dict:
    """Tell ``trial`` as FAIL with ``reason``; the study goes on."""
    logger.warning("trial %d failed: %s", trial.number, reason)
    trial.set_user_attr("reason", reason)
    study.tell(trial, state=TrialState.FAIL)
    return trial_record(study, trial.number)


def trial_record(study: optuna.Study, number: int) -> dict:
    # Trial numbers count from 0 across the study, also with several workers.
    return record_from_trial(study.get_trials(deepcopy=False)[number])


def record_from_trial(frozen: FrozenTrial) -> dict:
    """Return the JSON-ready record of a finished trial (what ``on_trial`` receives)."""
    attrs = frozen.user_attrs
    feasible = (
        frozen.state == TrialState.COMPLETE
        and all(value <= 0 for value in frozen.constraints.values())
        and math.isfinite(attrs.get("quality", math.nan))
    )
    return {
        "number": frozen.number,
        "state": frozen.state.name,
        "levels": {name: int(level) for name, level in frozen.params.items()},
        "quality": attrs.get("quality"),
        "predicted_latency_ms": attrs.get("predicted_latency_ms"),
        "sparsity": attrs.get("sparsity"),
        "feasible": bool(feasible),
        "reason": attrs.get("reason"),
        "seed_name": attrs.get("seed_name"),
        "constraints": dict(frozen.constraints),
    }


# ---------------------------------------------------------------------------------------------
# Picking the winner


def finished_records(study: optuna.Study) -> list[dict]:
    """Return the records of every finished trial in the study, in trial order."""
    return [
        record_from_trial(frozen)
        for frozen in study.get_trials(deepcopy=False, states=FINISHED_STATES)
    ]


def best_feasible(records: list[dict]) -> dict | None:
    """Return the feasible record with the lowest quality (then latency, then number)."""
    feasible = [record for record in records if record["feasible"]]
    if not feasible:
        return None
    return min(
        feasible,
        key=lambda r: (r["quality"], r["predicted_latency_ms"], r["number"]),
    )


def closest_infeasible(records: list[dict], budget: Budget, target: float | None) -> dict | None:
    """Return the predicted configuration that misses the constraints by the least.

    Violations are relative (latency over budget as a share of the budget, sparsity short of
    the target as a share of the target) and summed.
    """
    candidates = [
        record for record in records
        if record["predicted_latency_ms"] is not None and record["constraints"]
    ]
    if not candidates:
        return None

    def violation(record: dict) -> float:
        total = 0.0
        over = record["constraints"].get("latency_ms_over_budget", 0.0)
        if over > 0 and budget.ms:
            total += over / budget.ms
        short = record["constraints"].get("sparsity_under_target", 0.0)
        if short > 0 and target:
            total += short / target
        return total

    return min(candidates, key=lambda r: (violation(r), r["number"]))


def pareto_front(records: list[dict]) -> list[dict]:
    """Return the feasible records that no other feasible record dominates in (quality, latency).

    Configurations measured more than once appear once.
    """
    unique: dict[tuple, dict] = {}
    for record in records:
        if record["feasible"]:
            unique.setdefault(level_key(record["levels"]), record)
    points = list(unique.values())
    front = []
    for record in points:
        a = (record["quality"], record["predicted_latency_ms"])
        dominated = any(
            (other["quality"], other["predicted_latency_ms"]) != a
            and other["quality"] <= a[0]
            and other["predicted_latency_ms"] <= a[1]
            for other in points
        )
        if not dominated:
            front.append(record)
    return sorted(front, key=lambda r: (r["predicted_latency_ms"], r["quality"]))


def _progress_text(study: optuna.Study, context: SearchContext) -> str:
    best = best_feasible(finished_records(study))
    if best is None:
        return "no feasible trial yet"
    quality, latency = best["quality"], best["predicted_latency_ms"]
    return f"best {context.spec.objective} {quality:.4g} at {latency:.3g} ms"


def _progress_bar(total: int, done: int, *, enabled: bool, desc: str, unit: str):
    if not enabled:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit=unit, file=sys.stderr)
