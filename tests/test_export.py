"""Saving pruned checkpoints with levels and masks, and verifying them on reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from search.errors import CheckpointError, PruningError
from search.export import (
    FORMAT_VERSION,
    LEVELS_FILE,
    MASKS_FILE,
    keep_mask_from_weight,
    load_pruned,
    read_masks,
    save_pruned,
    verify_levels,
)
from search.models import eligible_layers, get_module, load_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent

MAMBA_LEVELS = {
    "backbone.layers.0.mixer.in_proj": 2,
    "backbone.layers.0.mixer.x_proj": 1,
    "backbone.layers.0.mixer.dt_proj": 3,
    "backbone.layers.1.mixer.out_proj": 2,
    "backbone.layers.1.mixer.in_proj": 0,
}
MAMBA2_LEVELS = {
    "backbone.layers.0.mixer.in_proj": 1,
    "backbone.layers.1.mixer.out_proj": 3,
    "lm_head": 2,
}

# Runs in a fresh interpreter: loads each export given on the command line, verifies it in
# float32 and bfloat16, and prints one JSON report per export for the test to compare.
RELOAD_SCRIPT = """
import hashlib, json, sys
import torch
from search.export import load_pruned, verify_levels

for export_dir in sys.argv[1:]:
    loaded, levels = load_pruned(export_dir)
    model = loaded.model
    embedding = model.get_input_embeddings().weight.detach()
    report = {
        "levels": levels,
        "dtype": str(next(model.parameters()).dtype),
        "embedding_sha256": hashlib.sha256(embedding.numpy().tobytes()).hexdigest(),
        "head_tied": model.lm_head.weight.data_ptr() == embedding.data_ptr(),
    }
    for dtype in ("float32", "bfloat16"):
        model = model.to(getattr(torch, dtype))
        report[dtype] = {
            name: [check.level, check.groups, check.groups_below_level, check.min_zeros]
            for name, check in verify_levels(model, levels).items()
        }
    print(json.dumps(report))
