"""The service commands: ``cn4 submit`` against a real server, ``cn4 serve`` start-up checks."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from service.client import SubmitError, read_batch_file
from service.worker import Worker

pytestmark = pytest.mark.postgres

REPO_ROOT = Path(__file__).resolve().parents[2]


def cn4(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "search.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


YAML_BATCH = """\
# two jobs
jobs:
  - trials: 2
    seed: 1
    idempotency_key: cli-a
  - spec: {trials: 3, seed: 2}
    idempotency_key: cli-b
"""


def test_read_yaml_batch(tmp_path):
    path = tmp_path / "batch.yaml"
    path.write_text(YAML_BATCH)
    entries = read_batch_file(path)
    assert [entry.line for entry in entries] == [3, 6]
    assert [entry.idempotency_key for entry in entries] == ["cli-a", "cli-b"]
    assert entries[0].spec == {"trials": 2, "seed": 1}
    assert entries[1].spec == {"trials": 3, "seed": 2}


def test_read_batch_names_bad_line(tmp_path):
    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text("- trials: 2\n- trials: 2\n  levels: [9]\n")
    with pytest.raises(SubmitError, match=r"line 2: levels \[9\] are invalid"):
        read_batch_file(yaml_path)
    jsonl_path = tmp_path / "bad.jsonl"
    jsonl_path.write_text('{"trials": 2}\n\n{"trials": 2,\n')
    with pytest.raises(SubmitError, match="line 3: invalid JSON"):
        read_batch_file(jsonl_path)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"trials": 2}\n{"trails": 2}\n')
    with pytest.raises(SubmitError, match="line 2: unknown settings"):
        read_batch_file(unknown)
    with pytest.raises(SubmitError, match="not found"):
        read_batch_file(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(SubmitError, match="no jobs"):
        read_batch_file(empty)


def test_submit_twice_same_ids(server, tmp_path):
    path = tmp_path / "batch.yaml"
    path.write_text(YAML_BATCH)
    first = cn4("submit", str(path), "--server", server.url)
    assert first.returncode == 0, first.stderr
    ids = re.findall(r"job (\d+)", first.stdout)
    assert len(ids) == 2
    assert "already submitted" not in first.stdout
    second = cn4("submit", str(path), "--server", server.url)
    assert second.returncode == 0, second.stderr
    assert re.findall(r"job (\d+)", second.stdout) == ids
    assert second.stdout.count("(already submitted)") == 2


def test_submit_bad_file_and_unreachable_server(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"trials": 0}\n')
    result = cn4("submit", str(bad), "--server", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert "line 1: trials=0 is invalid" in result.stderr
    good = tmp_path / "good.jsonl"
    good.write_text('{"trials": 2}\n')
    port = free_port()
    unreachable = cn4("submit", str(good), "--server", f"http://127.0.0.1:{port}")
    assert unreachable.returncode == 1
    assert f"cannot reach the cn4 server at http://127.0.0.1:{port}" in unreachable.stderr


def test_submit_wait_until_finished(server, engine, settings, tmp_path):
    def quick_runner(context):
        for number in range(context.spec["trials"]):
            context.on_trial({"number": number, "state": "COMPLETE", "levels": {"a": 1}, "quality": 0.5 - number / 10,
                              "predicted_latency_ms": 2.0, "sparsity": 0.25, "feasible": True})
        return {"done": True}

    path = tmp_path / "wait.jsonl"
    path.write_text('{"trials": 2, "seed": 11}\n{"trials": 3, "seed": 12}\n')
    worker = Worker(engine, settings, runner=quick_runner, worker_id="cli-test")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        result = cn4("submit", str(path), "--server", server.url, "--wait", "--poll-seconds", "0.2", timeout=180)
    finally:
        worker.stop()
        thread.join(30)
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"job \d+: succeeded best quality", result.stdout)) == 2
    assert "0.3" in result.stdout


def test_serve_refuses_public_address_without_token():
    result = cn4("serve", "--host", "0.0.0.0", "--port", "0", env={"CN4_API_TOKEN": ""})
    assert result.returncode == 1
    assert "not a loopback address" in result.stderr
    assert "CN4_API_TOKEN" in result.stderr


def test_serve_prints_address_and_answers(tmp_path):
    env = {**os.environ, "CN4_DATA_DIR": str(tmp_path / "data"), "CN4_DATABASE_URL": ""}
    process = subprocess.Popen(
        [sys.executable, "-m", "search.cli", "serve", "--port", "0", "--no-worker"], cwd=REPO_ROOT,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, line + process.stderr.read()[-2000:] if process.poll() is not None else line
        health = httpx.get(match.group(1) + "/healthz", timeout=60)
        assert health.status_code == 200
        assert health.json()["database"] == "sqlite"
        assert (tmp_path / "data" / "cn4.db").is_file()
    finally:
        process.terminate()
        process.wait(30)
