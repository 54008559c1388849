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
