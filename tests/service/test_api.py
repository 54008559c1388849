"""Contract of every REST route on a real uvicorn server: status codes and bodies."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import httpx
import pytest

from service import queue
from service.api import create_app
from service.tables import Job
from service_testing import ServerThread, tiny_job_spec, tiny_measurements

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def registered_tiny(server, model_root, tiny_model_dir) -> str:
    """The tiny checkpoint copied under the model root and registered as ``tiny``."""
    target = model_root / "tiny"
    shutil.copytree(tiny_model_dir, target)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.post("/v1/models", json={"name": "tiny", "path": str(target)})
    assert response.status_code == 201, response.text
    return "tiny"


@pytest.fixture(scope="module")
def device(server, tiny_model_dir) -> dict:
    """A device with the tiny model's measurements uploaded."""
    lines = "".join(json.dumps(record) + "\n" for record in tiny_measurements(tiny_model_dir))
    with httpx.Client(base_url=server.url, timeout=60) as http:
        created = http.post("/v1/devices", json={"name": "bench-cpu", "description": "test box"})
        assert created.status_code == 201, created.text
        device_id = created.json()["id"]
        upload = http.post(
            f"/v1/devices/{device_id}/measurements",
            files={"file": ("tiny.jsonl", lines.encode(), "application/x-ndjson")},
        )
        assert upload.status_code == 201, upload.text
    return created.json()


# --- health and docs --------------------------------------------------------------------------


def test_healthz_reports_schema_and_jobs(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["database"] in ("sqlite", "postgresql")
    assert body["schema_revision"] == "0003"
    assert isinstance(body["jobs"], dict)


def test_openapi_lists_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/jobs", "/v1/jobs/batch", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/trials",
        "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/result", "/v1/jobs/{job_id}/download",
        "/v1/models", "/v1/models/upload", "/v1/models/{name}", "/v1/devices",
        "/v1/devices/{device_id}/measurements", "/v1/devices/{device_id}/latency-models",
        "/v1/latency-models/{model_id}", "/v1/latency-models/{model_id}/predict", "/healthz",
    ):
        assert path in paths
    assert client.get("/docs").status_code == 200


# --- models -----------------------------------------------------------------------------------


def test_register_model_and_get_report(client, registered_tiny):
    listed = client.get("/v1/models").json()
    assert listed[0]["name"] == "default"
    assert listed[0]["source"] == "embedded"
    tiny = next(model for model in listed if model["name"] == registered_tiny)
    assert tiny["arch"] == "mamba2"
    assert tiny["source"] == "registered"
    assert len(tiny["fingerprint"]) == 64

    detail = client.get(f"/v1/models/{registered_tiny}").json()
    names = {layer["name"]: layer for layer in detail["layers"]}
    assert names["backbone.layers.0.mixer.in_proj"]["eligible"] is True
    assert names["backbone.layers.0.mixer.conv1d"]["eligible"] is False
    assert detail["eligible_layers"] == 5
    assert detail["eligible_weights"] == sum(
        layer["out_features"] * layer["in_features"] for layer in detail["layers"] if layer["eligible"]
    )


def test_register_model_outside_roots_rejected(client, tiny_model_dir):
    response = client.post("/v1/models", json={"name": "outside", "path": str(tiny_model_dir)})
    assert response.status_code == 403
    assert "outside the allowed directories" in response.json()["detail"]
    assert str(tiny_model_dir) in response.json()["detail"]


def test_register_model_errors(client, registered_tiny, model_root):
    duplicate = client.post("/v1/models", json={"name": registered_tiny, "path": str(model_root / "tiny")})
    assert duplicate.status_code == 409
    missing = client.post("/v1/models", json={"name": "ghost", "path": str(model_root / "ghost")})
    assert missing.status_code == 422
    assert "not found" in missing.json()["detail"]
    bad_name = client.post("/v1/models", json={"name": "a b", "path": str(model_root)})
    assert bad_name.status_code == 422
    assert "name" in bad_name.json()["detail"]
    extra = client.post("/v1/models", json={"name": "x", "path": "/", "pickle": True})
    assert extra.status_code == 422
    assert client.get("/v1/models/ghost").status_code == 404


