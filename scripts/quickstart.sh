#!/usr/bin/env bash
# Install cn4 and run the main job on the embedded default: the shipped Mamba2 model and texts,
# this machine as the device. The report and the pruned model land in runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/cn4 search --out runs/quickstart "$@"
