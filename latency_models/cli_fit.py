"""``cn4 fit``: validate latency measurement files and fit a cost model to them."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from latency_models.cost_model import DEFAULT_HOLDOUT, CostModel, fit_files
from search.errors import CostModelError

DEFAULT_FOLDS = 5


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "fit",
        help="fit a latency cost model to measurement files",
        description=(
            "Read and validate latency measurements (cn4.latency/1, CSV or JSON Lines), fit "
            "the per-device cost model and print its accuracy on held-out whole-model "
            "records. Exits with status 1 and the row number on an invalid file."
        ),
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="measurement file (.csv, .jsonl)")
    parser.add_argument("--out", metavar="FILE", help="write the fitted cost model JSON here")
    parser.add_argument("--device", help="device to fit when the files contain several")
    parser.add_argument("--backend", help="backend to fit when the files contain several")
    parser.add_argument("--dtype", help="weight dtype to fit when the files contain several")
    parser.add_argument(
        "--threads", type=int, help="thread count to fit when the files contain several"
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=DEFAULT_HOLDOUT,
        metavar="SHARE",
        help=(
            "share of each model's mixed level maps held out for the accuracy report; the "
            "rest and all uniform maps calibrate the model's fixed part "
            f"(default {DEFAULT_HOLDOUT})"
        ),
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=DEFAULT_FOLDS,
        metavar="K",
        help=(
            "also estimate accuracy by K-fold cross-validation over the mixed level maps; "
            f"0 skips it (default {DEFAULT_FOLDS})"
        ),
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.folds == 1 or args.folds < 0:
        raise CostModelError(f"--folds {args.folds} is invalid: give 0 (skip) or 2 or more")
    model = fit_files(
        args.files,
        folds=args.folds,
        device=args.device,
        backend=args.backend,
        dtype=args.dtype,
        threads=args.threads,
        holdout=args.holdout,
    )
    print_report(model, sys.stdout)
    if model.warnings:
        # Each warning was logged to stderr when it was raised.
        print(f"{len(model.warnings)} warning(s), logged above: check them before trusting the fit")
    if args.out:
        path = model.save(args.out)
        print(f"wrote {path}")
    return 0


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}%"


def _number(value: float | None, unit: str = "", digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def print_report(model: CostModel, stream: TextIO) -> None:
    """Write a plain-text summary of the fitted model and its fit report to ``stream``."""
    report = model.fit_report
    records = report.get("records", {})
    print(f"cost model for {model.name}, dtype {model.dtype}, threads {model.threads}", file=stream)
    print(
        f"  records: {records.get('linear', 0)} linear, {records.get('remainder', 0)} remainder, "
        f"{records.get('model', 0)} model ({records.get('combined_duplicates', 0)} duplicates "
        "combined)",
        file=stream,
    )
    print(
        f"  layer lookups: {report.get('lookup_cases', 0)}, regressions: "
        f"{report.get('regressions', 0)}",
        file=stream,
    )

    for (level, tokens), regression in sorted(model.regressions.items()):
        slope = regression.coefficients[1]
        bandwidth = f"{1e-6 / slope:.3g} GB/s" if slope > 0 else "n/a"
        print(
            f"    level {level}, tokens {tokens}: {regression.shapes} shapes, overhead "
            f"{regression.coefficients[0] * 1000:.3g} us, weight bandwidth {bandwidth}, "
            f"fit MAPE {regression.fit_mape:.1f}%",
            file=stream,
        )

    for (name, tokens), part in sorted(model.fixed_parts.items()):
        remainder = "none" if part.remainder_ms is None else f"{part.remainder_ms:.3f} ms"
        print(
            f"  model {name} (tokens {tokens}): remainder {remainder}, correction "
            f"{part.correction_ms:+.3f} ms from {part.calibration_records} record(s)",
            file=stream,
        )

    print(
        f"  held-out model records: {report.get('count', 0)} "
        f"(calibration: {report.get('calibration_records', 0)}, unpredicted: "
        f"{report.get('unpredicted', 0)})",
        file=stream,
    )
    print(
        f"    within 5%: {_share(report.get('within_5pct'))}, within 10%: "
        f"{_share(report.get('within_10pct'))}, MAPE: {_number(report.get('mape'), '%', 2)}, "
        f"Spearman: {_number(report.get('spearman'))}",
        file=stream,
    )

    folds = report.get("cross_validation")
    if folds and folds["folds"] > 0:
        print(
            f"  {folds['folds']}-fold cross-validation over {folds['count']} mixed maps "
            f"(unpredicted: {folds['unpredicted']}): within 5%: {_share(folds.get('within_5pct'))}, "
            f"within 10%: {_share(folds.get('within_10pct'))}, MAPE: "
            f"{_number(folds.get('mape'), '%', 2)}, Spearman: {_number(folds.get('spearman'))}",
            file=stream,
        )

    loo = report.get("layer_loo") or {}
    if loo.get("count"):
        print(
            f"  layer leave-one-out: {loo['count']} shapes, within 10%: "
            f"{_share(loo.get('within_10pct'))}, MAPE: {_number(loo.get('mape'), '%', 2)}",
            file=stream,
        )
