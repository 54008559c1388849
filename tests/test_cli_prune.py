"""``cn4 prune`` end to end on a tiny Mamba2 checkpoint with its own texts."""

from __future__ import annotations

import json

import pytest
import torch

from search.cli import main
from search.cli_prune import read_level_map
from search.errors import PruningError
from search.export import load_pruned
from search.models import eligible_layers, load_checkpoint

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
    "All the world's a stage, and all the men and women merely players. "
) * 30


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture
def texts(tmp_path):
    calibration = tmp_path / "calibration.txt"
    evaluation = tmp_path / "evaluation.txt"
    calibration.write_text(TEXT)
    evaluation.write_text(TEXT[::-1])
    return calibration, evaluation


def prune_args(model_dir, texts, out, *extra: str) -> list[str]:
    calibration, evaluation = texts
    return [
        "prune",
        "--model",
        str(model_dir),
        "--calibration",
        str(calibration),
        "--evaluation",
        str(evaluation),
        "--calibration-windows",
        "4",
        "--evaluation-windows",
        "4",
        "--window",
        "32",
        "--out",
        str(out),
        "--json",
        *extra,
    ]


def test_uniform_prune_exports_levels(tiny_mamba2_dir, texts, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(prune_args(tiny_mamba2_dir, texts, out, "--level", "2")) == 0
    summary = json.loads(capsys.readouterr().out)

    layers = [info.name for info in eligible_layers(load_checkpoint(tiny_mamba2_dir).model)]
    assert summary["levels"] == {"0": 0, "1": 0, "2": len(layers), "3": 0}
    assert summary["variants_pruned"] == len(layers)
    assert summary["pruned_perplexity"] != summary["dense_perplexity"]
    assert summary["evaluation_tokens"] == 4 * 31
    loaded, levels = load_pruned(out)
    assert levels == dict.fromkeys(layers, 2)
    for name in layers:
        weight = loaded.model.get_submodule(name).weight
        assert int((weight == 0).sum()) >= weight.numel() // 2

    # The second run reuses the cached variants.
    again = tmp_path / "again"
    assert main(prune_args(tiny_mamba2_dir, texts, again, "--level", "2")) == 0
    assert json.loads(capsys.readouterr().out)["variants_pruned"] == 0


def test_levels_file_prunes_listed_layers(tiny_mamba2_dir, texts, tmp_path, capsys):
    layers = [info.name for info in eligible_layers(load_checkpoint(tiny_mamba2_dir).model)]
    levels_file = tmp_path / "levels.json"
    levels_file.write_text(json.dumps({"levels": {layers[0]: 3, layers[1]: 1}}))
    out = tmp_path / "mixed"
    args = prune_args(tiny_mamba2_dir, texts, out, "--levels-file", str(levels_file))
    assert main([*args, "--method", "magnitude"]) == 0
    summary = json.loads(capsys.readouterr().out)

    assert summary["method"] == "magnitude"
    _, levels = load_pruned(out)
    assert levels[layers[0]] == 3
    assert levels[layers[1]] == 1
    assert all(levels[name] == 0 for name in layers[2:])


def test_invalid_level_map_fails(tiny_mamba2_dir, texts, tmp_path, capsys):
    levels_file = tmp_path / "levels.json"
    levels_file.write_text(json.dumps({"backbone.layers.0.mixer.conv1d": 2}))
    args = prune_args(tiny_mamba2_dir, texts, tmp_path / "out", "--levels-file", str(levels_file))
    assert main(args) == 1
    assert "cannot be pruned" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [("[1, 2]", "contains no level map"), ('{"a": "two"}', "not an integer"), ("{", "not valid")],
)
def test_read_level_map_rejects(tmp_path, content, message):
    path = tmp_path / "levels.json"
    path.write_text(content)
    with pytest.raises(PruningError, match=message):
        read_level_map(path)


def test_read_level_map_accepts_export_format(tmp_path):
    path = tmp_path / "cn4_levels.json"
    path.write_text(json.dumps({"layers": {"a.in_proj": {"level": 2, "pattern": "x"}}}))
    assert read_level_map(path) == {"a.in_proj": 2}


def test_prune_rejects_nonempty_out_before_pruning(tiny_mamba2_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data\n")
    status = main(["prune", "--model", str(tiny_mamba2_dir), "--level", "2", "--out", str(out)])
    assert status == 1
    error = capsys.readouterr().err
    assert "is not empty" in error
    assert "--overwrite" in error
    assert (out / "keep.txt").read_text() == "user data\n"
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
