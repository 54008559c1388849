"""SQLAlchemy tables of the service database.

Times are Unix epoch seconds (float), so lease checks compare plain numbers on SQLite and
PostgreSQL alike; the API renders them as ISO 8601 strings.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.sql.expression import false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Job states. A job moves queued -> running -> succeeded | failed | cancelled; a running job
# whose lease expires goes back to queued until it has been claimed max_attempts times.
QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
JOB_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)


def now() -> float:
    return time.time()


class Base(DeclarativeBase):
    pass


class ModelRecord(Base):
    """A checkpoint directory the service may search: registered by path or uploaded."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    path: Mapped[str] = mapped_column(Text)
    # "registered" (a directory under a model root) or "uploaded" (copied into the data dir).
    source: Mapped[str] = mapped_column(String(20))
    arch: Mapped[str | None] = mapped_column(String(20))
    fingerprint: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Double, default=now)


class Device(Base):
    """A device whose latency measurements were uploaded."""

    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Double, default=now)

    measurements: Mapped[list[Measurement]] = relationship(
        back_populates="device", cascade="all, delete-orphan", passive_deletes=True
    )


class Measurement(Base):
    """One validated latency measurement record of a device, as parsed from an upload."""

    __tablename__ = "measurements"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    # Upload that brought the record in; records of one upload share it.
    upload_id: Mapped[str] = mapped_column(String(64))
    record: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Double, default=now)

    device: Mapped[Device] = relationship(back_populates="measurements")


class LatencyModel(Base):
    """A cost model fitted from a device's measurements; its parameters live in ``path``."""

    __tablename__ = "latency_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(Text)
    measurement_count: Mapped[int] = mapped_column(Integer)
    fit_report: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Double, default=now)


class Job(Base):
    """One search job and its lease."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_id", "state", "id"),
        CheckConstraint(
            "state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
            name="ck_jobs_state",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(20), default=QUEUED)
    # The SearchSpec as submitted (``to_dict``), before model and device names are resolved.
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    # Random token of the current claim; every write by the worker is conditional on it.
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[float | None] = mapped_column(Double)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Maximum number of workers running the job's search at once: its claiming worker plus the
    # helpers that join it. Only PostgreSQL takes helpers, so on SQLite a job stays on one worker.
    workers: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    trials_total: Mapped[int] = mapped_column(Integer)
    trials_done: Mapped[int] = mapped_column(Integer, default=0)
    best: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    out_dir: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Double, default=now)
    started_at: Mapped[float | None] = mapped_column(Double)
    finished_at: Mapped[float | None] = mapped_column(Double)

    trials: Mapped[list[Trial]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True,
        order_by="Trial.number",
    )


class Trial(Base):
    """One finished trial of a job's search, as reported through ``on_trial``."""

    __tablename__ = "job_trials"
    __table_args__ = (UniqueConstraint("job_id", "number", name="uq_job_trials_job_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(20))
    levels: Mapped[dict[str, int] | None] = mapped_column(JSON)
    quality: Mapped[float | None] = mapped_column(Double)
    predicted_latency_ms: Mapped[float | None] = mapped_column(Double)
    sparsity: Mapped[float | None] = mapped_column(Double)
    feasible: Mapped[bool | None] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text)
    seed_name: Mapped[str | None] = mapped_column(String(100))
    # The worker that ran the trial; None for trials of a dead worker found when resuming.
    worker_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[float] = mapped_column(Double, default=now)

    job: Mapped[Job] = relationship(back_populates="trials")


class JobLease(Base):
    """The lease of a helper: a worker that joined a running job to run trials of its study.

    The job's claiming worker (its primary) holds the lease on the job row; each helper holds
    one row here, renewed by its heartbeat and deleted when it leaves or its lease expires.
    """

    __tablename__ = "job_leases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    worker_id: Mapped[str] = mapped_column(String(200))
    token: Mapped[str] = mapped_column(String(64), unique=True)
    expires_at: Mapped[float] = mapped_column(Double)
    joined_at: Mapped[float] = mapped_column(Double, default=now)
