"""Workers: claim queued jobs, hold their lease from a heartbeat thread, run the search.

A worker runs one job at a time. While the job runs, a heartbeat thread renews the lease every
``heartbeat_seconds``; when a renewal fails (the lease expired and another worker took the job,
or the job vanished) ``should_stop`` returns true, and whatever the worker reports afterwards is
refused by the conditional writes in :mod:`service.queue`. Between jobs, and before each claim,
the worker re-queues jobs whose lease expired, so a killed worker's job is picked up again.

On PostgreSQL a worker that finds no queued job joins a running job with room for another
worker (``workers`` > 1) as a helper: it runs trials of the job's Optuna study and reports them
like the primary, but never writes the job's result. When its search ends, fails or loses its
lease, the helper leaves and the job goes on.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from service import queue
from service.config import ServiceSettings
from service.tables import CANCELLED, FAILED, SUCCEEDED

logger = logging.getLogger(__name__)


@dataclass
class JobContext:
    """Input of a job runner: the job, its output directory and the callbacks of the search."""

    job_id: int
    attempt: int
    spec: dict[str, Any]
    out_dir: Path
    on_trial: Callable[[dict[str, Any]], None]
    should_stop: Callable[[], bool]
    # Optuna RDB storage URL shared by the workers of this job, or None for an in-memory study.
    storage: str | None
    study_name: str
    settings: ServiceSettings
    engine: Engine = field(repr=False)
    # Maximum number of workers sharing the job's study, and whether this one joined as a helper.
    workers: int = 1
    helper: bool = False


# A job runner runs one job and returns its report. The default one runs the Optuna search.
JobRunner = Callable[[JobContext], dict[str, Any]]


class JobCancelled(Exception):
    """Raised by a runner that stopped because the job was cancelled."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 100000}"


