"""The durable job queue: submission, claims, leases, trial records, results and cancellation.

Every write a worker makes about a job it runs is conditional on the job's ``lease_token``, the
random token of its claim. A worker that lost its lease (it stalled past ``lease_expires_at``
and another worker claimed the job) therefore cannot overwrite the new owner's state: its
writes match no row and the functions here return ``False``.

Claims are race-free on both backends. On SQLite one conditional ``UPDATE`` picks and claims the
oldest queued job, and its row count shows whether this worker won. On PostgreSQL the candidate
is selected with ``FOR UPDATE SKIP LOCKED``, so concurrent workers skip each other's rows instead
of waiting on them.

On PostgreSQL a job with ``workers`` > 1 also takes helpers: workers that join it while it runs
(:func:`join_job`) and run trials of its Optuna study. Each helper has a row of ``job_leases``
with its own token, which its trial records and renewals are conditional on. Helpers never write
the job's result, and a helper whose lease expires only frees its place.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete, func, insert, literal, or_, select, update
from sqlalchemy.exc import IntegrityError

from service.tables import (
    CANCELLED,
    FAILED,
    FINAL_STATES,
    QUEUED,
    RUNNING,
    Job,
    JobLease,
    Trial,
    now,
)

logger = logging.getLogger(__name__)

TRIAL_FIELDS = (
    "state", "levels", "quality", "predicted_latency_ms", "sparsity", "feasible", "reason",
    "seed_name",
)


class JobNotFound(LookupError):
    """A job id with no job."""


class JobStateConflict(Exception):
    """A request that the job's current state does not allow, e.g. cancelling a finished job."""


class IdempotencyConflict(Exception):
    """An idempotency key reused with a different job spec."""


@dataclass(frozen=True)
class NewJob:
    """One job to submit: its spec (``SearchSpec.to_dict()``), an optional idempotency key and
    the maximum number of workers that may run its search at once."""

    spec: dict[str, Any]
    idempotency_key: str | None = None
    workers: int = 1


@dataclass(frozen=True)
class Claim:
    """A job claimed by a worker: what the worker needs to run it and to write about it.

    ``helper`` is true for a worker that joined a job another worker claimed; its ``token`` is
    that of its row in ``job_leases``.
    """

    job_id: int
    token: str
    attempt: int
    spec: dict[str, Any]
    lease_expires_at: float
    workers: int = 1
    helper: bool = False


# --- submission -------------------------------------------------------------------------------


def submit_jobs(
    engine: Engine, jobs: Sequence[NewJob], *, max_attempts: int
) -> list[tuple[int, bool]]:
    """Insert ``jobs`` as queued and return ``(job id, created)`` for each, in order.

    A job whose idempotency key already exists is not inserted again: its existing id comes back
    with ``created=False``, so resubmitting a batch returns the same ids. Reusing a key with a
    different spec raises IdempotencyConflict. A key repeated inside one batch with the same
    spec maps to one job.
    """
    for attempt in range(3):
        try:
            return _submit_jobs_once(engine, jobs, max_attempts=max_attempts)
        except IntegrityError:
            # A concurrent submission inserted one of our keys between our read and our insert;
            # the next round finds it as existing.
            logger.debug("idempotency key race on submission, retrying (round %d)", attempt + 1)
    return _submit_jobs_once(engine, jobs, max_attempts=max_attempts)


