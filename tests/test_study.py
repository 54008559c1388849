"""The Optuna level search on a tiny Mamba2 checkpoint and a described device."""

from __future__ import annotations

import dataclasses
import json
import math

import optuna
import pytest
from search_support import predicted_ms, write_device_file

from search.baselines import (
    greedy_allocation,
    owl_allocation,
    swap_neighbours,
    uniform_allocations,
)
from search.budget import Budget, LatencyTable, resolve_budget, sparsity
from search.errors import BudgetError
from search.models import eligible_layers, load_checkpoint
from search.spec import SearchSpec
from search.study import (
    FINISHED_STATES,
    best_feasible,
    compute_seeds,
    create_study,
    enqueue_seeds,
    evaluate_trial,
    pareto_front,
    prepare_search,
    run_search,
    run_trials,
    tell_quality,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SMALL = dict(calibration_windows=8, window=32, evaluation_windows=6, proxy_windows=3)


@pytest.fixture(scope="module")
def loaded(tiny_mamba2_dir):
    return load_checkpoint(tiny_mamba2_dir)


@pytest.fixture(scope="module")
def device_file(loaded, tmp_path_factory):
    return write_device_file(tmp_path_factory.mktemp("device") / "device.jsonl", loaded)


def small_spec(model_dir, device, **overrides) -> SearchSpec:
    settings = {**SMALL, "model": str(model_dir), "device": str(device), "trials": 8}
    settings.update(overrides)
    return SearchSpec(**settings)


@pytest.fixture(scope="module")
def context(tiny_mamba2_dir, device_file):
    context = prepare_search(small_spec(tiny_mamba2_dir, device_file, budget_ratio=0.6))
    context.seeds = compute_seeds(context)
    return context


def fresh_study(context):
    study = create_study(context, storage=None, study_name=None)
    enqueue_seeds(study, context.seeds)
    return study


def table_for(loaded, device_file, levels=(1, 2, 3)):
    from latency_models.cost_model import fit_files
    from latency_models.probe import model_id

    return LatencyTable(
        fit_files([device_file]), eligible_layers(loaded.model), levels, model_id=model_id(loaded)
    )


# Budgets


def test_budget_ratio_resolves_against_dense(loaded, device_file, tiny_mamba2_dir):
    table = table_for(loaded, device_file)
    spec = small_spec(tiny_mamba2_dir, device_file, budget_ratio=0.7)
    budget = resolve_budget(spec, table)
    dense = predicted_ms(loaded, {})
    assert table.dense_ms() == pytest.approx(dense)
    assert budget.ms == pytest.approx(0.7 * dense)
    assert budget.source == "budget_ratio"


def test_budget_below_minimum_names_both_numbers(loaded, device_file, tiny_mamba2_dir):
    table = table_for(loaded, device_file)
    minimum = predicted_ms(loaded, {layer.name: 3 for layer in table.layers})
    assert table.minimum_ms() == pytest.approx(minimum)
    spec = small_spec(tiny_mamba2_dir, device_file, budget_ms=0.5 * minimum)
    with pytest.raises(BudgetError) as caught:
        resolve_budget(spec, table)
    message = str(caught.value)
    assert f"budget_ms={0.5 * minimum:.4g}" in message
    assert f"{minimum:.4g} ms" in message


def test_minimum_uses_fastest_level_not_highest(loaded, tmp_path, tiny_mamba2_dir):
    # On this device level 3 is slower than dense and level 1 is the fastest.
    rates = {0: 1.0e-4, 1: 0.5e-4, 2: 0.9e-4, 3: 1.5e-4}
    device = write_device_file(tmp_path / "slow3.jsonl", loaded, ms_per_weight=rates)
    table = table_for(loaded, device)
    assert set(table.fastest_levels().values()) == {1}
    expected = predicted_ms(loaded, {layer.name: 1 for layer in table.layers}, rates)
    assert table.minimum_ms() == pytest.approx(expected)
    spec = small_spec(tiny_mamba2_dir, device, budget_ms=expected * 1.001)
    assert resolve_budget(spec, table).ms == pytest.approx(expected * 1.001)


def test_unreachable_sparsity_target_raises(loaded, device_file, tiny_mamba2_dir):
    table = table_for(loaded, device_file, levels=(1, 2))
    spec = small_spec(tiny_mamba2_dir, device_file, levels=(1, 2), sparsity_target=0.6)
    with pytest.raises(BudgetError, match=r"sparsity_target=0.6 .* 0.5"):
        resolve_budget(spec, table)


# Baselines


def test_uniform_baselines_only_those_that_fit(loaded, device_file):
    table = table_for(loaded, device_file)
    dense = table.dense_ms()
    budget = Budget(ms=0.7 * dense, source="budget_ratio", ratio=0.7)
    fitting = uniform_allocations(table, (1, 2, 3), budget, None)
    assert sorted(fitting) == ["uniform-2", "uniform-3"]
    assert table.predict(fitting["uniform-2"]) <= budget.ms
    assert table.predict({layer.name: 1 for layer in table.layers}) > budget.ms


def test_greedy_meets_budget_and_prefers_cheap_layers(loaded, device_file):
    table = table_for(loaded, device_file)
    names = [layer.name for layer in table.layers]
    budget = Budget(ms=0.75 * table.dense_ms(), source="budget_ratio", ratio=0.75)
    # The first layer loses nothing at any level; every other layer loses a lot.
    losses = {name: {0: 0.0, 1: 1.0, 2: 5.0, 3: 20.0} for name in names}
    losses[names[0]] = {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}
    greedy = greedy_allocation(table, (1, 2, 3), losses, budget, None)
    assert greedy is not None
    assert table.predict(greedy) <= budget.ms
    assert greedy[names[0]] == 3


def test_owl_gives_more_zeros_to_fewer_outliers(loaded, device_file):
    table = table_for(loaded, device_file)
    names = [layer.name for layer in table.layers]
    ratios = {name: 0.01 * index for index, name in enumerate(names)}
    budget = Budget(ms=0.6 * table.dense_ms(), source="budget_ratio", ratio=0.6)
    owl = owl_allocation(table, (1, 2, 3), ratios, budget, None)
    assert owl is not None
    assert table.predict(owl) <= budget.ms
    assert owl[names[0]] >= owl[names[-1]]
    assert owl[names[0]] == 3


def test_swap_neighbours_fit_and_rank_by_loss(loaded, device_file):
    table = table_for(loaded, device_file)
    names = [layer.name for layer in table.layers]
    largest = max(table.layers, key=lambda layer: layer.weights).name
    start = {name: 2 for name in names}
    # No slack: lowering a layer alone does not fit, a trade against the largest layer does.
    budget = Budget(ms=table.predict(start), source="budget_ms", ratio=None)
    losses = {name: {0: 0.0, 1: 1.0, 2: 2.0, 3: 4.0} for name in names}
    losses[largest] = {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}
    neighbours = swap_neighbours(start, table, (1, 2, 3), losses, budget, None)
    assert neighbours
    for candidate in neighbours:
        assert table.predict(candidate) <= budget.ms
        changed = {name for name in names if candidate[name] != start[name]}
        assert len(changed) == 2
    first = neighbours[0]
    assert first[largest] == 3
    assert sum(1 for name in names if first[name] == 1) == 1


# The study


def test_seeds_are_the_first_trials(context):
    study = fresh_study(context)
    run_trials(study, context, on_trial=None, should_stop=None, progress=False)
    trials = study.get_trials(deepcopy=False)
    assert context.seeds, "at least one baseline must fit a 0.6 budget"
    assert "greedy" in context.seeds
    for index, (name, level_map) in enumerate(context.seeds.items()):
        assert trials[index].params == level_map
        assert trials[index].user_attrs["seed_name"] == name


def test_constraints_split_feasible_and_infeasible(context):
    study = fresh_study(context)
    records = []
    run_trials(study, context, on_trial=records.append, should_stop=None, progress=False)
    budget = context.budget.ms
    assert len(records) == context.spec.trials
    for record in records:
        expected_ms = context.table.predict(record["levels"])
        assert record["predicted_latency_ms"] == pytest.approx(expected_ms)
        if record["predicted_latency_ms"] > budget:
            assert record["state"] == "PRUNED"
            assert record["feasible"] is False
            assert record["constraints"]["latency_ms_over_budget"] > 0
            assert "over the budget" in record["reason"]
        else:
            assert record["state"] == "COMPLETE"
            assert record["feasible"] is True
            assert record["constraints"]["latency_ms_over_budget"] <= 0
            assert math.isfinite(record["quality"])
            assert record["quality"] >= 0
        assert record["sparsity"] == pytest.approx(sparsity(context.layers, record["levels"]))


def test_nan_quality_fails_trial_and_study_goes_on(context):
    study = fresh_study(context)
    trial = study.ask()
    level_map = {
        layer.name: trial.suggest_categorical(layer.name, list(context.spec.levels))
        for layer in context.layers
    }
    record = tell_quality(study, trial, math.nan, context.table.predict(level_map), context)
    assert record["state"] == "FAIL"
    assert record["feasible"] is False
    assert "nan" in record["reason"]

    run_trials(study, context, on_trial=None, should_stop=None, progress=False)
    states = [frozen.state for frozen in study.get_trials(deepcopy=False, states=FINISHED_STATES)]
    assert states[0] == optuna.trial.TrialState.FAIL
    assert len(states) == context.spec.trials
    assert states.count(optuna.trial.TrialState.COMPLETE) >= 1


def test_missing_latency_fails_trial(loaded, tmp_path, tiny_mamba2_dir):
    layer = eligible_layers(loaded.model)[0]
    device = write_device_file(
        tmp_path / "gap.jsonl", loaded, skip={(layer.out_features, layer.in_features, 3)}
    )
    context = prepare_search(small_spec(tiny_mamba2_dir, device, budget_ratio=0.8))
    study = create_study(context, storage=None, study_name=None)
    trial = study.ask({layer.name: optuna.distributions.CategoricalDistribution([3])})
    level_map = {info.name: 2 for info in context.layers}
    level_map[layer.name] = trial.params[layer.name]
    for info in context.layers[1:]:
        trial.suggest_categorical(info.name, [2])
    record = evaluate_trial(study, trial, level_map, context)
    assert record["state"] == "FAIL"
    assert "predicted latency is missing" in record["reason"]
    assert record["feasible"] is False


def test_best_feasible_over_better_infeasible():
    records = [
        {"number": 0, "feasible": True, "quality": 0.30, "predicted_latency_ms": 2.0},
        {"number": 1, "feasible": False, "quality": 0.05, "predicted_latency_ms": 9.0},
        {"number": 2, "feasible": True, "quality": 0.20, "predicted_latency_ms": 2.5},
        {"number": 3, "feasible": False, "quality": None, "predicted_latency_ms": None},
    ]
    assert best_feasible(records)["number"] == 2
    assert best_feasible([records[1], records[3]]) is None


def test_report_picks_best_feasible_trial(tiny_mamba2_dir, device_file):
    spec = small_spec(tiny_mamba2_dir, device_file, budget_ratio=0.6, trials=10)
    report = run_search(spec, out_dir=None)
    feasible = [r for r in report["trials"] if r["feasible"]]
    assert report["feasible"] is True
    best = min(feasible, key=lambda r: r["quality"])
    assert report["quality"]["objective_values"]["best"] == pytest.approx(best["quality"])
    assert report["predicted_latency_ms"] <= report["budget_ms"]
    for name, value in report["quality"]["objective_values"]["baselines"].items():
        assert report["quality"]["objective_values"]["best"] <= value + 1e-12, name
    assert report["measured_latency_ms"] is None
    json.dumps(report, allow_nan=False)


def test_no_feasible_trial_reports_closest(loaded, tmp_path, tiny_mamba2_dir):
    # Level 1 is the only fast level, so the budget forces level 1 while the sparsity target
    # needs higher levels: no configuration meets both.
    rates = {0: 1.0e-4, 1: 0.5e-4, 2: 0.9e-4, 3: 1.5e-4}
    device = write_device_file(tmp_path / "conflict.jsonl", loaded, ms_per_weight=rates)
    minimum = predicted_ms(loaded, {i.name: 1 for i in eligible_layers(loaded.model)}, rates)
    spec = small_spec(
        tiny_mamba2_dir, device, budget_ms=minimum * 1.01, sparsity_target=0.5, trials=4
    )
    report = run_search(spec, out_dir=None)
    assert report["feasible"] is False
    assert report["trial_counts"]["feasible"] == 0
    assert report["levels"] is not None
    assert "no trial was feasible" in report["infeasible_reason"]
    closest = report["trials"][report["best_trial"]]
    assert closest["feasible"] is False


def test_should_stop_ends_search_early(context):
    polls = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) > 3

    study = fresh_study(context)
    records = []
    stopped = run_trials(
        study, context, on_trial=records.append, should_stop=should_stop, progress=False
    )
    assert stopped is True
    assert len(records) == 3
    assert len(study.get_trials(deepcopy=False, states=FINISHED_STATES)) == 3


