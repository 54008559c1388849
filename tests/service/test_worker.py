"""Workers running real searches: end to end over HTTP, cancel, a worker killed mid-job, and a
late result after lease loss."""

from __future__ import annotations

import io
import shutil
import signal
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from service_testing import ServerThread, tiny_job_spec, wait_for, worker_process
from sqlalchemy import select, update

from service import queue
from service.api import create_app
from service.tables import Job
from service.worker import Worker

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_under_root(model_root, tiny_model_dir) -> Path:
    target = model_root / "tiny"
    shutil.copytree(tiny_model_dir, target)
    return target


@pytest.fixture(scope="module")
def device_file(settings, tiny_measurement_file) -> Path:
    """The tiny model's measurements inside the data directory, where job specs may point."""
    target = settings.resolved_data_dir / "devices" / tiny_measurement_file.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_measurement_file, target)
    return target


@pytest.fixture(autouse=True)
def no_pending_jobs(engine):
    """Cancel jobs left queued or running by an earlier test, so each test's worker takes its own."""
    with engine.begin() as connection:
        connection.execute(
            update(Job).where(Job.state.in_(("queued", "running"))).values(state="cancelled", lease_token=None)
        )


def job(engine, job_id: int):
    with engine.connect() as connection:
        return connection.execute(select(Job).where(Job.id == job_id)).one()


def test_job_runs_end_to_end_and_cancel(settings, engine, tiny_under_root, tiny_measurement_file):
    """A job submitted over HTTP runs on the embedded worker; a second one is cancelled mid-run."""
    app = create_app(settings, engine=engine, embedded_worker=True)
    with ServerThread(app) as running, httpx.Client(base_url=running.url, timeout=60) as http:
        assert http.post("/v1/models", json={"name": "tiny", "path": str(tiny_under_root)}).status_code == 201
        device_id = http.post("/v1/devices", json={"name": "tiny-cpu"}).json()["id"]
        upload = http.post(
            f"/v1/devices/{device_id}/measurements",
            files={"file": ("tiny.jsonl", tiny_measurement_file.read_bytes(), "text/plain")},
        )
        assert upload.status_code == 201

        created = http.post("/v1/jobs", json={"spec": tiny_job_spec("tiny", "tiny-cpu", trials=3)})
        assert created.status_code == 201
        job_id = created.json()["id"]
        long_id = http.post("/v1/jobs", json={"spec": tiny_job_spec("tiny", "tiny-cpu", trials=500, seed=1)}).json()["id"]

        finished = wait_for(
            lambda: (body := http.get(f"/v1/jobs/{job_id}").json())["state"] in queue.FINAL_STATES and body,
            timeout=900, interval=0.5, message=f"job {job_id} finished",
        )
        assert finished["state"] == "succeeded", finished["error"]
        assert finished["attempts"] == 1
        assert finished["progress"] == {"trials_done": 3, "trials_total": 3, "fraction": 1.0}
        assert finished["best"] is not None
        assert finished["best"]["quality"] >= 0
        trials = http.get(f"/v1/jobs/{job_id}/trials").json()
        assert [trial["number"] for trial in trials] == [0, 1, 2]
        assert all(trial["levels"] for trial in trials)
        assert all(trial["predicted_latency_ms"] > 0 for trial in trials)
        assert any(trial["feasible"] for trial in trials)
        result = http.get(f"/v1/jobs/{job_id}/result").json()
        assert "report.json" in result["files"]
        assert "model/config.json" in result["files"]
        assert set(result["result"]["levels"]) == set(trials[0]["levels"])
        archive = zipfile.ZipFile(io.BytesIO(http.get(f"/v1/jobs/{job_id}/download").content))
        assert "model/model.safetensors" in archive.namelist()

        # The long job starts after the first; cancel it once it has reported a trial.
        wait_for(
            lambda: http.get(f"/v1/jobs/{long_id}").json()["progress"]["trials_done"] >= 1,
            timeout=900, interval=0.2, message=f"job {long_id} reported a trial",
        )
        cancel_sent = time.monotonic()
        assert http.post(f"/v1/jobs/{long_id}/cancel").json()["cancel_requested"] is True
        cancelled = wait_for(
            lambda: (body := http.get(f"/v1/jobs/{long_id}").json())["state"] in queue.FINAL_STATES and body,
            timeout=120, interval=0.2, message=f"job {long_id} stopped",
        )
        stop_seconds = time.monotonic() - cancel_sent
        assert cancelled["state"] == "cancelled"
        # One trial of the tiny model takes well under a second on an idle machine; the bound
        # leaves room for a loaded one.
        assert stop_seconds < 60
        kept = http.get(f"/v1/jobs/{long_id}/trials").json()
        assert 1 <= len(kept) < 500
        assert cancelled["progress"]["trials_done"] == len(kept)


