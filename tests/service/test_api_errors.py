"""Error responses of the API on a real uvicorn server: out-of-range ids, results that never come,
upload errors, unexpected exceptions and the offline API docs."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from service.api import MAX_ROW_ID, create_app
from service.tables import Job
from service_testing import ServerThread

pytestmark = pytest.mark.postgres

TOO_LARGE_ID = 99999999999999999999999

# Every route with an integer id in its path: method, path with {id}, request keyword arguments.
ID_ROUTES = [
    ("GET", "/v1/jobs/{id}", {}),
    ("GET", "/v1/jobs/{id}/trials", {}),
    ("POST", "/v1/jobs/{id}/cancel", {}),
    ("GET", "/v1/jobs/{id}/result", {}),
    ("GET", "/v1/jobs/{id}/download", {}),
    ("GET", "/v1/jobs/{id}/files/report.json", {}),
    ("GET", "/v1/devices/{id}", {}),
    ("POST", "/v1/devices/{id}/measurements", {"files": {"file": ("m.jsonl", b"{}\n")}}),
    ("GET", "/v1/devices/{id}/measurements", {}),
    ("POST", "/v1/devices/{id}/latency-models", {"json": {}}),
    ("GET", "/v1/devices/{id}/latency-models", {}),
    ("GET", "/v1/latency-models/{id}", {}),
    ("POST", "/v1/latency-models/{id}/predict", {"json": {"layers": [[8, 8, 1]]}}),
]


@pytest.mark.parametrize(("method", "path", "extra"), ID_ROUTES)
def test_id_too_large_rejected(client, method, path, extra):
    response = client.request(method, path.format(id=TOO_LARGE_ID), **extra)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "path." in detail
    assert f"less than or equal to {MAX_ROW_ID}" in detail


@pytest.mark.parametrize(("method", "path", "extra"), ID_ROUTES)
def test_id_zero_rejected(client, method, path, extra):
    response = client.request(method, path.format(id=0), **extra)
    assert response.status_code == 422, response.text
    assert "greater than or equal to 1" in response.json()["detail"]


@pytest.mark.parametrize("path", ["/v1/jobs/{id}", "/v1/devices/{id}", "/v1/latency-models/{id}"])
def test_largest_id_not_found(client, path):
    response = client.get(path.format(id=MAX_ROW_ID))
    assert response.status_code == 404, response.text
    assert str(MAX_ROW_ID) in response.json()["detail"]


def test_offset_too_large_rejected(client):
    response = client.get("/v1/jobs", params={"offset": TOO_LARGE_ID})
    assert response.status_code == 422
    assert "query.offset" in response.json()["detail"]


def test_result_of_cancelled_job(client):
    job_id = client.post("/v1/jobs", json={"spec": {"trials": 2, "seed": 700}}).json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    response = client.get(f"/v1/jobs/{job_id}/result")
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert f"job {job_id} is cancelled and will never have a result" in detail
    assert "wait" not in detail
    assert client.get(f"/v1/jobs/{job_id}/download").status_code == 409


def test_result_of_failed_job_names_error(client, engine):
    job_id = client.post("/v1/jobs", json={"spec": {"trials": 2, "seed": 701}}).json()["id"]
    with engine.begin() as connection:
        connection.execute(
            update(Job).where(Job.id == job_id).values(state="failed", error="CheckpointError: no weights")
        )
    response = client.get(f"/v1/jobs/{job_id}/result")
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert f"job {job_id} is failed and will never have a result" in detail
    assert "(error: CheckpointError: no weights)" in detail
    assert "wait" not in detail


def test_result_of_queued_job_says_wait(client):
    job_id = client.post("/v1/jobs", json={"spec": {"trials": 2, "seed": 702}}).json()["id"]
    response = client.get(f"/v1/jobs/{job_id}/result")
    assert response.status_code == 409
    assert "has no result yet: wait until it succeeds" in response.json()["detail"]


def _checkpoint_files(directory: Path, *, skip: str = "", replace: dict[str, bytes] | None = None):
    replace = replace or {}
    return [
        ("files", (path.name, replace.get(path.name, path.read_bytes())))
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != skip
    ]


def test_upload_error_names_upload_not_temporary_dir(client, tiny_model_dir, settings):
    files = _checkpoint_files(tiny_model_dir, skip="model.safetensors")
    response = client.post("/v1/models/upload", data={"name": "no-weights"}, files=files)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "upload 'no-weights'" in detail
    assert "safetensors" in detail
    assert ".partial" not in detail
    assert str(settings.upload_root) not in detail


def test_upload_bad_config_names_file(client, tiny_model_dir, settings):
    files = _checkpoint_files(tiny_model_dir, replace={"config.json": b"{not json"})
    response = client.post("/v1/models/upload", data={"name": "bad-config"}, files=files)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("config.json is not a readable JSON file"), detail
    assert ".partial" not in detail
    assert str(settings.upload_root) not in detail
    assert not list(settings.upload_root.glob(".bad-config.*"))


def test_unexpected_error_logged_once(settings, engine, caplog):
    app = create_app(settings, engine=engine, embedded_worker=False)

    def fail() -> None:
        raise RuntimeError("disk on fire")

    app.add_api_route("/v1/fail", fail, methods=["GET"])
    with ServerThread(app) as server, caplog.at_level(logging.ERROR):
        response = httpx.get(server.url + "/v1/fail", timeout=30)
    assert response.status_code == 500
    assert response.json()["detail"] == (
        "internal error while handling GET /v1/fail (RuntimeError: disk on fire); "
        "the server log has the traceback"
    )
    tracebacks = [record for record in caplog.records if record.exc_info is not None]
    assert [record.name for record in tracebacks] == ["service.api"]
    assert "GET /v1/fail failed" in tracebacks[0].getMessage()


def test_docs_served_offline(client):
    response = client.get("/docs")
    assert response.status_code == 200
    page = response.text
    assert re.findall(r"https?://", page) == []
    assert "/docs-assets/swagger-ui-bundle.js" in page
    assert "/openapi.json" in page
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"):
        served = client.get(f"/docs-assets/{asset}")
        assert served.status_code == 200, asset
        assert len(served.content) > 1000, asset


def test_redoc_served_offline(client):
    response = client.get("/redoc")
    assert response.status_code == 200
    assert re.findall(r"https?://", response.text) == []
    assert "/docs-assets/redoc.standalone.js" in response.text
