"""The search report: the winner, its latency and quality beside the baselines, and the export.

``build_report`` returns a JSON-ready dict; ``write_report`` writes it as ``report.json`` with a
readable ``summary.txt`` beside it. Reported quality is measured on held-out evaluation windows
(perplexity, lower is better) for the dense model, the winner and every baseline. The search
objective values are reported beside them.
"""

from __future__ import annotations

import json
import logging
import math
import platform
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latency_models.measurements import SPREAD_WARN_RATIO
from search.budget import sparsity
from search.models import describe_level
from search.objective import HELD_OUT_LABEL

if TYPE_CHECKING:
    import optuna

    from search.study import SearchContext

logger = logging.getLogger(__name__)

# Decode timings whose p90/p10 exceeds the measurement files' spread threshold were probably
# disturbed by other work on the machine.
NOISY_SPREAD = SPREAD_WARN_RATIO
# Measured and predicted latency disagree when they differ by more than this share.
PREDICTION_TOLERANCE = 0.10
MODEL_SUBDIR = "model"


def build_report(
    context: SearchContext,
    study: optuna.Study,
    *,
    seeds: dict[str, dict[str, int]],
    stopped: bool,
    wall_time_s: float,
    out_dir: Path | None,
) -> dict[str, Any]:
    """Score the winner and the baselines on held-out windows, export the winner, report all."""
    from search.study import (
        best_feasible,
        closest_infeasible,
        finished_records,
        is_local_device,
        pareto_front,
    )

    spec, evaluator, table, budget = context.spec, context.evaluator, context.table, context.budget
    records = finished_records(study)
    best = best_feasible(records)
    winner = best or closest_infeasible(records, budget, spec.sparsity_target)
    winner_levels = dict(winner["levels"]) if winner is not None else None

    dense_map = {layer.name: 0 for layer in context.layers}
    dense_predicted = table.dense_ms()
    quality = {
        "measure": HELD_OUT_LABEL,
        "objective": evaluator.objective_label,
        "dense": evaluator.held_out_perplexity(dense_map),
        "best": None,
        "baselines": {},
        "objective_values": {"dense": evaluator.dense_objective(), "best": None, "baselines": {}},
    }
    baselines = {}
    for name, level_map in seeds.items():
        held_out = evaluator.held_out_perplexity(level_map)
        objective = evaluator.objective(level_map)
        quality["baselines"][name] = held_out
        quality["objective_values"]["baselines"][name] = objective
        baselines[name] = {
            "levels": dict(level_map),
            "predicted_latency_ms": table.predict(level_map),
            "sparsity": sparsity(context.layers, level_map),
            "held_out_perplexity": held_out,
            "objective": objective,
        }
    uniform = {
        name: value for name, value in quality["baselines"].items() if name.startswith("uniform")
    }
    quality["best_uniform"] = min(uniform, key=uniform.get) if uniform else None

    predicted = None
    if winner_levels is not None:
        quality["best"] = evaluator.held_out_perplexity(winner_levels)
        quality["objective_values"]["best"] = evaluator.objective(winner_levels)
        predicted = table.predict(winner_levels)

    measured = dense_measured = None
    winner_timing = dense_timing = None
    if winner_levels is not None and is_local_device(context) and spec.measure:
        winner_timing, dense_timing = measure_decode(context, winner_levels)
        measured = winner_timing["median_ms"]
        dense_measured = dense_timing["median_ms"]
    prediction_error = (
        (predicted - measured) / measured if measured and predicted is not None else None
    )

    model_dir = None
    if out_dir is not None and winner_levels is not None:
        model_dir = export_winner(context, winner_levels, Path(out_dir), feasible=best is not None)

    counts = Counter(record["state"] for record in records)
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.to_dict(),
        "model": {
            "path": str(context.loaded.path),
            "arch": context.loaded.arch,
            "fingerprint": context.loaded.fingerprint,
            "eligible_layers": len(context.layers),
            "eligible_weights": sum(layer.weights for layer in context.layers),
        },
        "device": {key: value for key, value in context.device.items() if key != "fit_report"},
        "cost_model_fit": context.device["fit_report"],
        "feasible": best is not None,
        "infeasible_reason": None if best is not None else _infeasible_reason(winner),
        "levels": winner_levels,
        "level_counts": _level_counts(winner_levels),
        "budget_ms": budget.ms,
        "budget_source": budget.source,
        "budget_ratio": budget.ratio,
        "minimum_latency_ms": table.minimum_ms(),
        "sparsity_target": spec.sparsity_target,
        "sparsity": sparsity(context.layers, winner_levels) if winner_levels else None,
        "predicted_latency_ms": predicted,
        "layer_latency_ms": _layer_latencies(table, winner_levels),
        "measured_latency_ms": measured,
        "dense_latency_ms": dense_predicted,
        "dense_measured_latency_ms": dense_measured,
        "measured_latency": winner_timing,
        "dense_measured_latency": dense_timing,
        "measurement_noisy": (
            any(_spread(timing) > NOISY_SPREAD for timing in (winner_timing, dense_timing))
            if winner_timing is not None else None
        ),
        "prediction_error": prediction_error,
        "prediction_disagrees": (
            abs(prediction_error) > PREDICTION_TOLERANCE if prediction_error is not None else None
        ),
        "quality": quality,
        "baselines": baselines,
        "best_trial": winner["number"] if winner is not None else None,
        "trial_counts": {
            "requested": spec.trials,
            "finished": len(records),
            "complete": counts.get("COMPLETE", 0),
            "pruned": counts.get("PRUNED", 0),
            "failed": counts.get("FAIL", 0),
            "feasible": sum(1 for record in records if record["feasible"]),
            "quality_evaluations": evaluator.evaluations,
        },
        "trials": records,
        "stopped": stopped,
        "pareto_front": pareto_front(records) if spec.multi_objective else None,
        "study_name": study.study_name,
        "model_dir": str(model_dir) if model_dir is not None else None,
        "wall_time_s": wall_time_s,
        "timings": dict(context.timings),
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
    }
    return _json_ready(report)


