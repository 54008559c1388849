"""Start-up errors of ``cn4 serve``, ``cn4 worker`` and ``cn4 migrate``: one error line on stderr
and a non-zero exit status, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Nothing listens on port 1 of the loopback address, so connecting there is refused at once.
UNREACHABLE_URL = "postgresql://nobody:hunter2@127.0.0.1:1/cn4"


def cn4(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {**os.environ, "CN4_DATA_DIR": str(tmp_path / "data"), "CN4_DATABASE_URL": ""}
    return subprocess.run(
        [sys.executable, "-m", "search.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=120, env={**base, **(env or {})},
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if "error:" in line]


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_serve_port_out_of_range(tmp_path, port):
    result = cn4(tmp_path, "serve", "--port", port)
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1
    assert f"port {port} is out of range: give a number from 0 to 65535" in lines[0]


def test_serve_port_not_a_number(tmp_path):
    result = cn4(tmp_path, "serve", "--port", "http")
    assert result.returncode == 2
    assert "invalid port 'http'" in error_lines(result)[0]


def test_serve_port_from_environment_out_of_range(tmp_path):
    result = cn4(tmp_path, "serve", env={"CN4_PORT": "70000"})
    assert result.returncode == 1
    lines = error_lines(result)
    assert lines == ["cn4 serve: error: CN4_PORT=70000 is invalid: Input should be less than or equal to 65535"]


def test_serve_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cn4(tmp_path, "serve", "--port", str(port), "--no-worker")
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1
    assert f"address 127.0.0.1:{port} is already in use: pick another --port" in lines[0]


@pytest.mark.parametrize("command", ["serve", "worker", "migrate"])
def test_database_unreachable(tmp_path, command):
    result = cn4(tmp_path, command, "--database-url", UNREACHABLE_URL)
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1
    assert "cannot reach the database postgresql://nobody:***@127.0.0.1:1/cn4" in lines[0]
    assert "Connection refused" in lines[0]
    assert "CN4_DATABASE_URL" in lines[0]
    assert "hunter2" not in result.stderr


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--lease-seconds", "-5", "--lease-seconds: lease_seconds=-5.0 is invalid: give a positive number of seconds"),
        ("--poll-seconds", "0", "--poll-seconds: poll_seconds=0.0 is invalid: give a positive number of seconds"),
        ("--heartbeat-seconds", "-1", "--heartbeat-seconds: heartbeat_seconds=-1.0 is invalid"),
    ],
)
def test_worker_invalid_seconds(tmp_path, option, value, message):
    result = cn4(tmp_path, "worker", option, value)
    assert result.returncode == 1
    lines = error_lines(result)
    assert len(lines) == 1
    assert lines[0].startswith("cn4 worker: error: " + message), lines[0]
