"""Fixtures of the dashboard tests: a real uvicorn server on loopback with an embedded worker and
a SQLite database in a temporary folder, a tiny registered model with a measurement file, and
Debian's headless Chromium driven by Playwright."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from dashboard_testing import (
    ACTION_TIMEOUT_MS,
    PageLog,
    ServerThread,
    new_context,
    tiny_device_records,
    write_tiny_checkpoint,
)
from playwright.sync_api import expect

from service import db
from service.api import create_app
from service.config import ServiceSettings

CHROMIUM = Path("/usr/bin/chromium")
expect.set_options(timeout=ACTION_TIMEOUT_MS)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@dataclass
class Dashboard:
    """The running server, an HTTP client of its API and what the tests set up."""

    url: str
    http: httpx.Client
    model_name: str
    measurement_file: Path
    settings: ServiceSettings


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory) -> Iterator[Dashboard]:
    """The API with the dashboard and an embedded worker on a fresh SQLite database."""
    base = tmp_path_factory.mktemp("dashboard")
    url = f"sqlite:///{base / 'cn4.db'}"
    db.upgrade(url)
    model_root = base / "models"
    model_dir = write_tiny_checkpoint(model_root / "tiny", "mamba2")
    measurement_file = base / "tiny-cpu.jsonl"
    measurement_file.write_text(
        "".join(json.dumps(record) + "\n" for record in tiny_device_records(model_dir))
    )
    settings = ServiceSettings(
        database_url=url,
        data_dir=base / "data",
        model_roots=[model_root],
        lease_seconds=30.0,
        heartbeat_seconds=1.0,
        poll_seconds=0.2,
        embedded_worker=True,
    )
    app = create_app(settings)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        registered = http.post("/v1/models", json={"name": "tiny", "path": str(model_dir)})
        assert registered.status_code == 201, registered.text
        yield Dashboard(
            url=server.url, http=http, model_name="tiny", measurement_file=measurement_file,
            settings=settings,
        )


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(
            "Debian's chromium is not installed at /usr/bin/chromium: run "
            "`apt-get install -y chromium` as root"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, dashboard):
    context = new_context(browser, dashboard.url)
    page = context.new_page()
    page.log = PageLog(page)
    yield page
    context.close()
