"""The dashboard in a real headless Chromium against a real server: every page, a device set up
through the pages, a job submitted through the form and run by the embedded worker, errors."""

from __future__ import annotations

import io
import json
import math
import os
import re
import zipfile
from pathlib import Path

import pytest
from dashboard_testing import REPO_ROOT, new_context, save_screenshot
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

PAGES = {
    "/": "Jobs",
    "/submit": "Submit a search",
    "/devices": "Devices and measurements",
    "/latency-models": "Latency models",
}
DEVICE = "tiny-cpu"
# A search small enough for a test: a few trials on 2 windows of 16 tokens.
TINY_SEARCH = {
    "trials": "6", "calibration_windows": "2", "window": "16", "evaluation_windows": "2",
    "proxy_windows": "1",
}
# Seconds a tiny job may take on a busy 2-core machine.
JOB_TIMEOUT_S = 900
README_SCREENSHOT = REPO_ROOT / "docs" / "images" / "dashboard-job.png"


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def shown_number(locator) -> float:
    """The number a figure or cell shows, without its unit."""
    return float(locator.inner_text().split()[0])


def plotted_points(page, selector: str) -> int:
    """Markers Plotly drew in the plot at ``selector`` (lines and bars draw none)."""
    return page.locator(f"{selector} .scatterlayer .point").count()


# --- fixtures: a device and jobs set up through the pages -------------------------------------


@pytest.fixture(scope="module")
def fitted_device(browser, dashboard) -> dict:
    """Device tiny-cpu created, given its measurement file and fitted, all through the pages."""
    context = new_context(browser, dashboard.url)
    page = context.new_page()
    page.goto("/devices")
    page.fill("#device-name", DEVICE)
    page.fill("#device-description", "made-up device of the tiny model")
    page.click("#device-form button[type=submit]")
    expect(page.locator("#device-form-messages")).to_contain_text(f"Device {DEVICE} created")

    page.set_input_files("#measurement-file", str(dashboard.measurement_file))
    page.click("#upload-form button[type=submit]")
    count = len(records_of(dashboard.measurement_file))
    expect(page.locator("#upload-messages")).to_contain_text(f"{count} measurements stored")

    page.click("#fit")
    expect(page.locator("#fit-messages")).to_contain_text("fitted on")
    context.close()
    [device] = [item for item in dashboard.http.get("/v1/devices").json() if item["name"] == DEVICE]
    assert device["latest_latency_model_id"] is not None
    return device


@pytest.fixture(scope="module")
def submitted_jobs(browser, dashboard, fitted_device) -> dict[str, int]:
    """Job ``search`` submitted through the form, then job ``queued`` over the API behind it."""
    context = new_context(browser, dashboard.url)
    page = context.new_page()
    page.goto("/submit")
    expect(page.locator("#model option[value=tiny]")).to_have_count(1)
    page.select_option("#model", "tiny")
    page.fill("#device", DEVICE)
    page.select_option("#budget-kind", "budget_ratio")
    # Tight enough that some trials are over the budget, loose enough for uniform level 3.
    page.fill("#budget", "0.5")
    page.locator("details summary").click()
    for name, value in TINY_SEARCH.items():
        page.fill(f"#{name}", value)
    page.uncheck("#measure")
    page.click("#submit-job")
    link = page.locator("#new-job-link")
    expect(link).to_be_visible()
    search_id = int(link.get_attribute("href").rsplit("/", 1)[1])
    context.close()

    # The embedded worker runs one job at a time, so this one waits in the queue.
    spec = dashboard.http.get(f"/v1/jobs/{search_id}").json()["spec"]
    response = dashboard.http.post("/v1/jobs", json={"spec": {**spec, "seed": 1}})
    assert response.status_code == 201, response.text
    return {"search": search_id, "queued": response.json()["id"]}


# --- pages --------------------------------------------------------------------------------------


def test_pages_open_with_local_assets(page, dashboard):
    for path, heading in PAGES.items():
        page.goto(path)
        expect(page.locator("h1")).to_have_text(heading)
    # The job page loads Plotly too.
    page.goto("/jobs/1")
    page.wait_for_load_state("networkidle")

    foreign = [url for url in page.log.requests if not url.startswith(dashboard.url)]
    assert foreign == []
    assert page.log.script_errors() == []
    assert any(url.endswith("/vendor/plotly.min.js") for url in page.log.requests)


