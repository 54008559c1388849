"""Fixtures of the service tests.

Each test module gets a fresh database on SQLite and on PostgreSQL, settings with short leases
and a real uvicorn server on loopback. A tiny checkpoint with a measurement file lets jobs run
without probing this machine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_testing import (
    BACKENDS,
    ServerThread,
    create_database,
    drop_database,
    tiny_measurements,
    write_tiny_checkpoint,
)

from service import db
from service.api import create_app
from service.config import ServiceSettings


@pytest.fixture(scope="module", params=BACKENDS)
def empty_database_url(request, tmp_path_factory) -> Iterator[str]:
    """URL of a fresh, empty database (no schema) for this test module and backend."""
    url = create_database(request.param, tmp_path_factory.mktemp(f"db-{request.param}"))
    yield url
    drop_database(url)


@pytest.fixture(scope="module")
def database_url(empty_database_url) -> str:
    """URL of a fresh database with the schema at the newest migration."""
    db.upgrade(empty_database_url)
    return empty_database_url


@pytest.fixture(scope="module")
def engine(database_url):
    engine = db.create_db_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def model_root(empty_database_url, tmp_path_factory) -> Path:
    """A model root per module and backend (it depends on the database to follow its param)."""
    return tmp_path_factory.mktemp("model-root")


@pytest.fixture(scope="module")
def settings(database_url, model_root, tmp_path_factory) -> ServiceSettings:
    return ServiceSettings(
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("service-data"),
        model_roots=[model_root],
        lease_seconds=3.0,
        heartbeat_seconds=0.5,
        poll_seconds=0.2,
        max_attempts=3,
        embedded_worker=False,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-root") / "tiny-mamba2", "mamba2")


@pytest.fixture(scope="session")
def tiny_measurement_file(tiny_model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("measurements") / "tiny-cpu.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in tiny_measurements(tiny_model_dir)))
    return path


@pytest.fixture(scope="module")
def server(settings, engine) -> Iterator[ServerThread]:
    """The API without a worker, on a real uvicorn."""
    with ServerThread(create_app(settings, engine=engine, embedded_worker=False)) as running:
        yield running


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http
