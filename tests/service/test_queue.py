"""The job queue on SQLite and PostgreSQL: claims, leases, late results, cancel, idempotency."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import delete, func, select, update

from service import queue
from service.tables import Job, JobLease, Trial

pytestmark = pytest.mark.postgres


@pytest.fixture(autouse=True)
def empty_queue(engine):
    """Start every test with no jobs, so counts are exact."""
    with engine.begin() as connection:
        connection.execute(delete(Trial))
        connection.execute(delete(Job))
    yield


def submit(engine, count: int, *, trials: int = 4, max_attempts: int = 3) -> list[int]:
    jobs = [queue.NewJob(spec={"trials": trials, "seed": index}) for index in range(count)]
    return [job_id for job_id, _ in queue.submit_jobs(engine, jobs, max_attempts=max_attempts)]


def job_row(engine, job_id: int):
    with engine.connect() as connection:
        return connection.execute(select(Job).where(Job.id == job_id)).one()


def expire_lease(engine, job_id: int) -> None:
    with engine.begin() as connection:
        connection.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=time.time() - 1))


def trial_record(number: int, *, quality: float, feasible: bool = True) -> dict:
    return {
        "number": number, "state": "COMPLETE", "levels": {"layer.a": 2, "layer.b": 1},
        "quality": quality, "predicted_latency_ms": 1.5 + number, "sparsity": 0.375,
        "feasible": feasible, "reason": None if feasible else "over budget", "seed_name": None,
    }


def test_four_workers_claim_each_job_once(engine):
    job_ids = submit(engine, 50)
    claimed: dict[str, list[int]] = {f"worker-{n}": [] for n in range(4)}
    start = threading.Barrier(4)

    def claim_all(worker_id: str) -> None:
        start.wait()
        while (claim := queue.claim_next_job(engine, worker_id=worker_id, lease_seconds=30)) is not None:
            claimed[worker_id].append(claim.job_id)

    threads = [threading.Thread(target=claim_all, args=(name,)) for name in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    every_claim = [job_id for ids in claimed.values() for job_id in ids]
    assert len(every_claim) == 50
    assert sorted(every_claim) == sorted(job_ids)
    with engine.connect() as connection:
        rows = connection.execute(select(Job.id, Job.state, Job.attempts, Job.lease_owner)).all()
    assert {row.state for row in rows} == {"running"}
    assert {row.attempts for row in rows} == {1}
    owners = {row.id: row.lease_owner for row in rows}
    for worker_id, ids in claimed.items():
        assert all(owners[job_id] == worker_id for job_id in ids)


def test_claim_takes_oldest_and_returns_none_when_empty(engine):
    first, second = submit(engine, 2)
    claim = queue.claim_next_job(engine, worker_id="w", lease_seconds=30)
    assert claim.job_id == first
    assert claim.attempt == 1
    assert claim.spec == {"trials": 4, "seed": 0}
    assert queue.claim_next_job(engine, worker_id="w", lease_seconds=30).job_id == second
    assert queue.claim_next_job(engine, worker_id="w", lease_seconds=30) is None


def test_expired_lease_requeued_with_attempt_raised(engine):
    [job_id] = submit(engine, 1)
    claim = queue.claim_next_job(engine, worker_id="dead", lease_seconds=30)
    assert queue.requeue_expired(engine) == []
    expire_lease(engine, job_id)

    assert queue.requeue_expired(engine) == [(job_id, "queued")]
    row = job_row(engine, job_id)
    assert row.state == "queued"
    assert row.lease_token is None
    assert "dead" in row.error

    second = queue.claim_next_job(engine, worker_id="alive", lease_seconds=30)
    assert second.job_id == job_id
    assert second.attempt == 2
    assert second.token != claim.token


def test_expired_lease_fails_after_max_attempts(engine):
    [job_id] = submit(engine, 1, max_attempts=2)
    for _ in range(2):
        queue.claim_next_job(engine, worker_id="crashy", lease_seconds=30)
        expire_lease(engine, job_id)
        queue.requeue_expired(engine)
    row = job_row(engine, job_id)
    assert row.state == "failed"
    assert row.attempts == 2
    assert "attempt 2 of 2" in row.error
    assert queue.claim_next_job(engine, worker_id="w", lease_seconds=30) is None


def test_late_result_refused_after_lease_loss(engine):
    [job_id] = submit(engine, 1)
    stale = queue.claim_next_job(engine, worker_id="stalled", lease_seconds=30)
    assert queue.record_trial(engine, job_id, stale.token, trial_record(0, quality=0.5))
    expire_lease(engine, job_id)
    queue.requeue_expired(engine)
    fresh = queue.claim_next_job(engine, worker_id="fresh", lease_seconds=30)

    assert not queue.renew_lease(engine, job_id, stale.token, lease_seconds=30)
    assert not queue.record_trial(engine, job_id, stale.token, trial_record(1, quality=0.1))
    assert not queue.finish_job(engine, job_id, stale.token, state="succeeded", result={"from": "stale"})
    row = job_row(engine, job_id)
    assert row.state == "running"
    assert row.lease_owner == "fresh"
    assert row.result is None

    assert queue.finish_job(engine, job_id, fresh.token, state="succeeded", result={"from": "fresh"})
    assert not queue.finish_job(engine, job_id, stale.token, state="failed", error="late")
    row = job_row(engine, job_id)
    assert row.state == "succeeded"
    assert row.result == {"from": "fresh"}
    assert row.error is None
    with engine.connect() as connection:
        numbers = connection.execute(select(Trial.number).where(Trial.job_id == job_id)).scalars().all()
    assert numbers == [0]


def test_record_trial_tracks_progress_and_best(engine):
    [job_id] = submit(engine, 1, trials=5)
    claim = queue.claim_next_job(engine, worker_id="w", lease_seconds=30)
    assert queue.record_trial(engine, job_id, claim.token, trial_record(0, quality=0.4))
    assert queue.record_trial(engine, job_id, claim.token, trial_record(1, quality=0.1, feasible=False))
    assert queue.record_trial(engine, job_id, claim.token, trial_record(2, quality=0.2))
    # A trial number reported again replaces the earlier row instead of adding one.
    assert queue.record_trial(engine, job_id, claim.token, trial_record(0, quality=0.3))
    row = job_row(engine, job_id)
    assert row.trials_done == 3
    assert row.trials_total == 5
    assert row.best["number"] == 2
    assert row.best["quality"] == pytest.approx(0.2)
    assert row.best["levels"] == {"layer.a": 2, "layer.b": 1}
    with engine.connect() as connection:
        count = connection.execute(select(func.count()).select_from(Trial).where(Trial.job_id == job_id)).scalar_one()
    assert count == 3


def test_cancel_queued_and_running_jobs(engine):
    queued_id, running_id = submit(engine, 2)
    assert queue.request_cancel(engine, queued_id) == "cancelled"
    claim = queue.claim_next_job(engine, worker_id="w", lease_seconds=30)
    assert claim.job_id == running_id
    assert queue.lease_status(engine, running_id, claim.token) == (True, False)

    assert queue.request_cancel(engine, running_id) == "running"
    assert queue.lease_status(engine, running_id, claim.token) == (True, True)
    assert queue.finish_job(engine, running_id, claim.token, state="cancelled")
    assert job_row(engine, running_id).state == "cancelled"
    with pytest.raises(queue.JobStateConflict, match="already cancelled"):
        queue.request_cancel(engine, queued_id)
    with pytest.raises(queue.JobNotFound):
        queue.request_cancel(engine, 10**9)


def test_batch_resubmitted_creates_nothing(engine):
    jobs = [queue.NewJob(spec={"trials": 2, "seed": n}, idempotency_key=f"batch-a-{n}") for n in range(20)]
    first = queue.submit_jobs(engine, jobs, max_attempts=3)
    second = queue.submit_jobs(engine, jobs, max_attempts=3)
    assert [created for _, created in first] == [True] * 20
    assert [created for _, created in second] == [False] * 20
    assert [job_id for job_id, _ in first] == [job_id for job_id, _ in second]
    assert queue.count_by_state(engine) == {"queued": 20}


def test_reused_key_with_other_spec_rejected(engine):
    queue.submit_jobs(engine, [queue.NewJob(spec={"trials": 2}, idempotency_key="k")], max_attempts=3)
    with pytest.raises(queue.IdempotencyConflict, match="'k'"):
        queue.submit_jobs(engine, [queue.NewJob(spec={"trials": 3}, idempotency_key="k")], max_attempts=3)
    assert queue.count_by_state(engine) == {"queued": 1}


def test_release_job_returns_it_uncounted(engine):
    [job_id] = submit(engine, 1)
    claim = queue.claim_next_job(engine, worker_id="w", lease_seconds=30)
    assert queue.release_job(engine, job_id, claim.token)
    row = job_row(engine, job_id)
    assert row.state == "queued"
    assert row.attempts == 0


def test_helpers_join_a_running_job_up_to_its_workers(engine):
    """A second and third worker join a job of workers=3 once it reported a trial; a fourth finds
    no room. Each helper's trials, renewals and leave go through its own lease."""
    [(job_id, _)] = queue.submit_jobs(
        engine, [queue.NewJob(spec={"trials": 5}, workers=3)], max_attempts=3
    )
    primary = queue.claim_next_job(engine, worker_id="primary", lease_seconds=60)
    assert primary.workers == 3
    assert not primary.helper
    if engine.dialect.name != "postgresql":
        # SQLite keeps each job on one worker.
        queue.record_trial(engine, job_id, primary.token, trial_record(0, quality=0.5))
        assert queue.join_job(engine, worker_id="helper-1", lease_seconds=60) is None
        return
    # No trial reported yet: the study may not exist, so nobody joins.
    assert queue.join_job(engine, worker_id="helper-1", lease_seconds=60) is None
    assert queue.record_trial(engine, job_id, primary.token, {**trial_record(0, quality=0.5), "worker_id": "primary"})
    assert queue.join_job(engine, worker_id="primary", lease_seconds=60) is None
    first = queue.join_job(engine, worker_id="helper-1", lease_seconds=60)
    assert (first.job_id, first.helper) == (job_id, True)
    assert queue.join_job(engine, worker_id="helper-1", lease_seconds=60) is None
    second = queue.join_job(engine, worker_id="helper-2", lease_seconds=60)
    assert second.job_id == job_id
    assert queue.join_job(engine, worker_id="helper-3", lease_seconds=60) is None
    assert queue.live_helpers(engine, job_id) == 2

    assert queue.record_trial(engine, job_id, first.token, {**trial_record(1, quality=0.25), "worker_id": "helper-1"})
    assert queue.renew_lease(engine, job_id, first.token, lease_seconds=60, helper=True)
    assert queue.lease_status(engine, job_id, first.token, helper=True) == (True, False)
    # A helper token is no primary lease: it cannot write the result.
    assert not queue.finish_job(engine, job_id, first.token, state="succeeded", result={})
    row = job_row(engine, job_id)
    assert (row.trials_done, row.best["number"]) == (2, 1)

    # The second helper dies: once its lease expires its place is free for another worker.
    with engine.begin() as connection:
        connection.execute(
            update(JobLease).where(JobLease.token == second.token).values(expires_at=time.time() - 1)
        )
    assert queue.requeue_expired(engine) == []
    assert not queue.renew_lease(engine, job_id, second.token, lease_seconds=60, helper=True)
    assert not queue.record_trial(engine, job_id, second.token, trial_record(2, quality=0.1))
    third = queue.join_job(engine, worker_id="helper-3", lease_seconds=60)
    assert third.job_id == job_id
    assert queue.leave_job(engine, job_id, third.token)
    assert queue.live_helpers(engine, job_id) == 1

    queue.request_cancel(engine, job_id)
    assert queue.lease_status(engine, job_id, first.token, helper=True) == (True, True)
    assert queue.finish_job(engine, job_id, primary.token, state="cancelled")
    assert queue.lease_status(engine, job_id, first.token, helper=True) == (False, True)
    assert queue.live_helpers(engine, job_id) == 0
    with engine.connect() as connection:
        workers = dict(connection.execute(select(Trial.number, Trial.worker_id)).all())
    assert workers == {0: "primary", 1: "helper-1"}
