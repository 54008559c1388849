"""Held-out perplexity and time of magnitude, Wanda and OBS pruning at uniform levels 1, 2, 3.

Also times the whole variant preparation a search job runs first (calibration pass plus OBS
pruning of every eligible layer at levels 1, 2 and 3 into an empty cache)::

    .venv/bin/python benchmarks/bench_pruning.py                 # embedded model
    .venv/bin/python benchmarks/bench_pruning.py --model DIR --json results.json

Times are wall-clock seconds and process CPU seconds (both threads count), since the machine may
be shared with other work. Results go to stdout as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from search.calibration import collect_layer_stats  # noqa: E402
from search.cn4 import METHODS, count_cn4_violations, prune_layer, prune_obs_levels  # noqa: E402
from search.data import calibration_text, evaluation_text, token_windows  # noqa: E402
from search.data import tokens_fingerprint  # noqa: E402
from search.models import eligible_layers, load_checkpoint  # noqa: E402
from search.quality import perplexity  # noqa: E402
from search.variants import VariantCache  # noqa: E402

LEVELS = (1, 2, 3)
logger = logging.getLogger("bench_pruning")


class Timer:
    def __enter__(self) -> Timer:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def prune_model(model, names, stats, method: str, level: int) -> dict[str, torch.Tensor]:
    """Prune every layer in ``names`` in place; return the dense weights to restore."""
    dense = {}
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            dense[name] = layer.weight.detach().clone()
            result = prune_layer(dense[name], level, stats.get(name), method)
            if count_cn4_violations(result.weight, level):
                raise AssertionError(f"{method} left Cn4 violations in {name} at level {level}")
            layer.weight.copy_(result.weight)
    return dense


def restore(model, dense: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, weight in dense.items():
            model.get_submodule(name).weight.copy_(weight)


def run(args: argparse.Namespace) -> dict:
    loaded = load_checkpoint(args.model)
    model = loaded.model
    names = [info.name for info in eligible_layers(model)]
    calibration = token_windows(
        loaded.tokenizer,
        calibration_text(),
        window=args.window,
        count=args.calibration_windows,
        seed=args.seed,
    )
    evaluation = token_windows(
        loaded.tokenizer,
        evaluation_text(),
        window=args.eval_window,
        count=args.eval_windows,
        seed=args.seed,
    )

    with Timer() as calibration_time:
        stats = collect_layer_stats(model, calibration, names)
    with Timer() as eval_time:
        dense = perplexity(model, evaluation)
    logger.info("dense perplexity %.3f (%.1f s)", dense.perplexity, eval_time.wall)

    rows = []
    for method in args.methods:
        for level in LEVELS:
            with Timer() as prune_time:
                saved = prune_model(model, names, stats, method, level)
            try:
                pruned = perplexity(model, evaluation)
            finally:
                restore(model, saved)
            rows.append(
                {
                    "method": method,
                    "level": level,
                    "perplexity": pruned.perplexity,
                    "prune_wall_s": prune_time.wall,
                    "prune_cpu_s": prune_time.cpu,
                }
            )
            logger.info(
                "%s level %d: perplexity %.3f, pruning %.2f s",
                method,
                level,
                pruned.perplexity,
                prune_time.wall,
            )

    # OBS at all three levels of one layer at once, the way the variant cache prunes.
    with Timer() as stacked_time:
        for name in names:
            weight = model.get_submodule(name).weight.detach()
            prune_obs_levels(weight, LEVELS, stats[name])

    # The whole preparation a search job runs on an empty cache: calibration plus OBS variants.
    # The numba kernel compiled on first use above, or came from numba's on-disk cache.
    with tempfile.TemporaryDirectory() as root, Timer() as prepare_time:
        fresh_stats = collect_layer_stats(model, calibration, names)
        cache = VariantCache(
            root,
            model_fingerprint=loaded.fingerprint,
            calibration_fingerprint=tokens_fingerprint(calibration),
            method="obs",
        )
        report = cache.prepare(model, names, LEVELS, fresh_stats)
        errors = {(r.layer, r.level): r.relative_error for r in cache.records()}

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        "model": str(loaded.path),
        "layers": len(names),
        "calibration_tokens": calibration.numel(),
        "evaluation_tokens": dense.tokens,
        "dense_perplexity": dense.perplexity,
        "eval_wall_s": eval_time.wall,
        "calibration_wall_s": calibration_time.wall,
        "calibration_cpu_s": calibration_time.cpu,
        "obs_three_levels_wall_s": stacked_time.wall,
        "obs_three_levels_cpu_s": stacked_time.cpu,
        "prepare_variants": report.computed,
        "prepare_wall_s": prepare_time.wall,
        "prepare_cpu_s": prepare_time.cpu,
        "mean_relative_error": {
            str(level): sum(e for (_, n), e in errors.items() if n == level) / len(names)
            for level in LEVELS
        },
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"Dense perplexity {result['dense_perplexity']:.3f} on {result['evaluation_tokens']} "
        f"held-out tokens; calibration on {result['calibration_tokens']} tokens; "
        f"{result['layers']} eligible layers.",
        "",
        "| level | method | perplexity | pruning wall s | pruning CPU s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in sorted(result["rows"], key=lambda r: (r["level"], r["method"])):
        lines.append(
            f"| {row['level']} ({row['level']} zeros / {4 - row['level']} kept) | {row['method']} "
            f"| {row['perplexity']:.3f} | {row['prune_wall_s']:.2f} | {row['prune_cpu_s']:.2f} |"
        )
    lines += [
        "",
        f"Calibration pass: {result['calibration_wall_s']:.1f} s wall, "
        f"{result['calibration_cpu_s']:.1f} s CPU. OBS at levels 1, 2, 3 together for all "
        f"layers: {result['obs_three_levels_wall_s']:.1f} s wall, "
        f"{result['obs_three_levels_cpu_s']:.1f} s CPU. Whole variant preparation into an empty "
        f"cache ({result['prepare_variants']} variants, calibration included): "
        f"{result['prepare_wall_s']:.1f} s wall, {result['prepare_cpu_s']:.1f} s CPU.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="checkpoint directory or 'default'")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--window", type=int, default=128, help="calibration window, tokens")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--eval-window", type=int, default=256, help="evaluation window, tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's own choice, the core count)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"{result['date']}, {result['machine']}")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
