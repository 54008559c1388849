"""The job runner workers use by default: resolve the job's spec and run the Optuna search."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, bindparam, text

from service.resolve import resolve_spec
from service.worker import JobContext

logger = logging.getLogger(__name__)


def run_search_job(context: JobContext) -> dict[str, Any]:
    """Run ``search.study.run_search`` for the job and return its report.

    The report, ``summary.txt`` and the pruned checkpoint (``model/``) land in the attempt's
    output directory, which the API serves as the job's result.
    """
    from search.study import run_search

    spec = resolve_spec(context.engine, context.spec, context.settings, out_dir=context.out_dir)
    if context.storage is not None:
        create_study_tables(context.engine, context.storage)
    if context.helper:
        logger.info(
            "job %d: helping with the search of study %s (%d trials in all)", context.job_id,
            context.study_name, spec.trials,
        )
        storage = helper_storage(context.storage, trials=spec.trials)
        try:
            return run_search(
                spec, out_dir=None, on_trial=context.on_trial, should_stop=context.should_stop,
                storage=storage, study_name=context.study_name,
            )
        except StudyFull:
            logger.info("job %d: the study is full, helper leaves", context.job_id)
            return {}
        finally:
            storage.engine.dispose()
    if context.storage is not None and context.attempt > 1:
        for record in resume_study(context.storage, context.study_name):
            context.on_trial(record)
    logger.info(
        "job %d attempt %d: searching %s on device %s, %d trials", context.job_id,
        context.attempt, spec.model, spec.device, spec.trials,
    )
    report = run_search(
        spec,
        out_dir=context.out_dir,
        on_trial=context.on_trial,
        should_stop=context.should_stop,
        storage=context.storage,
        study_name=context.study_name,
    )
    if context.storage is None or context.workers < 2 or report.get("stopped"):
        return report
    if not settle_helpers(context, finished=report["trial_counts"]["finished"]):
        return report
    # Trials of helpers finished after this search built its report: build it again over the
    # whole study. The study is full, so this search runs no trials.
    logger.info("job %d: rebuilding the report to include the helpers' last trials", context.job_id)
    return run_search(
        spec,
        out_dir=context.out_dir,
        on_trial=context.on_trial,
        should_stop=context.should_stop,
        storage=context.storage,
        study_name=context.study_name,
    )


class StudyFull(Exception):
    """Raised in a helper's search when starting a trial would leave no room for the primary's."""


def helper_storage(storage_url: str, *, trials: int):
    """Return the Optuna storage a helper searches with: it starts a trial only while there is room.

    A search checks that the study counts fewer than ``trials`` trials and then requests one,
    so two workers passing the check at once overshoot the total (seen in the tests: 121 of
    120). A helper starts a trial only under a PostgreSQL advisory lock on the study and only
    while the study counts at most ``trials - 2`` trials, leaving the last place to the
    primary's one trial that may have passed its check already. Helpers are serialised by the
    lock and the primary adds at most one trial past any helper's, so the study never exceeds
    ``trials``. A helper refused a trial raises StudyFull out of its search.
    """
    import optuna
    from optuna.trial import TrialState

    counted = ("RUNNING", "COMPLETE", "PRUNED", "FAIL")

    class HelperStorage(optuna.storages.RDBStorage):
        # NOTE: Optuna's cached storage (which wraps every RDBStorage) creates trials through
        # the private _create_new_trial (optuna 5.1), so that is the method to guard.
        def _create_new_trial(self, study_id, template_trial=None):
            if template_trial is not None and template_trial.state != TrialState.RUNNING:
                # An enqueued (waiting) trial, not a trial starting.
                return super()._create_new_trial(study_id, template_trial)
            with self._room(study_id):
                return super()._create_new_trial(study_id, template_trial)

        def set_trial_state_values(self, trial_id, state, values=None):
            if state != TrialState.RUNNING:
                return super().set_trial_state_values(trial_id, state, values)
            # A waiting trial (an enqueued baseline, repair or neighbour) starting.
            with self._room(trial_id=trial_id):
                return super().set_trial_state_values(trial_id, state, values)

        @contextmanager
        def _room(self, study_id=None, *, trial_id=None):
            with self.engine.connect() as connection:
                if study_id is None:
                    study_id = connection.execute(
                        text("SELECT study_id FROM trials WHERE trial_id = :trial"),
                        {"trial": trial_id},
                    ).scalar_one()
                lock = {"key": STUDY_TRIALS_LOCK, "study": study_id}
                connection.execute(text("SELECT pg_advisory_lock(:key, :study)"), lock)
                try:
                    count = connection.execute(
                        text(
                            "SELECT COUNT(*) FROM trials "
                            "WHERE study_id = :study AND CAST(state AS TEXT) IN :states"
                        ).bindparams(bindparam("states", expanding=True)),
                        {"study": study_id, "states": list(counted)},
                    ).scalar_one()
                    if count > trials - 2:
                        raise StudyFull(f"study {study_id} counts {count} of {trials} trials")
                    yield
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:key, :study)"), lock)
                    connection.commit()

    return HelperStorage(storage_url)


# Keys of PostgreSQL advisory locks, "cn4t" and "cn4o" in ASCII: helpers starting trials of a
# study (the lock's second key is the study id), and Optuna creating its tables.
STUDY_TRIALS_LOCK = 0x636E3474
STUDY_TABLES_LOCK = 0x636E346F


def create_study_tables(engine: Engine, storage_url: str) -> None:
    """Create Optuna's tables in the service database unless they exist, one worker at a time.

    Optuna creates its tables when a storage is first opened. Two workers doing that at once on
    a fresh database collide (PostgreSQL refuses the second ``CREATE TYPE studydirection``)
    and one search fails, so the creation runs under an advisory lock.
    """
    import optuna

    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": STUDY_TABLES_LOCK})
        try:
            optuna.storages.RDBStorage(storage_url).engine.dispose()
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": STUDY_TABLES_LOCK})
            connection.commit()


def settle_helpers(context: JobContext, *, finished: int) -> bool:
    """Wait for the job's helpers to leave, then account for every trial of the study.

    The primary's search ends once the study counts ``spec.trials`` trials, running ones
    included, so helpers may still be finishing theirs. A helper leaves when its search ends;
    one that died holds its place until its lease expires. Trials still running after that
    belong to dead helpers and are marked failed. Trials missing from the job's trial table
    (those and any a helper finished but could not report) are recorded. Returns whether the
    study now contains more finished trials than ``finished``, the count the report was built on.
    Returns False at once when the job is stopped (cancel, lease loss or shutdown) meanwhile.
    """
    from service import queue

    while queue.live_helpers(context.engine, context.job_id) > 0:
        if context.should_stop():
            return False
        time.sleep(min(context.settings.poll_seconds, 1.0))
    records = resume_study(context.storage, context.study_name)
    reported = queue.reported_trials(context.engine, context.job_id)
    for record in records:
        if record["number"] not in reported:
            context.on_trial({**record, "worker_id": None})
    return len(records) > finished


def resume_study(storage_url: str, study_name: str) -> list[dict[str, Any]]:
    """Fail the running trials an earlier attempt left in the study; return every finished trial.

    A job is re-claimed only after its previous worker's lease expired, so that worker is gone
    and its running trials will never finish. The search counts running trials towards the
    total, so left alone they would shorten the resumed search. The returned records (in trial
    order, as ``on_trial`` receives them) let the job's trial table match the study, including
    trials the dead worker finished but could not report.
    """
    import optuna
    from optuna.trial import TrialState

    from search.study import finished_records

    storage = optuna.storages.RDBStorage(storage_url)
    try:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            # The earlier attempt died before creating its study.
            return []
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for trial in stale:
            # NOTE: FrozenTrial exposes no public storage id; Optuna's own fail_stale_trials
            # uses ``_trial_id`` the same way (optuna 5.1).
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        if stale:
            logger.warning(
                "study %s: marked %d running trials of an earlier attempt as failed", study_name,
                len(stale),
            )
        stale_numbers = {trial.number for trial in stale}
        records = finished_records(study)
    finally:
        storage.engine.dispose()
    for record in records:
        if record["number"] in stale_numbers:
            record["reason"] = "the worker running this trial stopped before it finished (lease expired)"
    return records