def test_plotly_served_from_package(dashboard):
    import plotly

    bundle = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    response = dashboard.http.get("/vendor/plotly.min.js")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.content == bundle.read_bytes()


def test_missing_job_shows_not_found(page):
    page.goto("/jobs/999999")
    expect(page.locator("#messages .error")).to_contain_text("job 999999 not found")
    expect(page.locator("h1")).to_have_text("Job 999999 not found")
    expect(page.locator("#job")).to_be_hidden()

    page.goto("/jobs/abc")
    expect(page.locator("#messages .error")).to_contain_text('job id "abc" is invalid')
    assert page.log.script_errors() == []


def test_devices_page_plots_measurements(page, dashboard, fitted_device):
    records = records_of(dashboard.measurement_file)
    linear = [record for record in records if record["op"] == "linear"]
    page.goto(f"/devices?device={fitted_device['id']}")
    expect(page.locator("#measurements")).to_have_attribute("data-points", str(len(linear)))
    assert plotted_points(page, "#measurements") == len(linear)
    shapes = {(record["out_features"], record["in_features"]) for record in linear}
    assert page.locator("#measurements .scatterlayer .trace").count() == len(shapes)
    assert page.locator("#measurements .errorbar").count() == len(linear)
    for op in ("linear", "model", "remainder"):
        expected = sum(record["op"] == op for record in records)
        expect(page.locator(f"#record-counts td[data-op={op}]")).to_have_text(str(expected))
    save_screenshot(page, "devices", full_page=True)
    assert page.log.script_errors() == []


def test_latency_model_page_shows_fit(page, dashboard, fitted_device):
    model_id = fitted_device["latest_latency_model_id"]
    fit = dashboard.http.get(f"/v1/latency-models/{model_id}").json()["fit_report"]
    whole_model = [record for record in records_of(dashboard.measurement_file) if record["op"] == "model"]
    assert fit["count"] > 0

    page.goto(f"/latency-models?device={fitted_device['id']}")
    expect(page.locator("#scatter")).to_have_attribute("data-points", str(len(whole_model)))
    assert plotted_points(page, "#scatter") == len(whole_model)
    figures = page.locator("#figures")
    expect(figures.locator("[data-key=count] .value")).to_have_text(str(fit["count"]))
    expect(figures.locator("[data-key=within_10pct] .value")).to_have_text(f"{100 * fit['within_10pct']:.1f}%")
    expect(figures.locator("[data-key=mape] .value")).to_have_text(f"{fit['mape']:.2f}%")
    expect(page.locator("#scatter-messages .error")).to_have_count(0)
    save_screenshot(page, "latency-model", full_page=True)
    assert page.log.script_errors() == []


def test_invalid_budget_shows_api_message(page, dashboard, fitted_device):
    before = dashboard.http.get("/v1/jobs").json()["total"]
    page.goto("/submit")
    expect(page.locator("#model option[value=tiny]")).to_have_count(1)
    page.select_option("#model", "tiny")
    page.fill("#device", DEVICE)
    page.select_option("#budget-kind", "budget_ratio")
    page.fill("#budget", "1.5")
    page.click("#submit-job")
    error = page.locator("#job-messages .error")
    expect(error).to_contain_text("budget_ratio=1.5 is invalid")
    expect(error).to_contain_text("HTTP 422")
    assert dashboard.http.get("/v1/jobs").json()["total"] == before
    save_screenshot(page, "submit-invalid-budget")


