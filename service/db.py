"""Database engines, sessions and schema migrations of the service.

SQLite is the single-machine default. Every connection turns on WAL, a busy timeout and foreign
keys. Every transaction starts with ``BEGIN IMMEDIATE``, so a transaction that reads before it
writes cannot fail on a stale snapshot when another writer commits in between. PostgreSQL
(psycopg 3) serves several workers on several machines.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from service.config import ServiceConfigError

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# Optuna's RDB storage keeps its own ``alembic_version`` table in the same database.
VERSION_TABLE = "cn4_alembic_version"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalise_url(url: str) -> str:
    """Return ``url`` with a PostgreSQL URL pinned to the psycopg 3 driver."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ServiceConfigError(
            f"database URL {url!r} is invalid: give sqlite:///PATH or "
            "postgresql://USER@HOST:PORT/DATABASE"
        ) from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ServiceConfigError(
            f"database backend {parsed.get_backend_name()!r} is not supported: use SQLite or "
            "PostgreSQL"
        )
    return parsed.render_as_string(hide_password=False)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def create_db_engine(url: str, *, pool_size: int = 10, foreign_keys: bool = True) -> Engine:
    """Create an engine for ``url``, with the SQLite connection settings applied on every connect.

    ``foreign_keys=False`` is for migrations only: SQLite batch migrations copy, drop and rename
    tables, and with foreign keys on, dropping a parent table deletes the rows of its children.
    """
    url = normalise_url(url)
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        _install_sqlite_hooks(engine, foreign_keys=foreign_keys)
        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=2 * pool_size, pool_pre_ping=True)


def _install_sqlite_hooks(engine: Engine, *, foreign_keys: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Driver-level autocommit, so the "begin" hook below decides how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # PRAGMA foreign_keys is ignored inside a transaction, so it is set here, before any.
        cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Yield a session that commits on success and rolls back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str):
    """Return an Alembic config that runs the migrations in ``migrations/`` against ``url``."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Alembic's config interpolates %-signs, which URL-encoded passwords contain.
    config.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the service schema at ``url`` to ``revision``."""
    from alembic import command

    logger.info("upgrading database schema to %s", revision)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Downgrade the service schema at ``url`` to ``revision`` (``base`` drops every table)."""
    from alembic import command

    logger.info("downgrading database schema to %s", revision)
    command.downgrade(alembic_config(url), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": VERSION_TABLE}
        )
        return context.get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    head = script.get_current_head()
    assert head is not None, "migrations/versions holds no revision"
    return head


def check_schema(engine: Engine) -> None:
    """Raise ServiceConfigError unless the database schema is at the newest migration."""
    current = current_revision(engine)
    head = head_revision()
    if current != head:
        found = "no cn4 tables" if current is None and not inspect(engine).has_table("jobs") else (
            f"revision {current}"
        )
        raise ServiceConfigError(
            f"the database at {engine.url.render_as_string(hide_password=True)} has {found}, "
            f"the code expects revision {head}: run `cn4 migrate`"
        )