def _submit_jobs_once(
    engine: Engine, jobs: Sequence[NewJob], *, max_attempts: int
) -> list[tuple[int, bool]]:
    keys = sorted({job.idempotency_key for job in jobs if job.idempotency_key is not None})
    with engine.begin() as connection:
        existing: dict[str, tuple[int, dict[str, Any]]] = {}
        for chunk_start in range(0, len(keys), 500):
            chunk = keys[chunk_start : chunk_start + 500]
            rows = connection.execute(
                select(Job.idempotency_key, Job.id, Job.spec).where(Job.idempotency_key.in_(chunk))
            )
            existing.update({key: (job_id, spec) for key, job_id, spec in rows})

        batch_specs: dict[str, dict[str, Any]] = {}
        to_insert: list[dict[str, Any]] = []
        for job in jobs:
            key = job.idempotency_key
            if key is None:
                to_insert.append(_job_row(job, max_attempts))
                continue
            known = existing[key][1] if key in existing else batch_specs.get(key)
            if known is not None:
                if known != job.spec:
                    raise IdempotencyConflict(
                        f"idempotency key {key!r} was already used for a different job spec: "
                        "use a new key for a new job"
                    )
                continue
            batch_specs[key] = job.spec
            to_insert.append(_job_row(job, max_attempts))

        new_ids: list[int] = []
        if to_insert:
            result = connection.execute(insert(Job).returning(Job.id, sort_by_parameter_order=True), to_insert)
            new_ids = [row[0] for row in result]

    fresh = iter(new_ids)
    created_for_key: dict[str, int] = {}
    answer: list[tuple[int, bool]] = []
    for job in jobs:
        key = job.idempotency_key
        if key is not None and key in existing:
            answer.append((existing[key][0], False))
        elif key is not None and key in created_for_key:
            answer.append((created_for_key[key], False))
        else:
            job_id = next(fresh)
            if key is not None:
                created_for_key[key] = job_id
            answer.append((job_id, True))
    created = [job_id for job_id, was_created in answer if was_created]
    if created:
        logger.info("queued %d jobs (ids %d..%d)", len(created), min(created), max(created))
    return answer


def _job_row(job: NewJob, max_attempts: int) -> dict[str, Any]:
    return {
        "state": QUEUED,
        "spec": job.spec,
        "idempotency_key": job.idempotency_key,
        "attempts": 0,
        "max_attempts": max_attempts,
        "cancel_requested": False,
        "workers": job.workers,
        "trials_total": int(job.spec.get("trials", 0)),
        "trials_done": 0,
        "created_at": now(),
    }


# --- claims and leases ------------------------------------------------------------------------


