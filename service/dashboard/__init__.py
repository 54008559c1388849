"""The web dashboard: plain HTML pages and scripts that call the JSON API under ``/v1``.

``mount_dashboard(app)`` adds the pages (``/``, ``/jobs/{id}``, ``/submit``, ``/devices``,
``/latency-models``), the static files under ``/static`` and Plotly's JavaScript at
``/vendor/plotly.min.js``. Every asset is served by this process: Plotly's bundle is read from
the installed ``plotly`` package, so the pages work on machines that cannot reach a CDN.
"""

from __future__ import annotations

import logging
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, File, HTTPException, UploadFile
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Page path -> HTML file under STATIC_DIR. ``/jobs/{job_id}`` is added separately.
PAGES = {
    "/": "jobs.html",
    "/submit": "submit.html",
    "/devices": "devices.html",
    "/latency-models": "latency.html",
}

# Batch files are job specs, so a few MiB is far more than any real one needs.
MAX_BATCH_FILE_BYTES = 4 * 1024 * 1024


def plotly_js_path() -> Path:
    """Return the path of ``plotly.min.js`` inside the installed ``plotly`` package."""
    path = Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))
    if not path.is_file():
        raise FileNotFoundError(
            f"plotly.min.js not found at {path}: reinstall the plotly package "
            "(pip install --force-reinstall plotly)"
        )
    return path


def _page(name: str):
    path = STATIC_DIR / name

    def serve_page() -> FileResponse:
        # no-cache: a browser revalidates, so pages change with the server's version.
        return FileResponse(path, media_type="text/html", headers={"Cache-Control": "no-cache"})

    return serve_page


def build_router() -> APIRouter:
    """Return the router of the dashboard pages, Plotly's bundle and the batch-file parser."""
    router = APIRouter(include_in_schema=False)
    for route, name in PAGES.items():
        router.add_api_route(route, _page(name), methods=["GET"])
    # The page reads the id from its URL and shows the API's message for a missing or bad id.
    router.add_api_route("/jobs/{job_id}", _page("job.html"), methods=["GET"])

    plotly_js = plotly_js_path()

    @router.get("/vendor/plotly.min.js")
    def serve_plotly() -> FileResponse:
        return FileResponse(plotly_js, media_type="text/javascript")

    @router.post("/dashboard/batch-file")
    async def parse_batch_file(file: UploadFile = File(...)) -> dict[str, Any]:
        """Parse an uploaded YAML or JSON Lines batch file into the body of POST /v1/jobs/batch."""
        return await _parse_batch_upload(file)

    return router


async def _parse_batch_upload(upload: UploadFile) -> dict[str, Any]:
    from service.client import SubmitError, read_batch_file

    data = await upload.read(MAX_BATCH_FILE_BYTES + 1)
    if len(data) > MAX_BATCH_FILE_BYTES:
        raise HTTPException(
            status_code=413,
            detail=f"the batch file exceeds {MAX_BATCH_FILE_BYTES} bytes: split it into smaller files",
        )
    # read_batch_file picks the format from the suffix, so the upload keeps its file name.
    name = Path(upload.filename or "batch.yaml").name or "batch.yaml"
    with tempfile.TemporaryDirectory(prefix="cn4-batch-") as directory:
        path = Path(directory) / name
        path.write_bytes(data)
        try:
            entries = read_batch_file(path)
        except SubmitError as exc:
            raise HTTPException(status_code=422, detail=str(exc).replace(str(path), name)) from None
    jobs = []
    for entry in entries:
        job: dict[str, Any] = {"spec": entry.spec}
        if entry.idempotency_key is not None:
            job["idempotency_key"] = entry.idempotency_key
        jobs.append(job)
    return {"jobs": jobs, "lines": [entry.line for entry in entries]}


def mount_dashboard(app: FastAPI) -> None:
    """Add the dashboard pages and their static files to ``app``."""
    app.include_router(build_router())
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    logger.debug("dashboard mounted (static files from %s)", STATIC_DIR)
