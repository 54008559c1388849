"""This machine's cost model: probed and fitted on first use per model, then read from a cache.

The cache lives under ``cn4_home() / "devices" / <device> / <model id>/``:

- ``measurements.jsonl``: the probe's records (``cn4.latency/1``),
- ``cost_model.json``: the model fitted to them (``cn4.costmodel/1``),
- ``probe.json``: the probe settings, so that a request for levels the cache lacks probes again.

``<device>`` is :func:`local_device_name`, so moving CN4_HOME to another machine, or changing
the numba thread count, starts a fresh cache. Deleting a folder forces a new probe.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from latency_models.cost_model import CostModel
from latency_models.measurements import write_measurements
from latency_models.probe import (
    DEFAULT_CONFIGS,
    DEFAULT_REPEATS,
    TOOL_VERSION,
    kernel_threads,
    model_id,
    probe_model,
)
from search.paths import cn4_home

logger = logging.getLogger(__name__)

MEASUREMENTS_NAME = "measurements.jsonl"
COST_MODEL_NAME = "cost_model.json"
PROBE_INFO_NAME = "probe.json"
LOCK_NAME = ".lock"
# Model ids are sha256 hex digests; this many characters name the cache folder.
MODEL_ID_CHARS = 16


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    if match:
        return match.group(1).strip()
    import platform

    return platform.processor() or platform.machine() or "unknown-cpu"


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def local_device_name() -> str:
    """Return a stable id of this machine: CPU model, usable cores and numba threads.

    Example: ``amd-epyc-2cores-2threads``.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", _cpu_model().lower()).strip("-") or "cpu"
    return f"{slug}-{_usable_cores()}cores-{kernel_threads()}threads"


def local_cache_dir(loaded_model, *, device: str | None = None) -> Path:
    """Return the cache folder of ``loaded_model``'s measurements and cost model on this machine."""
    device = device or local_device_name()
    identity = model_id(loaded_model)
    prefix, _, digest = identity.rpartition("-")
    short = f"{prefix}-{digest[:MODEL_ID_CHARS]}" if prefix else digest[:MODEL_ID_CHARS]
    return cn4_home() / "devices" / device / re.sub(r"[^A-Za-z0-9_.-]+", "-", short)


@contextmanager
def _locked(directory: Path):
    """Hold an exclusive lock on ``directory`` so that parallel workers probe a model once."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_NAME, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached_levels(directory: Path, clock: str) -> set[int] | None:
    try:
        info = json.loads((directory / PROBE_INFO_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("tool_version") != TOOL_VERSION or info.get("clock", "wall") != clock:
        return None
    return {int(level) for level in info.get("levels", [])}


def local_cost_model(
    loaded_model,
    *,
    levels: Iterable[int],
    refresh: bool = False,
    configs: int = DEFAULT_CONFIGS,
    repeats: int = DEFAULT_REPEATS,
    clock: str = "wall",
    progress: bool = False,
) -> CostModel:
    """Return this machine's cost model for ``loaded_model``, probing and fitting it when needed.

    A cached model is reused when it was probed by this cn4 version at every requested level
    (level 0 is always probed). Otherwise, or with ``refresh``, the model is probed at
    ``levels`` (merged with the cached levels), fitted and saved. ``configs``, ``repeats`` and
    ``clock`` are passed to :func:`latency_models.probe.probe_model`. A cache probed with
    another clock is probed again.
    """
    requested = {int(level) for level in levels} | {0}
    device = local_device_name()
    directory = local_cache_dir(loaded_model, device=device)
    with _locked(directory):
        cached = _cached_levels(directory, clock)
        model_path = directory / COST_MODEL_NAME
        if not refresh and cached is not None and requested <= cached and model_path.exists():
            logger.debug("using the cached cost model %s", model_path)
            return CostModel.load(model_path)

        probe_levels = sorted(requested | (cached or set()))
        logger.info(
            "probing %s on %s at levels %s (cached in %s)",
            model_id(loaded_model)[:16], device, probe_levels, directory,
        )
        result = probe_model(
            loaded_model,
            device=device,
            levels=probe_levels,
            configs=configs,
            repeats=repeats,
            clock=clock,
            progress=progress,
        )
        write_measurements(result.records, directory / MEASUREMENTS_NAME)
        cost_model = CostModel.fit(result.records)
        cost_model.save(model_path)
        info = {
            "tool_version": TOOL_VERSION,
            "device": device,
            "model": model_id(loaded_model),
            "levels": probe_levels,
            "configs": configs,
            "repeats": repeats,
            "clock": clock,
            "probe_seconds": round(result.seconds, 2),
        }
        (directory / PROBE_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        return cost_model
