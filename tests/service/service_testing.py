"""Helpers of the service tests: databases, a uvicorn server thread, tiny jobs and measurements."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from server_testing import ServerThread


def _root_conftest():
    """The repository's tests/conftest.py, which contains ``write_tiny_checkpoint``."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("cn4_root_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_tiny_checkpoint = _root_conftest().write_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BACKENDS = ("sqlite", "postgresql")


def postgres_available() -> bool:
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def create_database(backend: str, directory: Path) -> str:
    """Create an empty database and return its URL."""
    if backend == "sqlite":
        return f"sqlite:///{directory / f'cn4-{secrets.token_hex(4)}.db'}"
    if not postgres_available():
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432 (scripts/test.sh starts it)")
    name = f"cn4_test_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_database(url: str) -> None:
    if not url.startswith("postgresql"):
        return
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def tiny_measurements(model_dir: Path, *, device: str = "test-cpu") -> list[dict]:
    """Linear records at every level for each eligible shape, plus the model's remainder.

    Latency grows with the kept weights, so sparser levels predict faster and a budget of 0.8
    of the dense latency is reachable.
    """
    from latency_models.probe import model_id
    from search.models import eligible_layers, load_checkpoint

    loaded = load_checkpoint(model_dir)
    shapes = sorted({(layer.out_features, layer.in_features) for layer in eligible_layers(loaded.model)})
    records = [
        {
            "format": "cn4.latency/1", "device": device, "op": "linear", "out_features": out,
            "in_features": inp, "level": level, "tokens": 1,
            "median_ms": 0.002 + 0.001 * out * inp * (4 - level) / 4096,
        }
        for out, inp in shapes
        for level in range(4)
    ]
    records.append({
        "format": "cn4.latency/1", "device": device, "op": "remainder",
        "model": model_id(loaded), "tokens": 1, "median_ms": 0.005,
    })
    return records


def tiny_job_spec(model: str, device: str, *, trials: int = 3, **extra) -> dict:
    """A search spec small enough for a test: a few trials on 2 windows of 16 tokens."""
    spec = {
        "model": model, "device": device, "trials": trials, "budget_ratio": 0.8,
        "calibration_windows": 2, "window": 16, "evaluation_windows": 2, "proxy_windows": 1,
        "measure": False,
    }
    spec.update(extra)
    return spec


def wait_for(condition, *, timeout: float, interval: float = 0.1, message: str = "condition"):
    """Poll ``condition()`` until it returns a truthy value; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{message} not met within {timeout} s (last value {value!r})")
        time.sleep(interval)


def worker_process(settings, worker_id: str, log_path: Path) -> subprocess.Popen:
    """Start ``cn4 worker`` in its own process with the test's settings; it logs to ``log_path``."""
    env = dict(
        os.environ,
        CN4_DATA_DIR=str(settings.resolved_data_dir),
        CN4_MODEL_ROOTS=os.pathsep.join(str(root) for root in settings.model_roots),
        HF_HUB_OFFLINE="1",
    )
    command = [
        sys.executable, "-m", "search.cli", "-v", "worker", "--database-url", settings.database_url,
        "--worker-id", worker_id, "--lease-seconds", str(settings.lease_seconds),
        "--heartbeat-seconds", str(settings.heartbeat_seconds), "--poll-seconds", "0.2",
    ]
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT
    )
