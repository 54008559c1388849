#!/usr/bin/env bash
# Install cn4 with its test dependencies, start the services the tests talk to, and run the
# whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
CN4_EXTRAS=test bash scripts/install.sh

# PostgreSQL: the tests create and drop their own databases on the local server.
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    for version in /etc/postgresql/*; do
        pg_ctlcluster --skip-systemctl-redirect "$(basename "$version")" main start || true
    done
    for _ in $(seq 1 30); do
        pg_isready -q -h 127.0.0.1 -p 5432 && break
        sleep 1
    done
fi

# Debian's Chromium for the dashboard's browser tests (Playwright drives the system browser;
# nothing downloads a browser of its own).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export PYTHONHASHSEED=0
exec .venv/bin/python -m pytest -q "$@"
