"""Cn4 masks and the magnitude, Wanda and OBS pruning methods on synthetic layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from search.calibration import LayerStats
from search.cn4 import (
    PruneResult,
    cn4_keep_mask,
    count_cn4_violations,
    obs_reconstruct,
    prune_layer,
    prune_magnitude,
    prune_obs,
    prune_obs_levels,
    prune_wanda,
    reconstruction_error,
)
from search.errors import PruningError


pytestmark = pytest.mark.usefixtures("single_torch_thread")

SHAPES = [(1, 4), (3, 8), (7, 16), (5, 12), (64, 64), (33, 128)]


def correlated_inputs(in_features: int, tokens: int, seed: int) -> torch.Tensor:
    """Return inputs X [in_features, tokens] whose channels are strongly correlated."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(in_features // 2, tokens, generator=generator, dtype=torch.float64)
    mixing = torch.randn(in_features, in_features // 2, generator=generator, dtype=torch.float64)
    noise = 0.1 * torch.randn(in_features, tokens, generator=generator, dtype=torch.float64)
    scales = torch.linspace(0.2, 3.0, in_features, dtype=torch.float64).unsqueeze(1)
    return (mixing @ latent + noise) * scales


def layer_with_inputs(
    out_features: int, in_features: int, tokens: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, LayerStats]:
    generator = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(out_features, in_features, generator=generator)
    inputs = correlated_inputs(in_features, tokens, seed)
    return weight, inputs, LayerStats(hessian=inputs @ inputs.T, tokens=tokens)


def output_error(weight: torch.Tensor, pruned: torch.Tensor, inputs: torch.Tensor) -> float:
    dense_out = weight.double() @ inputs
    return float(torch.linalg.norm(dense_out - pruned.double() @ inputs))


def zeros_per_group(weight: torch.Tensor) -> torch.Tensor:
    rows, cols = weight.shape
    return (weight == 0).reshape(rows, cols // 4, 4).sum(dim=-1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_magnitude_mask_invariant(shape, level):
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(*shape, generator=generator)
    result = prune_magnitude(weight, level)

    assert torch.all(zeros_per_group(result.weight) == level)
    assert torch.all(result.mask.reshape(shape[0], -1, 4).sum(dim=-1) == 4 - level)
    assert torch.equal(result.weight[result.mask], weight[result.mask])
    assert count_cn4_violations(result.weight, level) == 0
    # The pruned weights are the smallest of their group.
    groups = weight.abs().reshape(shape[0], -1, 4)
    keep = result.mask.reshape(shape[0], -1, 4)
    if 0 < level:
        largest_pruned = torch.where(keep, -torch.inf, groups).amax(dim=-1)
        smallest_kept = torch.where(keep, groups, torch.inf).amin(dim=-1)
        assert torch.all(largest_pruned <= smallest_kept)


@pytest.mark.parametrize("method", ["obs", "wanda"])
@pytest.mark.parametrize("shape", [(3, 8), (7, 16), (33, 128)])
@pytest.mark.parametrize("level", [1, 2, 3])
def test_calibrated_methods_mask_invariant(method, shape, level):
    weight, _, stats = layer_with_inputs(*shape, tokens=256, seed=3)
    result = prune_layer(weight, level, stats, method)

    assert result.method == method
    assert torch.all(result.mask.reshape(shape[0], -1, 4).sum(dim=-1) == 4 - level)
    assert torch.all(result.weight[~result.mask] == 0)
    assert count_cn4_violations(result.weight, level) == 0


def test_keep_mask_ties_prune_earlier_columns():
    scores = torch.ones(2, 8)
    mask = cn4_keep_mask(scores, 2)
    expected = torch.tensor([[False, False, True, True] * 2] * 2)
    assert torch.equal(mask, expected)


def test_keep_mask_zeroes_lowest_scores():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.7, 0.1, 0.9]])
    assert cn4_keep_mask(scores, 1).tolist() == [[True, False, True, True] + [True] * 2 + [False, True]]
    assert cn4_keep_mask(scores, 3).tolist() == [[True, False, False, False, False, False, False, True]]


def test_count_violations_counts_groups():
    weight = torch.tensor([[1.0, 0.0, 0.0, 2.0, 1.0, 2.0, 3.0, 0.0], [0.0] * 8])
    assert count_cn4_violations(weight, 0) == 0
    assert count_cn4_violations(weight, 1) == 0
    assert count_cn4_violations(weight, 2) == 1
    assert count_cn4_violations(weight, 3) == 2


