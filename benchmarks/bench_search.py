"""Search against baselines: held-out perplexity of the search's best and of each baseline.

One search runs for each budget, a share of the dense model's predicted latency. Its report gives
the held-out perplexity of the dense model, the search's best, every uniform level that fits,
the greedy allocation and the OWL-style allocation. All are measured on the same held-out
evaluation windows. The goal to report against: the search at least as good as every baseline
at every budget, and cutting the perplexity increase of the best uniform level by 10% or more.

    .venv/bin/python benchmarks/bench_search.py --budgets 0.8,0.6,0.45 --trials 40 \\
        --out runs/bench-search

Writes ``results.json`` and ``results.md`` (a Markdown table) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from search.errors import BudgetError  # noqa: E402
from search.spec import SearchSpec  # noqa: E402
from search.study import run_search  # noqa: E402

logger = logging.getLogger("bench_search")

# The goal: the search's perplexity increase over dense is at most this share of the best
# uniform level's increase.
GOAL_INCREASE_SHARE = 0.90
# Read bandwidth of the described bandwidth-bound device, in GB/s (about what 2 threads of an
# x86-64 server core pair read).
BANDWIDTH_GBPS = 65.0


def write_bandwidth_device(model_name: str, path: Path) -> Path:
    """Describe a bandwidth-bound device as a cn4.latency/1 file and return its path.

    Every Linear costs the bytes it streams per decoded token over ``BANDWIDTH_GBPS``: fp32
    values kept plus one code byte per group of 4, so levels 1, 2 and 3 move 1.23x, 1.78x and
    3.2x fewer bytes than dense. The remainder is the tied ``lm_head``, which streams the whole
    embedding matrix. These are predictions of a described device, not measurements.
    """
    from latency_models.measurements import Measurement, write_measurements
    from latency_models.probe import model_id
    from search.models import eligible_layers, load_checkpoint

    loaded = load_checkpoint(model_name)
    bytes_per_ms = BANDWIDTH_GBPS * 1e6
    records = []
    shapes = sorted({(i.out_features, i.in_features) for i in eligible_layers(loaded.model)})
    for out_features, in_features in shapes:
        groups = out_features * in_features / 4
        for level in (0, 1, 2, 3):
            streamed = groups * 16 if level == 0 else groups * ((4 - level) * 4 + 1)
            records.append(Measurement(
                device=f"bandwidth-bound-{BANDWIDTH_GBPS:g}GBps", backend="described",
                op="linear", out_features=out_features, in_features=in_features, level=level,
                median_ms=streamed / bytes_per_ms,
            ))
    head = loaded.model.get_output_embeddings().weight
    records.append(Measurement(
        device=f"bandwidth-bound-{BANDWIDTH_GBPS:g}GBps", backend="described", op="remainder",
        model=model_id(loaded), median_ms=head.numel() * 4 / bytes_per_ms,
    ))
    return write_measurements(records, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="checkpoint directory or 'default'")
    parser.add_argument(
        "--device", default="local",
        help="'local', 'bandwidth-bound' (a described device), a measurement file or a cost "
        "model JSON",
    )
    parser.add_argument(
        "--budgets", default="0.8,0.6,0.45",
        help="budgets as shares of the dense predicted latency, comma-separated",
    )
    parser.add_argument("--trials", type=int, default=40, help="trials per search")
    parser.add_argument("--seed", type=int, default=0, help="sampler and window seed")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--evaluation-windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=128, help="tokens per window")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-search"))
    return parser.parse_args(argv)


def summarise(report: dict) -> dict:
    """Return the benchmark row of one search report."""
    quality = report["quality"]
    dense, best = quality["dense"], quality["best"]
    baselines = dict(quality["baselines"])
    uniform_name = quality["best_uniform"]
    row = {
        "budget_ratio": report["budget_ratio"],
        "budget_ms": report["budget_ms"],
        "dense_ms": report["dense_latency_ms"],
        "best_ms": report["predicted_latency_ms"],
        "feasible": report["feasible"],
        "dense_perplexity": dense,
        "search_perplexity": best,
        "best_uniform": uniform_name,
        "uniform_perplexity": baselines.get(uniform_name) if uniform_name else None,
        "owl_perplexity": baselines.get("owl"),
        "greedy_perplexity": baselines.get("greedy"),
        "trials": report["trial_counts"]["finished"],
        "quality_evaluations": report["trial_counts"]["quality_evaluations"],
        "wall_time_s": report["wall_time_s"],
        "levels": report["levels"],
        "sparsity": report["sparsity"],
    }
    compared = [value for value in baselines.values() if value is not None]
    row["beats_every_baseline"] = best is not None and all(best <= value for value in compared)
    uniform = row["uniform_perplexity"]
    if uniform is not None and best is not None and uniform > dense:
        row["increase_cut"] = 1 - (best - dense) / (uniform - dense)
    else:
        row["increase_cut"] = None
    return row


def format_table(rows: list[dict]) -> str:
    def number(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        "| budget | budget ms | dense ppl | search ppl | best uniform | OWL-style | greedy | "
        "increase cut vs uniform | trials | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['budget_ratio']} | {row['error']} |||||||||")
            continue
        uniform = (
            f"{number(row['uniform_perplexity'])} ({row['best_uniform']})"
            if row["best_uniform"] else "none fits"
        )
        cut = "n/a" if row["increase_cut"] is None else f"{row['increase_cut']:.1%}"
        lines.append(
            f"| {row['budget_ratio']} | {number(row['budget_ms'])} | "
            f"{number(row['dense_perplexity'])} | {number(row['search_perplexity'])} | {uniform} | "
            f"{number(row['owl_perplexity'])} | {number(row['greedy_perplexity'])} | {cut} | "
            f"{row['trials']} | {row['wall_time_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args = parse_args(argv)
    budgets = [float(part) for part in args.budgets.split(",") if part.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    device = args.device
    if device == "bandwidth-bound":
        device = str(write_bandwidth_device(args.model, args.out / "bandwidth-bound.jsonl"))
    rows = []
    started = time.perf_counter()
    for ratio in budgets:
        spec = SearchSpec(
            model=args.model,
            device=device,
            budget_ratio=ratio,
            trials=args.trials,
            seed=args.seed,
            calibration_windows=args.calibration_windows,
            evaluation_windows=args.evaluation_windows,
            window=args.window,
            measure=True,
        )
        try:
            report = run_search(spec, out_dir=args.out / f"budget-{ratio}", progress=True)
        except BudgetError as exc:
            logger.warning("budget %s: %s", ratio, exc)
            rows.append({"budget_ratio": ratio, "error": str(exc)})
            continue
        row = summarise(report)
        rows.append(row)
        logger.info("budget %s: %s", ratio, json.dumps({k: row[k] for k in row if k != "levels"}))

    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": args.device,
        "goal_increase_share": GOAL_INCREASE_SHARE,
        "rows": rows,
        "wall_time_s": time.perf_counter() - started,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(format_table(rows))
    print(format_table(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
