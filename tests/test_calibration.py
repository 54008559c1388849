"""The hooked calibration pass on tiny Mamba and Mamba2 checkpoints."""

from __future__ import annotations

import pytest
import torch

from search.calibration import LayerStats, collect_layer_stats
from search.errors import PruningError
from search.models import eligible_layers, load_checkpoint


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def random_windows(vocab: int, count: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=generator)


@pytest.fixture(scope="module", params=["mamba", "mamba2"])
def loaded(request, tiny_mamba_dir, tiny_mamba2_dir):
    directory = tiny_mamba_dir if request.param == "mamba" else tiny_mamba2_dir
    return load_checkpoint(directory)


def test_one_statistic_per_layer(loaded):
    names = [info.name for info in eligible_layers(loaded.model)]
    windows = random_windows(loaded.model.config.vocab_size, count=5, length=24)
    stats = collect_layer_stats(loaded.model, windows, names, batch_size=2)

    assert sorted(stats) == sorted(names)
    for name in names:
        layer = loaded.model.get_submodule(name)
        assert stats[name].tokens == 5 * 24
        assert stats[name].hessian.dtype == torch.float64
        assert stats[name].hessian.shape == (layer.in_features, layer.in_features)
        torch.testing.assert_close(stats[name].hessian, stats[name].hessian.T, rtol=0, atol=0)
        assert float(stats[name].hessian.diagonal().min()) >= 0.0
        assert float(stats[name].hessian.trace()) > 0.0


def test_hessian_equals_recorded_inputs(loaded):
    name = eligible_layers(loaded.model)[-1].name
    layer = loaded.model.get_submodule(name)
    windows = random_windows(loaded.model.config.vocab_size, count=3, length=16, seed=1)
    recorded = []
    handle = layer.register_forward_pre_hook(lambda module, args: recorded.append(args[0].clone()))
    try:
        with torch.no_grad():
            loaded.model(input_ids=windows, use_cache=False)
    finally:
        handle.remove()
    inputs = torch.cat([x.reshape(-1, x.shape[-1]) for x in recorded]).double()

    stats = collect_layer_stats(loaded.model, windows, [name], batch_size=3)
    torch.testing.assert_close(stats[name].hessian, inputs.T @ inputs, rtol=1e-10, atol=1e-10)
    assert stats[name].tokens == inputs.shape[0]


def test_batch_size_does_not_change_result(loaded):
    names = [info.name for info in eligible_layers(loaded.model)]
    windows = random_windows(loaded.model.config.vocab_size, count=4, length=16, seed=2)
    one = collect_layer_stats(loaded.model, windows, names, batch_size=1)
    four = collect_layer_stats(loaded.model, windows, names, batch_size=4)
    for name in names:
        # float32 forwards differ in the last bits between batch sizes, so compare to the scale.
        scale = float(one[name].hessian.abs().max())
        difference = float((one[name].hessian - four[name].hessian).abs().max())
        assert difference <= 1e-5 * scale
        assert one[name].tokens == four[name].tokens


def test_mamba_dt_proj_reads_x_proj_output(tiny_mamba_dir):
    loaded = load_checkpoint(tiny_mamba_dir)
    mixer = loaded.model.backbone.layers[0].mixer
    windows = random_windows(loaded.model.config.vocab_size, count=2, length=12, seed=3)
    outputs = []
    handle = mixer.x_proj.register_forward_hook(lambda m, args, out: outputs.append(out.clone()))
    try:
        with torch.no_grad():
            loaded.model(input_ids=windows, use_cache=False)
    finally:
        handle.remove()
    rank = mixer.dt_proj.in_features
    time_step = outputs[0][..., :rank].reshape(-1, rank).double()

    name = "backbone.layers.0.mixer.dt_proj"
    stats = collect_layer_stats(loaded.model, windows, [name])
    assert stats[name].tokens == 24
    torch.testing.assert_close(stats[name].hessian, time_step.T @ time_step, rtol=1e-10, atol=1e-10)


def test_hooks_removed_after_error(tiny_mamba2_dir):
    loaded = load_checkpoint(tiny_mamba2_dir)
    names = [info.name for info in eligible_layers(loaded.model)]
    vocab = loaded.model.config.vocab_size
    bad_windows = torch.full((2, 8), vocab + 10)
    with pytest.raises(IndexError):
        collect_layer_stats(loaded.model, bad_windows, names)
    for name in names:
        layer = loaded.model.get_submodule(name)
        assert len(layer._forward_pre_hooks) == 0
        assert len(layer._forward_hooks) == 0


def test_unknown_layer_rejected(tiny_mamba2_dir):
    loaded = load_checkpoint(tiny_mamba2_dir)
    windows = random_windows(loaded.model.config.vocab_size, count=1, length=8)
    with pytest.raises(PruningError, match="'backbone.layers.9.mixer.in_proj' not found"):
        collect_layer_stats(loaded.model, windows, ["backbone.layers.9.mixer.in_proj"])


def test_non_linear_layer_rejected(tiny_mamba2_dir):
    loaded = load_checkpoint(tiny_mamba2_dir)
    windows = random_windows(loaded.model.config.vocab_size, count=1, length=8)
    with pytest.raises(PruningError, match="is a Conv1d, not a Linear"):
        collect_layer_stats(loaded.model, windows, ["backbone.layers.0.mixer.conv1d"])


@pytest.mark.parametrize("shape", [(8,), (0, 8), (2, 0)])
def test_invalid_windows_rejected(tiny_mamba2_dir, shape):
    loaded = load_checkpoint(tiny_mamba2_dir)
    with pytest.raises(PruningError, match="calibration windows"):
        collect_layer_stats(loaded.model, torch.zeros(shape, dtype=torch.long), ["lm_head"])


def test_merge_adds_token_sets():
    first = LayerStats(hessian=torch.eye(4, dtype=torch.float64), tokens=3)
    second = LayerStats(hessian=2 * torch.eye(4, dtype=torch.float64), tokens=5)
    merged = first.merge(second)
    assert merged.tokens == 8
    assert torch.equal(merged.hessian, 3 * torch.eye(4, dtype=torch.float64))
    with pytest.raises(PruningError, match="different layers"):
        first.merge(LayerStats(hessian=torch.eye(8, dtype=torch.float64), tokens=1))
