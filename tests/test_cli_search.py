"""``cn4 search`` end to end: options, exit codes, report.json and the exported model."""

from __future__ import annotations

import json
import math

import pytest
from search_support import DEFAULT_REMAINDER_MS, write_device_file

from search.cli import main
from search.export import load_pruned
from search.models import DEFAULT_MODEL_DIR, eligible_layers, load_checkpoint

REPORT_KEYS = {
    "layer_latency_ms",
    "levels",
    "budget_ms",
    "predicted_latency_ms",
    "measured_latency_ms",
    "dense_latency_ms",
    "quality",
    "feasible",
    "trials",
    "trial_counts",
    "sparsity",
    "wall_time_s",
    "spec",
    "cost_model_fit",
    "prediction_error",
    "prediction_disagrees",
    "model_dir",
}
SMALL_OPTIONS = [
    "--calibration-windows", "8", "--evaluation-windows", "6", "--window", "32", "--quiet",
]


@pytest.fixture(scope="module")
def device_file(tiny_mamba_dir, tmp_path_factory):
    loaded = load_checkpoint(tiny_mamba_dir)
    return write_device_file(tmp_path_factory.mktemp("device") / "device.jsonl", loaded)


def test_search_writes_report_and_model(tiny_mamba_dir, device_file, tmp_path, capsys):
    out = tmp_path / "run"
    status = main([
        "search", "--model", str(tiny_mamba_dir), "--device", str(device_file),
        "--budget-ratio", "0.7", "--trials", "6", "--out", str(out), *SMALL_OPTIONS,
    ])
    assert status == 0
    printed = capsys.readouterr().out
    assert "zeros /" in printed
    assert "kept" in printed
    assert (out / "summary.txt").read_text() in printed

    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["feasible"] is True
    assert report["predicted_latency_ms"] <= report["budget_ms"]
    assert report["budget_ms"] == pytest.approx(0.7 * report["dense_latency_ms"])
    assert report["measured_latency_ms"] is None
    assert report["trial_counts"]["finished"] == 6
    assert len(report["trials"]) == 6
    quality = report["quality"]
    assert {"dense", "best", "baselines"} <= set(quality)
    assert math.isfinite(quality["dense"])
    assert math.isfinite(quality["best"])
    assert set(quality["baselines"]) >= {"greedy"}

    # Per-layer predictions plus the described device's 0.5 ms remainder give the total.
    layer_latency = report["layer_latency_ms"]
    assert set(layer_latency) == set(report["levels"])
    for name, entry in layer_latency.items():
        assert entry["level"] == report["levels"][name]
        assert entry["predicted_ms"] <= entry["dense_ms"]
    layers_total = sum(entry["predicted_ms"] for entry in layer_latency.values())
    assert layers_total + DEFAULT_REMAINDER_MS == pytest.approx(report["predicted_latency_ms"])

    loaded, levels = load_pruned(out / "model")
    assert levels == report["levels"]
    eligible = {info.name for info in eligible_layers(loaded.model)}
    assert set(levels) == eligible
    modules = dict(loaded.model.named_modules())
    for name, level in levels.items():
        weight = modules[name].weight.detach()
        zeros = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(dim=-1)
        assert int(zeros.min()) >= level, name


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--budget-ms", "-2", "--budget-ms -2.0 is invalid"),
        ("--budget-ratio", "1.5", "--budget-ratio 1.5 is invalid"),
        ("--sparsity-target", "0.9", "--sparsity-target 0.9 is invalid"),
        ("--levels", "1,4", "invalid level '4'"),
        ("--trials", "0", "--trials 0 is invalid"),
    ],
)
def test_search_rejects_invalid_option(option, value, expected, capsys):
    status = main(["search", option, value, "--quiet"])
    assert status == 2
    assert expected in capsys.readouterr().err


def test_search_rejects_budget_below_minimum(tiny_mamba_dir, device_file, tmp_path, capsys):
    status = main([
        "search", "--model", str(tiny_mamba_dir), "--device", str(device_file),
        "--budget-ms", "0.001", "--out", str(tmp_path / "run"), *SMALL_OPTIONS,
    ])
    assert status == 1
    error = capsys.readouterr().err
    assert "budget_ms=0.001 is below the lowest predicted latency" in error
    assert "raise the budget to at least" in error
    assert not (tmp_path / "run" / "report.json").exists()


def test_search_rejects_missing_device_file(tiny_mamba_dir, tmp_path, capsys):
    missing = tmp_path / "nowhere.jsonl"
    status = main(["search", "--model", str(tiny_mamba_dir), "--device", str(missing), "--quiet"])
    assert status == 1
    assert str(missing) in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_MODEL_DIR.is_dir(), reason="the embedded model is not built")
def test_search_on_embedded_model(tmp_path, capsys):
    loaded = load_checkpoint("default")
    device = write_device_file(tmp_path / "device.jsonl", loaded)
    out = tmp_path / "run"
    status = main([
        "search", "--device", str(device), "--trials", "12", "--calibration-windows", "16",
        "--evaluation-windows", "16", "--out", str(out), "--quiet",
    ])
    assert status == 0
    report = json.loads((out / "report.json").read_text())
    assert report["budget_source"] == "default"
    halfway = (report["minimum_latency_ms"] + report["dense_latency_ms"]) / 2
    assert report["budget_ms"] == pytest.approx(halfway)
    assert report["budget_ratio"] == pytest.approx(halfway / report["dense_latency_ms"])
    assert report["feasible"] is True
    assert report["predicted_latency_ms"] <= report["budget_ms"]
    objective = report["quality"]["objective_values"]
    for name, value in objective["baselines"].items():
        assert objective["best"] <= value, name
    assert report["quality"]["best"] < 2 * report["quality"]["dense"]