def _checkpoint_files(directory: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (path.name, path.read_bytes())) for path in sorted(directory.iterdir()) if path.is_file()]


def test_upload_model(client, tiny_model_dir):
    response = client.post("/v1/models/upload", data={"name": "tiny-upload"}, files=_checkpoint_files(tiny_model_dir))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["source"] == "uploaded"
    assert body["arch"] == "mamba2"
    assert Path(body["path"], "model.safetensors").is_file()
    detail = client.get("/v1/models/tiny-upload").json()
    assert detail["eligible_layers"] == 5


def test_upload_model_rejects_pickle_and_broken(client, tiny_model_dir):
    files = _checkpoint_files(tiny_model_dir) + [("files", ("pytorch_model.bin", b"\x80\x04junk"))]
    pickled = client.post("/v1/models/upload", data={"name": "pickled"}, files=files)
    assert pickled.status_code == 422
    assert "pytorch_model.bin" in pickled.json()["detail"]

    without_weights = [item for item in _checkpoint_files(tiny_model_dir) if not item[1][0].endswith(".safetensors")]
    broken = client.post("/v1/models/upload", data={"name": "broken"}, files=without_weights)
    assert broken.status_code == 422
    assert "safetensors" in broken.json()["detail"]
    names = [model["name"] for model in client.get("/v1/models").json()]
    assert "pickled" not in names
    assert "broken" not in names