def test_batch_file_submits_jobs(page, dashboard, tmp_path, submitted_jobs):
    spec = dashboard.http.get(f"/v1/jobs/{submitted_jobs['search']}").json()["spec"]
    batch = tmp_path / "jobs.jsonl"
    batch.write_text(json.dumps({**spec, "seed": 2, "idempotency_key": "dashboard-batch-1"}) + "\n")
    page.goto("/submit")
    page.set_input_files("#batch-file", str(batch))
    page.click("#submit-batch")
    expect(page.locator("#batch-messages")).to_contain_text("1 of 1 jobs created from jobs.jsonl")
    href = page.locator("#batch-messages a").get_attribute("href")
    batch_id = int(href.rsplit("/", 1)[1])
    job = dashboard.http.get(f"/v1/jobs/{batch_id}").json()
    assert job["idempotency_key"] == "dashboard-batch-1"
    assert job["spec"]["seed"] == 2
    # Keep the worker for the form's job: this one only had to be queued.
    assert dashboard.http.post(f"/v1/jobs/{batch_id}/cancel").status_code == 200

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"trials": 0}) + "\n")
    page.set_input_files("#batch-file", str(bad))
    page.click("#submit-batch")
    expect(page.locator("#batch-messages .error")).to_contain_text("bad.jsonl, line 1: trials=0 is invalid")


def test_cancel_button_cancels_job(page, dashboard, submitted_jobs):
    job_id = submitted_jobs["queued"]
    page.goto(f"/jobs/{job_id}")
    badge = page.locator("#state [data-state]")
    # Queued behind the form's job, unless that one has finished already.
    expect(badge).to_have_attribute("data-state", re.compile("^(queued|running)$"))
    page.click("#cancel")
    expect(page.locator("#action-messages")).to_contain_text(
        re.compile("The job is cancelled|Cancel requested")
    )
    # A running job stops at its next check between trials; the page keeps polling until then.
    expect(badge).to_have_attribute("data-state", "cancelled", timeout=JOB_TIMEOUT_S * 1000)
    expect(page.locator("#cancel")).to_be_disabled()
    assert dashboard.http.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
    if dashboard.http.get(f"/v1/jobs/{job_id}/result").status_code == 409:
        expect(page.locator("#baseline-messages")).to_contain_text("No report: the job was cancelled")


def test_job_page_shows_finished_search(page, dashboard, submitted_jobs):
    job_id = submitted_jobs["search"]
    page.goto(f"/jobs/{job_id}")
    # The page polls the API: no reload between queued or running and succeeded.
    expect(page.locator("#state [data-state]")).to_have_attribute(
        "data-state", "succeeded", timeout=JOB_TIMEOUT_S * 1000
    )
    job = dashboard.http.get(f"/v1/jobs/{job_id}").json()
    trials = dashboard.http.get(f"/v1/jobs/{job_id}/trials").json()
    report = dashboard.http.get(f"/v1/jobs/{job_id}/result").json()["result"]
    assert len(trials) == 6

    # Pareto plot: one marker per trial with a prediction, split by feasibility.
    predicted = [trial for trial in trials if trial["predicted_latency_ms"] is not None]
    feasible = [trial for trial in predicted if trial["feasible"] and trial["quality"] is not None]
    pareto = page.locator("#pareto")
    expect(pareto).to_have_attribute("data-feasible", str(len(feasible)))
    expect(pareto).to_have_attribute("data-infeasible", str(len(predicted) - len(feasible)))
    assert plotted_points(page, "#pareto") == len(predicted)
    assert pareto.locator(".shapelayer path").count() == 1  # the budget line
    shown = shown_number(page.locator("#best-quality .value"))
    assert math.isclose(shown, job["best"]["quality"], rel_tol=1e-3)

    # Levels per layer: one coloured cell per layer, with the report's level.
    levels = report["levels"]
    cells = page.locator("#levels td.level")
    expect(cells).to_have_count(len(levels))
    for index in range(cells.count()):
        cell = cells.nth(index)
        assert int(cell.get_attribute("data-level")) == levels[cell.get_attribute("data-layer")]
    expect(page.locator("#level-legend")).to_contain_text("2 zeros / 2 kept")
    names = [cells.nth(index).get_attribute("data-layer") for index in range(cells.count())]
    assert names[-1] == "lm_head"

    # Per-layer latency from the device's latency model adds up to the report's prediction.
    layer_plot = page.locator("#layer-latency")
    expect(layer_plot).to_have_attribute("data-layers", str(len(levels)))
    assert math.isclose(float(layer_plot.get_attribute("data-total-ms")), report["predicted_latency_ms"], rel_tol=1e-6)
    assert layer_plot.locator(".barlayer .point").count() == 2 * len(levels)

    # Baselines beside the best, and the winner's latency.
    rows = page.locator("#baselines tbody tr")
    expect(rows).to_have_count(2 + len(report["baselines"]))
    for name in report["baselines"]:
        expect(page.locator(f'#baselines tr[data-configuration="{name}"]')).to_have_count(1)
    shown = shown_number(page.locator("#winner-predicted .value"))
    assert math.isclose(shown, report["predicted_latency_ms"], rel_tol=1e-3)
    expect(page.locator("#winner-latency-messages")).to_contain_text("the job ran with measure off")

    with page.expect_download() as download_info:
        page.click("#download-zip")
    download = download_info.value
    assert download.suggested_filename == f"cn4-job-{job_id}.zip"
    with zipfile.ZipFile(io.BytesIO(Path(download.path()).read_bytes())) as archive:
        names_in_zip = set(archive.namelist())
    assert {"report.json", "model/config.json", "model/model.safetensors"} <= names_in_zip

    page.evaluate("window.scrollTo(0, 0)")
    path = save_screenshot(page, "job", full_page=True)
    if os.environ.get("CN4_UPDATE_SCREENSHOTS") == "1":
        # From the top down to the per-layer latency plot, which keeps the PNG small.
        box = page.locator("#layer-latency").bounding_box()
        clip = {"x": 0, "y": 0, "width": 1280, "height": box["y"] + box["height"]}
        readme = save_screenshot(page, "job-readme", full_page=True, clip=clip)
        README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        README_SCREENSHOT.write_bytes(readme.read_bytes())
    assert page.log.script_errors() == []


