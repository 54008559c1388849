"""The on-disk variant cache and level-map assembly on tiny Mamba and Mamba2 checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from search.calibration import collect_layer_stats
from search.cn4 import count_cn4_violations, prune_obs_levels, prune_wanda
from search.errors import PruningError
from search.models import eligible_layers, load_checkpoint
from search.variants import MANIFEST_NAME, VariantCache, apply_level_map, assemble


pytestmark = pytest.mark.usefixtures("single_torch_thread")

LEVELS = (1, 2, 3)


def random_windows(vocab: int, count: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=generator)


def dense_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def make_cache(root: Path, loaded, method: str = "obs") -> VariantCache:
    return VariantCache(
        root,
        model_fingerprint=loaded.fingerprint,
        calibration_fingerprint="windows-seed-0",
        method=method,
    )


@pytest.fixture(scope="module", params=["mamba", "mamba2"])
def prepared(request, tiny_mamba_dir, tiny_mamba2_dir, tmp_path_factory):
    """A loaded tiny model with its calibration statistics and a filled OBS variant cache."""
    directory = tiny_mamba_dir if request.param == "mamba" else tiny_mamba2_dir
    loaded = load_checkpoint(directory)
    names = [info.name for info in eligible_layers(loaded.model)]
    windows = random_windows(loaded.model.config.vocab_size, count=4, length=32)
    stats = collect_layer_stats(loaded.model, windows, names)
    cache = make_cache(tmp_path_factory.mktemp("variants"), loaded)
    calls = []
    report = cache.prepare(loaded.model, names, LEVELS, stats, progress=lambda *a: calls.append(a))
    return loaded, names, stats, cache, report, calls, windows


def test_prepare_prunes_every_variant(prepared):
    loaded, names, _, cache, report, calls, _ = prepared
    assert report.computed == len(names) * len(LEVELS)
    assert report.reused == 0
    assert cache.prunings == len(names) * len(LEVELS)
    assert calls[-1] == (len(names) * len(LEVELS), len(names) * len(LEVELS))
    assert cache.missing(names, (0, 1, 2, 3)) == []
    for name in names:
        for level in LEVELS:
            assert count_cn4_violations(cache.load(name, level), level) == 0
            assert cache.load_mask(name, level).sum() == cache.load(name, level).numel() * (
                4 - level
            ) // 4


@pytest.mark.parametrize("level", LEVELS)
def test_uniform_level_runs_with_finite_logits(prepared, level):
    loaded, names, _, cache, _, _, windows = prepared
    model = loaded.model
    before = dense_weights(model)
    embedding = model.get_input_embeddings().weight.detach().clone()

    with apply_level_map(model, dict.fromkeys(names, level), cache):
        for name in names:
            assert count_cn4_violations(model.get_submodule(name).weight, level) == 0
        with torch.no_grad():
            logits = model(input_ids=windows[:2]).logits
        assert torch.isfinite(logits).all()
        assert torch.equal(model.get_input_embeddings().weight, embedding)

    after = dense_weights(model)
    for name, weight in before.items():
        assert torch.equal(after[name], weight), name


def test_tied_embeddings_unchanged(prepared):
    loaded, names, _, cache, _, _, _ = prepared
    model = loaded.model
    embedding = model.get_input_embeddings().weight.detach().clone()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (loaded.arch == "mamba")
    assert "lm_head" not in names or not tied

    with apply_level_map(model, dict.fromkeys(names, 3), cache):
        assert torch.equal(model.get_input_embeddings().weight, embedding)
        assert torch.equal(model.get_output_embeddings().weight, model.lm_head.weight)
    if tied:
        with pytest.raises(PruningError, match="shares its weight with the input embedding"):
            cache.prepare(model, ["lm_head"], [2], None)


def test_second_cache_served_from_disk(prepared):
    loaded, names, _, cache, _, _, _ = prepared
    again = make_cache(cache.directory.parent, loaded)
    assert again.key == cache.key
    report = again.prepare(loaded.model, names, LEVELS, stats=None)
    assert report.computed == 0
    assert report.reused == len(names) * len(LEVELS)
    assert again.prunings == 0
    for name in names:
        assert torch.equal(again.load(name, 2), cache.load(name, 2))


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_cache_reused_across_processes(tiny_mamba2_dir, tmp_path):
    loaded = load_checkpoint(tiny_mamba2_dir)
    names = [info.name for info in eligible_layers(loaded.model)]
    cache = make_cache(tmp_path, loaded, "magnitude")
    cache.prepare(loaded.model, names, LEVELS, None)
    script = (
        "import sys\n"
        "from search.models import load_checkpoint\n"
        "from search.variants import VariantCache\n"
        "loaded = load_checkpoint(sys.argv[1])\n"
        "cache = VariantCache(sys.argv[2], model_fingerprint=loaded.fingerprint,\n"
        "                     calibration_fingerprint='windows-seed-0', method='magnitude')\n"
        "report = cache.prepare(loaded.model, sys.argv[3].split(','), [1, 2, 3], None)\n"
        "print(report.computed, report.reused, cache.key)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(loaded.path), str(tmp_path), ",".join(names)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env=child_env(),
    )
    computed, reused, key = result.stdout.split()
    assert int(computed) == 0
    assert int(reused) == len(names) * len(LEVELS)
    assert key == cache.key


def test_assembly_equals_direct_pruning(prepared):
    loaded, names, stats, cache, _, _, _ = prepared
    model = loaded.model
    level_map = {name: (i % 4) for i, name in enumerate(names)}
    dense = {name: model.get_submodule(name).weight.detach().clone() for name in names}

    with apply_level_map(model, level_map, cache):
        for name, level in level_map.items():
            direct = prune_obs_levels(dense[name], LEVELS, stats[name])[LEVELS.index(level)] if level else None
            weight = model.get_submodule(name).weight
            if direct is None:
                assert torch.equal(weight, dense[name])
            else:
                assert torch.equal(weight, direct.weight), name


def test_assemble_leaves_variants_in(prepared):
    loaded, names, _, cache, _, _, _ = prepared
    model = loaded.model
    before = dense_weights(model)
    try:
        assemble(model, dict.fromkeys(names, 2), cache)
        for name in names:
            assert torch.equal(model.get_submodule(name).weight, cache.load(name, 2))
    finally:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(before[name])


def test_dense_restored_after_error(prepared):
    loaded, names, _, cache, _, _, _ = prepared
    model = loaded.model
    before = dense_weights(model)
    with pytest.raises(RuntimeError, match="inside the context"):
        with apply_level_map(model, dict.fromkeys(names, 3), cache):
            raise RuntimeError("failure inside the context")
    for name, weight in dense_weights(model).items():
        assert torch.equal(weight, before[name])


def test_manifest_records_each_variant(prepared):
    _, names, _, cache, _, _, _ = prepared
    manifest = json.loads((cache.directory / MANIFEST_NAME).read_text())
    assert manifest["key"] == cache.key
    assert manifest["settings"]["method"] == "obs"
    assert len(manifest["variants"]) == len(names) * len(LEVELS)
    for entry in manifest["variants"]:
        assert entry["method"] == "obs"
        assert entry["damping"] == pytest.approx(0.01)
        assert 0.0 < entry["relative_error"] < 1.0
        assert entry["seconds"] >= 0.0
        assert entry["note"] is None
    errors = {(e["layer"], e["level"]): e["relative_error"] for e in manifest["variants"]}
    for name in names:
        assert errors[(name, 1)] < errors[(name, 2)] < errors[(name, 3)]


def test_missing_variant_raises_before_change(prepared, tmp_path):
    loaded, names, _, _, _, _, _ = prepared
    empty = make_cache(tmp_path, loaded)
    before = dense_weights(loaded.model)
    with pytest.raises(PruningError, match="call prepare"):
        with apply_level_map(loaded.model, dict.fromkeys(names, 1), empty):
            pass
    for name, weight in dense_weights(loaded.model).items():
        assert torch.equal(weight, before[name])


def test_invalid_level_map_rejected(prepared):
    loaded, names, _, cache, _, _, _ = prepared
    with pytest.raises(PruningError, match="level 5"):
        with apply_level_map(loaded.model, {names[0]: 5}, cache):
            pass
    with pytest.raises(PruningError, match="not found"):
        with apply_level_map(loaded.model, {"backbone.layers.7.mixer.in_proj": 1}, cache):
            pass


def test_missing_stats_rejected(prepared, tmp_path):
    loaded, names, _, _, _, _, _ = prepared
    with pytest.raises(PruningError, match="needs calibration statistics"):
        make_cache(tmp_path, loaded).prepare(loaded.model, names, [1], None)


def test_key_depends_on_settings(prepared, tmp_path):
    loaded, _, _, _, _, _, _ = prepared
    keys = {
        make_cache(tmp_path, loaded, "obs").key,
        make_cache(tmp_path, loaded, "wanda").key,
        make_cache(tmp_path, loaded, "magnitude").key,
        VariantCache(
            tmp_path, model_fingerprint=loaded.fingerprint, calibration_fingerprint="other"
        ).key,
        VariantCache(
            tmp_path,
            model_fingerprint=loaded.fingerprint,
            calibration_fingerprint="windows-seed-0",
            damping=0.1,
        ).key,
    }
    assert len(keys) == 5


def test_wanda_cache_matches_direct(prepared, tmp_path):
    loaded, names, stats, _, _, _, _ = prepared
    cache = make_cache(tmp_path, loaded, "wanda")
    cache.prepare(loaded.model, names[:2], [2], stats)
    for name in names[:2]:
        direct = prune_wanda(loaded.model.get_submodule(name).weight.detach(), 2, stats[name])
        assert torch.equal(cache.load(name, 2), direct.weight)
        assert cache.record(name, 2).method == "wanda"


def test_default_root_under_cn4_home(prepared, cn4_home):
    loaded, _, _, _, _, _, _ = prepared
    cache = VariantCache(model_fingerprint=loaded.fingerprint, calibration_fingerprint="x")
    assert cache.directory.parent == cn4_home / "variants"


def test_killed_run_leaves_whole_entries(tiny_mamba2_dir, tmp_path):
    loaded = load_checkpoint(tiny_mamba2_dir)
    names = [info.name for info in eligible_layers(loaded.model)]
    # A child process prunes by magnitude in a loop under fresh keys; kill it mid-write.
    script = (
        "import itertools, sys\n"
        "from search.models import load_checkpoint\n"
        "from search.variants import VariantCache\n"
        "loaded = load_checkpoint(sys.argv[1])\n"
        "names = sys.argv[3].split(',')\n"
        "print('ready', flush=True)\n"
        "for i in itertools.count():\n"
        "    cache = VariantCache(sys.argv[2], model_fingerprint=loaded.fingerprint,\n"
        "                         calibration_fingerprint=f'run-{i}', method='magnitude')\n"
        "    cache.prepare(loaded.model, names, [1, 2, 3], None)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(loaded.path), str(tmp_path), ",".join(names)],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(2.0)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)

    entries = list(tmp_path.glob("*/*.safetensors"))
    assert len(entries) > 0
    for path in entries:
        with safe_open(str(path), framework="pt") as handle:
            assert handle.metadata()["method"] == "magnitude"
            weight = handle.get_tensor("weight")
            assert torch.isfinite(weight).all()
            assert count_cn4_violations(weight, int(handle.metadata()["level"])) == 0
    for manifest in tmp_path.glob(f"*/{MANIFEST_NAME}"):
        json.loads(manifest.read_text())
