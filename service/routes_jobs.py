"""Routes under ``/v1/jobs``: submit, list, inspect, cancel, results and downloads."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import func, select

from search.spec import SearchSpec, SpecError
from service import queue
from service.api import MAX_ROW_ID, EngineDep, RowId, SessionDep, SettingsDep, WriteAccess
from service.resolve import check_spec
from service.schemas import (
    BatchItemOut,
    BatchOut,
    JobBatchCreate,
    JobCreate,
    JobOut,
    JobPage,
    JobResultOut,
    TrialOut,
    iso,
)
from service.tables import JOB_STATES, Job, Trial

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_PAGE = 500


def job_out(job: Job) -> dict[str, Any]:
    total = job.trials_total or 0
    return {
        "id": job.id,
        "state": job.state,
        "spec": job.spec,
        "idempotency_key": job.idempotency_key,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "cancel_requested": job.cancel_requested,
        "workers": job.workers,
        "progress": {
            "trials_done": job.trials_done,
            "trials_total": total,
            "fraction": min(1.0, job.trials_done / total) if total else 0.0,
        },
        "best": job.best,
        "error": job.error,
        "lease_owner": job.lease_owner,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
    }


def _validated(session, body: JobCreate, settings) -> queue.NewJob:
    spec = SearchSpec.from_dict(body.spec)
    check_spec(session, spec, settings)
    if body.workers > 1 and session.get_bind().dialect.name != "postgresql":
        raise SpecError(
            f"workers={body.workers} needs a PostgreSQL service database: on SQLite each job "
            "runs on one worker; leave workers at 1 or set CN4_DATABASE_URL to PostgreSQL"
        )
    return queue.NewJob(
        spec=spec.to_dict(), idempotency_key=body.idempotency_key, workers=body.workers
    )


def _get_job(session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise queue.JobNotFound(job_id)
    return job


@router.post("", status_code=201, response_model=JobOut, dependencies=[WriteAccess])
def create_job(body: JobCreate, session: SessionDep, engine: EngineDep, settings: SettingsDep):
    """Queue one search job. A known idempotency key returns the existing job, also with 201,
    so clients need one code path."""
    new_job = _validated(session, body, settings)
    # End the read transaction first: on SQLite it holds the write lock that submit_jobs needs.
    session.rollback()
    [(job_id, _created)] = queue.submit_jobs(engine, [new_job], max_attempts=settings.max_attempts)
    session.expire_all()
    return job_out(_get_job(session, job_id))


@router.post("/batch", status_code=201, response_model=BatchOut, dependencies=[WriteAccess])
def create_batch(body: JobBatchCreate, session: SessionDep, engine: EngineDep, settings: SettingsDep):
    """Queue many jobs at once; resubmitting a batch with idempotency keys creates nothing new."""
    if len(body.jobs) > settings.max_batch_jobs:
        raise HTTPException(
            status_code=413,
            detail=f"the batch holds {len(body.jobs)} jobs, the limit is {settings.max_batch_jobs}: "
            "split it into smaller batches",
        )
    new_jobs = []
    for index, item in enumerate(body.jobs):
        try:
            new_jobs.append(_validated(session, item, settings))
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=f"jobs[{index}]: {exc}") from None
    session.rollback()
    results = queue.submit_jobs(engine, new_jobs, max_attempts=settings.max_attempts)
    items = [
        BatchItemOut(id=job_id, created=created, idempotency_key=job.idempotency_key)
        for (job_id, created), job in zip(results, new_jobs)
    ]
    return BatchOut(jobs=items, created=sum(item.created for item in items))


@router.get("", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    state: str | None = Query(default=None, description="only jobs in this state"),
    limit: int = Query(default=50, ge=1, le=MAX_PAGE),
    offset: int = Query(default=0, ge=0, le=MAX_ROW_ID),
):
    """List jobs, newest first."""
    if state is not None and state not in JOB_STATES:
        raise HTTPException(
            status_code=422, detail=f"state={state!r} is unknown: use one of {list(JOB_STATES)}"
        )
    query = select(Job)
    count = select(func.count()).select_from(Job)
    if state is not None:
        query = query.where(Job.state == state)
        count = count.where(Job.state == state)
    jobs = session.execute(query.order_by(Job.id.desc()).limit(limit).offset(offset)).scalars()
    return {
        "items": [job_out(job) for job in jobs],
        "total": session.execute(count).scalar_one(),
        "limit": limit,
        "offset": offset,
    }


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: RowId, session: SessionDep):
    return job_out(_get_job(session, job_id))


@router.get("/{job_id}/trials", response_model=list[TrialOut])
def list_trials(job_id: RowId, session: SessionDep):
    """List every trial reported so far, by number, with levels, quality, latency and feasibility."""
    _get_job(session, job_id)
    trials = session.execute(
        select(Trial).where(Trial.job_id == job_id).order_by(Trial.number)
    ).scalars()
    return [
        {
            "number": trial.number, "attempt": trial.attempt, "state": trial.state,
            "levels": trial.levels, "quality": trial.quality,
            "predicted_latency_ms": trial.predicted_latency_ms, "sparsity": trial.sparsity,
            "feasible": trial.feasible, "reason": trial.reason, "seed_name": trial.seed_name,
            "worker_id": trial.worker_id,
            "created_at": iso(trial.created_at),
        }
        for trial in trials
    ]


@router.post("/{job_id}/cancel", response_model=JobOut, dependencies=[WriteAccess])
def cancel_job(job_id: RowId, session: SessionDep, engine: EngineDep):
    """Cancel a queued job, or ask a running job's worker to stop (it keeps its trials)."""
    queue.request_cancel(engine, job_id)
    session.expire_all()
    return job_out(_get_job(session, job_id))