def test_upload_model_over_limit(client, settings, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(settings, "max_upload_bytes", 4096)
    response = client.post("/v1/models/upload", data={"name": "too-big"}, files=_checkpoint_files(tiny_model_dir))
    assert response.status_code == 413
    assert "4096 bytes" in response.json()["detail"]
    assert not (settings.upload_root / "too-big").exists()


# --- devices and measurements -----------------------------------------------------------------


def test_device_crud(client, device):
    assert device["name"] == "bench-cpu"
    fetched = client.get(f"/v1/devices/{device['id']}").json()
    assert fetched["measurement_count"] == 13
    assert fetched["latest_latency_model_id"] is None or fetched["latest_latency_model_id"] > 0
    assert device["id"] in [item["id"] for item in client.get("/v1/devices").json()]
    assert client.post("/v1/devices", json={"name": "bench-cpu"}).status_code == 409
    assert client.post("/v1/devices", json={"name": "local"}).status_code == 422
    missing = client.get("/v1/devices/999999")
    assert missing.status_code == 404
    assert "999999" in missing.json()["detail"]


def test_measurements_listed(client, device):
    records = client.get(f"/v1/devices/{device['id']}/measurements").json()
    assert len(records) == 13
    assert {record["op"] for record in records} == {"linear", "remainder"}


def test_bad_measurement_file_stores_nothing(client):
    device_id = client.post("/v1/devices", json={"name": "bad-file-box"}).json()["id"]
    csv_text = (
        "format,device,op,out_features,in_features,level,tokens,median_ms\n"
        "cn4.latency/1,box,linear,64,128,1,1,0.5\n"
        "cn4.latency/1,box,linear,64,128,7,1,0.5\n"
    )
    response = client.post(
        f"/v1/devices/{device_id}/measurements", files={"file": ("m.csv", csv_text.encode(), "text/csv")}
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "row 2" in detail
    assert "level" in detail
    assert client.get(f"/v1/devices/{device_id}").json()["measurement_count"] == 0

    good = client.post(
        f"/v1/devices/{device_id}/measurements",
        files={"file": ("m.csv", csv_text.rsplit("cn4", 1)[0].encode(), "text/csv")},
    )
    assert good.status_code == 201
    assert good.json()["records"] == 1


def test_measurement_file_over_limit(client, device, settings, monkeypatch):
    monkeypatch.setattr(settings, "max_measurement_bytes", 100)
    response = client.post(
        f"/v1/devices/{device['id']}/measurements", files={"file": ("m.jsonl", b"{}\n" * 200, "text/plain")}
    )
    assert response.status_code == 413


# --- latency models ---------------------------------------------------------------------------


def test_fit_and_predict(client, device, registered_tiny, tiny_model_dir):
    fitted = client.post(f"/v1/devices/{device['id']}/latency-models", json={})
    assert fitted.status_code == 201, fitted.text
    body = fitted.json()
    assert body["measurement_count"] == 13
    assert len(body["models"]) == 1
    assert isinstance(body["fit_report"], dict)
    assert client.get(f"/v1/latency-models/{body['id']}").json()["id"] == body["id"]
    assert [item["id"] for item in client.get(f"/v1/devices/{device['id']}/latency-models").json()] == [body["id"]]
    assert client.get(f"/v1/devices/{device['id']}").json()["latest_latency_model_id"] == body["id"]

    records = tiny_measurements(tiny_model_dir)
    layer_ms = {(r["out_features"], r["in_features"], r["level"]): r["median_ms"] for r in records if r["op"] == "linear"}
    remainder = next(r["median_ms"] for r in records if r["op"] == "remainder")
    detail = client.get(f"/v1/models/{registered_tiny}").json()
    eligible = [layer for layer in detail["layers"] if layer["eligible"]]
    levels = {eligible[0]["name"]: 3, eligible[1]["name"]: 2}
    expected = remainder + sum(
        layer_ms[(layer["out_features"], layer["in_features"], levels.get(layer["name"], 0))] for layer in eligible
    )
    predicted = client.post(
        f"/v1/latency-models/{body['id']}/predict", json={"checkpoint": registered_tiny, "levels": levels}
    )
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["latency_ms"] == pytest.approx(expected, rel=1e-9)
    assert predicted.json()["layers"] == 5

    shape = eligible[0]
    by_shape = client.post(
        f"/v1/latency-models/{body['id']}/predict",
        json={"layers": [[shape["out_features"], shape["in_features"], 1]]},
    )
    assert by_shape.json()["latency_ms"] == pytest.approx(
        remainder + layer_ms[(shape["out_features"], shape["in_features"], 1)]
    )

    unknown = client.post(
        f"/v1/latency-models/{body['id']}/predict", json={"checkpoint": registered_tiny, "levels": {"nope": 1}}
    )
    assert unknown.status_code == 422
    assert "nope" in unknown.json()["detail"]
    no_basis = client.post(f"/v1/latency-models/{body['id']}/predict", json={"layers": [[4096, 4096, 2]]})
    assert no_basis.status_code == 422
    assert "4096x4096" in no_basis.json()["detail"]
    assert client.get("/v1/latency-models/999999").status_code == 404


def test_fit_without_measurements_conflicts(client):
    device_id = client.post("/v1/devices", json={"name": "empty-box"}).json()["id"]
    response = client.post(f"/v1/devices/{device_id}/latency-models", json={})
    assert response.status_code == 409
    assert "no measurements" in response.json()["detail"]


# --- jobs -------------------------------------------------------------------------------------


def test_create_and_get_job(client):
    response = client.post("/v1/jobs", json={"spec": {"trials": 7, "seed": 3}})
    assert response.status_code == 201
    job = response.json()
    assert job["state"] == "queued"
    assert job["progress"] == {"trials_done": 0, "trials_total": 7, "fraction": 0.0}
    assert job["spec"]["model"] == "default"
    assert job["spec"]["seed"] == 3
    assert job["best"] is None
    fetched = client.get(f"/v1/jobs/{job['id']}")
    assert fetched.status_code == 200
    assert fetched.json()["id"] == job["id"]
    missing = client.get("/v1/jobs/999999")
    assert missing.status_code == 404
    assert "999999" in missing.json()["detail"]


def test_workers_setting(client, engine):
    """workers > 1 is kept on PostgreSQL and refused on SQLite, naming the value and the fix."""
    response = client.post("/v1/jobs", json={"spec": {"trials": 4}, "workers": 3})
    if engine.dialect.name == "postgresql":
        assert response.status_code == 201
        assert response.json()["workers"] == 3
    else:
        assert response.status_code == 422
        assert "workers=3 needs a PostgreSQL" in response.json()["detail"]
    assert client.post("/v1/jobs", json={"spec": {"trials": 4}}).json()["workers"] == 1
    assert client.post("/v1/jobs", json={"spec": {}, "workers": 0}).status_code == 422
    schema = client.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]
    assert "PostgreSQL" in schema["properties"]["workers"]["description"]


def test_invalid_spec_rejected(client):
    bad_levels = client.post("/v1/jobs", json={"spec": {"levels": [5]}})
    assert bad_levels.status_code == 422
    assert "levels [5]" in bad_levels.json()["detail"]
    unknown = client.post("/v1/jobs", json={"spec": {"trails": 3}})
    assert unknown.status_code == 422
    assert "trails" in unknown.json()["detail"]
    model = client.post("/v1/jobs", json={"spec": {"model": "no-such-model"}})
    assert model.status_code == 422
    assert "not registered" in model.json()["detail"]
    outside = client.post("/v1/jobs", json={"spec": {"model": "/etc"}})
    assert outside.status_code == 422
    assert "outside the allowed directories" in outside.json()["detail"]
    text = client.post("/v1/jobs", json={"spec": {"calibration_text": "/etc/passwd"}})
    assert text.status_code == 422
    device = client.post("/v1/jobs", json={"spec": {"device": "no-such-device"}})
    assert device.status_code == 422
    assert "POST /v1/devices" in device.json()["detail"]
    not_json = client.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 422


def test_job_with_registered_model_and_device(client, registered_tiny, device):
    spec = tiny_job_spec(registered_tiny, device["name"])
    response = client.post("/v1/jobs", json={"spec": spec})
    assert response.status_code == 201
    assert response.json()["spec"]["model"] == registered_tiny
    assert response.json()["spec"]["device"] == "bench-cpu"


def test_list_jobs_filter_and_pages(client, engine):
    ids = [client.post("/v1/jobs", json={"spec": {"trials": 2, "seed": 100 + n}}).json()["id"] for n in range(5)]
    queue.request_cancel(engine, ids[0])
    page = client.get("/v1/jobs", params={"limit": 2, "offset": 0}).json()
    assert page["limit"] == 2
    assert len(page["items"]) == 2
    assert page["items"][0]["id"] > page["items"][1]["id"]
    second = client.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
    assert second["items"][0]["id"] < page["items"][1]["id"]
    assert second["total"] == page["total"]

    cancelled = client.get("/v1/jobs", params={"state": "cancelled", "limit": 500}).json()
    assert ids[0] in [item["id"] for item in cancelled["items"]]
    assert {item["state"] for item in cancelled["items"]} == {"cancelled"}
    queued = client.get("/v1/jobs", params={"state": "queued", "limit": 500}).json()
    assert set(ids[1:]) <= {item["id"] for item in queued["items"]}
    assert client.get("/v1/jobs", params={"state": "done"}).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_cancel_job(client):
    job_id = client.post("/v1/jobs", json={"spec": {"trials": 2, "seed": 200}}).json()["id"]
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409
    assert "already cancelled" in again.json()["detail"]
    assert client.post("/v1/jobs/999999/cancel").status_code == 404


def _finish_with_files(engine, settings, job_id: int) -> Path:
    """Run a job by hand through the queue: two trials, files on disk, then success."""
    from sqlalchemy import update

    with engine.begin() as connection:
        connection.execute(update(Job).where(Job.id != job_id, Job.state == "queued").values(state="cancelled"))
    claim = queue.claim_next_job(engine, worker_id="test", lease_seconds=30)
    assert claim.job_id == job_id
    for number, (quality, feasible) in enumerate([(0.3, True), (0.1, False)]):
        queue.record_trial(engine, job_id, claim.token, {
            "number": number, "state": "COMPLETE", "levels": {"a": number + 1}, "quality": quality,
            "predicted_latency_ms": 2.0 - number, "sparsity": 0.25 * (number + 1), "feasible": feasible,
            "reason": None if feasible else "over budget", "seed_name": "uniform-1" if number == 0 else None,
        })
    out_dir = settings.resolved_data_dir / "jobs" / str(job_id) / "attempt-1"
    (out_dir / "model").mkdir(parents=True)
    (out_dir / "report.json").write_text('{"feasible": true}')
    (out_dir / "model" / "config.json").write_text("{}")
    assert queue.finish_job(engine, job_id, claim.token, state="succeeded", result={"feasible": True}, out_dir=str(out_dir))
    return out_dir


def test_trials_result_and_downloads(client, engine, settings):
    job_id = client.post("/v1/jobs", json={"spec": {"trials": 2, "seed": 300}}).json()["id"]
    early = client.get(f"/v1/jobs/{job_id}/result")
    assert early.status_code == 409
    assert "queued" in early.json()["detail"]
    _finish_with_files(engine, settings, job_id)

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded"
    assert job["progress"] == {"trials_done": 2, "trials_total": 2, "fraction": 1.0}
    assert job["best"]["number"] == 0
    trials = client.get(f"/v1/jobs/{job_id}/trials").json()
    assert [trial["number"] for trial in trials] == [0, 1]
    assert trials[0]["levels"] == {"a": 1}
    assert trials[0]["seed_name"] == "uniform-1"
    assert trials[1]["feasible"] is False
    assert trials[1]["reason"] == "over budget"

    result = client.get(f"/v1/jobs/{job_id}/result").json()
    assert result["result"] == {"feasible": True}
    assert result["files"] == ["model/config.json", "report.json"]
    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/jobs/{job_id}/download").content))
    assert sorted(archive.namelist()) == ["model/config.json", "report.json"]
    assert archive.read("report.json") == b'{"feasible": true}'
    single = client.get(f"/v1/jobs/{job_id}/files/model/config.json")
    assert single.status_code == 200
    assert single.content == b"{}"
    assert client.get(f"/v1/jobs/{job_id}/files/missing.txt").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/files/..%2F..%2F..%2Fcn4.db").status_code == 404
    assert client.get("/v1/jobs/999999/trials").status_code == 404


def test_batch_twice_same_ids(client):
    body = {"jobs": [{"spec": {"trials": 2, "seed": 400 + n}, "idempotency_key": f"api-batch-{n}"} for n in range(10)]}
    body["jobs"].append({"spec": {"trials": 2, "seed": 499}})
    first = client.post("/v1/jobs/batch", json=body)
    assert first.status_code == 201
    assert first.json()["created"] == 11
    total_before = client.get("/v1/jobs").json()["total"]

    keyed = {"jobs": body["jobs"][:10]}
    second = client.post("/v1/jobs/batch", json=keyed)
    assert second.status_code == 201
    assert second.json()["created"] == 0
    assert [job["id"] for job in second.json()["jobs"]] == [job["id"] for job in first.json()["jobs"][:10]]
    assert client.get("/v1/jobs").json()["total"] == total_before


def test_batch_errors(client):
    conflict = client.post("/v1/jobs/batch", json={"jobs": [{"spec": {"trials": 9}, "idempotency_key": "api-batch-0"}]})
    assert conflict.status_code == 409
    assert "api-batch-0" in conflict.json()["detail"]
    invalid = client.post("/v1/jobs/batch", json={"jobs": [{"spec": {"trials": 2}}, {"spec": {"trials": 0}}]})
    assert invalid.status_code == 422
    assert invalid.json()["detail"].startswith("jobs[1]: trials=0")
    assert client.post("/v1/jobs/batch", json={"jobs": []}).status_code == 422


# --- security ---------------------------------------------------------------------------------


def test_token_required_for_writes(settings, engine):
    guarded = settings.model_copy(update={"api_token": "s3cret", "require_token_on_loopback": True})
    with ServerThread(create_app(guarded, engine=engine, embedded_worker=False)) as running, \
            httpx.Client(base_url=running.url, timeout=30) as http:
        missing = http.post("/v1/jobs", json={"spec": {}})
        assert missing.status_code == 401
        assert "Bearer" in missing.json()["detail"]
        wrong = http.post("/v1/jobs", json={"spec": {}}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert http.post("/v1/devices", json={"name": "x"}).status_code == 401
        right = http.post("/v1/jobs", json={"spec": {"seed": 500}}, headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 201
        assert http.get("/v1/jobs").status_code == 200
        assert http.get(f"/v1/jobs/{right.json()['id']}").status_code == 200


def test_json_body_over_limit(client):
    huge = {"jobs": [{"spec": {"extra": {"pad": "x" * 1024}}}] * 17 * 1024}
    response = client.post("/v1/jobs/batch", content=json.dumps(huge).encode(), headers={"content-type": "application/json"})
    assert response.status_code == 413