def test_failed_job_shows_error(page, dashboard, submitted_jobs):
    # The jobs list is open before the job exists: it must appear and fail without a reload.
    page.goto("/")
    expect(page.locator(f"#jobs tr[data-job-id='{submitted_jobs['search']}']")).to_have_count(1)
    spec = dashboard.http.get(f"/v1/jobs/{submitted_jobs['search']}").json()["spec"]
    # Valid for the API, but below the fastest configuration the device's latency model predicts.
    spec = {**spec, "budget_ratio": None, "budget_ms": 0.001}
    response = dashboard.http.post("/v1/jobs", json={"spec": spec})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]

    row = page.locator(f"#jobs tr[data-job-id='{job_id}']")
    expect(row.locator("[data-state]")).to_have_attribute(
        "data-state", "failed", timeout=JOB_TIMEOUT_S * 1000
    )

    page.goto(f"/jobs/{job_id}")
    expect(page.locator("#state [data-state]")).to_have_attribute("data-state", "failed")
    error = dashboard.http.get(f"/v1/jobs/{job_id}").json()["error"]
    assert error
    expect(page.locator("#job-error .error")).to_have_text(f"The job failed: {error}")
    expect(page.locator("#baseline-messages")).to_have_text("No report: the job failed.")
    save_screenshot(page, "job-failed")
    assert page.log.script_errors() == []


def test_jobs_page_lists_and_filters(page, dashboard, submitted_jobs):
    search_id = submitted_jobs["search"]
    job = dashboard.http.get(f"/v1/jobs/{search_id}").json()
    page.goto("/")
    row = page.locator(f"#jobs tr[data-job-id='{search_id}']")
    expect(row.locator("[data-state]")).to_have_attribute("data-state", job["state"])
    expect(row.locator(".progress")).to_contain_text(f"{job['progress']['trials_done']}/6")
    assert math.isclose(shown_number(row.locator(".best-latency")), job["best"]["predicted_latency_ms"], rel_tol=1e-3)
    assert math.isclose(shown_number(row.locator(".best-quality")), job["best"]["quality"], rel_tol=1e-3)

    save_screenshot(page, "jobs", full_page=True)

    page.select_option("#state-filter", "cancelled")
    cancelled = dashboard.http.get("/v1/jobs", params={"state": "cancelled"}).json()["items"]
    expect(page.locator("#jobs tbody tr")).to_have_count(len(cancelled))
    expect(page.locator(f"#jobs tr[data-job-id='{submitted_jobs['queued']}']")).to_have_count(1)
    assert "state=cancelled" in page.url
    assert page.log.script_errors() == []