def measure_decode(
    context: SearchContext, level_map: dict[str, int]
) -> tuple[dict[str, float], dict[str, float]]:
    """Measure the winner's and the dense model's decode latency through the engine.

    Each result contains ``median_ms``, ``p10_ms`` and ``p90_ms`` (ms per decoded token).
    """
    from latency_models.probe import measure_model_decode
    from search.variants import apply_level_map

    model = context.loaded.model
    with apply_level_map(model, level_map, context.evaluator.cache):
        pruned = measure_model_decode(context.loaded, level_map)
    dense = measure_model_decode(context.loaded, {})
    keys = ("median_ms", "p10_ms", "p90_ms")
    return ({key: float(pruned[key]) for key in keys}, {key: float(dense[key]) for key in keys})


def _layer_latencies(table, level_map: dict[str, int] | None) -> dict[str, dict[str, Any]] | None:
    """Return each eligible layer's level and its predicted latency there and when dense, in ms.

    The layers alone do not add up to ``predicted_latency_ms``: the cost model adds the fixed
    part of the model (embedding, conv1d, scan, norms, head).
    """
    if level_map is None:
        return None
    layers = {}
    for layer in table.layers:
        level = int(level_map.get(layer.name, 0))
        layers[layer.name] = {
            "level": level,
            "predicted_ms": table.layer_ms[layer.name].get(level),
            "dense_ms": table.layer_ms[layer.name].get(0),
        }
    return layers


def _spread(timing: dict[str, float]) -> float:
    return timing["p90_ms"] / timing["p10_ms"] if timing["p10_ms"] > 0 else math.inf


def export_winner(
    context: SearchContext, level_map: dict[str, int], out_dir: Path, *, feasible: bool
) -> Path:
    """Save the winner as a pruned checkpoint under ``out_dir/model``."""
    from search.export import save_pruned
    from search.variants import apply_level_map

    metadata = {
        "search": context.spec.to_dict(),
        "feasible": feasible,
        "budget_ms": context.budget.ms,
        "predicted_latency_ms": context.table.predict(level_map),
        "device": context.device["name"],
    }
    with apply_level_map(context.loaded.model, level_map, context.evaluator.cache):
        return save_pruned(
            context.loaded, level_map, out_dir / MODEL_SUBDIR, metadata=metadata, overwrite=True
        )


