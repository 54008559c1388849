"""``cn4 search``: find per-layer Cn4 levels under a latency budget and export the pruned model.

With no options it searches the embedded model on this machine (probed and fitted on first use,
then cached) under the default budget, halfway between the lowest reachable latency and the
dense model's, and writes the report and the
pruned checkpoint under ``runs/<timestamp>``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

from search.spec import (
    ALL_LEVELS,
    DEFAULT_BUDGET_SHARE,
    DEFAULT_LEVELS,
    OBJECTIVES,
    PRUNING_METHODS,
    SearchSpec,
    SpecError,
)

logger = logging.getLogger(__name__)

DEFAULT_RUNS_DIR = Path("runs")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "search",
        help="search per-layer Cn4 levels under a latency budget",
        description=(
            "Search one Cn4 level per eligible layer (level n: n zeros / 4-n kept in every "
            "group of 4 input weights) that minimises the measured quality loss while the "
            "device's predicted decode latency stays within the budget. Writes report.json, "
            "summary.txt and the pruned checkpoint (model/) to --out."
        ),
    )
    parser.add_argument(
        "--model", default="default", metavar="PATH",
        help="checkpoint directory, or 'default' for the embedded model (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default="local", metavar="DEVICE",
        help=(
            "'local' (this machine, probed and fitted on first use, then cached), a measurement "
            "file (.csv or .jsonl, cn4.latency/1) or a cost model JSON from cn4 fit "
            "(default: %(default)s)"
        ),
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget-ms", type=float, metavar="MS",
        help="latency budget in milliseconds per decoded token on the device",
    )
    budget.add_argument(
        "--budget-ratio", type=float, metavar="RATIO",
        help=(
            "latency budget as a share of the dense model's predicted latency, in (0, 1]; with "
            "no budget and no sparsity target, the budget is "
            f"{DEFAULT_BUDGET_SHARE:g} of the way from the lowest reachable latency to dense"
        ),
    )
    parser.add_argument(
        "--sparsity-target", type=float, metavar="SHARE",
        help="least share of eligible weights to zero, in [0, 0.75]",
    )
    parser.add_argument(
        "--levels", default=",".join(str(n) for n in DEFAULT_LEVELS), metavar="N,N,...",
        help=(
            "allowed levels, comma-separated zeros per group of 4 (0 = dense, 3 = 3 zeros / "
            "1 kept) (default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--trials", type=int, default=40, metavar="COUNT",
        help="trials the study runs, baselines included (default: %(default)s)",
    )
    parser.add_argument(
        "--method", default="obs", choices=PRUNING_METHODS,
        help="how each layer is pruned to its level (default: %(default)s)",
    )
    parser.add_argument(
        "--objective", default="kl", choices=OBJECTIVES,
        help=(
            "search objective, lower is better: 'kl' is the KL divergence to the dense model "
            "in nats per token, 'perplexity' the perplexity, both on calibration windows "
            "(default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--multi-objective", action="store_true",
        help="minimise quality and predicted latency together and report the Pareto front",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="INT",
        help="seed of the sampler and of the window draws (default: %(default)s)",
    )
    parser.add_argument(
        "--calibration", metavar="FILE",
        help="UTF-8 text for pruning and the objective (default: the embedded calibration text)",
    )
    parser.add_argument(
        "--evaluation", metavar="FILE",
        help="UTF-8 held-out text for the reported perplexity (default: the embedded text)",
    )
    parser.add_argument(
        "--calibration-windows", type=int, default=32, metavar="COUNT",
        help="calibration windows (default: %(default)s)",
    )
    parser.add_argument(
        "--evaluation-windows", type=int, default=32, metavar="COUNT",
        help="held-out evaluation windows (default: %(default)s)",
    )
    parser.add_argument(
        "--window", type=int, default=128, metavar="TOKENS",
        help="tokens per window (default: %(default)s)",
    )
    parser.add_argument(
        "--no-measure", action="store_true",
        help="skip measuring the winner's decode latency on this machine",
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR",
        help="output directory (default: runs/<UTC timestamp>)",
    )
    parser.add_argument("--quiet", action="store_true", help="show no progress bar")
    parser.set_defaults(func=run)
    return parser


def parse_levels(text: str) -> tuple[int, ...]:
    """Parse ``--levels`` such as ``1,2,3``; raise SpecError naming the bad value."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise SpecError(f"--levels {text!r} is empty: give levels such as 1,2,3")
    levels = []
    for part in parts:
        if not part.isdigit() or int(part) not in ALL_LEVELS:
            raise SpecError(
                f"--levels {text!r} has the invalid level {part!r}: a level is 0, 1, 2 or 3 "
                "zeros per group of 4, for example --levels 1,2,3"
            )
        levels.append(int(part))
    return tuple(levels)


def spec_from_args(args: argparse.Namespace) -> SearchSpec:
    """Build the SearchSpec of the parsed options (raises SpecError for invalid values)."""
    return SearchSpec(
        model=args.model,
        device=args.device,
        budget_ms=args.budget_ms,
        budget_ratio=args.budget_ratio,
        sparsity_target=args.sparsity_target,
        levels=parse_levels(args.levels),
        trials=args.trials,
        method=args.method,
        objective=args.objective,
        multi_objective=args.multi_objective,
        seed=args.seed,
        calibration_windows=args.calibration_windows,
        evaluation_windows=args.evaluation_windows,
        window=args.window,
        measure=not args.no_measure,
        calibration_text=args.calibration,
        evaluation_text=args.evaluation,
    )


def default_out_dir() -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return DEFAULT_RUNS_DIR / stamp


def run(args: argparse.Namespace) -> int:
    """Run ``cn4 search``: errors in the options exit with status 2 before any work starts."""
    try:
        spec = spec_from_args(args)
    except SpecError as exc:
        print(f"cn4 search: error: {_option_names(str(exc))}", file=sys.stderr)
        return 2

    import optuna

    from search.report import format_summary
    from search.study import run_search

    # Optuna logs every trial at INFO; the progress bar and the summary replace that.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out_dir = args.out if args.out is not None else default_out_dir()
    if out_dir.exists() and not out_dir.is_dir():
        print(f"cn4 search: error: --out {out_dir} is a file: give a directory", file=sys.stderr)
        return 2
    report = run_search(spec, out_dir=out_dir, progress=not args.quiet)
    print(format_summary(report), end="")
    print(f"report: {out_dir / 'report.json'}")
    return 0


def _option_names(message: str) -> str:
    """Spell spec field names in a message as the command-line options that set them."""
    for field_name, option in (
        ("budget_ms=", "--budget-ms "),
        ("budget_ratio=", "--budget-ratio "),
        ("sparsity_target=", "--sparsity-target "),
        ("trials=", "--trials "),
        ("calibration_windows=", "--calibration-windows "),
        ("evaluation_windows=", "--evaluation-windows "),
        ("window=", "--window "),
    ):
        message = message.replace(field_name, option)
    return message
