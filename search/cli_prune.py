"""``cn4 prune``: prune a model uniformly or by a level map, measure it and export it.

The command loads the checkpoint, calibrates on a text and prunes every eligible layer through
the variant cache, so a second run with the same model, text and method reuses the pruned
weights. It reports held-out perplexity before and after and saves the pruned checkpoint with
its levels and masks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from search.errors import PruningError

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION_WINDOWS = 32
DEFAULT_EVALUATION_WINDOWS = 32
DEFAULT_WINDOW = 128


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="prune a model to a uniform level or a level map and export it",
        description=(
            "Prune every eligible layer of a checkpoint to one Cn4 level (n zeros in each group "
            "of 4 input weights) or to the levels of a JSON level map, report held-out "
            "perplexity before and after, and save the pruned checkpoint."
        ),
    )
    parser.add_argument(
        "--model",
        default="default",
        help="checkpoint directory, or 'default' for the embedded model (the default)",
    )

    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--level",
        type=int,
        choices=(0, 1, 2, 3),
        help="uniform level for every eligible layer: n zeros / 4-n kept in each group of 4",
    )
    target.add_argument(
        "--levels-file",
        type=Path,
        metavar="JSON",
        help=(
            "level map: a JSON object of layer name to level, or a document with such an "
            "object under 'levels' or 'layers' (as in cn4_levels.json); unlisted layers stay "
            "dense"
        ),
    )

    parser.add_argument(
        "--method",
        choices=("obs", "wanda", "magnitude"),
        default="obs",
        help="pruning method (default: obs, SparseGPT-style compensation)",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE",
        help="UTF-8 text file to calibrate on (default: the embedded calibration text)",
    )
    parser.add_argument(
        "--evaluation",
        type=Path,
        metavar="FILE",
        help="UTF-8 text file for held-out perplexity (default: the embedded evaluation text)",
    )
    parser.add_argument(
        "--calibration-windows",
        type=int,
        default=DEFAULT_CALIBRATION_WINDOWS,
        help=f"calibration windows (default {DEFAULT_CALIBRATION_WINDOWS})",
    )
    parser.add_argument(
        "--evaluation-windows",
        type=int,
        default=DEFAULT_EVALUATION_WINDOWS,
        help=f"held-out perplexity windows (default {DEFAULT_EVALUATION_WINDOWS})",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        help=f"tokens per window (default {DEFAULT_WINDOW})",
    )

    parser.add_argument("--seed", type=int, default=0, help="seed that picks the windows")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="variant cache root (default: $CN4_HOME/variants)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="export directory")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace DIR if it already exists"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the summary as JSON instead of text"
    )
    parser.set_defaults(func=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    from search.calibration import collect_layer_stats
    from search.data import calibration_text, evaluation_text, read_text, token_windows
    from search.data import tokens_fingerprint
    from search.export import check_out_dir, save_pruned
    from search.models import check_level_map, describe_level, eligible_layers, load_checkpoint
    from search.quality import perplexity
    from search.variants import VariantCache, assemble

    started = time.perf_counter()
    loaded = load_checkpoint(args.model)
    # Fail before the pruning and evaluation, not after them.
    check_out_dir(Path(args.out), loaded.path, overwrite=args.overwrite)
    layers = [info.name for info in eligible_layers(loaded.model)]
    if args.level is not None:
        level_map = dict.fromkeys(layers, args.level)
    else:
        level_map = check_level_map(loaded.model, read_level_map(args.levels_file))

    calibration = read_text(args.calibration) if args.calibration else calibration_text()
    evaluation = read_text(args.evaluation) if args.evaluation else evaluation_text()
    calibration_windows = token_windows(
        loaded.tokenizer,
        calibration,
        window=args.window,
        count=args.calibration_windows,
        seed=args.seed,
    )
    evaluation_windows = token_windows(
        loaded.tokenizer,
        evaluation,
        window=args.window,
        count=args.evaluation_windows,
        seed=args.seed,
    )
    dense = perplexity(loaded.model, evaluation_windows)
    logger.info("dense held-out perplexity %.3f", dense.perplexity)

    cache = VariantCache(
        args.cache_dir,
        model_fingerprint=loaded.fingerprint,
        calibration_fingerprint=tokens_fingerprint(calibration_windows),
        method=args.method,
    )
    pruned_layers = [name for name, level in level_map.items() if level > 0]
    used_levels = sorted({level for level in level_map.values() if level > 0})
    missing = {name for name, _ in cache.missing(pruned_layers, used_levels)}
    stats = None
    if missing and args.method != "magnitude":
        stats = collect_layer_stats(loaded.model, calibration_windows, sorted(missing))
    prepared = _prepare_with_progress(cache, loaded.model, sorted(missing), level_map, stats)

    assemble(loaded.model, level_map, cache)
    after = perplexity(loaded.model, evaluation_windows)
    masks = {name: cache.load_mask(name, level_map[name]) for name in pruned_layers}
    notes = {
        name: note
        for name in pruned_layers
        if (note := cache.record(name, level_map[name]).note) is not None
    }
    metadata = {
        "method": args.method,
        "calibration_windows": args.calibration_windows,
        "window": args.window,
        "seed": args.seed,
        "calibration_file": str(args.calibration) if args.calibration else "embedded",
        "dense_perplexity": dense.perplexity,
        "pruned_perplexity": after.perplexity,
        "notes": notes,
    }
    out_dir = save_pruned(
        loaded, level_map, args.out, metadata=metadata, masks=masks, overwrite=args.overwrite
    )

    summary: dict[str, Any] = {
        "model": str(loaded.path),
        "method": args.method,
        "out": str(out_dir),
        "levels": {str(level): sum(1 for v in level_map.values() if v == level) for level in range(4)},
        "dense_perplexity": dense.perplexity,
        "pruned_perplexity": after.perplexity,
        "evaluation_tokens": after.tokens,
        "variants_pruned": prepared,
        "notes": notes,
        "seconds": time.perf_counter() - started,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"model        {loaded.path} ({loaded.arch})")
    print(f"method       {args.method}")
    for level in range(1, 4):
        count = summary["levels"][str(level)]
        if count:
            print(f"level {level}      {count} layers ({describe_level(level)})")
    print(f"dense ppl    {dense.perplexity:.3f} on {dense.tokens} held-out tokens")
    print(f"pruned ppl   {after.perplexity:.3f}")
    for name, note in notes.items():
        print(f"note         {name}: {note}")
    print(f"saved        {out_dir}")
    return 0


def read_level_map(path: Path) -> dict[str, int]:
    """Read a level map from ``path``: a JSON object, or one under ``levels`` or ``layers``."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PruningError(f"levels file {str(path)!r} not found: check the path") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PruningError(f"levels file {str(path)!r} is not valid JSON: {exc}") from exc
    if isinstance(document, dict):
        for key in ("levels", "layers"):
            if isinstance(document.get(key), dict):
                document = document[key]
                break
    if not isinstance(document, dict) or not document:
        raise PruningError(
            f"levels file {str(path)!r} contains no level map: give a JSON object such as "
            '{"backbone.layers.0.mixer.in_proj": 2}'
        )
    level_map: dict[str, int] = {}
    for name, value in document.items():
        level = value.get("level") if isinstance(value, Mapping) else value
        if isinstance(level, bool) or not isinstance(level, int):
            raise PruningError(
                f"levels file {str(path)!r}: layer {name!r} has level {level!r}, not an "
                "integer 0..3"
            )
        level_map[name] = level
    return level_map


def _prepare_with_progress(cache, model, layers, level_map, stats) -> int:
    """Prune the missing variants of ``layers`` with a progress bar on stderr; return the count."""
    if not layers:
        return 0
    from tqdm import tqdm

    total = 0
    with tqdm(total=len(layers), desc="pruning", unit="layer", file=sys.stderr) as bar:
        for name in layers:
            report = cache.prepare(model, [name], [level_map[name]], stats)
            total += report.computed
            bar.update(1)
    return total