def _disagreement_hint(report: dict[str, Any]) -> str:
    if report.get("measurement_noisy"):
        return (
            "the timings spread widely (p90/p10 over "
            f"{NOISY_SPREAD:g}), so other work on this machine probably disturbed them; "
            "measure again on an idle machine"
        )
    return "the cost model may be stale or was probed on a busy machine; probe and fit again"


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """Write ``report.json`` and ``summary.txt`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(
        json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    (out_dir / "summary.txt").write_text(format_summary(report), encoding="utf-8")


def format_summary(report: dict[str, Any]) -> str:
    """Return a readable summary of a report: budget, latency, quality and the levels."""
    quality = report["quality"]
    counts = report["trial_counts"]
    lines = [
        f"cn4 search: {report['model']['path']} ({report['model']['arch']}, "
        f"{report['model']['eligible_layers']} eligible layers) on {report['device']['name']}",
        "",
        f"budget               {_ms(report['budget_ms'])} ({report['budget_source']})"
        + (f", sparsity target {report['sparsity_target']:.3f}"
           if report["sparsity_target"] is not None else ""),
        f"lowest reachable     {_ms(report['minimum_latency_ms'])}",
        f"dense latency        {_ms(report['dense_latency_ms'])} predicted"
        + (f", {_ms(report['dense_measured_latency_ms'])} measured"
           if report["dense_measured_latency_ms"] is not None else ""),
    ]
    if report["levels"] is None:
        lines += ["", "no trial was predicted or measured: see the failed trials in report.json"]
        return "\n".join(lines) + "\n"

    verdict = "feasible" if report["feasible"] else "INFEASIBLE (closest configuration shown)"
    lines += [
        f"winner latency       {_ms(report['predicted_latency_ms'])} predicted"
        + (f", {_ms(report['measured_latency_ms'])} measured "
           f"(prediction error {report['prediction_error']:+.1%}"
           + (", over 10%: " + _disagreement_hint(report) if report["prediction_disagrees"] else "")
           + ")"
           if report["measured_latency_ms"] is not None else ""),
        f"winner               trial {report['best_trial']}, {verdict}, sparsity "
        f"{report['sparsity']:.3f}",
    ]
    if not report["feasible"]:
        lines.append(f"                     {report['infeasible_reason']}")
    lines += [
        "",
        f"quality: {quality['measure']} (lower is better)",
        f"  dense              {quality['dense']:.4f}",
        f"  search best        {quality['best']:.4f}",
    ]
    for name, value in quality["baselines"].items():
        lines.append(f"  {name:<18} {value:.4f}")
    lines += [
        f"objective: {quality['objective']}",
        f"  search best        {quality['objective_values']['best']:.5g}",
    ]
    for name, value in quality["objective_values"]["baselines"].items():
        lines.append(f"  {name:<18} {value:.5g}")

    lines += ["", "levels (n zeros / 4-n kept in every group of 4 input weights):"]
    width = max(len(name) for name in report["levels"])
    for name, level in report["levels"].items():
        lines.append(f"  {name:<{width}}  {level}  ({describe_level(level)})")

    lines += [
        "",
        f"trials               {counts['finished']} of {counts['requested']}: "
        f"{counts['complete']} measured, {counts['pruned']} over the constraints, "
        f"{counts['failed']} failed; {counts['feasible']} feasible"
        + (" (stopped early)" if report["stopped"] else ""),
        f"wall time            {report['wall_time_s']:.1f} s",
    ]
    fit = report.get("cost_model_fit") or {}
    if fit:
        shown = ", ".join(
            f"{key} {fit[key]:.3g}" for key in ("within_5pct", "within_10pct", "mape", "spearman")
            if isinstance(fit.get(key), (int, float))
        )
        if shown:
            lines.append(f"cost model fit       {shown}")
    if report["pareto_front"]:
        lines += ["", "Pareto front (predicted ms, objective):"]
        for record in report["pareto_front"]:
            lines.append(
                f"  trial {record['number']:>4}  {record['predicted_latency_ms']:.4g} ms  "
                f"{record['quality']:.5g}"
            )
    if report["model_dir"]:
        lines += ["", f"pruned model         {report['model_dir']}"]
    return "\n".join(lines) + "\n"


def _ms(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g} ms/token"


def _level_counts(levels: dict[str, int] | None) -> dict[str, int] | None:
    if levels is None:
        return None
    counts = Counter(levels.values())
    return {str(level): counts[level] for level in sorted(counts)}


def _infeasible_reason(winner: dict | None) -> str:
    if winner is None:
        return "no trial was feasible, and no trial could be predicted"
    return f"no trial was feasible; the closest (trial {winner['number']}): {winner['reason']}"


def _json_ready(value: Any) -> Any:
    """Replace non-finite floats with None so the report is strict JSON."""
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