def test_multi_objective_front_is_non_dominated(tiny_mamba2_dir, device_file):
    spec = small_spec(
        tiny_mamba2_dir, device_file, budget_ratio=0.8, trials=12, multi_objective=True
    )
    report = run_search(spec, out_dir=None)
    front = report["pareto_front"]
    feasible = [r for r in report["trials"] if r["feasible"]]
    assert front

    def dominates(a, b):
        return (
            a["quality"] <= b["quality"]
            and a["predicted_latency_ms"] <= b["predicted_latency_ms"]
            and (a["quality"], a["predicted_latency_ms"])
            != (b["quality"], b["predicted_latency_ms"])
        )

    for member in front:
        assert not any(dominates(other, member) for other in feasible)
    front_numbers = {member["number"] for member in front}
    for record in feasible:
        if record["number"] not in front_numbers:
            assert any(dominates(member, record) for member in front) or any(
                member["levels"] == record["levels"] for member in front
            )
    assert pareto_front(feasible) == front


def test_shared_storage_continues_one_study(context, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = dataclasses.replace(context, spec=dataclasses.replace(context.spec, trials=4))
    study = create_study(first, storage=storage, study_name="shared")
    enqueue_seeds(study, context.seeds)
    run_trials(study, first, on_trial=None, should_stop=None, progress=False)

    second = dataclasses.replace(context, spec=dataclasses.replace(context.spec, trials=7))
    joined = create_study(second, storage=storage, study_name="shared")
    enqueue_seeds(joined, context.seeds)
    records = []
    run_trials(joined, second, on_trial=records.append, should_stop=None, progress=False)

    trials = joined.get_trials(deepcopy=False, states=FINISHED_STATES)
    assert len(records) == 3
    assert len(trials) == 7
    seed_names = [t.user_attrs.get("seed_name") for t in trials]
    for name in context.seeds:
        assert seed_names.count(name) == 1


def test_measure_decode_times_winner_and_dense(context):
    from search.report import measure_decode

    level_map = context.seeds["greedy"]
    pruned, dense = measure_decode(context, level_map)
    for timing in (pruned, dense):
        assert set(timing) == {"median_ms", "p10_ms", "p90_ms"}
        assert 0 < timing["p10_ms"] <= timing["median_ms"] <= timing["p90_ms"]
    # The dense weights are back after the measurement.
    modules = dict(context.loaded.model.named_modules())
    name = context.layers[0].name
    weight = modules[name].weight.detach()
    assert int((weight == 0).sum()) < weight.numel() // 4


def test_budget_ratio_below_minimum_names_ratio(loaded, device_file, tiny_mamba2_dir):
    table = table_for(loaded, device_file, levels=(1, 2))
    dense = predicted_ms(loaded, {})
    minimum = predicted_ms(loaded, {layer.name: 2 for layer in table.layers})
    lowest_ratio = minimum / dense
    spec = small_spec(tiny_mamba2_dir, device_file, budget_ratio=lowest_ratio - 0.05,
                      levels=(1, 2))
    with pytest.raises(BudgetError) as caught:
        resolve_budget(spec, table)
    message = str(caught.value)
    assert f"raise the budget ratio to at least {math.ceil(lowest_ratio * 1000) / 1000:.3f}" in message
    assert "allow level 3" in message


def test_default_budget_halfway_to_dense(loaded, device_file, tiny_mamba2_dir):
    table = table_for(loaded, device_file)
    dense = predicted_ms(loaded, {})
    minimum = predicted_ms(loaded, {layer.name: 3 for layer in table.layers})
    budget = resolve_budget(small_spec(tiny_mamba2_dir, device_file), table)
    assert budget.source == "default"
    assert budget.ms == pytest.approx((minimum + dense) / 2)
    assert budget.ratio == pytest.approx((minimum + dense) / 2 / dense)
