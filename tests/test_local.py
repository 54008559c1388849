"""This machine's cost model: probed once per model, then read from the CN4_HOME cache."""

from __future__ import annotations

import json
import re

import pytest

from latency_models.cost_model import CostModel
from latency_models.local import (
    COST_MODEL_NAME,
    MAX_USABLE_MAPE,
    MEASUREMENTS_NAME,
    PROBE_INFO_NAME,
    fit_is_usable,
    local_cache_dir,
    local_cost_model,
    local_device_name,
)
from latency_models.measurements import read_measurements
from search.models import load_checkpoint

SMALL_PROBE = {"configs": 2, "repeats": 3}


pytestmark = pytest.mark.usefixtures("single_kernel_thread")


def test_local_device_name_stable():
    name = local_device_name()
    assert name == local_device_name()
    assert re.fullmatch(r"[a-z0-9-]+-\d+cores-1threads", name)


def test_local_cost_model_caches(tiny_mamba2_dir, cn4_home):
    loaded = load_checkpoint(tiny_mamba2_dir)
    directory = local_cache_dir(loaded)
    assert directory.parent.parent == cn4_home / "devices"
    assert not directory.exists()

    first = local_cost_model(loaded, levels=(1, 2), **SMALL_PROBE)
    measurements = directory / MEASUREMENTS_NAME
    saved = directory / COST_MODEL_NAME
    stamps = (measurements.stat().st_mtime_ns, saved.stat().st_mtime_ns)
    records = read_measurements(measurements, combine=False).records
    assert {r.level for r in records if r.op == "linear"} == {0, 1, 2}
    assert first.models() == [loaded.fingerprint]

    # Same or fewer levels: read from the cache, no new probe.
    second = local_cost_model(loaded, levels=(2,), **SMALL_PROBE)
    assert (measurements.stat().st_mtime_ns, saved.stat().st_mtime_ns) == stamps
    assert isinstance(second, CostModel)
    # The probe writes the all-dense model record first.
    dense = list(next(r for r in records if r.op == "model").levels.values())
    assert {level for _, _, level in dense} == {0}
    assert second.predict_model(dense, model=loaded.fingerprint) == pytest.approx(
        first.predict_model(dense, model=loaded.fingerprint)
    )


def test_local_cost_model_probes_new_levels(tiny_mamba_dir):
    loaded = load_checkpoint(tiny_mamba_dir)
    local_cost_model(loaded, levels=(1,), **SMALL_PROBE)
    measurements = local_cache_dir(loaded) / MEASUREMENTS_NAME
    stamp = measurements.stat().st_mtime_ns

    local_cost_model(loaded, levels=(3,), **SMALL_PROBE)
    assert measurements.stat().st_mtime_ns != stamp
    records = read_measurements(measurements, combine=False).records
    assert {r.level for r in records if r.op == "linear"} == {0, 1, 3}

    stamp = measurements.stat().st_mtime_ns
    local_cost_model(loaded, levels=(1,), refresh=True, **SMALL_PROBE)
    assert measurements.stat().st_mtime_ns != stamp


def test_local_cost_model_clock_change(tiny_mamba2_dir):
    loaded = load_checkpoint(tiny_mamba2_dir)
    local_cost_model(loaded, levels=(1,), **SMALL_PROBE)
    measurements = local_cache_dir(loaded) / MEASUREMENTS_NAME
    stamp = measurements.stat().st_mtime_ns

    model = local_cost_model(loaded, levels=(1,), clock="thread", **SMALL_PROBE)
    assert measurements.stat().st_mtime_ns != stamp
    assert model.backend == "numba-cn4/thread-time"


def test_fit_is_usable_threshold():
    assert fit_is_usable({"mape": 8.0})
    assert fit_is_usable({"mape": MAX_USABLE_MAPE})
    assert not fit_is_usable({"mape": MAX_USABLE_MAPE + 0.1})
    assert not fit_is_usable({"mape": 9529.0})
    assert fit_is_usable({"mape": None})


def test_unusable_cache_probes_again(tiny_mamba2_dir):
    loaded = load_checkpoint(tiny_mamba2_dir)
    local_cost_model(loaded, levels=(1,), **SMALL_PROBE)
    directory = local_cache_dir(loaded)
    info_path = directory / PROBE_INFO_NAME
    info = json.loads(info_path.read_text())
    assert "usable" in info
    # A cache marked unusable (every probe disturbed) is not reused.
    info["usable"] = False
    info_path.write_text(json.dumps(info))
    measurements = directory / MEASUREMENTS_NAME
    stamp = measurements.stat().st_mtime_ns
    local_cost_model(loaded, levels=(1,), **SMALL_PROBE)
    assert measurements.stat().st_mtime_ns != stamp