"""


def prune_by_magnitude(model, level_map) -> dict[str, torch.Tensor]:
    """Zero the n smallest-magnitude weights of each group of 4 inputs; return the keep masks."""
    masks = {}
    for name, level in level_map.items():
        if level == 0:
            continue
        weight = get_module(model, name).weight
        out_features, in_features = weight.shape
        groups = weight.detach().reshape(out_features, in_features // 4, 4)
        dropped = groups.abs().topk(level, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, dropped, False)
        with torch.no_grad():
            weight.mul_(keep.reshape(out_features, in_features))
        masks[name] = keep.reshape(out_features, in_features)
    return masks


def embedding_digest(model) -> str:
    import hashlib

    weight = model.get_input_embeddings().weight.detach().float()
    return hashlib.sha256(weight.numpy().tobytes()).hexdigest()


def run_reload_script(*export_dirs: Path) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, *map(str, export_dirs)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.fixture
def pruned_mamba(tiny_mamba_dir):
    loaded = load_checkpoint(tiny_mamba_dir)
    masks = prune_by_magnitude(loaded.model, MAMBA_LEVELS)
    return loaded, masks


# Saving and reloading


def test_reload_in_fresh_process(tiny_mamba_dir, tiny_mamba2_dir, tmp_path):
    # One interpreter checks both architectures, because starting one costs several seconds.
    cases = [(tiny_mamba_dir, MAMBA_LEVELS, True), (tiny_mamba2_dir, MAMBA2_LEVELS, False)]
    exports = []
    for index, (source, level_map, _) in enumerate(cases):
        loaded = load_checkpoint(source)
        prune_by_magnitude(loaded.model, level_map)
        exports.append((loaded, save_pruned(loaded, level_map, tmp_path / f"export{index}")))

    reports = run_reload_script(*(export_dir for _, export_dir in exports))

    assert len(reports) == 2
    for (_, level_map, tied), (loaded, _), report in zip(cases, exports, reports):
        eligible = {info.name: info for info in eligible_layers(loaded.model)}
        assert report["levels"] == {name: level_map.get(name, 0) for name in eligible}
        assert report["dtype"] == "torch.float32"
        assert report["embedding_sha256"] == embedding_digest(loaded.model)
        assert report["head_tied"] is tied
        for dtype in ("float32", "bfloat16"):
            assert sorted(report[dtype]) == sorted(eligible)
            for name, (level, groups, below, min_zeros) in report[dtype].items():
                assert level == level_map.get(name, 0), (dtype, name)
                assert groups == eligible[name].weights // 4, (dtype, name)
                assert below == 0, (dtype, name)
                assert min_zeros >= level, (dtype, name)


def test_reload_keeps_weights_exactly(pruned_mamba, tmp_path):
    loaded, _ = pruned_mamba
    export_dir = save_pruned(loaded, MAMBA_LEVELS, tmp_path / "export")

    reloaded, levels = load_pruned(export_dir)

    assert levels["backbone.layers.0.mixer.dt_proj"] == 3
    assert levels["backbone.layers.1.mixer.x_proj"] == 0
    saved = loaded.model.state_dict()
    for name, tensor in reloaded.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_tied_embedding_unchanged(tiny_mamba_dir, tmp_path):
    loaded = load_checkpoint(tiny_mamba_dir)
    dense = embedding_digest(loaded.model)
    prune_by_magnitude(loaded.model, MAMBA_LEVELS)
    after_pruning = embedding_digest(loaded.model)
    export_dir = save_pruned(loaded, MAMBA_LEVELS, tmp_path / "export")
    reloaded, _ = load_pruned(export_dir)

    assert after_pruning == dense
    assert embedding_digest(reloaded.model) == dense
    embedding = reloaded.model.get_input_embeddings().weight
    assert reloaded.model.lm_head.weight.data_ptr() == embedding.data_ptr()
    with safe_open(export_dir / "model.safetensors", framework="pt") as reader:
        names = set(reader.keys())
    assert "backbone.embeddings.weight" in names
    assert "lm_head.weight" not in names


def test_levels_file_contents(pruned_mamba, tmp_path):
    loaded, _ = pruned_mamba
    export_dir = save_pruned(loaded, MAMBA_LEVELS, tmp_path / "export", metadata={"trial": 7})

    record = json.loads((export_dir / LEVELS_FILE).read_text())

    assert record["format_version"] == FORMAT_VERSION
    assert record["source_fingerprint"] == loaded.fingerprint
    assert record["metadata"] == {"trial": 7}
    assert sorted(record["layers"]) == sorted(info.name for info in eligible_layers(loaded.model))
    assert record["layers"]["backbone.layers.0.mixer.in_proj"] == {
        "level": 2,
        "pattern": "2 zeros / 2 kept",
        "out_features": 256,
        "in_features": 64,
    }
    assert record["layers"]["backbone.layers.0.mixer.x_proj"]["pattern"] == "1 zeros / 3 kept"
    assert record["layers"]["backbone.layers.0.mixer.dt_proj"]["pattern"] == "3 zeros / 1 kept"
    assert record["layers"]["backbone.layers.1.mixer.x_proj"]["pattern"] == "0 zeros / 4 kept"
    # Zeroed: in_proj 256*64/2 + x_proj 20*128/4 + dt_proj 128*4*3/4 + out_proj 64*128/2 = 13312.
    assert record["zeroed_share_of_eligible_weights"] == pytest.approx(13312 / 55296)


def test_export_dir_follows_umask(pruned_mamba, tmp_path):
    loaded, _ = pruned_mamba
    umask = os.umask(0)
    os.umask(umask)

    export_dir = save_pruned(loaded, MAMBA_LEVELS, tmp_path / "export")

    assert export_dir.stat().st_mode & 0o777 == 0o777 & ~umask
    assert [path.name for path in tmp_path.iterdir()] == ["export"]


def test_masks_file_matches_pruning(pruned_mamba, tmp_path):
    loaded, masks = pruned_mamba
    export_dir = save_pruned(loaded, MAMBA_LEVELS, tmp_path / "export")

    with safe_open(export_dir / MASKS_FILE, framework="pt") as reader:
        assert sorted(reader.keys()) == sorted(n for n, level in MAMBA_LEVELS.items() if level)
        assert {reader.get_slice(name).get_dtype() for name in reader.keys()} == {"BOOL"}
    stored = read_masks(export_dir / MASKS_FILE)
    for name, mask in masks.items():
        assert torch.equal(stored[name], mask), name
        kept = stored[name].reshape(mask.shape[0], -1, 4).sum(dim=-1)
        assert (kept == 4 - MAMBA_LEVELS[name]).all(), name


def test_save_passes_given_masks(pruned_mamba, tmp_path):
    loaded, masks = pruned_mamba
    export_dir = save_pruned(loaded, MAMBA_LEVELS, tmp_path / "export", masks=masks)

    assert set(read_masks(export_dir / MASKS_FILE)) == set(masks)


# Refusals


def test_save_rejects_violating_layer(tiny_mamba_dir, tmp_path):
    loaded = load_checkpoint(tiny_mamba_dir)
    prune_by_magnitude(loaded.model, {"backbone.layers.0.mixer.in_proj": 1})
    out_dir = tmp_path / "runs" / "export"

    with pytest.raises(PruningError) as error:
        save_pruned(loaded, {"backbone.layers.0.mixer.in_proj": 2}, out_dir)

    message = str(error.value)
    # in_proj is 256 x 64: 4096 groups, each holding exactly 1 zero after level-1 pruning.
    assert "backbone.layers.0.mixer.in_proj at level 2 (2 zeros / 2 kept)" in message
    assert "4096 of 4096 groups contain fewer than 2 zeros (fewest: 1)" in message
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_mask_over_nonzero(pruned_mamba, tmp_path):
    loaded, masks = pruned_mamba
    name = "backbone.layers.0.mixer.in_proj"
    wrong = masks[name].roll(1, dims=1)

    with pytest.raises(PruningError, match=f"{name} at level 2") as error:
        save_pruned(loaded, MAMBA_LEVELS, tmp_path / "export", masks={name: wrong})
    assert "masked weights are not zero" in str(error.value)


def test_save_rejects_tied_head(tiny_mamba_dir, tmp_path):
    loaded = load_checkpoint(tiny_mamba_dir)

    with pytest.raises(PruningError, match="'lm_head' cannot be pruned: tied"):
        save_pruned(loaded, {"lm_head": 1}, tmp_path / "export")


def test_save_rejects_non_empty_dir(pruned_mamba, tmp_path):
    loaded, _ = pruned_mamba
    out_dir = tmp_path / "export"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")

    with pytest.raises(CheckpointError, match="is not empty"):
        save_pruned(loaded, MAMBA_LEVELS, out_dir)
    assert (out_dir / "notes.txt").read_text() == "keep me"

    save_pruned(loaded, MAMBA_LEVELS, out_dir, overwrite=True)
    assert not (out_dir / "notes.txt").exists()
    assert (out_dir / LEVELS_FILE).is_file()


def test_save_rejects_source_dir(tiny_mamba_dir):
    loaded = load_checkpoint(tiny_mamba_dir)

    with pytest.raises(CheckpointError, match="contains the source checkpoint"):
        save_pruned(loaded, {}, tiny_mamba_dir.parent, overwrite=True)
    assert (tiny_mamba_dir / "model.safetensors").is_file()


def test_save_rejects_non_json_metadata(pruned_mamba, tmp_path):
    loaded, _ = pruned_mamba

    with pytest.raises(CheckpointError, match="metadata is not JSON-serializable"):
        save_pruned(loaded, MAMBA_LEVELS, tmp_path / "export", metadata={"at": object()})


def test_load_rejects_changed_weight(pruned_mamba, tmp_path):
    loaded, masks = pruned_mamba
    export_dir = save_pruned(loaded, MAMBA_LEVELS, tmp_path / "export")
    name = "backbone.layers.1.mixer.out_proj"
    tensors = load_file(export_dir / "model.safetensors")
    weight = tensors[f"{name}.weight"]
    # Each group has 2 pruned positions, listed in order: every other one is a different group.
    pruned_positions = (~masks[name]).nonzero()[::2][:5]
    weight[pruned_positions[:, 0], pruned_positions[:, 1]] = 0.5
    save_file(tensors, export_dir / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(CheckpointError) as error:
        load_pruned(export_dir)
    message = str(error.value)
    assert f"{name} at level 2 (2 zeros / 2 kept)" in message
    assert "5 of 2048 groups contain fewer than 2 zeros (fewest: 1)" in message
    assert "5 masked weights are not zero" in message


def test_load_rejects_missing_mask(pruned_mamba, tmp_path):
    loaded, masks = pruned_mamba
    export_dir = save_pruned(loaded, MAMBA_LEVELS, tmp_path / "export")
    stored = read_masks(export_dir / MASKS_FILE)
    del stored["backbone.layers.0.mixer.x_proj"]
    save_file(stored, export_dir / MASKS_FILE)

    with pytest.raises(CheckpointError, match="pruned layers without a mask") as error:
        load_pruned(export_dir)
    assert "backbone.layers.0.mixer.x_proj" in str(error.value)


def test_load_rejects_dense_checkpoint(tiny_mamba_dir):
    with pytest.raises(CheckpointError, match="is not a cn4 export: cn4_levels.json not found"):
        load_pruned(tiny_mamba_dir)


def test_load_rejects_other_format_version(pruned_mamba, tmp_path):
    loaded, _ = pruned_mamba
    export_dir = save_pruned(loaded, MAMBA_LEVELS, tmp_path / "export")
    record = json.loads((export_dir / LEVELS_FILE).read_text())
    record["format_version"] = 99
    (export_dir / LEVELS_FILE).write_text(json.dumps(record))

    with pytest.raises(CheckpointError, match="format_version=99"):
        load_pruned(export_dir)


# Level checks


def test_verify_levels_bfloat16(pruned_mamba):
    loaded, masks = pruned_mamba
    model = loaded.model.to(torch.bfloat16)

    checks = verify_levels(model, MAMBA_LEVELS, masks=masks)

    for name, level in MAMBA_LEVELS.items():
        assert checks[name].ok, name
        assert checks[name].min_zeros >= level, name
    assert checks["backbone.layers.0.mixer.x_proj"].masked_nonzero == 0
    assert checks["backbone.layers.1.mixer.in_proj"].masked_nonzero is None


def test_verify_levels_counts_violations(tiny_mamba_dir):
    loaded = load_checkpoint(tiny_mamba_dir)
    prune_by_magnitude(loaded.model, {"backbone.layers.0.mixer.x_proj": 1})

    check = verify_levels(loaded.model, {"backbone.layers.0.mixer.x_proj": 3})[
        "backbone.layers.0.mixer.x_proj"
    ]

    # x_proj is 20 x 128: 640 groups, each with exactly 1 zero.
    assert not check.ok
    assert (check.groups, check.groups_below_level, check.min_zeros) == (640, 640, 1)


def test_keep_mask_marks_lowest_zeros():
    weight = torch.tensor([[0.0, 0.0, 0.0, 2.0, -3.0, 0.0, 1.0, 0.5]])

    mask = keep_mask_from_weight(weight, 2)

    assert mask.tolist() == [[False, False, True, True, True, False, True, False]]
