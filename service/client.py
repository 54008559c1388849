"""``cn4 submit``: read a batch file of job specs, submit it, and optionally wait for the jobs.

A batch file is YAML (a list of jobs, or a mapping with a ``jobs`` list) or JSON Lines (one job
per line). A job is a mapping of SearchSpec settings; it may carry ``idempotency_key``, or be
written as ``{spec: {...}, idempotency_key: ...}``. Errors name the line of the bad job.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from search.errors import Cn4Error
from search.spec import SearchSpec, SpecError

logger = logging.getLogger(__name__)

FINAL_STATES = ("succeeded", "failed", "cancelled")


class SubmitError(Cn4Error, ValueError):
    """A batch file that cannot be read, or a server that rejects or cannot take the batch."""


@dataclass(frozen=True)
class BatchEntry:
    line: int
    spec: dict[str, Any]
    idempotency_key: str | None


def read_batch_file(path: str | Path) -> list[BatchEntry]:
    """Read and validate every job of a YAML or JSON Lines batch file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SubmitError(f"batch file {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SubmitError(f"batch file {str(path)!r} cannot be read: {exc}") from None
    if path.suffix.lower() in (".jsonl", ".ndjson") or (
        path.suffix.lower() not in (".yaml", ".yml") and text.lstrip().startswith("{")
    ):
        raw = _jsonl_items(path, text)
    else:
        raw = _yaml_items(path, text)
    if not raw:
        raise SubmitError(f"{path}: the file contains no jobs: write one job spec per line (JSON Lines) or a YAML list")
    return [_entry(path, line, item) for line, item in raw]


def _jsonl_items(path: Path, text: str) -> list[tuple[int, Any]]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            items.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise SubmitError(f"{path}, line {number}: invalid JSON ({exc.msg}): write one JSON object per line") from None
    return items


def _yaml_items(path: Path, text: str) -> list[tuple[int, Any]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise SubmitError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return []
    if isinstance(data, dict) and "jobs" in data:
        node = next(value for key, value in node.value if key.value == "jobs")
        data = data["jobs"]
    if not isinstance(data, list):
        raise SubmitError(f"{path}: expected a list of jobs (or a mapping with 'jobs'), found a {type(data).__name__}")
    return [(child.start_mark.line + 1, item) for child, item in zip(node.value, data)]


def _entry(path: Path, line: int, item: Any) -> BatchEntry:
    where = f"{path}, line {line}"
    if not isinstance(item, dict):
        raise SubmitError(f"{where}: a job must be a mapping of settings, found {type(item).__name__}")
    item = dict(item)
    key = item.pop("idempotency_key", None)
    spec = item.pop("spec") if "spec" in item and not (set(item) - {"spec"}) else item
    if key is not None and not isinstance(key, str):
        raise SubmitError(f"{where}: idempotency_key must be a string, found {key!r}")
    if not isinstance(spec, dict):
        raise SubmitError(f"{where}: spec must be a mapping of settings")
    try:
        SearchSpec.from_dict(spec)
    except (SpecError, TypeError) as exc:
        raise SubmitError(f"{where}: {exc}") from None
    return BatchEntry(line=line, spec=spec, idempotency_key=key)


class Client:
    """A small synchronous client of the cn4 REST API."""

    def __init__(self, server: str, *, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.server = server.rstrip("/")
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise SubmitError(
                f"cannot reach the cn4 server at {self.server} ({type(exc).__name__}: {exc}): "
                "start it with `cn4 serve` or pass --server URL"
            ) from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise SubmitError(f"{method} {url} failed with HTTP {response.status_code}: {detail}")
        return response.json()

    def submit(self, entries: list[BatchEntry]) -> list[dict[str, Any]]:
        body = {"jobs": [
            {"spec": entry.spec, **({"idempotency_key": entry.idempotency_key} if entry.idempotency_key else {})}
            for entry in entries
        ]}
        return self.request("POST", "/v1/jobs/batch", json=body)["jobs"]

    def job(self, job_id: int) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}")


def wait_for_jobs(client: Client, job_ids: list[int], *, poll_seconds: float = 2.0) -> dict[int, dict[str, Any]]:
    """Poll the jobs until all are final, showing trials done on a progress bar (stderr)."""
    from tqdm import tqdm

    latest: dict[int, dict[str, Any]] = {}
    with tqdm(total=None, unit="trial", desc="trials", dynamic_ncols=True) as bar:
        while True:
            for job_id in job_ids:
                if job_id in latest and latest[job_id]["state"] in FINAL_STATES:
                    continue
                latest[job_id] = client.job(job_id)
            done = sum(job["progress"]["trials_done"] for job in latest.values())
            total = sum(job["progress"]["trials_total"] for job in latest.values())
            finished = sum(job["state"] in FINAL_STATES for job in latest.values())
            bar.total = total
            bar.n = done
            bar.set_postfix_str(f"{finished}/{len(job_ids)} jobs finished", refresh=False)
            bar.refresh()
            if finished == len(job_ids):
                return latest
            time.sleep(poll_seconds)