def claim_next_job(engine: Engine, *, worker_id: str, lease_seconds: float) -> Claim | None:
    """Claim the oldest queued job for ``worker_id`` and return it, or None when none is queued."""
    token = secrets.token_hex(16)
    claimed_at = now()
    expires = claimed_at + lease_seconds
    claim_values = {
        "state": RUNNING,
        "lease_owner": worker_id,
        "lease_token": token,
        "lease_expires_at": expires,
        "attempts": Job.attempts + 1,
        "started_at": func.coalesce(Job.started_at, claimed_at),
        "error": None,
    }
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            candidate = connection.execute(
                select(Job.id)
                .where(Job.state == QUEUED)
                .order_by(Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).scalar_one_or_none()
            if candidate is None:
                return None
            target = Job.id == candidate
        else:
            oldest = (
                select(Job.id).where(Job.state == QUEUED).order_by(Job.id).limit(1).scalar_subquery()
            )
            target = Job.id == oldest
        result = connection.execute(
            update(Job).where(target, Job.state == QUEUED).values(**claim_values)
        )
        if result.rowcount != 1:
            return None
        row = connection.execute(
            select(Job.id, Job.attempts, Job.spec, Job.workers).where(Job.lease_token == token)
        ).one()
    logger.info("worker %s claimed job %d (attempt %d)", worker_id, row.id, row.attempts)
    return Claim(
        job_id=row.id, token=token, attempt=row.attempts, spec=row.spec, lease_expires_at=expires,
        workers=row.workers,
    )


def join_job(
    engine: Engine, *, worker_id: str, lease_seconds: float, skip: Collection[int] = ()
) -> Claim | None:
    """Join the oldest running job that has room for another worker; None when none has.

    PostgreSQL only (on SQLite it returns None: each job stays on one worker). A job takes
    helpers once it reported its first trial, so its study exists and contains trials, and a
    joining search offsets its sampler seed instead of repeating the primary's proposals. A
    job whose trials are all reported takes no helper. A worker never joins its own job, a job
    it already helps, or a job id in ``skip`` (the worker passes the jobs it helped before,
    whose studies it left full).
    """
    if engine.dialect.name != "postgresql":
        return None
    token = secrets.token_hex(16)
    joined_at = now()
    expires = joined_at + lease_seconds

    def helper_count(job_id):
        return (
            select(func.count())
            .select_from(JobLease)
            .where(JobLease.job_id == job_id, JobLease.expires_at >= joined_at)
            .scalar_subquery()
        )

    with engine.begin() as connection:
        mine = select(JobLease.id).where(JobLease.job_id == Job.id, JobLease.worker_id == worker_id)
        candidate = connection.execute(
            select(Job.id)
            .where(
                Job.state == RUNNING,
                Job.workers > 1,
                Job.cancel_requested.is_(False),
                Job.trials_done >= 1,
                Job.trials_done < Job.trials_total,
                Job.lease_owner != worker_id,
                Job.id.not_in(list(skip)),
                ~mine.exists(),
                helper_count(Job.id) < Job.workers - 1,
            )
            .order_by(Job.id)
            .limit(1)
            .with_for_update(skip_locked=True, of=Job)
        ).scalar_one_or_none()
        if candidate is None:
            return None
        # The job row is locked, so the room counted here cannot be taken meanwhile; the
        # condition still guards the insert, and the row it returns shows whether this worker
        # joined (psycopg reports no row count for INSERT ... SELECT here).
        room = (
            select(
                Job.id, literal(worker_id), literal(token), literal(expires), literal(joined_at)
            )
            .where(
                Job.id == candidate,
                Job.state == RUNNING,
                helper_count(candidate) < Job.workers - 1,
            )
        )
        joined = connection.execute(
            insert(JobLease)
            .from_select(["job_id", "worker_id", "token", "expires_at", "joined_at"], room)
            .returning(JobLease.id)
        ).scalar_one_or_none()
        if joined is None:
            return None
        row = connection.execute(
            select(Job.id, Job.attempts, Job.spec, Job.workers).where(Job.id == candidate)
        ).one()
    logger.info("worker %s joined job %d as a helper (attempt %d)", worker_id, row.id, row.attempts)
    return Claim(
        job_id=row.id, token=token, attempt=row.attempts, spec=row.spec, lease_expires_at=expires,
        workers=row.workers, helper=True,
    )


def renew_lease(
    engine: Engine, job_id: int, token: str, *, lease_seconds: float, helper: bool = False
) -> bool:
    """Extend the lease of a running job; False when the lease was lost to expiry or cancel.

    With ``helper``, ``token`` is a helper's lease (see :func:`join_job`); it is lost when its
    row expired and was removed, or the job no longer runs.
    """
    with engine.begin() as connection:
        if helper:
            result = connection.execute(
                update(JobLease)
                .where(
                    JobLease.job_id == job_id,
                    JobLease.token == token,
                    select(Job.id).where(Job.id == job_id, Job.state == RUNNING).exists(),
                )
                .values(expires_at=now() + lease_seconds)
            )
        else:
            result = connection.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_token == token, Job.state == RUNNING)
                .values(lease_expires_at=now() + lease_seconds)
            )
    return result.rowcount == 1


def leave_job(engine: Engine, job_id: int, token: str) -> bool:
    """End a helper's lease (its search finished or stopped); False when it was already gone."""
    with engine.begin() as connection:
        result = connection.execute(
            delete(JobLease).where(JobLease.job_id == job_id, JobLease.token == token)
        )
    return result.rowcount == 1


def live_helpers(engine: Engine, job_id: int) -> int:
    """Return how many helpers hold an unexpired lease on ``job_id``."""
    with engine.connect() as connection:
        return connection.execute(
            select(func.count())
            .select_from(JobLease)
            .where(JobLease.job_id == job_id, JobLease.expires_at >= now())
        ).scalar_one()


