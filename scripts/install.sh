#!/usr/bin/env bash
# Create .venv (if missing) and install cn4 into it. Safe to run again: it installs only what
# is missing. torch comes first, pinned to the CPU wheel, because a looser requirement makes pip
# resolve a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
VENV_PY=.venv/bin/python

if ! "$VENV_PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
    "$VENV_PY" -m pip install --quiet --upgrade pip
    "$VENV_PY" -m pip install --quiet torch==2.13.0
fi

extras=${CN4_EXTRAS:-}
"$VENV_PY" -m pip install --quiet -e ".${extras:+[$extras]}"
