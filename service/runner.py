"""The job runner workers use by default: resolve the job's spec and run the Optuna search."""

from __future__ import annotations

import logging
from typing import Any

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
    if context.storage is not None and context.attempt > 1:
        for record in resume_study(context.storage, context.study_name):
            context.on_trial(record)
    logger.info(
        "job %d attempt %d: searching %s on device %s, %d trials", context.job_id,
        context.attempt, spec.model, spec.device, spec.trials,
    )
    return run_search(
        spec,
        out_dir=context.out_dir,
        on_trial=context.on_trial,
        should_stop=context.should_stop,
        storage=context.storage,
        study_name=context.study_name,
    )


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
