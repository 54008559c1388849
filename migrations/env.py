"""Alembic environment of the cn4 service database.

The version table is ``cn4_alembic_version`` because Optuna's RDB storage keeps its own
``alembic_version`` table in the same database. On SQLite, foreign keys are off while migrating
(batch migrations drop and recreate parent tables) and checked once at the end.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from service.db import VERSION_TABLE, create_db_engine
from service.tables import Base

config = context.config
target_metadata = Base.metadata

# Optuna's tables share the database; autogenerate must neither drop nor recreate them.
OPTUNA_TABLES = {
    "alembic_version", "studies", "study_directions", "study_user_attributes",
    "study_system_attributes", "trials", "trial_user_attributes", "trial_system_attributes",
    "trial_params", "trial_values", "trial_intermediate_values", "trial_heartbeats",
    "version_info",
}


def _include_object(obj, name, type_, reflected, compare_to) -> bool:
    return not (type_ == "table" and reflected and compare_to is None and name in OPTUNA_TABLES)


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    engine = create_db_engine(url, pool_size=1, foreign_keys=False)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                version_table=VERSION_TABLE,
                render_as_batch=True,
                include_object=_include_object,
            )
            with context.begin_transaction():
                context.run_migrations()
                if connection.dialect.name == "sqlite":
                    broken = connection.execute(text("PRAGMA foreign_key_check")).fetchall()
                    if broken:
                        raise RuntimeError(
                            f"migration left {len(broken)} rows with dangling foreign keys, "
                            f"first {broken[0]}; the migration was rolled back"
                        )
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