def _output_dir(job: Job) -> Path:
    """Return the directory of the job's result, or raise 409 when it has none."""
    # A job cancelled while running keeps the result of its finished trials.
    if job.state in ("succeeded", "cancelled") and job.out_dir:
        return Path(job.out_dir)
    if job.state in ("failed", "cancelled"):
        reason = f" (error: {job.error})" if job.error else ""
        raise HTTPException(
            status_code=409,
            detail=f"job {job.id} is {job.state} and will never have a result{reason}: "
            "submit its spec again as a new job",
        )
    raise HTTPException(
        status_code=409,
        detail=f"job {job.id} is {job.state} and has no result yet: wait until it succeeds "
        f"(GET /v1/jobs/{job.id})",
    )


def _files(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file())


@router.get("/{job_id}/result", response_model=JobResultOut)
def get_result(job_id: RowId, session: SessionDep):
    """Return the search report of a finished job and the files it wrote."""
    job = _get_job(session, job_id)
    directory = _output_dir(job)
    return {"id": job.id, "state": job.state, "result": job.result, "files": _files(directory)}


@router.get("/{job_id}/download")
def download_zip(job_id: RowId, session: SessionDep):
    """Download everything the job wrote (report and exported model) as one zip file."""
    job = _get_job(session, job_id)
    directory = _output_dir(job)
    files = _files(directory)
    if not files:
        raise HTTPException(status_code=404, detail=f"job {job_id} wrote no files to {directory}")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in files:
            archive.write(directory / name, arcname=name)
    buffer.seek(0)
    return StreamingResponse(
        buffer,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="cn4-job-{job_id}.zip"'},
    )


@router.get("/{job_id}/files/{name:path}")
def download_file(job_id: RowId, name: str, session: SessionDep):
    """Download one file the job wrote, ``name`` as listed by GET /v1/jobs/{id}/result."""
    job = _get_job(session, job_id)
    directory = _output_dir(job).resolve()
    path = (directory / name).resolve()
    if not path.is_relative_to(directory) or not path.is_file():
        raise HTTPException(
            status_code=404,
            detail=f"job {job_id} has no file {name!r}: list its files with GET /v1/jobs/{job_id}/result",
        )
    return FileResponse(path, filename=path.name)
