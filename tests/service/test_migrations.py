"""Alembic migrations on a database that contains data: every step down and up keeps every row."""

from __future__ import annotations

import pytest
from service_testing import BACKENDS, create_database, drop_database
from sqlalchemy import func, inspect, select, text

from service import db, queue
from service.tables import Device, Job, Measurement, Trial

pytestmark = pytest.mark.postgres

@pytest.fixture(params=BACKENDS)
def empty_database_url(request, tmp_path):
    """A fresh, empty database per test (migrations change the schema)."""
    url = create_database(request.param, tmp_path)
    yield url
    drop_database(url)


COUNTED_TABLES = ("jobs", "job_trials", "devices", "measurements", "models", "latency_models")


def row_counts(engine) -> dict[str, int]:
    with engine.connect() as connection:
        return {
            table: connection.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
            for table in COUNTED_TABLES
        }


def fill(engine) -> None:
    """Jobs in several states with trials, and a device with measurements."""
    jobs = [queue.NewJob(spec={"trials": 3, "seed": n}, idempotency_key=f"mig-{n}") for n in range(6)]
    queue.submit_jobs(engine, jobs, max_attempts=3)
    for _ in range(3):
        claim = queue.claim_next_job(engine, worker_id="migration-test", lease_seconds=600)
        for number in range(3):
            queue.record_trial(engine, claim.job_id, claim.token, {
                "number": number, "state": "COMPLETE", "levels": {"a": number}, "quality": 0.1 * number,
                "predicted_latency_ms": 1.0, "sparsity": 0.25, "feasible": True,
            })
    queue.finish_job(engine, claim.job_id, claim.token, state="succeeded", result={"ok": True})
    with engine.begin() as connection:
        device_id = connection.execute(
            Device.__table__.insert().values(name="mig-box", description="", created_at=1.0)
        ).inserted_primary_key[0]
        connection.execute(Measurement.__table__.insert(), [
            {"device_id": device_id, "upload_id": "u1", "record": {"op": "linear", "median_ms": 0.1 * n},
             "created_at": 1.0}
            for n in range(1, 8)
        ])


def test_downgrade_and_upgrade_keep_rows(empty_database_url):
    db.upgrade(empty_database_url)
    engine = db.create_db_engine(empty_database_url)
    try:
        assert db.current_revision(engine) == "0003"
        fill(engine)
        before = row_counts(engine)
        assert before == {
            "jobs": 6, "job_trials": 9, "devices": 1, "measurements": 7, "models": 0, "latency_models": 0,
        }

        db.downgrade(empty_database_url, "0002")
        engine.dispose()
        assert db.current_revision(engine) == "0002"
        assert row_counts(engine) == before
        assert "job_leases" not in inspect(engine).get_table_names()
        assert "workers" not in {column["name"] for column in inspect(engine).get_columns("jobs")}

        db.downgrade(empty_database_url, "0001")
        engine.dispose()
        assert db.current_revision(engine) == "0001"
        assert row_counts(engine) == before
        columns = {column["name"] for column in inspect(engine).get_columns("jobs")}
        assert "cancel_requested" not in columns

        db.upgrade(empty_database_url)
        engine.dispose()
        assert db.current_revision(engine) == "0003"
        assert row_counts(engine) == before
        with engine.connect() as connection:
            states = sorted(connection.execute(select(Job.state)).scalars())
            cancel_flags = set(connection.execute(select(Job.cancel_requested)).scalars())
            worker_counts = set(connection.execute(select(Job.workers)).scalars())
            trial_workers = set(connection.execute(select(Trial.worker_id)).scalars())
            trial_jobs = connection.execute(select(func.count(func.distinct(Trial.job_id)))).scalar_one()
        assert states == ["queued"] * 3 + ["running"] * 2 + ["succeeded"]
        assert cancel_flags == {False}
        assert worker_counts == {1}
        assert trial_workers == {None}
        assert trial_jobs == 3
        if engine.dialect.name == "sqlite":
            with engine.connect() as connection:
                assert connection.execute(text("PRAGMA foreign_key_check")).fetchall() == []
                assert connection.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
    finally:
        engine.dispose()


def test_version_table_leaves_optuna_alone(empty_database_url):
    """The service's version table is cn4_alembic_version; Optuna's storage can share the database."""
    import optuna

    db.upgrade(empty_database_url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(db.normalise_url(empty_database_url))
    study = optuna.create_study(storage=storage, study_name="shared")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    engine = db.create_db_engine(empty_database_url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"cn4_alembic_version", "alembic_version", "jobs", "job_trials", "trials", "studies"} <= tables
        assert db.current_revision(engine) == "0003"
        db.check_schema(engine)
        db.downgrade(empty_database_url, "base")
        remaining = set(inspect(engine).get_table_names())
        assert "jobs" not in remaining
        assert "trials" in remaining
        assert len(optuna.load_study(study_name="shared", storage=storage).trials) == 2
    finally:
        engine.dispose()
        storage.engine.dispose()


def test_check_schema_names_the_fix(empty_database_url):
    engine = db.create_db_engine(empty_database_url)
    try:
        with pytest.raises(Exception, match="cn4 migrate"):
            db.check_schema(engine)
    finally:
        engine.dispose()