class Worker:
    """A job worker bound to one database; ``run`` loops until ``stop`` is called.

    ``runner`` replaces the search (tests of the queue mechanics inject their own).
    """

    def __init__(
        self,
        engine: Engine,
        settings: ServiceSettings,
        *,
        runner: JobRunner | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.worker_id = worker_id or default_worker_id()
        self._runner = runner
        self._stopping = threading.Event()
        self.jobs_done = 0
        # Jobs this worker joined as a helper: it left their studies full and does not rejoin.
        self._helped: set[int] = set()

    @property
    def runner(self) -> JobRunner:
        if self._runner is None:
            from service.runner import run_search_job

            self._runner = run_search_job
        return self._runner

    def stop(self) -> None:
        """Ask the worker to finish: a running job is put back in the queue for another worker."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self, *, max_jobs: int | None = None, exit_when_idle: bool = False) -> int:
        """Claim and run jobs until stopped; return the number of jobs this worker ran."""
        logger.info(
            "worker %s started (lease %.1f s, heartbeat %.1f s, database %s)",
            self.worker_id, self.settings.lease_seconds, self.settings.heartbeat_seconds,
            self.engine.url.render_as_string(hide_password=True),
        )
        try:
            while not self.stopping:
                if max_jobs is not None and self.jobs_done >= max_jobs:
                    break
                ran = self.run_once()
                if not ran:
                    if exit_when_idle:
                        break
                    self._stopping.wait(self.settings.poll_seconds)
        finally:
            logger.info("worker %s stopped after %d jobs", self.worker_id, self.jobs_done)
        return self.jobs_done

    def run_once(self) -> bool:
        """Re-queue expired jobs, claim one job (or join a running one) and run it.

        Returns False when there was nothing to run.
        """
        try:
            queue.requeue_expired(self.engine)
            claim = queue.claim_next_job(
                self.engine, worker_id=self.worker_id, lease_seconds=self.settings.lease_seconds
            )
            if claim is None:
                claim = queue.join_job(
                    self.engine, worker_id=self.worker_id,
                    lease_seconds=self.settings.lease_seconds, skip=self._helped,
                )
        except Exception:
            # A database outage must not kill the worker: log it and try again after a poll.
            logger.exception("worker %s could not poll the queue", self.worker_id)
            return False
        if claim is None:
            return False
        try:
            self._run_claim(claim)
        except Exception:
            # Storing the outcome failed (database outage): the lease expires and the job is
            # re-queued, so the worker lives on.
            logger.exception("worker %s could not store the outcome of job %d", self.worker_id, claim.job_id)
        self.jobs_done += 1
        return True

    def _run_claim(self, claim: queue.Claim) -> None:
        if claim.helper:
            self._run_helper(claim)
            return
        lease = _Lease(self, claim)
        lease.start()
        out_dir = (
            self.settings.resolved_data_dir / "jobs" / str(claim.job_id) / f"attempt-{claim.attempt}"
        )
        context = self._context(claim, lease, out_dir)
        state, report, error = SUCCEEDED, None, None
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            report = self.runner(context)
            if lease.cancel_requested:
                state = CANCELLED
        except JobCancelled:
            state = CANCELLED
        except Exception as exc:
            if lease.lost:
                logger.warning(
                    "job %d failed after worker %s lost its lease: %s", claim.job_id,
                    self.worker_id, exc,
                )
            else:
                logger.error(
                    "job %d failed on worker %s (attempt %d): %s", claim.job_id, self.worker_id,
                    claim.attempt, exc,
                )
                logger.debug("traceback of job %d:\n%s", claim.job_id, traceback.format_exc())
            state, error = FAILED, f"{type(exc).__name__}: {exc}"
        finally:
            lease.close()

        if lease.cancel_requested and state == FAILED:
            state = CANCELLED
        if lease.stopped_for_shutdown and state != CANCELLED and not lease.lost:
            # The search was cut short by this worker's shutdown, not by the job: let another
            # worker run it again.
            if queue.release_job(self.engine, claim.job_id, claim.token):
                logger.info("worker %s put job %d back in the queue", self.worker_id, claim.job_id)
                return
        queue.finish_job(
            self.engine, claim.job_id, claim.token, state=state, result=report, error=error,
            out_dir=str(out_dir),
        )

    def _run_helper(self, claim: queue.Claim) -> None:
        """Run trials of a job another worker claimed; whatever happens, only leave the job."""
        self._helped.add(claim.job_id)
        lease = _Lease(self, claim)
        lease.start()
        # Device files the spec resolves to are written here; the report is the primary's.
        out_dir = (
            self.settings.resolved_data_dir / "jobs" / str(claim.job_id)
            / f"attempt-{claim.attempt}" / "helpers" / claim.token[:12]
        )
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.runner(self._context(claim, lease, out_dir))
        except Exception as exc:
            # A helper's failure leaves the job to its primary and the other helpers.
            logger.warning(
                "helper %s of job %d stopped on an error, the job goes on: %s: %s",
                self.worker_id, claim.job_id, type(exc).__name__, exc,
            )
            logger.debug("traceback of helper of job %d:\n%s", claim.job_id, traceback.format_exc())
        finally:
            lease.close()
            queue.leave_job(self.engine, claim.job_id, claim.token)
        logger.info("helper %s left job %d", self.worker_id, claim.job_id)

    def _context(self, claim: queue.Claim, lease: _Lease, out_dir: Path) -> JobContext:
        return JobContext(
            job_id=claim.job_id,
            attempt=claim.attempt,
            spec=claim.spec,
            out_dir=out_dir,
            on_trial=lease.on_trial,
            should_stop=lease.should_stop,
            storage=self._optuna_storage(),
            study_name=f"cn4-job-{claim.job_id}",
            settings=self.settings,
            engine=self.engine,
            workers=claim.workers,
            helper=claim.helper,
        )

    def _optuna_storage(self) -> str | None:
        # Several workers share one study only through a server database. On SQLite the study
        # stays in memory, so Optuna's writes do not compete for the job database's lock.
        if self.engine.dialect.name == "postgresql":
            return self.engine.url.render_as_string(hide_password=False)
        return None


class _Lease:
    """Heartbeat thread and stop checks of one claimed job."""

    def __init__(self, worker: Worker, claim: queue.Claim) -> None:
        self.worker = worker
        self.claim = claim
        self.lost = False
        self.cancel_requested = False
        self.stopped_for_shutdown = False
        self._closed = threading.Event()
        self._last_check = 0.0
        self._thread = threading.Thread(
            target=self._beat, name=f"cn4-lease-{claim.job_id}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._thread.join()

    def _beat(self) -> None:
        settings = self.worker.settings
        while not self._closed.wait(settings.heartbeat_seconds):
            try:
                held = queue.renew_lease(
                    self.worker.engine, self.claim.job_id, self.claim.token,
                    lease_seconds=settings.lease_seconds, helper=self.claim.helper,
                )
            except Exception:
                logger.exception(
                    "worker %s could not renew the lease of job %d", self.worker.worker_id,
                    self.claim.job_id,
                )
                continue
            if not held:
                self.lost = True
                logger.warning(
                    "worker %s lost the lease of job %d: stopping its search",
                    self.worker.worker_id, self.claim.job_id,
                )
                return

    def should_stop(self) -> bool:
        """Polled by the search between trials: stop on cancel, lease loss or worker shutdown."""
        if self.worker.stopping:
            self.stopped_for_shutdown = True
            return True
        if self.lost or self.cancel_requested:
            return True
        # Read the database at most once per poll interval, however often the search polls.
        if time.monotonic() - self._last_check < min(self.worker.settings.poll_seconds, 1.0):
            return False
        self._last_check = time.monotonic()
        try:
            held, cancel = queue.lease_status(
                self.worker.engine, self.claim.job_id, self.claim.token, helper=self.claim.helper
            )
        except Exception:
            logger.exception("worker %s could not check job %d", self.worker.worker_id, self.claim.job_id)
            return False
        if not held:
            self.lost = True
        if cancel:
            self.cancel_requested = True
            logger.info("job %d: cancel noticed by worker %s", self.claim.job_id, self.worker.worker_id)
        return self.lost or self.cancel_requested

    def on_trial(self, record: dict[str, Any]) -> None:
        record = {"worker_id": self.worker.worker_id, **record}
        try:
            stored = queue.record_trial(self.worker.engine, self.claim.job_id, self.claim.token, record)
        except Exception:
            logger.exception(
                "worker %s could not store trial %s of job %d", self.worker.worker_id,
                record.get("number"), self.claim.job_id,
            )
            return
        if not stored:
            self.lost = True
            logger.warning(
                "trial %s of job %d rejected: worker %s no longer holds the lease",
                record.get("number"), self.claim.job_id, self.worker.worker_id,
            )


class WorkerThread:
    """A worker running in a daemon thread of the API process (``cn4 serve``)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._thread = threading.Thread(target=worker.run, name="cn4-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        self.worker.stop()
        self._thread.join(timeout)