def test_killed_worker_job_requeued_and_finished(settings, engine, tiny_under_root, device_file, tmp_path):
    # Enough trials that the job is still running when the first one is reported: on an idle
    # machine a tiny model's trials take milliseconds each.
    trials = 60
    spec = tiny_job_spec(str(tiny_under_root), str(device_file), trials=trials, seed=2)
    [(job_id, _)] = queue.submit_jobs(engine, [queue.NewJob(spec=spec)], max_attempts=3)
    doomed = worker_process(settings, "doomed", tmp_path / "doomed.log")
    try:
        wait_for(
            lambda: job(engine, job_id).trials_done >= 1 or doomed.poll() is not None,
            timeout=900, interval=0.2, message="the doomed worker reported a trial",
        )
        assert doomed.poll() is None, (tmp_path / "doomed.log").read_text()[-3000:]
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(30)
    finally:
        if doomed.poll() is None:
            doomed.kill()
    killed_at = time.time()
    row = job(engine, job_id)
    assert row.state == "running"
    assert row.lease_owner == "doomed"
    assert row.attempts == 1
    assert row.trials_done < trials

    rescuer = Worker(engine, settings, worker_id="rescuer")
    thread = threading.Thread(target=rescuer.run, kwargs={"max_jobs": 1}, daemon=True)
    thread.start()
    try:
        requeued = wait_for(lambda: job(engine, job_id).lease_owner == "rescuer", timeout=60, message="rescuer claimed the job")
        assert requeued
        assert time.time() - killed_at >= settings.lease_seconds - settings.heartbeat_seconds - 0.5
        thread.join(900)
    finally:
        rescuer.stop()
        thread.join(30)
    row = job(engine, job_id)
    assert row.state == "succeeded", row.error
    assert row.attempts == 2
    assert row.lease_owner is None
    # Every study trial has a row, the killed worker's unfinished one included (as failed).
    assert row.trials_done == trials
    assert row.result["spec"]["trials"] == trials
    assert Path(row.out_dir).name == "attempt-2"
    assert (Path(row.out_dir) / "report.json").is_file()


def test_late_result_from_worker_refused(settings, engine):
    """A worker whose lease was taken over finishes without error and changes nothing."""
    release = threading.Event()
    reports: list[bool] = []

    def slow_runner(context):
        release.wait(30)
        context.on_trial({"number": 0, "state": "COMPLETE", "levels": {}, "quality": 9.9,
                          "predicted_latency_ms": 1.0, "sparsity": 0.0, "feasible": True})
        reports.append(context.should_stop())
        return {"from": "stale worker"}

    [(job_id, _)] = queue.submit_jobs(engine, [queue.NewJob(spec={"trials": 1, "seed": 3})], max_attempts=3)
    # A heartbeat slower than the lease lets the lease expire while the runner still works.
    stalled_settings = settings.model_copy(update={"lease_seconds": 1.0, "heartbeat_seconds": 60.0})
    stale = Worker(engine, stalled_settings, runner=slow_runner, worker_id="stale")
    thread = threading.Thread(target=stale.run_once, daemon=True)
    thread.start()
    wait_for(lambda: job(engine, job_id).lease_owner == "stale", timeout=30, message="stale claimed")
    with engine.begin() as connection:
        connection.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=time.time() - 1))
    assert queue.requeue_expired(engine) == [(job_id, "queued")]
    fresh = queue.claim_next_job(engine, worker_id="fresh", lease_seconds=60)
    assert fresh.job_id == job_id

    release.set()
    thread.join(30)
    assert not thread.is_alive()
    assert reports == [True]
    row = job(engine, job_id)
    assert row.state == "running"
    assert row.lease_owner == "fresh"
    assert row.result is None
    assert row.trials_done == 0
    assert queue.finish_job(engine, job_id, fresh.token, state="succeeded", result={"from": "fresh"})
    assert job(engine, job_id).result == {"from": "fresh"}


def test_resume_study_fails_stale_trials(database_url):
    """A re-claimed job's study: the running trials of the dead worker become failed."""
    import optuna
    from optuna.trial import TrialState

    from service.db import normalise_url
    from service.runner import resume_study

    storage_url = normalise_url(database_url)
    storage = optuna.storages.RDBStorage(storage_url)
    study = optuna.create_study(storage=storage, study_name="cn4-job-stale")
    finished = study.ask()
    finished.suggest_categorical("layer.a", [1, 2])
    finished.set_user_attr("quality", 0.5)
    study.tell(finished, 1.0)
    study.ask()
    study.ask()
    try:
        records = resume_study(storage_url, "cn4-job-stale")
        assert [record["number"] for record in records] == [0, 1, 2]
        assert [record["state"] for record in records] == ["COMPLETE", "FAIL", "FAIL"]
        assert records[0]["quality"] == 0.5
        assert records[0]["reason"] is None
        assert all("lease expired" in record["reason"] for record in records[1:])
        states = [trial.state for trial in optuna.load_study(study_name="cn4-job-stale", storage=storage).trials]
        assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
        again = resume_study(storage_url, "cn4-job-stale")
        assert [record["number"] for record in again] == [0, 1, 2]
        assert again[1]["reason"] is None
        assert resume_study(storage_url, "cn4-job-never-created") == []
    finally:
        storage.engine.dispose()