def requeue_expired(engine: Engine) -> list[tuple[int, str]]:
    """Re-queue running jobs whose lease expired, or fail them after ``max_attempts`` claims.

    A job whose cancel was requested becomes cancelled instead. Returns ``(job id, new state)``
    for every job changed here.
    """
    checked_at = now()
    changed: list[tuple[int, str]] = []
    with engine.begin() as connection:
        gone = connection.execute(
            delete(JobLease)
            .where(JobLease.expires_at < checked_at)
            .returning(JobLease.job_id, JobLease.worker_id)
        ).all()
        for job_id, worker_id in gone:
            logger.warning(
                "helper %s of job %d let its lease expire: its place is free", worker_id, job_id
            )
        expired = connection.execute(
            select(
                Job.id, Job.lease_token, Job.lease_owner, Job.attempts, Job.max_attempts,
                Job.cancel_requested,
            ).where(Job.state == RUNNING, Job.lease_expires_at < checked_at)
        ).all()
        for row in expired:
            values: dict[str, Any] = {
                "lease_owner": None, "lease_token": None, "lease_expires_at": None,
            }
            if row.cancel_requested:
                values.update(state=CANCELLED, finished_at=checked_at)
            elif row.attempts >= row.max_attempts:
                values.update(
                    state=FAILED,
                    finished_at=checked_at,
                    error=(
                        f"the lease of worker {row.lease_owner} expired on attempt "
                        f"{row.attempts} of {row.max_attempts}: the job was given up"
                    ),
                )
            else:
                values.update(
                    state=QUEUED,
                    error=f"the lease of worker {row.lease_owner} expired on attempt {row.attempts}",
                )
            result = connection.execute(
                update(Job)
                .where(Job.id == row.id, Job.lease_token == row.lease_token, Job.state == RUNNING)
                .values(**values)
            )
            if result.rowcount == 1:
                changed.append((row.id, values["state"]))
                # The helpers of the old claim stop: their leases are gone.
                connection.execute(delete(JobLease).where(JobLease.job_id == row.id))
    for job_id, state in changed:
        if state == QUEUED:
            logger.warning("job %d lease expired, re-queued for another attempt", job_id)
        else:
            logger.warning("job %d lease expired, job is now %s", job_id, state)
    return changed


def release_job(engine: Engine, job_id: int, token: str) -> bool:
    """Put a running job back in the queue without counting the attempt (a worker shutting down)."""
    with engine.begin() as connection:
        result = connection.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_token == token, Job.state == RUNNING)
            .values(
                state=QUEUED, lease_owner=None, lease_token=None, lease_expires_at=None,
                attempts=Job.attempts - 1,
            )
        )
        if result.rowcount == 1:
            connection.execute(delete(JobLease).where(JobLease.job_id == job_id))
    return result.rowcount == 1


# --- progress and results ---------------------------------------------------------------------


def record_trial(engine: Engine, job_id: int, token: str, record: Mapping[str, Any]) -> bool:
    """Store one trial record of a running job and update its progress and best feasible trial.

    ``token`` is the lease of the job's primary or of one of its helpers. The record's
    ``worker_id``, when present, names the worker that ran the trial. A trial number reported
    again (a re-queued job repeating its search) replaces the earlier row. Returns False,
    storing nothing, when ``token`` no longer holds a lease on the job.
    """
    number = int(record["number"])
    values = {name: _json_safe(record.get(name)) for name in TRIAL_FIELDS}
    values["state"] = str(values["state"] or "complete")
    values["worker_id"] = record.get("worker_id")
    with engine.begin() as connection:
        helper = select(JobLease.id).where(JobLease.job_id == job_id, JobLease.token == token)
        owned = select(Job.attempts).where(
            Job.id == job_id, or_(Job.lease_token == token, helper.exists()), Job.state == RUNNING
        )
        if engine.dialect.name == "postgresql":
            owned = owned.with_for_update()
        attempt = connection.execute(owned).scalar_one_or_none()
        if attempt is None:
            return False
        connection.execute(delete(Trial).where(Trial.job_id == job_id, Trial.number == number))
        connection.execute(
            insert(Trial).values(
                job_id=job_id, number=number, attempt=attempt, created_at=now(), **values
            )
        )
        done = connection.execute(
            select(func.count()).select_from(Trial).where(Trial.job_id == job_id)
        ).scalar_one()
        best = _best_feasible(connection, job_id)
        connection.execute(
            update(Job).where(Job.id == job_id).values(trials_done=done, best=best)
        )
    return True


def reported_trials(engine: Engine, job_id: int) -> set[int]:
    """Return the numbers of the trials stored for ``job_id``."""
    with engine.connect() as connection:
        return set(
            connection.execute(select(Trial.number).where(Trial.job_id == job_id)).scalars()
        )


