"""The cn4 command line as a whole: subcommand registration and start-up cost."""

from __future__ import annotations

import subprocess
import sys

from search.cli import build_parser, main

EXPECTED_COMMANDS = {"search", "layers", "prune", "probe", "fit", "serve", "worker", "submit"}


def test_parser_registers_every_subcommand():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert EXPECTED_COMMANDS <= set(subparsers.choices)


def test_help_imports_no_torch():
    code = (
        "import sys, search.cli as cli; cli.build_parser(); "
        "heavy = sorted(m for m in ('torch', 'numba', 'transformers') if m in sys.modules); "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_main_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
