"""Tests of the fitted cost model and ``cn4 fit`` on synthetic but realistic measurements.

Layer latencies follow a bandwidth model of this kind of machine: a fixed call overhead plus
the estimated weight bytes over the kernel's bandwidth (dense 40 GB/s, Cn4 gathers 21 GB/s),
with log-normal noise. Levels 1 and 2 move fewer bytes than dense but are slower, as a gather
bound Cn4 kernel is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from latency_models.cost_model import (
    FORMAT_VERSION,
    CostModel,
    accuracy_report,
    cross_validate,
    fit_files,
    spearman,
    weight_bytes,
)
from latency_models.measurements import Measurement, write_measurements
from search.cli import main
from search.errors import CostModelError

DEVICE = "x86-2core"
BACKEND = "cn4-numba"
OVERHEAD_MS = 0.008
# Bytes per millisecond: 40 GB/s dense, 21 GB/s for the Cn4 gather kernel.
BANDWIDTH = {0: 40e6, 1: 21e6, 2: 21e6, 3: 21e6}
REMAINDER_MS = 2.0
# Whole-model runs pay a little more than their parts: module calls between the layers.
MODEL_OVERHEAD_MS = 0.15

# Linear shapes of a 130m-shaped Mamba block: in_proj, x_proj, dt_proj, out_proj.
BLOCK_SHAPES = [(3072, 768), (80, 1536), (1536, 48), (768, 1536)]
# Extra shapes measured so that each level has a regression.
EXTRA_SHAPES = [(1536, 768), (768, 768), (2048, 1024)]


def true_layer_ms(out_features: int, in_features: int, level: int) -> float:
    return OVERHEAD_MS + weight_bytes(out_features, in_features, level, 4) / BANDWIDTH[level]


def linear_record(out_features, in_features, level, median, **extra) -> Measurement:
    return Measurement(
        device=DEVICE,
        backend=BACKEND,
        op="linear",
        out_features=out_features,
        in_features=in_features,
        level=level,
        median_ms=median,
        **extra,
    )


def synthetic_records(
    *, seed: int = 0, noise: float = 0.01, blocks: int = 6, model_records: int = 40,
    remainder: bool = True, levels=(0, 1, 2, 3), model: str = "mamba-130m-shaped",
) -> list[Measurement]:
    rng = np.random.default_rng(seed)
    records = []
    for out_features, in_features in BLOCK_SHAPES + EXTRA_SHAPES:
        for level in levels:
            truth = true_layer_ms(out_features, in_features, level)
            records.append(
                linear_record(out_features, in_features, level, truth * rng.lognormal(0, noise))
            )
    if remainder:
        records.append(
            Measurement(
                device=DEVICE, backend=BACKEND, op="remainder", model=model,
                median_ms=REMAINDER_MS * rng.lognormal(0, noise),
            )
        )
    for _ in range(model_records):
        level_map = {}
        for block in range(blocks):
            for (out_features, in_features), name in zip(BLOCK_SHAPES, ("in_proj", "x_proj", "dt_proj", "out_proj")):
                level = int(rng.choice(levels))
                level_map[f"backbone.layers.{block}.mixer.{name}"] = (out_features, in_features, level)
        truth = REMAINDER_MS + MODEL_OVERHEAD_MS + sum(true_layer_ms(*entry) for entry in level_map.values())
        records.append(
            Measurement(
                device=DEVICE, backend=BACKEND, op="model", model=model, levels=level_map,
                median_ms=truth * rng.lognormal(0, noise),
            )
        )
    return records


@pytest.fixture(scope="module")
def fitted() -> CostModel:
    return CostModel.fit(synthetic_records())


# ---------------------------------------------------------------------------------------------
# Fit report


def test_fit_report_on_realistic_set(fitted):
    report = fitted.fit_report

    assert report["count"] == 30
    assert report["calibration_records"] == 10
    assert report["unpredicted"] == 0
    assert report["within_10pct"] == 1.0
    assert report["within_5pct"] >= 0.95
    assert report["mape"] < 2.0
    assert report["spearman"] > 0.9
    assert report["records"] == {"linear": 28, "remainder": 1, "model": 40, "combined_duplicates": 0}
    assert report["regressions"] == 4


def test_fit_report_matches_predictions(fitted):
    # Recompute MAPE on the same held-out split from the public predictions.
    records = synthetic_records()
    held_out = [r for r in records if r.op == "model"]
    errors = []
    for record in held_out:
        predicted = fitted.predict_model(record.levels, model=record.model)
        errors.append(abs(predicted - record.median_ms) / record.median_ms)
    # Calibration records are in this list too, so the overall MAPE stays close to the report's.
    assert 100 * np.mean(errors) == pytest.approx(fitted.fit_report["mape"], abs=0.5)


def test_calibration_learns_model_overhead(fitted):
    part = fitted.fixed_parts[("mamba-130m-shaped", 1)]

    assert part.remainder_ms == pytest.approx(REMAINDER_MS, rel=0.05)
    assert part.correction_ms == pytest.approx(MODEL_OVERHEAD_MS, abs=0.08)
    assert part.calibration_records == 10


def test_without_calibration_overhead_shows(fitted):
    model = CostModel.fit(synthetic_records(), holdout=1.0)
    report = model.fit_report

    assert report["calibration_records"] == 0
    assert report["count"] == 40
    # Every prediction misses MODEL_OVERHEAD_MS, so all errors lean low.
    assert report["median_error_pct"] < -1.0
    assert report["mape"] > fitted.fit_report["mape"]


def test_layer_leave_one_out(fitted):
    loo = fitted.fit_report["layer_loo"]

    assert loo["count"] > 10
    assert loo["mape"] < 10.0


def test_cross_validation_predicts_every_mixed_map():
    records = synthetic_records() + [uniform_record(level) for level in (0, 3)]

    report = cross_validate(records, folds=5)

    assert report["folds"] == 5
    assert report["count"] == 40
    assert report["unpredicted"] == 0
    assert report["within_10pct"] == 1.0
    assert report["mape"] < 2.0
    assert report["spearman"] > 0.9


def test_cross_validation_counts_unpredicted():
    # Without a remainder or uniform map, a model whose only mixed map is tested has no basis.
    records = synthetic_records(remainder=False, model_records=1)

    report = cross_validate(records, folds=5)

    assert report["folds"] == 1
    assert report["count"] == 0
    assert report["unpredicted"] == 1


def test_cross_validation_rejects_one_fold():
    with pytest.raises(CostModelError, match="folds=1 is invalid"):
        cross_validate(synthetic_records(model_records=2), folds=1)


def test_holdout_zero_reports_nothing():
    model = CostModel.fit(synthetic_records(model_records=8), holdout=0.0)

    assert model.fit_report["count"] == 0
    assert model.fit_report["within_5pct"] is None
    assert model.fit_report["calibration_records"] == 8


def test_holdout_out_of_range_rejected():
    with pytest.raises(CostModelError, match="holdout=1.5 is invalid"):
        CostModel.fit(synthetic_records(model_records=2), holdout=1.5)


def test_calibration_without_remainder_record():
    records = synthetic_records(remainder=False, model_records=8)

    model = CostModel.fit(records, holdout=0.75)

    part = model.fixed_parts[("mamba-130m-shaped", 1)]
    assert part.remainder_ms is None
    assert part.calibration_records == 2
    assert part.total_ms == pytest.approx(REMAINDER_MS + MODEL_OVERHEAD_MS, rel=0.1)
    assert model.fit_report["count"] == 6
    assert model.fit_report["within_10pct"] == 1.0


def test_one_record_calibrates_without_remainder():
    model = CostModel.fit(synthetic_records(remainder=False, model_records=4), holdout=1.0)

    assert model.fit_report["calibration_records"] == 1
    assert model.fit_report["count"] == 3


def uniform_record(level: int, *, blocks: int = 6, model: str = "mamba-130m-shaped") -> Measurement:
    level_map = {
        f"backbone.layers.{block}.mixer.{name}": (out_features, in_features, level)
        for block in range(blocks)
        for (out_features, in_features), name in zip(BLOCK_SHAPES, ("in_proj", "x_proj", "dt_proj", "out_proj"))
    }
    truth = REMAINDER_MS + MODEL_OVERHEAD_MS + sum(true_layer_ms(*entry) for entry in level_map.values())
    return Measurement(
        device=DEVICE, backend=BACKEND, op="model", model=model, levels=level_map, median_ms=truth
    )


def test_uniform_maps_always_calibrate():
    records = synthetic_records(model_records=8) + [uniform_record(level) for level in (0, 1, 2, 3)]

    model = CostModel.fit(records, holdout=1.0)

    assert model.fit_report["calibration_records"] == 4
    assert model.fit_report["count"] == 8
    part = model.fixed_parts[("mamba-130m-shaped", 1)]
    assert part.correction_ms == pytest.approx(MODEL_OVERHEAD_MS, abs=0.08)
    assert model.fit_report["within_5pct"] == 1.0


def test_uniform_maps_replace_forced_calibration():
    records = synthetic_records(remainder=False, model_records=4) + [uniform_record(0)]

    model = CostModel.fit(records, holdout=1.0)

    assert model.fit_report["calibration_records"] == 1
    assert model.fit_report["count"] == 4
    assert model.fixed_parts[("mamba-130m-shaped", 1)].total_ms == pytest.approx(
        REMAINDER_MS + MODEL_OVERHEAD_MS, rel=0.05
    )


def test_split_independent_of_record_order():
    records = synthetic_records(model_records=12)
    shuffled = list(reversed(records))

    first = CostModel.fit(records).fit_report
    second = CostModel.fit(shuffled).fit_report

    assert first["mape"] == pytest.approx(second["mape"])
    assert first["count"] == second["count"] == 9


# ---------------------------------------------------------------------------------------------
# Layer predictions


def test_measured_case_is_looked_up(fitted):
    records = synthetic_records()
    record = next(r for r in records if r.op == "linear" and r.out_features == 80 and r.level == 2)

    assert fitted.predict_layer(80, 1536, 2) == record.median_ms


def test_regression_recovers_bandwidth():
    model = CostModel.fit(synthetic_records(noise=0.0, model_records=0))

    for level, bandwidth in BANDWIDTH.items():
        coefficients = model.regressions[(level, 1)].coefficients
        assert 1.0 / coefficients[1] == pytest.approx(bandwidth, rel=1e-6)
        assert coefficients[0] == pytest.approx(OVERHEAD_MS, rel=1e-6)
        assert coefficients[2] == pytest.approx(0.0, abs=1e-12)


def test_regression_predicts_unmeasured_shape():
    model = CostModel.fit(synthetic_records(noise=0.01, model_records=0))

    for level in (0, 1, 2, 3):
        predicted = model.predict_layer(1024, 1024, level)
        assert predicted == pytest.approx(true_layer_ms(1024, 1024, level), rel=0.05)


def test_slower_level_predicted_slower(fitted):
    # The Cn4 gather kernel makes levels 1 and 2 slower than dense, as measured.
    for out_features, in_features in BLOCK_SHAPES:
        dense = fitted.predict_layer(out_features, in_features, 0)
        assert fitted.predict_layer(out_features, in_features, 1) > dense
    # Unmeasured shape: the level regressions keep the measured order too.
    dense = fitted.predict_layer(1024, 1024, 0)
    assert fitted.predict_layer(1024, 1024, 1) > dense
    assert fitted.predict_layer(1024, 1024, 2) > dense
    assert fitted.predict_layer(1024, 1024, 3) < dense


def test_slower_level_raises_model_latency(fitted):
    dense = [(o, i, 0) for o, i in BLOCK_SHAPES]
    level_one = [(o, i, 1) for o, i in BLOCK_SHAPES]

    assert fitted.predict_model(level_one, model="mamba-130m-shaped") > fitted.predict_model(
        dense, model="mamba-130m-shaped"
    )


def test_single_slow_measurement_kept():
    # One shape whose level 3 run was slower than dense: the lookup keeps it slower.
    records = [
        linear_record(512, 512, 0, 0.05),
        linear_record(512, 512, 3, 0.09),
    ]
    model = CostModel.fit(records)

    assert model.predict_layer(512, 512, 3) > model.predict_layer(512, 512, 0)


def test_level_never_measured_raises():
    model = CostModel.fit(synthetic_records(levels=(0, 3), model_records=0))

    with pytest.raises(CostModelError) as caught:
        model.predict_layer(3072, 768, 2)

    message = str(caught.value)
    assert "level 2 was never measured at tokens=1" in message
    assert "measured levels: [0, 3]" in message
    assert "add op=linear records with out_features=3072, in_features=768, level=2, tokens=1" in message


def test_tokens_never_measured_raises(fitted):
    with pytest.raises(CostModelError, match=r"no Linear was measured at tokens=8 \(measured: \[1\]\)"):
        fitted.predict_layer(3072, 768, 0, tokens=8)


def test_shape_outside_range_raises(fitted):
    with pytest.raises(CostModelError, match="outside the measured range"):
        fitted.predict_layer(16384, 16384, 0)
    with pytest.raises(CostModelError, match="outside the measured range"):
        fitted.predict_layer(4, 8, 0)


def test_shape_near_range_edge_allowed(fitted):
    # 2048x1024 is the largest measured dense case; 1.2x its weights is inside the margin.
    predicted = fitted.predict_layer(2048, 1228, 0)

    assert predicted == pytest.approx(true_layer_ms(2048, 1228, 0), rel=0.05)


def test_too_few_shapes_for_regression_raises():
    records = [linear_record(512, 512, 0, 0.05), linear_record(1024, 512, 0, 0.09)]
    model = CostModel.fit(records)

    with pytest.raises(CostModelError, match="only 2 shape.* the regression needs 3"):
        model.predict_layer(768, 512, 0)


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [((0, 4, 0), "out_features=0"), ((4, 4, 5), "level=5"), ((4, 4, 0, 0), "tokens=0")],
)
def test_invalid_layer_arguments_raise(fitted, arguments, fragment):
    with pytest.raises(CostModelError, match=fragment):
        fitted.predict_layer(*arguments)


def test_unknown_model_raises(fitted):
    with pytest.raises(CostModelError) as caught:
        fitted.predict_model([(3072, 768, 0)], model="mamba2-tiny")

    message = str(caught.value)
    assert "model 'mamba2-tiny'" in message
    assert "known: mamba-130m-shaped (tokens=1)" in message
    assert "add an op=remainder record for model=mamba2-tiny" in message


def test_predict_model_sums_parts(fitted):
    layers = {"a": (3072, 768, 3), "b": (80, 1536, 0)}
    expected = (
        fitted.fixed_ms("mamba-130m-shaped")
        + fitted.predict_layer(3072, 768, 3)
        + fitted.predict_layer(80, 1536, 0)
    )

    assert fitted.predict_model(layers, model="mamba-130m-shaped") == pytest.approx(expected)
    assert fitted.predict_model(list(layers.values()), model="mamba-130m-shaped") == pytest.approx(expected)


def test_nonnegative_coefficients():
    # Latency grows faster than linearly here, so plain least squares gives a negative
    # intercept; the fit must clamp it to zero instead.
    records = [
        linear_record(1024, 256 * k, 0, 0.1 * k * k)
        for k in (1, 2, 3, 4)
    ]
    model = CostModel.fit(records)
    coefficients = model.regressions[(0, 1)].coefficients

    assert all(c >= 0 for c in coefficients)
    assert coefficients[0] == 0.0
    assert model.predict_layer(1024, 640, 0) > 0


def test_conflicting_duplicates_combined_in_fit():
    records = [
        linear_record(512, 512, 0, 2000.0),
        linear_record(512, 512, 0, 200.0),
    ]
    model = CostModel.fit(records)

    assert model.predict_layer(512, 512, 0) == pytest.approx(1100.0)
    assert model.fit_report["records"]["combined_duplicates"] == 1
    assert any("conflicting duplicates" in w for w in model.warnings)


# ---------------------------------------------------------------------------------------------
# Selection of device, backend, dtype, threads


def test_several_devices_need_a_choice():
    other = [
        Measurement(device="phone", backend=BACKEND, op="linear", out_features=512, in_features=512, level=0, median_ms=0.3)
    ]
    records = synthetic_records(model_records=4) + other

    with pytest.raises(CostModelError, match=r"several device values \['phone', 'x86-2core'\]: choose one with --device"):
        CostModel.fit(records)
    phone = CostModel.fit(records, device="phone")
    assert phone.predict_layer(512, 512, 0) == 0.3
    assert CostModel.fit(records, device=DEVICE).device == DEVICE


def test_absent_device_named():
    with pytest.raises(CostModelError, match=r"device='gpu' has no measurements"):
        CostModel.fit(synthetic_records(model_records=0), device="gpu")


def test_empty_records_rejected():
    with pytest.raises(CostModelError, match="no measurement records"):
        CostModel.fit([])


# ---------------------------------------------------------------------------------------------
# Serialisation


def test_save_load_round_trip(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.json")

    loaded = CostModel.load(path)

    data = json.loads(path.read_text())
    assert data["format"] == FORMAT_VERSION
    assert data["device"] == DEVICE
    assert data["backend"] == BACKEND
    assert loaded.fit_report == fitted.fit_report
    assert loaded.to_dict() == fitted.to_dict()
    for level in (0, 1, 2, 3):
        assert loaded.predict_layer(1024, 1024, level) == fitted.predict_layer(1024, 1024, level)
        assert loaded.predict_layer(3072, 768, level) == fitted.predict_layer(3072, 768, level)
    layers = [(o, i, 2) for o, i in BLOCK_SHAPES]
    assert loaded.predict_model(layers, model="mamba-130m-shaped") == fitted.predict_model(
        layers, model="mamba-130m-shaped"
    )


def test_load_rejects_unknown_version(fitted, tmp_path):
    data = fitted.to_dict()
    data["format"] = "cn4.costmodel/2"
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))

    with pytest.raises(CostModelError, match=r"format 'cn4.costmodel/2' is not supported.*cn4 fit"):
        CostModel.load(path)


def test_load_rejects_damaged_file(fitted, tmp_path):
    data = fitted.to_dict()
    del data["layers"]
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))

    with pytest.raises(CostModelError, match="incomplete or damaged"):
        CostModel.load(path)
    path.write_text("{not json")
    with pytest.raises(CostModelError, match="cannot read the cost model"):
        CostModel.load(path)


@pytest.mark.parametrize(
    ("table", "field", "value", "fragment"),
    [
        ("layers", "median_ms", -1.0, "median_ms=-1.0 is invalid"),
        ("layers", "level", 4, "level=4 is invalid"),
        ("layers", "out_features", "3072", "out_features='3072' is invalid"),
        ("regressions", "coefficients", [0.1, float("nan"), 0.0], "coefficients=nan is invalid"),
        ("regressions", "coefficients", [0.1, 0.2], "coefficients=[0.1, 0.2] is invalid"),
        ("fixed_parts", "remainder_ms", float("inf"), "remainder_ms=inf is invalid"),
        ("fixed_parts", "model", "", "model='' is invalid"),
    ],
)
def test_load_rejects_invalid_values(fitted, tmp_path, table, field, value, fragment):
    data = fitted.to_dict()
    data[table][0][field] = value
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))

    with pytest.raises(CostModelError) as caught:
        CostModel.load(path)

    assert "incomplete or damaged" in str(caught.value)
    assert fragment in str(caught.value)


def test_load_rejects_non_text_dtype(fitted, tmp_path):
    data = fitted.to_dict()
    data["dtype"] = 4
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))

    with pytest.raises(CostModelError, match="incomplete or damaged"):
        CostModel.load(path)


# ---------------------------------------------------------------------------------------------
# Metrics


def test_spearman_with_ties():
    rho = spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])

    assert rho == pytest.approx(8 / math.sqrt(95))


def test_spearman_limits():
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 4, 9]) == pytest.approx(1.0)
    assert spearman([1], [2]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_accuracy_report_numbers():
    report = accuracy_report([100, 100, 200, 100], [104, 95, 218, 130])

    assert report["count"] == 4
    assert report["within_5pct"] == 0.5
    assert report["within_10pct"] == 0.75
    assert report["mape"] == pytest.approx((4 + 5 + 9 + 30) / 4)
    assert report["max_ape"] == pytest.approx(30)
    assert report["median_error_pct"] == pytest.approx(6.5)
    assert report["spearman"] == pytest.approx(spearman([100, 100, 200, 100], [104, 95, 218, 130]))


# ---------------------------------------------------------------------------------------------
# cn4 fit


def write_valid_file(tmp_path: Path, name: str = "m.csv") -> Path:
    return write_measurements(synthetic_records(model_records=12), tmp_path / name)


def write_invalid_file(tmp_path: Path) -> Path:
    records = synthetic_records(model_records=0)
    path = write_measurements(records[:5], tmp_path / "bad.csv")
    lines = path.read_text().splitlines()
    # Data row 3 sits on line 4; give it a negative latency.
    cells = lines[3].split(",")
    cells[12] = "-1"
    lines[3] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_fit_writes_model(tmp_path, capsys):
    source = write_valid_file(tmp_path)
    out = tmp_path / "model.json"

    status = main(["fit", str(source), "--out", str(out)])

    assert status == 0
    data = json.loads(out.read_text())
    report = data["fit_report"]
    for key in ("within_5pct", "within_10pct", "mape", "spearman"):
        assert report[key] is not None
    assert report["count"] == 9
    assert report["within_10pct"] == 1.0
    assert data["fit_report"]["cross_validation"]["count"] == 12
    assert data["fit_report"]["cross_validation"]["folds"] == 5
    printed = capsys.readouterr().out
    assert "held-out model records: 9" in printed
    assert "5-fold cross-validation over 12 mixed maps" in printed
    assert "within 10%: 100.0%" in printed
    assert f"wrote {out}" in printed


def test_cli_fit_pools_files(tmp_path, capsys, caplog):
    first = write_valid_file(tmp_path, "a.jsonl")
    second = write_measurements([linear_record(3072, 768, 0, 0.5)], tmp_path / "b.csv")

    with caplog.at_level(logging.WARNING):
        status = main(["fit", str(first), str(second)])

    assert status == 0
    printed = capsys.readouterr().out
    assert "1 duplicates combined" in printed
    assert "1 warning(s), logged above" in printed
    conflicts = [m for m in caplog.messages if "conflicting duplicates" in m]
    assert len(conflicts) == 1
    assert "shape=3072x768 level=0" in conflicts[0]


def test_cli_fit_rejects_invalid_file(tmp_path, capsys):
    source = write_invalid_file(tmp_path)
    out = tmp_path / "model.json"

    status = main(["fit", str(source), "--out", str(out)])

    assert status == 1
    error = capsys.readouterr().err
    assert "row 3 (line 4): median_ms=-1.0 is invalid" in error
    assert str(source) in error
    assert not out.exists()


def test_cli_fit_rejects_one_fold(tmp_path, capsys):
    source = write_valid_file(tmp_path)

    assert main(["fit", str(source), "--folds", "1"]) == 1
    assert "--folds 1 is invalid" in capsys.readouterr().err


def test_cli_fit_device_choice(tmp_path, capsys):
    records = synthetic_records(model_records=4)
    records.append(Measurement(device="phone", op="remainder", model="m", median_ms=1.0))
    source = write_measurements(records, tmp_path / "m.jsonl")

    assert main(["fit", str(source)]) == 1
    assert "choose one with --device" in capsys.readouterr().err
    assert main(["fit", str(source), "--device", DEVICE]) == 0


def cn4_script() -> Path:
    script = Path(sys.executable).parent / "cn4"
    if not script.exists():
        pytest.skip(f"{script} is missing: run pip install -e . --no-deps in this venv")
    return script


def test_console_script_fit(tmp_path):
    script = cn4_script()
    source = write_valid_file(tmp_path)
    out = tmp_path / "model.json"
    environment = dict(os.environ, HF_HUB_OFFLINE="1")

    done = subprocess.run(
        [str(script), "fit", str(source), "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=environment,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["fit_report"]["count"] == 9

    bad = write_invalid_file(tmp_path)
    failed = subprocess.run(
        [str(script), "fit", str(bad)], capture_output=True, text=True, timeout=120, env=environment
    )
    assert failed.returncode == 1
    assert "row 3 (line 4)" in failed.stderr
    assert failed.stderr.startswith("cn4 fit: error:")


def test_fit_files_keeps_read_warnings(tmp_path):
    spread = linear_record(512, 512, 0, 1.0, p10_ms=0.5, p90_ms=2.0)
    path = write_measurements([spread], tmp_path / "m.csv")

    model = fit_files([path])

    assert len(model.warnings) == 1
    assert "high spread" in model.warnings[0]