@pytest.mark.parametrize("level", [1, 2, 3])
def test_obs_beats_same_mask_without_update(level):
    weight, inputs, stats = layer_with_inputs(48, 64, tokens=512, seed=11)
    for exact in (False, True):
        result = prune_obs(weight, level, stats, exact=exact)
        compensated = output_error(weight, result.weight, inputs)
        masked_only = output_error(weight, weight * result.mask, inputs)
        assert compensated < 0.9 * masked_only


@pytest.mark.parametrize("level", [1, 2, 3])
def test_obs_beats_magnitude_and_wanda(level):
    weight, inputs, stats = layer_with_inputs(64, 128, tokens=1024, seed=5)
    obs = output_error(weight, prune_obs(weight, level, stats, exact=False).weight, inputs)
    magnitude = output_error(weight, prune_magnitude(weight, level).weight, inputs)
    wanda = output_error(weight, prune_wanda(weight, level, stats).weight, inputs)
    assert obs < magnitude
    assert obs < wanda


@pytest.mark.parametrize("level", [1, 2, 3])
def test_obs_reconstruct_matches_lstsq(level):
    weight, inputs, stats = layer_with_inputs(3, 8, tokens=20, seed=2)
    mask = prune_magnitude(weight, level).mask
    reconstructed = obs_reconstruct(weight.double(), mask, stats.hessian)

    x = inputs.numpy()
    w = weight.double().numpy()
    for row in range(3):
        kept = mask[row].numpy()
        solution, *_ = np.linalg.lstsq(x[kept].T, w[row] @ x, rcond=None)
        expected = np.zeros(8)
        expected[kept] = solution
        np.testing.assert_allclose(reconstructed[row].numpy(), expected, atol=1e-6)


