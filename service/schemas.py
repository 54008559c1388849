"""Request and response bodies of the REST API (pydantic models)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def iso(timestamp: float | None) -> str | None:
    """Render epoch seconds as an ISO 8601 UTC string."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="milliseconds")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- models -----------------------------------------------------------------------------------


class ModelRegister(Strict):
    """Register a checkpoint directory that lies under one of the configured model roots."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$")
    path: str = Field(min_length=1)


class LayerOut(BaseModel):
    name: str
    block: int | None
    kind: str
    out_features: int
    in_features: int
    eligible: bool
    reason: str | None


class ModelOut(BaseModel):
    id: int | None
    name: str
    path: str
    source: str
    arch: str | None
    fingerprint: str | None
    created_at: str | None


class ModelDetail(ModelOut):
    layers: list[LayerOut]
    eligible_layers: int
    eligible_weights: int


# --- devices, measurements, latency models ----------------------------------------------------


class DeviceCreate(Strict):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")
    description: str = Field(default="", max_length=2000)


class DeviceOut(BaseModel):
    id: int
    name: str
    description: str
    measurement_count: int
    latest_latency_model_id: int | None
    created_at: str | None


class MeasurementUploadOut(BaseModel):
    device_id: int
    upload_id: str
    records: int
    warnings: list[str]


class LatencyModelFit(Strict):
    """Fit settings; each may stay unset when the measurements hold a single value of it."""

    backend: str | None = None
    dtype: str | None = None
    threads: int | None = Field(default=None, ge=1)
    holdout: float = Field(default=0.75, ge=0.0, le=1.0)


class LatencyModelOut(BaseModel):
    id: int
    device_id: int
    measurement_count: int
    models: list[str]
    fit_report: dict[str, Any]
    warnings: list[str]
    created_at: str | None


class PredictRequest(Strict):
    """A level map to predict, with layer shapes from ``checkpoint`` or given in ``layers``.

    ``model`` is the model key of the cost model's measurements; it may be left unset when the
    cost model covers one model only. With ``checkpoint`` (a registered model name or
    ``default``), eligible layers missing from ``levels`` count as dense (level 0).
    """

    model: str | None = None
    checkpoint: str | None = None
    levels: dict[str, int] = Field(default_factory=dict)
    layers: list[tuple[int, int, int]] | None = None
    tokens: int = Field(default=1, ge=1)


class PredictOut(BaseModel):
    latency_ms: float
    model: str
    tokens: int
    layers: int


# --- jobs -------------------------------------------------------------------------------------


class JobCreate(Strict):
    """A search job: its SearchSpec settings and an optional idempotency key."""

    spec: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Maximum number of workers that may run trials of this job's search at once. The "
            "worker that claims the job runs it. While it runs, idle workers join until this "
            "many share its Optuna study, and the claiming worker writes the result. More than "
            "1 needs a PostgreSQL service database: on SQLite each job runs on one worker and a "
            "value over 1 is rejected with 422."
        ),
    )


class JobBatchCreate(Strict):
    jobs: list[JobCreate] = Field(min_length=1)


class Progress(BaseModel):
    trials_done: int
    trials_total: int
    fraction: float


class JobOut(BaseModel):
    id: int
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    spec: dict[str, Any]
    idempotency_key: str | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    workers: int = Field(
        description="Maximum number of workers that may run trials of the job at once."
    )
    progress: Progress
    best: dict[str, Any] | None
    error: str | None
    lease_owner: str | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class BatchItemOut(BaseModel):
    id: int
    created: bool
    idempotency_key: str | None


class BatchOut(BaseModel):
    jobs: list[BatchItemOut]
    created: int


class TrialOut(BaseModel):
    number: int
    attempt: int
    state: str
    levels: dict[str, int] | None
    quality: float | None
    predicted_latency_ms: float | None
    sparsity: float | None
    feasible: bool | None
    reason: str | None
    seed_name: str | None
    worker_id: str | None = Field(
        description="The worker that ran the trial; null for a trial of a worker that died."
    )
    created_at: str | None


class JobResultOut(BaseModel):
    id: int
    state: str
    result: dict[str, Any] | None
    files: list[str]


class Health(BaseModel):
    status: Literal["ok"]
    database: str
    schema_revision: str | None
    jobs: dict[str, int]
