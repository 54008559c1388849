"""Two worker processes sharing one job's Optuna study on PostgreSQL: both run trials, the job
ends with exactly its trials, and a helper killed with SIGKILL does not cost the job."""

from __future__ import annotations

import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from service_testing import tiny_job_spec, wait_for, worker_process
from sqlalchemy import select

from service import queue
from service.tables import Job, JobLease, Trial

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

# Enough trials that the primary is still searching when the second worker has loaded the model.
TRIALS = 120


@pytest.fixture(scope="module")
def postgres_engine(engine):
    if engine.dialect.name != "postgresql":
        pytest.skip("workers share a job only on PostgreSQL")
    return engine


@pytest.fixture(scope="module")
def device_file(settings, tiny_measurement_file) -> Path:
    target = settings.resolved_data_dir / "devices" / tiny_measurement_file.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_measurement_file, target)
    return target


@pytest.fixture(scope="module")
def tiny_under_root(model_root, tiny_model_dir) -> Path:
    target = model_root / "tiny"
    shutil.copytree(tiny_model_dir, target)
    return target


@pytest.fixture(scope="module")
def two_workers(settings, postgres_engine, tmp_path_factory):
    """Two ``cn4 worker`` processes on the test database; the test may kill either."""
    logs = tmp_path_factory.mktemp("worker-logs")
    processes = {
        name: worker_process(settings, name, logs / f"{name}.log") for name in ("alpha", "beta")
    }
    yield processes, logs
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes.values():
        try:
            process.wait(30)
        except Exception:
            process.kill()


def job_row(engine, job_id: int):
    with engine.connect() as connection:
        return connection.execute(select(Job).where(Job.id == job_id)).one()


def trial_rows(engine, job_id: int):
    with engine.connect() as connection:
        return connection.execute(
            select(Trial.number, Trial.worker_id, Trial.state, Trial.reason)
            .where(Trial.job_id == job_id)
            .order_by(Trial.number)
        ).all()


def study_numbers(settings, job_id: int) -> list[int]:
    import optuna

    from service.db import normalise_url

    storage = optuna.storages.RDBStorage(normalise_url(settings.database_url))
    try:
        study = optuna.load_study(study_name=f"cn4-job-{job_id}", storage=storage)
        return [trial.number for trial in study.get_trials(deepcopy=False)
                if trial.state.is_finished()]
    finally:
        storage.engine.dispose()


def finished(engine, job_id, processes, logs):
    def done():
        for name, process in processes.items():
            assert process.poll() is None or process.returncode == -signal.SIGKILL, (
                (logs / f"{name}.log").read_text()[-3000:]
            )
        return job_row(engine, job_id).state in queue.FINAL_STATES
    wait_for(done, timeout=240, interval=0.3, message=f"job {job_id} finished")
    return job_row(engine, job_id)


def submit(engine, spec: dict) -> int:
    [(job_id, _)] = queue.submit_jobs(engine, [queue.NewJob(spec=spec, workers=2)], max_attempts=3)
    return job_id


def test_two_workers_share_a_job(settings, postgres_engine, tiny_under_root, device_file, two_workers):
    processes, logs = two_workers
    job_id = submit(postgres_engine, tiny_job_spec(str(tiny_under_root), str(device_file), trials=TRIALS, seed=5))
    row = finished(postgres_engine, job_id, processes, logs)

    assert row.state == "succeeded", row.error
    assert row.attempts == 1
    assert row.workers == 2
    trials = trial_rows(postgres_engine, job_id)
    numbers = [trial.number for trial in trials]
    assert len(numbers) == TRIALS
    assert len(set(numbers)) == TRIALS
    assert row.trials_done == TRIALS
    by_worker = Counter(trial.worker_id for trial in trials)
    assert set(by_worker) == {"alpha", "beta"}, by_worker
    assert min(by_worker.values()) >= 1
    # The study's finished trials are the job's; numbers may skip enqueued trials never run.
    assert sorted(study_numbers(settings, job_id)) == numbers
    assert row.result["trial_counts"]["finished"] == TRIALS
    assert len(row.result["trials"]) == TRIALS
    with postgres_engine.connect() as connection:
        leases = connection.execute(select(JobLease).where(JobLease.job_id == job_id)).all()
    assert leases == []


def test_killed_helper_does_not_lose_the_job(
    settings, postgres_engine, tiny_under_root, device_file, two_workers
):
    processes, logs = two_workers
    job_id = submit(postgres_engine, tiny_job_spec(str(tiny_under_root), str(device_file), trials=TRIALS, seed=6))

    def helper_reported():
        with postgres_engine.connect() as connection:
            helper = connection.execute(
                select(JobLease.worker_id).where(JobLease.job_id == job_id)
            ).scalar_one_or_none()
        if helper is None:
            return None
        workers = {trial.worker_id for trial in trial_rows(postgres_engine, job_id)}
        return helper if helper in workers else None

    helper = wait_for(helper_reported, timeout=240, interval=0.1, message="a helper reported a trial")
    primary = job_row(postgres_engine, job_id).lease_owner
    assert {helper, primary} == {"alpha", "beta"}
    processes[helper].send_signal(signal.SIGKILL)
    processes[helper].wait(30)

    row = finished(postgres_engine, job_id, {primary: processes[primary]}, logs)
    assert row.state == "succeeded", row.error
    assert row.attempts == 1
    trials = trial_rows(postgres_engine, job_id)
    numbers = [trial.number for trial in trials]
    assert len(numbers) == TRIALS
    assert len(set(numbers)) == TRIALS
    assert row.trials_done == TRIALS
    workers = {trial.worker_id for trial in trials}
    assert {helper, primary} <= workers
    # Trials the primary recorded for the dead helper have no worker: one it was running is
    # failed with the reason, one it finished but had not reported keeps its state.
    for trial in trials:
        if trial.worker_id is None and trial.state == "FAIL":
            assert "stopped before it finished" in trial.reason
    assert len([trial for trial in trials if trial.worker_id is None]) <= 2
    # The study's finished trials are the job's; numbers may skip enqueued trials never run.
    assert sorted(study_numbers(settings, job_id)) == numbers
    assert row.result["trial_counts"]["finished"] == TRIALS


def test_cancel_stops_primary_and_helper(settings, postgres_engine, tiny_under_root, device_file, two_workers):
    """Runs after the helper was killed: only one worker is left, so start a second one."""
    processes, logs = two_workers
    for name, process in list(processes.items()):
        if process.poll() is not None:
            processes[name] = worker_process(settings, name, logs / f"{name}-2.log")
    job_id = submit(postgres_engine, tiny_job_spec(str(tiny_under_root), str(device_file), trials=5000, seed=7))

    def both_reported():
        return len({trial.worker_id for trial in trial_rows(postgres_engine, job_id)}) == 2
    wait_for(both_reported, timeout=240, interval=0.2, message="both workers reported trials")
    assert queue.request_cancel(postgres_engine, job_id) == "running"
    row = finished(postgres_engine, job_id, processes, logs)
    assert row.state == "cancelled"
    kept = len(trial_rows(postgres_engine, job_id))
    assert 2 <= kept < 5000
    with postgres_engine.connect() as connection:
        assert connection.execute(select(JobLease).where(JobLease.job_id == job_id)).all() == []
    # Both processes go back to polling: neither runs a trial of the cancelled job afterwards.
    time.sleep(2 * settings.poll_seconds + 1.0)
    assert len(trial_rows(postgres_engine, job_id)) == kept
    assert all(process.poll() is None for process in processes.values())