def sequential_obs(weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Unblocked OBS for a fixed mask: each pruned weight updates only the columns after it."""
    w = weight.double().clone()
    cols = w.shape[1]
    for j in range(cols):
        inverse = torch.linalg.inv(hessian[j:, j:])
        for row in range(w.shape[0]):
            if not mask[row, j]:
                w[row, j:] -= w[row, j] / inverse[0, 0] * inverse[0, :]
    return w * mask


@pytest.mark.parametrize("level", [1, 2, 3])
def test_obs_sweep_matches_sequential_obs(level):
    weight, _, stats = layer_with_inputs(16, 64, tokens=512, seed=13)
    damping = 0.01
    result = prune_obs(weight, level, stats, damping=damping, block_size=16, exact=False)
    hessian = stats.hessian.clone()
    hessian += damping * hessian.diagonal().mean() * torch.eye(64, dtype=torch.float64)

    expected = sequential_obs(weight, result.mask, hessian)
    torch.testing.assert_close(result.weight.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_obs_exact_improves_on_sweep(level):
    weight, inputs, stats = layer_with_inputs(32, 64, tokens=512, seed=13)
    sweep = prune_obs(weight, level, stats, exact=False)
    exact = prune_obs(weight, level, stats, exact=True)

    assert torch.equal(sweep.mask, exact.mask)
    assert output_error(weight, exact.weight, inputs) < output_error(weight, sweep.weight, inputs)


def test_obs_dead_and_huge_channels_stay_finite():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(64, 64, generator=generator)
    inputs = torch.randn(64, 8, generator=generator, dtype=torch.float64)
    inputs[5] = 0.0
    inputs[17] *= 1e4
    stats = LayerStats(hessian=inputs @ inputs.T, tokens=8)
    for level in (0, 1, 2, 3):
        result = prune_obs(weight, level, stats)
        assert torch.isfinite(result.weight).all()
        assert count_cn4_violations(result.weight, level) == 0
        assert torch.all(result.mask.reshape(64, 16, 4).sum(dim=-1) == 4 - level)
        if level > 0:
            # The dead column costs nothing on the calibration data, so it is pruned first.
            assert not result.mask[:, 5].any()
            assert result.method == "obs"


def test_obs_indefinite_hessian_gets_more_damping():
    hessian = torch.eye(8, dtype=torch.float64)
    hessian[0, 1] = hessian[1, 0] = 1.05  # eigenvalue -0.05, fixed by a damping share of 0.1
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    result = prune_obs(weight, 2, LayerStats(hessian=hessian, tokens=8))

    assert result.method == "obs"
    assert result.damping == pytest.approx(0.1)
    assert result.note is not None and "damping 0.1" in result.note
    assert torch.isfinite(result.weight).all()
    assert count_cn4_violations(result.weight, 2) == 0


def test_obs_hopeless_hessian_falls_back_to_magnitude():
    hessian = torch.eye(8, dtype=torch.float64)
    hessian[0, 1] = hessian[1, 0] = 50.0  # eigenvalue -49, beyond the maximum damping
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    result = prune_obs(weight, 2, LayerStats(hessian=hessian, tokens=8))

    assert result.method == "magnitude"
    assert result.note is not None and "fell back to magnitude" in result.note
    assert torch.equal(result.weight, prune_magnitude(weight, 2).weight)


def test_obs_deterministic():
    weight, _, stats = layer_with_inputs(40, 64, tokens=256, seed=21)
    first = prune_obs(weight, 2, stats)
    second = prune_obs(weight, 2, stats)
    assert torch.equal(first.weight, second.weight)
    assert torch.equal(first.mask, second.mask)


@pytest.mark.parametrize("exact", [False, True])
def test_obs_levels_match_single_level_runs(exact):
    weight, _, stats = layer_with_inputs(24, 32, tokens=256, seed=8)
    together = prune_obs_levels(weight, [0, 1, 2, 3], stats, exact=exact)
    for level, result in zip([0, 1, 2, 3], together):
        alone = prune_obs(weight, level, stats, exact=exact)
        assert torch.equal(result.mask, alone.mask)
        torch.testing.assert_close(result.weight, alone.weight, rtol=0, atol=1e-6)
    assert torch.equal(together[0].weight, weight)


def test_obs_level_zero_is_dense():
    weight, _, stats = layer_with_inputs(8, 16, tokens=64, seed=1)
    result = prune_obs(weight, 0, stats)
    assert torch.equal(result.weight, weight)
    assert result.mask.all()


def test_reconstruction_error_relative():
    weight, inputs, stats = layer_with_inputs(16, 32, tokens=128, seed=6)
    pruned = prune_magnitude(weight, 2).weight
    expected = output_error(weight, pruned, inputs) / float(torch.linalg.norm(weight.double() @ inputs))
    assert reconstruction_error(weight, pruned, stats.hessian) == pytest.approx(expected, rel=1e-9)
    assert reconstruction_error(weight, weight, stats.hessian) == 0.0


def test_prune_result_fields():
    result = prune_magnitude(torch.ones(2, 4), 1)
    assert isinstance(result, PruneResult)
    assert result.damping is None
    assert result.note is None


@pytest.mark.parametrize("in_features", [6, 2, 0])
def test_in_features_not_divisible_rejected(in_features):
    with pytest.raises(PruningError, match=f"in_features={in_features}"):
        prune_magnitude(torch.ones(3, in_features), 1)


@pytest.mark.parametrize("level", [-1, 4, True, 1.0])
def test_invalid_level_rejected(level):
    with pytest.raises(PruningError, match="level"):
        prune_magnitude(torch.ones(3, 8), level)


def test_unknown_method_rejected():
    with pytest.raises(PruningError, match="'sparsegpt' is unknown"):
        prune_layer(torch.ones(3, 8), 1, None, "sparsegpt")


@pytest.mark.parametrize("method", ["obs", "wanda"])
def test_missing_stats_rejected(method):
    with pytest.raises(PruningError, match="needs calibration statistics"):
        prune_layer(torch.ones(3, 8), 1, None, method)


def test_mismatched_hessian_rejected():
    stats = LayerStats(hessian=torch.eye(12, dtype=torch.float64), tokens=4)
    with pytest.raises(PruningError, match="does not fit"):
        prune_obs(torch.ones(3, 8), 1, stats)


def test_nonfinite_weight_rejected():
    weight = torch.ones(3, 8)
    weight[1, 2] = float("nan")
    with pytest.raises(PruningError, match="NaN"):
        prune_magnitude(weight, 1)


def test_obs_overflowing_update_falls_back():
    # Strongly correlated inputs move each pruned weight onto its neighbours, past float32's max.
    hessian = torch.full((8, 8), 1.0, dtype=torch.float64) + 1e-3 * torch.eye(8, dtype=torch.float64)
    weight = torch.full((2, 8), 3e38)
    result = prune_obs(weight, 2, LayerStats(hessian=hessian, tokens=8), exact=False)

    assert result.method == "magnitude"
    assert result.note is not None and "non-finite" in result.note
    assert torch.isfinite(result.weight).all()
    assert count_cn4_violations(result.weight, 2) == 0
