"""``cn4 layers``: which layers of a checkpoint Cn4 pruning can apply to."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

# search.models imports torch: load it only when the command runs, so `cn4 --help` stays fast.
DEFAULT_MODEL_NAME = "default"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "layers",
        help="list a model's layers and whether Cn4 pruning applies to each",
        description=(
            "Load a checkpoint and list every Linear layer and each block's depthwise conv1d, "
            "with shape and Cn4 eligibility (in_features a multiple of 4, not tied to the "
            "embedding) or the reason a layer stays dense."
        ),
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL_NAME,
        metavar="MODEL",
        help="checkpoint directory, or 'default' for the embedded model (the default)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON instead of a table"
    )
    parser.set_defaults(func=run_layers)


def run_layers(args: argparse.Namespace) -> int:
    from search.models import format_layer_report, layer_report, load_checkpoint

    loaded = load_checkpoint(args.model)
    report = layer_report(loaded.model)
    if args.json:
        document = {
            "model": str(loaded.path),
            "arch": loaded.arch,
            "fingerprint": loaded.fingerprint,
            "layers": [asdict(info) for info in report],
        }
        print(json.dumps(document, indent=2))
    else:
        print(f"{loaded.path} ({loaded.arch}, fingerprint {loaded.fingerprint[:12]})")
        print(format_layer_report(report))
    return 0
