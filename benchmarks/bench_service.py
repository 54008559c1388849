"""Bounded load test of the cn4 REST API on loopback: uvicorn with PostgreSQL.

Starts ``cn4 serve`` (no worker) in a subprocess on a fresh PostgreSQL database, submits one
batch of ``--jobs`` jobs and times it, then runs ``--clients`` concurrent clients that issue
``GET /v1/jobs`` and ``GET /v1/jobs/{id}`` (random ids) until ``--requests`` requests of each
route are done or ``--max-seconds`` pass. Prints p50 and p99 latency per route and the batch
time, as JSON. Goals: p99 <= 50 ms at 50 clients, 1000 jobs submitted in <= 5 s.

    .venv/bin/python benchmarks/bench_service.py [--jobs 1000] [--clients 50] [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg

REPO_ROOT = Path(__file__).resolve().parents[1]
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))
    return ordered[index]


def start_server(database_url: str, data_dir: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "CN4_DATA_DIR": str(data_dir), "CN4_MAX_BATCH_JOBS": "100000"}
    process = subprocess.Popen(
        [sys.executable, "-m", "search.cli", "serve", "--port", "0", "--no-worker", "--migrate",
         "--database-url", database_url],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = process.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    if not match:
        process.kill()
        raise RuntimeError(f"cn4 serve did not start: {line!r}")
    return process, match.group(1)


def submit_batch(url: str, count: int) -> tuple[float, list[int]]:
    tag = secrets.token_hex(4)
    body = {"jobs": [
        {"spec": {"trials": 10, "seed": n}, "idempotency_key": f"bench-{tag}-{n}"} for n in range(count)
    ]}
    with httpx.Client(base_url=url, timeout=120) as http:
        started = time.perf_counter()
        response = http.post("/v1/jobs/batch", json=body)
        elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, [job["id"] for job in response.json()["jobs"]]


async def load(url: str, job_ids: list[int], *, clients: int, requests: int, max_seconds: float) -> dict:
    latencies: dict[str, list[float]] = {"GET /v1/jobs": [], "GET /v1/jobs/{id}": []}
    errors = 0
    deadline = time.perf_counter() + max_seconds
    plan = ["GET /v1/jobs", "GET /v1/jobs/{id}"] * requests
    random.Random(0).shuffle(plan)
    cursor = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        async def client(seed: int) -> None:
            nonlocal cursor, errors
            rng = random.Random(seed)
            while cursor < len(plan) and time.perf_counter() < deadline:
                route = plan[cursor]
                cursor += 1
                path = "/v1/jobs" if route == "GET /v1/jobs" else f"/v1/jobs/{rng.choice(job_ids)}"
                started = time.perf_counter()
                response = await http.get(path)
                latencies[route].append((time.perf_counter() - started) * 1000)
                errors += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(client(seed) for seed in range(clients)))
        wall = time.perf_counter() - started
    return {
        route: {
            "requests": len(values),
            "p50_ms": round(percentile(values, 0.50), 2),
            "p99_ms": round(percentile(values, 0.99), 2),
            "mean_ms": round(statistics.fmean(values), 2),
        }
        for route, values in latencies.items()
    } | {"errors": errors, "wall_s": round(wall, 2),
         "throughput_rps": round(sum(len(v) for v in latencies.values()) / wall, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs in the submitted batch")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=2000, help="requests per route")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time cap of the load phase")
    parser.add_argument("--database-url", help="use this database instead of a fresh PostgreSQL one")
    args = parser.parse_args()

    database_name = None
    database_url = args.database_url
    if database_url is None:
        database_name = f"cn4_bench_{secrets.token_hex(4)}"
        with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{database_name}"')
        database_url = f"postgresql://postgres@127.0.0.1:5432/{database_name}"
    data_dir = Path(f"/tmp/{database_name or 'cn4-bench'}-data")
    process, url = start_server(database_url, data_dir)
    try:
        batch_s, job_ids = submit_batch(url, args.jobs)
        routes = asyncio.run(load(url, job_ids, clients=args.clients, requests=args.requests,
                                  max_seconds=args.max_seconds))
    finally:
        process.terminate()
        process.wait(30)
        if database_name is not None:
            with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{database_name}" WITH (FORCE)')
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "database": "postgresql" if database_url.startswith("postgres") else "sqlite",
        "clients": args.clients,
        "batch_jobs": args.jobs,
        "batch_submit_s": round(batch_s, 3),
        "routes": routes,
        "load_avg_1m": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
