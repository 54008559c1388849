"""The FastAPI application: ``create_app`` wires settings, the database, routes and security.

Every error body is JSON with a readable ``detail`` that names the value and the fix. Write
requests need ``Authorization: Bearer <token>`` whenever a token is required (see
:attr:`ServiceSettings.token_required`). Request bodies are limited in size per route.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from search.errors import Cn4Error
from search.spec import SpecError
from service import db, queue
from service.config import ServiceSettings
from service.schemas import Health

logger = logging.getLogger(__name__)

# Bodies of JSON requests (a batch of a few thousand specs fits easily).
MAX_JSON_BYTES = 16 * 1024 * 1024

# Largest id the tables can hold: their id columns are INTEGER, 4 bytes on PostgreSQL. A larger
# id in a path would fail in the database driver (a 500) instead of being rejected with a 422.
MAX_ROW_ID = 2**31 - 1

RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID, description=f"database id, 1 to {MAX_ROW_ID}")]


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


def get_session(request: Request):
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        yield session


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]


def require_token(request: Request) -> None:
    """Reject a write request without the configured bearer token (when one is required)."""
    settings: ServiceSettings = request.app.state.settings
    if not settings.token_required:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise HTTPException(
            status_code=401,
            detail="this server requires a bearer token for writes: send 'Authorization: Bearer TOKEN'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(given.strip().encode(), str(settings.api_token).encode()):
        raise HTTPException(
            status_code=401,
            detail="the bearer token is invalid: use the token the server was started with (CN4_API_TOKEN)",
            headers={"WWW-Authenticate": "Bearer"},
        )


WriteAccess = Depends(require_token)


class BodyLimitMiddleware:
    """Reject with 413 a request body over the limit of its route, counting streamed bytes."""

    def __init__(self, app, settings: ServiceSettings) -> None:
        self.app = app
        self.settings = settings

    def limit_for(self, path: str) -> int:
        if path.startswith("/v1/models/upload"):
            return self.settings.max_upload_bytes
        if path.endswith("/measurements"):
            return self.settings.max_measurement_bytes
        return MAX_JSON_BYTES

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(send, limit)
            return
        received = 0
        exceeded = False
        response_started = False

        async def counting_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message) -> None:
            nonlocal response_started
            if exceeded:
                if message["type"] == "http.response.start" and not response_started:
                    response_started = True
                    await self._reject(send, limit)
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, guarded_send)

    @staticmethod
    async def _reject(send, limit: int) -> None:
        body = json.dumps(
            {"detail": f"the request body exceeds the limit of {limit} bytes for this route: "
             "send a smaller file, or raise the limit (CN4_MAX_UPLOAD_BYTES, "
             "CN4_MAX_MEASUREMENT_BYTES)"}
        ).encode()
        await send({
            "type": "http.response.start", "status": 413,
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
        })
        await send({"type": "http.response.body", "body": body})


class UnexpectedErrorMiddleware:
    """Convert an unexpected exception into a 500 JSON detail and log its traceback once.

    A handler registered for ``Exception`` would not do: Starlette's ServerErrorMiddleware
    re-raises after calling it, so uvicorn logs the same traceback a second time. This middleware
    sits inside ServerErrorMiddleware and does not re-raise, unless the response has started
    already; then uvicorn logs the error and closes the connection.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False

        async def tracking_send(message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if response_started:
                raise
            method, path = scope["method"], scope["path"]
            logger.exception("%s %s failed", method, path)
            response = JSONResponse(
                status_code=500,
                content={"detail": f"internal error while handling {method} {path} "
                         f"({type(exc).__name__}: {exc}); the server log has the traceback"},
            )
            await response(scope, receive, send)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(item) for item in error.get("loc", ()) if item != "body")
        parts.append(f"{location or 'body'}: {error.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def create_app(
    settings: ServiceSettings | None = None,
    *,
    engine: Engine | None = None,
    embedded_worker: bool | None = None,
) -> FastAPI:
    """Build the API. The schema must be migrated already (``cn4 migrate``).

    With ``embedded_worker`` (default: ``settings.embedded_worker``), a worker thread runs jobs
    inside the API process for as long as the app runs.
    """
    settings = settings or ServiceSettings()
    own_engine = engine is None
    engine = engine or db.create_db_engine(settings.resolved_database_url)
    run_worker = settings.embedded_worker if embedded_worker is None else embedded_worker

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db.check_schema(engine)
        worker_thread = None
        if run_worker:
            from service.worker import Worker, WorkerThread

            worker_thread = WorkerThread(Worker(engine, settings))
            worker_thread.start()
        logger.info("API started (database %s)", engine.url.render_as_string(hide_password=True))
        try:
            yield
        finally:
            if worker_thread is not None:
                worker_thread.stop()
            if own_engine:
                engine.dispose()
            logger.info("API stopped")

    app = FastAPI(
        title="cn4",
        version="1",
        summary="Latency-driven Cn4 sparsity search for Mamba and Mamba2 models",
        lifespan=lifespan,
        # FastAPI's own pages load their scripts from a CDN: mount_api_docs serves them locally.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(BodyLimitMiddleware, settings=settings)

    def _rejected(request: Request, status: int, detail: str) -> JSONResponse:
        logger.info("%s %s rejected with %d: %s", request.method, request.url.path, status, detail)
        return JSONResponse(status_code=status, content={"detail": detail})

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _rejected(request, 422, _validation_detail(exc))

    @app.exception_handler(SpecError)
    async def _invalid_spec(request: Request, exc: SpecError) -> JSONResponse:
        return _rejected(request, 422, str(exc))

    @app.exception_handler(queue.JobNotFound)
    async def _job_not_found(request: Request, exc: queue.JobNotFound) -> JSONResponse:
        return _rejected(request, 404, f"job {exc.args[0]} not found: list jobs with GET /v1/jobs")

    @app.exception_handler(queue.JobStateConflict)
    async def _job_conflict(request: Request, exc: queue.JobStateConflict) -> JSONResponse:
        return _rejected(request, 409, str(exc))

    @app.exception_handler(queue.IdempotencyConflict)
    async def _key_conflict(request: Request, exc: queue.IdempotencyConflict) -> JSONResponse:
        return _rejected(request, 409, str(exc))

    @app.exception_handler(Cn4Error)
    async def _cn4_error(request: Request, exc: Cn4Error) -> JSONResponse:
        # Remaining cn4 errors are bad input: a checkpoint, measurement file or prediction.
        return _rejected(request, 422, str(exc))

    @app.get("/healthz", response_model=Health, tags=["health"])
    def health(engine: EngineDep) -> Any:
        return {
            "status": "ok",
            "database": engine.dialect.name,
            "schema_revision": db.current_revision(engine),
            "jobs": queue.count_by_state(engine),
        }

    from service import routes_assets, routes_jobs
    from service.api_docs import mount_api_docs
    from service.dashboard import mount_dashboard

    app.include_router(routes_jobs.router)
    app.include_router(routes_assets.router)
    mount_api_docs(app)
    mount_dashboard(app)
    return app
