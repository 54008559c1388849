"""The ``cn4`` command line.

Each subcommand lives in the module that owns its work and exposes ``add_parser(subparsers)``,
which registers the subcommand and sets ``func`` to a callable taking the parsed arguments and
returning the exit status. This module only collects them, so importing it stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from search.errors import Cn4Error

# Modules that define subcommands, in the order they appear in ``cn4 --help``.
SUBCOMMAND_MODULES = (
    "search.cli_search",
    "search.cli_models",
    "search.cli_prune",
    "latency_models.cli_probe",
    "latency_models.cli_fit",
    "service.cli",
)

logger = logging.getLogger("cn4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cn4",
        description="Latency-driven Cn4 sparsity search for Mamba and Mamba2 language models.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v for INFO, -vv for DEBUG)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # A subcommand module that is not written yet must not break the others.
            if exc.name != module_name:
                raise
            continue
        module.add_parser(subparsers)
    return parser


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING
    if verbosity == 1:
        level = logging.INFO
    elif verbosity >= 2:
        level = logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except Cn4Error as exc:
        print(f"cn4 {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cn4 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
