"""Measure how well a fitted cost model predicts whole-model latency, and how long fitting takes.

Usage::

    python benchmarks/cost_model_accuracy.py probe-embedded.jsonl [more files] [--device NAME]

It fits the files as ``cn4 fit`` does and prints one Markdown table row for
docs/benchmarks.md. The row gives the held-out report (mixed level maps not used to
calibrate), the k-fold cross-validation over all mixed maps, and the median wall and CPU time
of one fit. Measurement files come from
``cn4 probe``; this script measures nothing on the device itself.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

from latency_models.cost_model import DEFAULT_HOLDOUT, CostModel, cross_validate, read_files


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.0f}%"


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="measurement files of one device (.csv, .jsonl)")
    parser.add_argument("--device", help="device to fit when the files contain several")
    parser.add_argument("--backend", help="backend to fit when the files contain several")
    parser.add_argument("--holdout", type=float, default=DEFAULT_HOLDOUT, help="held-out share")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    parser.add_argument("--timing-runs", type=int, default=5, help="fits timed for the fit time")
    parser.add_argument(
        "--label", help="model name for the table, e.g. embedded (default: the model ids)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    records, _ = read_files(args.files)
    options = {"device": args.device, "backend": args.backend}
    fit_seconds = []
    fit_cpu_seconds = []
    for _ in range(max(1, args.timing_runs)):
        start, start_cpu = time.perf_counter(), time.process_time()
        model = CostModel.fit(records, holdout=args.holdout, **options)
        fit_seconds.append(time.perf_counter() - start)
        fit_cpu_seconds.append(time.process_time() - start_cpu)
    folds = cross_validate(records, folds=args.folds, **options)
    report = model.fit_report

    print(
        f"date {datetime.now(timezone.utc):%Y-%m-%d}, machine {platform.machine()} "
        f"{platform.processor() or platform.platform()}, python {platform.python_version()}"
    )
    print("command: python benchmarks/cost_model_accuracy.py " + " ".join(sys.argv[1:]))
    print()
    print(
        "| model | device | backend | held out | within 5% | within 10% | MAPE % | Spearman "
        "| CV maps | CV within 5% | CV within 10% | CV MAPE % | CV Spearman | fit ms (CPU ms) |"
    )
    print("| --- " * 14 + "|")
    label = args.label or ", ".join(name[:16] for name in model.models())
    print(
        f"| {label} | {model.device} | {model.backend} | {report['count']} "
        f"| {_share(report['within_5pct'])} | {_share(report['within_10pct'])} "
        f"| {_number(report['mape'])} | {_number(report['spearman'], 3)} "
        f"| {folds['count']} | {_share(folds['within_5pct'])} | {_share(folds['within_10pct'])} "
        f"| {_number(folds['mape'])} | {_number(folds['spearman'], 3)} "
        f"| {1000 * statistics.median(fit_seconds):.1f} "
        f"({1000 * statistics.median(fit_cpu_seconds):.1f}) |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