def _best_feasible(connection, job_id: int) -> dict[str, Any] | None:
    trial = connection.execute(
        select(
            Trial.number, Trial.quality, Trial.predicted_latency_ms, Trial.sparsity, Trial.levels
        )
        .where(Trial.job_id == job_id, Trial.feasible.is_(True), Trial.quality.is_not(None))
        .order_by(Trial.quality, Trial.number)
        .limit(1)
    ).first()
    if trial is None:
        return None
    return {
        "number": trial.number,
        "quality": trial.quality,
        "predicted_latency_ms": trial.predicted_latency_ms,
        "sparsity": trial.sparsity,
        "levels": trial.levels,
    }


def finish_job(
    engine: Engine,
    job_id: int,
    token: str,
    *,
    state: str,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    out_dir: str | None = None,
) -> bool:
    """Store the outcome of a running job and end its lease.

    Returns False, writing nothing, when ``token`` no longer holds the lease: the result of a
    worker that lost its job is refused, so it can neither overwrite nor duplicate another's.
    """
    if state not in FINAL_STATES:
        raise ValueError(f"state={state!r} is not final: use one of {FINAL_STATES}")
    with engine.begin() as connection:
        outcome = connection.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_token == token, Job.state == RUNNING)
            .values(
                state=state,
                result=_json_safe(result) if result is not None else None,
                error=error,
                out_dir=out_dir,
                finished_at=now(),
                lease_owner=None,
                lease_token=None,
                lease_expires_at=None,
            )
        )
        if outcome.rowcount == 1:
            connection.execute(delete(JobLease).where(JobLease.job_id == job_id))
    if outcome.rowcount != 1:
        logger.warning(
            "result of job %d rejected: the lease was lost before it arrived (expired or taken "
            "over by another worker)", job_id,
        )
        return False
    logger.info("job %d finished: %s", job_id, state)
    return True


# --- cancellation -----------------------------------------------------------------------------


def request_cancel(engine: Engine, job_id: int) -> str:
    """Cancel a queued job at once, or ask the worker running it to stop; return the new state.

    A running job stays ``running`` with ``cancel_requested`` set until its worker notices
    (within its poll interval), stops the search and stores the trials done so far.
    """
    with engine.begin() as connection:
        queued = connection.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == QUEUED)
            .values(state=CANCELLED, finished_at=now())
        )
        if queued.rowcount == 1:
            logger.info("job %d cancelled while queued", job_id)
            return CANCELLED
        running = connection.execute(
            update(Job).where(Job.id == job_id, Job.state == RUNNING).values(cancel_requested=True)
        )
        if running.rowcount == 1:
            logger.info("job %d: cancel requested from its worker", job_id)
            return RUNNING
        state = connection.execute(select(Job.state).where(Job.id == job_id)).scalar_one_or_none()
    if state is None:
        raise JobNotFound(job_id)
    raise JobStateConflict(f"job {job_id} is already {state}: only queued or running jobs can be cancelled")


def lease_status(
    engine: Engine, job_id: int, token: str, *, helper: bool = False
) -> tuple[bool, bool]:
    """Return ``(lease held, cancel requested)`` for the claim ``token`` of ``job_id``.

    With ``helper``, ``token`` is a helper's lease, held while its row exists and the job runs.
    """
    with engine.connect() as connection:
        row = connection.execute(
            select(Job.lease_token, Job.state, Job.cancel_requested).where(Job.id == job_id)
        ).first()
        if row is not None and helper:
            mine = connection.execute(
                select(JobLease.id).where(JobLease.job_id == job_id, JobLease.token == token)
            ).first()
    if row is None:
        return False, False
    if helper:
        held = mine is not None and row.state == RUNNING
    else:
        held = row.lease_token == token and row.state == RUNNING
    return held, bool(row.cancel_requested)


def count_by_state(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {state: count for state, count in rows}


def _json_safe(value: Any) -> Any:
    """Return ``value`` with NaN and infinities replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return [_json_safe(item) for item in value]
    return value
