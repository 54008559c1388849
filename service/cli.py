"""Subcommands of the service: ``cn4 serve``, ``cn4 worker``, ``cn4 migrate``, ``cn4 submit``."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

logger = logging.getLogger(__name__)

MAX_PORT = 65535


def port_number(text: str) -> int:
    """Parse a ``--port`` value: a TCP port from 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: give a number from 0 to {MAX_PORT}") from None
    if not 0 <= port <= MAX_PORT:
        raise argparse.ArgumentTypeError(
            f"port {port} is out of range: give a number from 0 to {MAX_PORT} (0 for any free port)"
        )
    return port


def add_parser(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="start the REST API (with a worker thread unless --no-worker)",
        description="Start the REST API with uvicorn. On the default SQLite database the schema "
        "is migrated first and a worker thread runs jobs in the same process.",
    )
    serve.add_argument("--host", help="address to bind (default CN4_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=port_number, help="port to bind, 0 for any free port (default CN4_PORT or 8000)")
    serve.add_argument("--database-url", help="database URL (default CN4_DATABASE_URL or SQLite under CN4_HOME)")
    serve.add_argument("--no-worker", action="store_true", help="run no worker thread in the API process")
    serve.add_argument("--migrate", action="store_true",
                       help="upgrade the schema before starting, on PostgreSQL too")
    serve.set_defaults(func=run_serve)

    worker = subparsers.add_parser(
        "worker", help="run a job worker against the service database",
        description="Claim queued jobs and run their searches until stopped (SIGTERM or Ctrl-C "
        "put a running job back in the queue).",
    )
    worker.add_argument("--database-url", help="database URL (default CN4_DATABASE_URL)")
    worker.add_argument("--worker-id", help="name in logs and leases (default HOST:PID:THREAD)")
    worker.add_argument("--max-jobs", type=int, help="exit after running this many jobs")
    worker.add_argument("--exit-when-idle", action="store_true", help="exit when no job is queued")
    worker.add_argument("--lease-seconds", type=float, help="lease length in seconds (default CN4_LEASE_SECONDS or 60)")
    worker.add_argument("--heartbeat-seconds", type=float, help="seconds between lease renewals (default 10)")
    worker.add_argument("--poll-seconds", type=float, help="seconds between queue polls when idle (default 1)")
    worker.set_defaults(func=run_worker)

    migrate = subparsers.add_parser(
        "migrate", help="upgrade (or downgrade) the service database schema",
        description="Run the Alembic migrations in migrations/ (version table cn4_alembic_version).",
    )
    migrate.add_argument("--database-url", help="database URL (default CN4_DATABASE_URL)")
    migrate.add_argument("--revision", default="head", help="target revision (default head)")
    migrate.add_argument("--downgrade", action="store_true", help="downgrade to --revision instead")
    migrate.set_defaults(func=run_migrate)

    submit = subparsers.add_parser(
        "submit", help="submit a YAML or JSON Lines file of job specs to a cn4 server",
        description="Submit every job of FILE as one batch and print the job ids. Jobs with an "
        "idempotency_key are created once, however often the file is submitted.",
    )
    submit.add_argument("file", help="YAML list of job specs, or JSON Lines with one spec per line")
    submit.add_argument("--server", default=os.environ.get("CN4_SERVER", "http://127.0.0.1:8000"),
                        help="server URL (default CN4_SERVER or http://127.0.0.1:8000)")
    submit.add_argument("--token", default=os.environ.get("CN4_API_TOKEN"),
                        help="bearer token for the server (default CN4_API_TOKEN)")
    submit.add_argument("--wait", action="store_true", help="show progress until every job finishes")
    submit.add_argument("--poll-seconds", type=float, default=2.0, help="seconds between progress polls")
    submit.set_defaults(func=run_submit)


def _settings(args: argparse.Namespace, **fields: Any):
    """Build the settings from the options given and the environment.

    Invalid values raise one ServiceConfigError, which names the option or the ``CN4_*``
    variable of each value.
    """
    from pydantic import ValidationError

    from service.config import ServiceConfigError, ServiceSettings

    overrides = {name: value for name, value in fields.items() if value is not None}
    if getattr(args, "database_url", None):
        overrides["database_url"] = args.database_url
    try:
        return ServiceSettings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else "settings"
            if name in overrides:
                source = "--" + name.replace("_", "-")
            else:
                # The value may also come from the file named by CN4_CONFIG_FILE.
                source = f"CN4_{name.upper()}"
            if error["type"] == "value_error":
                problems.append(f"{source}: {error['msg'].removeprefix('Value error, ')}")
            else:
                problems.append(f"{source}={error['input']} is invalid: {error['msg']}")
        raise ServiceConfigError("; ".join(problems)) from None


def _check_database(url: str) -> None:
    """Raise ServiceConfigError if the database cannot be reached or its schema is not current."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from service import db
    from service.config import ServiceConfigError

    engine = db.create_db_engine(url, pool_size=1)
    try:
        db.check_schema(engine)
    except OperationalError as exc:
        raise ServiceConfigError(_unreachable_message(make_url(url), exc)) from None
    finally:
        engine.dispose()


def _upgrade(url: str, revision: str = "head") -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    from service import db
    from service.config import ServiceConfigError

    try:
        db.upgrade(url, revision)
    except OperationalError as exc:
        raise ServiceConfigError(_unreachable_message(make_url(url), exc)) from None


def _unreachable_message(url, exc) -> str:
    shown = url.render_as_string(hide_password=True)
    reason = str(exc.orig or exc).strip().splitlines()[0]
    return (
        f"cannot reach the database {shown} ({reason}): start the database server, or fix "
        "--database-url or CN4_DATABASE_URL"
    )


def _bind(host: str, port: int) -> socket.socket:
    """Return a socket bound to ``host:port``; raise ServiceConfigError if the bind fails."""
    from service.config import ServiceConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServiceConfigError(
                f"address {host}:{port} is already in use: pick another --port, or 0 for any "
                "free port"
            ) from None
        raise ServiceConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): check --host and --port"
        ) from None
    return sock


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api import create_app

    settings = _settings(args, host=args.host, port=args.port)
    settings.check_bind_safety()
    url = settings.resolved_database_url
    if args.migrate or url.startswith("sqlite"):
        _upgrade(url)
    # Check here, so a database that is down gives one error line instead of a failed start-up
    # of the app with tracebacks from uvicorn.
    _check_database(url)
    app = create_app(settings, embedded_worker=False if args.no_worker else None)

    sock = _bind(settings.host, settings.port)
    # Listen before printing the address, so clients that connect at once wait in the backlog
    # instead of being refused while uvicorn starts.
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
    print(f"cn4 serve: listening on http://{shown}:{port} (API docs at /docs)", flush=True)
    print(f"cn4 serve: dashboard at http://{shown}:{port}/", flush=True)
    logger.info("serving on %s:%d, token required for writes: %s", host, port, settings.token_required)
    config = uvicorn.Config(app, log_config=None, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from service import db
    from service.worker import Worker

    settings = _settings(
        args, lease_seconds=args.lease_seconds, heartbeat_seconds=args.heartbeat_seconds,
        poll_seconds=args.poll_seconds,
    )
    _check_database(settings.resolved_database_url)
    engine = db.create_db_engine(settings.resolved_database_url, pool_size=2)
    worker = Worker(engine, settings, worker_id=args.worker_id)

    def _stop(signum, _frame) -> None:
        logger.info("worker %s received signal %d, stopping", worker.worker_id, signum)
        worker.stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    try:
        worker.run(max_jobs=args.max_jobs, exit_when_idle=args.exit_when_idle)
    finally:
        engine.dispose()
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    from service import db

    settings = _settings(args)
    url = settings.resolved_database_url
    if args.downgrade:
        db.downgrade(url, args.revision)
    else:
        _upgrade(url, args.revision)
    engine = db.create_db_engine(url, pool_size=1)
    try:
        print(f"cn4 migrate: schema at revision {db.current_revision(engine)}")
    finally:
        engine.dispose()
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from service.client import Client, read_batch_file, wait_for_jobs

    entries = read_batch_file(args.file)
    client = Client(args.server, token=args.token)
    try:
        jobs = client.submit(entries)
        for entry, job in zip(entries, jobs):
            note = "" if job["created"] else " (already submitted)"
            print(f"line {entry.line}: job {job['id']}{note}")
        if not args.wait:
            return 0
        final = wait_for_jobs(client, [job["id"] for job in jobs], poll_seconds=args.poll_seconds)
    finally:
        client.close()
    failed = 0
    for job_id, job in sorted(final.items()):
        best = job.get("best") or {}
        quality = best.get("quality")
        summary = f" best quality {quality:.4g} at {best.get('predicted_latency_ms'):.3g} ms" if quality is not None else ""
        print(f"job {job_id}: {job['state']}{summary}" + (f" ({job['error']})" if job.get("error") else ""))
        failed += job["state"] != "succeeded"
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover - convenience for `python -m service.cli`
    from search.cli import main

    sys.exit(main())
