"""Cn4 packed storage and the numba kernels against a masked dense float64 product."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from latency_models.kernels import (
    GROUP_SIZE,
    PackedCn4,
    cn4_matmul,
    cn4_matvec,
    dense_matmul,
    dense_matvec,
    pack_cn4,
)
from search.errors import PruningError

FLOAT32_EPS = float(np.finfo(np.float32).eps)

# [out, in] of the Mamba-130m Linears (in_proj, x_proj, dt_proj, out_proj), then odd row counts.
MAMBA_130M_SHAPES = [(3072, 768), (80, 1536), (1536, 48), (768, 1536)]
ODD_SHAPES = [(1, 4), (7, 12), (33, 20), (129, 64)]
SHAPES = MAMBA_130M_SHAPES + ODD_SHAPES


def pruned_weight(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """Return a random float32 weight with the n smallest |w| of every group of 4 zeroed."""
    weight = rng.standard_normal(shape).astype(np.float32)
    groups = weight.reshape(shape[0], -1, GROUP_SIZE)
    smallest = np.argsort(np.abs(groups), axis=-1)[..., :n]
    np.put_along_axis(groups, smallest, 0.0, axis=-1)
    return weight


def assert_close_to_reference(result, weight, tokens, bias=None) -> None:
    """Check ``result`` against X Wᵀ + b in float64 within the float32 summation error bound.

    Summing k float32 products has an error of at most about k * eps * sum |w x| (the γ_k bound
    with eps = 2u, so twice the worst case), with k = in_features plus one for the bias.
    """
    weight64 = weight.astype(np.float64)
    tokens64 = np.atleast_2d(tokens).astype(np.float64)
    reference = tokens64 @ weight64.T
    scale = np.abs(tokens64) @ np.abs(weight64).T
    if bias is not None:
        reference += bias.astype(np.float64)
        scale += np.abs(bias.astype(np.float64))
    bound = (weight.shape[1] + 1) * FLOAT32_EPS * scale
    error = np.abs(np.atleast_2d(result).astype(np.float64) - reference)
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert np.all(error <= bound), (
        f"error {error[worst]:.3g} above bound {bound[worst]:.3g} at {worst}"
    )


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_pack_unpack_roundtrip(n):
    rng = np.random.default_rng(10 + n)
    weight = pruned_weight(rng, (33, 20), n)
    packed = pack_cn4(weight, n)
    assert packed.n == n
    expected_columns = 5 * (GROUP_SIZE - n) if n else 20
    assert packed.values.shape == (33, expected_columns)
    assert packed.values.dtype == np.float32
    assert np.array_equal(packed.unpack(), weight)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_pack_codes_are_keep_masks(n):
    rng = np.random.default_rng(20 + n)
    weight = pruned_weight(rng, (9, 16), n)
    packed = pack_cn4(weight, n)
    assert packed.codes.shape == (9, 4)
    assert packed.codes.dtype == np.uint8
    bits = (packed.codes[:, :, None] >> np.arange(GROUP_SIZE)) & 1
    assert np.all(bits.sum(axis=-1) == GROUP_SIZE - n)
    assert np.array_equal(bits.astype(bool), weight.reshape(9, 4, GROUP_SIZE) != 0)
    # Kept values are the non-zeros of each row in column order.
    assert np.array_equal(packed.values, weight[weight != 0].reshape(9, -1))


def test_pack_level_zero_has_no_codes():
    weight = np.arange(18, dtype=np.float32).reshape(3, 6)
    packed = pack_cn4(weight, 0)
    assert packed.codes.shape == (3, 0)
    assert packed.groups == 0
    assert np.array_equal(packed.values, weight)
    assert packed.nbytes == weight.nbytes


def test_pack_nbytes_counts_values_and_codes():
    weight = pruned_weight(np.random.default_rng(3), (3072, 768), 2)
    packed = pack_cn4(weight, 2)
    assert packed.nbytes == 3072 * 192 * (2 * 4 + 1)


def test_pack_accepts_torch_tensor():
    weight = pruned_weight(np.random.default_rng(4), (5, 8), 1)
    packed = pack_cn4(torch.from_numpy(weight), 1, bias=torch.ones(5))
    assert np.array_equal(packed.unpack(), weight)
    assert packed.bias is not None
    assert np.array_equal(packed.bias, np.ones(5, dtype=np.float32))


def test_pack_too_few_zeros_names_row_and_group():
    weight = pruned_weight(np.random.default_rng(5), (6, 16), 2)
    weight[4, 8:12] = [1.0, 0.5, 0.25, 0.0]  # one zero where level 2 needs two
    with pytest.raises(PruningError, match=r"row 4, group 2 \(input columns 8\.\.11\)"):
        pack_cn4(weight, 2)


def test_pack_dense_weight_at_level_raises():
    weight = np.ones((4, 8), dtype=np.float32)
    with pytest.raises(PruningError, match="8 groups in all"):
        pack_cn4(weight, 1)


@pytest.mark.parametrize("level", [-1, 4, 2.0, True, "2"])
def test_pack_invalid_level_raises(level):
    with pytest.raises(PruningError, match="level n="):
        pack_cn4(np.zeros((2, 8), dtype=np.float32), level)


def test_pack_in_features_not_multiple_of_four():
    weight = np.zeros((2, 6), dtype=np.float32)
    with pytest.raises(PruningError, match="in_features=6 is not a multiple of 4"):
        pack_cn4(weight, 1)
    assert np.array_equal(pack_cn4(weight, 0).unpack(), weight)


def test_pack_rejects_wrong_rank_and_bias():
    with pytest.raises(ValueError, match="2-D matrix"):
        pack_cn4(np.zeros(8, dtype=np.float32), 1)
    with pytest.raises(ValueError, match="bias has 3 entries"):
        pack_cn4(np.zeros((2, 8), dtype=np.float32), 1, bias=np.zeros(3))


@pytest.mark.parametrize("n", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_matvec_matches_masked_dense(n, shape):
    rng = np.random.default_rng([n, *shape])
    weight = pruned_weight(rng, shape, n)
    packed = pack_cn4(weight, n)
    x = rng.standard_normal(shape[1]).astype(np.float32)
    assert_close_to_reference(cn4_matvec(packed, x), weight, x)


@pytest.mark.parametrize("n", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
@pytest.mark.parametrize("tokens", [2, 33])
def test_matmul_matches_masked_dense(n, shape, tokens):
    rng = np.random.default_rng([n, tokens, *shape])
    weight = pruned_weight(rng, shape, n)
    packed = pack_cn4(weight, n)
    x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
    result = cn4_matmul(packed, x)
    assert result.shape == (tokens, shape[0])
    assert_close_to_reference(result, weight, x)


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_kernels_add_bias(n):
    rng = np.random.default_rng(30 + n)
    weight = pruned_weight(rng, (37, 24), n)
    bias = rng.standard_normal(37).astype(np.float32)
    packed = pack_cn4(weight, n, bias=bias)
    x = rng.standard_normal((3, 24)).astype(np.float32)
    assert_close_to_reference(cn4_matvec(packed, x[0]), weight, x[0], bias)
    assert_close_to_reference(cn4_matmul(packed, x), weight, x, bias)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_groups_with_extra_zeros(n):
    # Weights pruned to level 3 with whole zero rows meet every level, so groups keep zeros.
    rng = np.random.default_rng(40 + n)
    weight = pruned_weight(rng, (31, 48), 3)
    weight[5] = 0.0
    weight[30] = 0.0
    weight[7, :24] = 0.0
    packed = pack_cn4(weight, n)
    assert packed.values.shape == (31, 12 * (GROUP_SIZE - n))
    assert np.array_equal(packed.unpack(), weight)
    assert np.all(packed.values[5] == 0.0)
    x = rng.standard_normal((4, 48)).astype(np.float32)
    y = cn4_matvec(packed, x[0])
    assert y[5] == 0.0
    assert y[30] == 0.0
    assert_close_to_reference(y, weight, x[0])
    assert_close_to_reference(cn4_matmul(packed, x), weight, x)


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_all_zero_matrix_gives_zeros(n):
    packed = pack_cn4(np.zeros((17, 32), dtype=np.float32), n)
    x = np.random.default_rng(6).standard_normal((3, 32)).astype(np.float32)
    assert np.array_equal(cn4_matvec(packed, x[0]), np.zeros(17, dtype=np.float32))
    assert np.array_equal(cn4_matmul(packed, x), np.zeros((3, 17), dtype=np.float32))


def test_dense_kernels_match_reference():
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((65, 30)).astype(np.float32)
    bias = rng.standard_normal(65).astype(np.float32)
    x = rng.standard_normal((40, 30)).astype(np.float32)
    assert_close_to_reference(dense_matvec(weight, x[0]), weight, x[0])
    assert_close_to_reference(dense_matvec(weight, x[0], bias=bias), weight, x[0], bias)
    assert_close_to_reference(dense_matmul(weight, x), weight, x)
    assert_close_to_reference(dense_matmul(weight, x, bias=bias), weight, x, bias)


def test_matvec_writes_into_out():
    rng = np.random.default_rng(8)
    weight = pruned_weight(rng, (10, 16), 2)
    packed = pack_cn4(weight, 2)
    x = rng.standard_normal(16).astype(np.float32)
    out = np.full(10, np.nan, dtype=np.float32)
    result = cn4_matvec(packed, x, out=out)
    assert result is out
    assert_close_to_reference(out, weight, x)
    out_matrix = np.full((3, 10), np.nan, dtype=np.float32)
    assert cn4_matmul(packed, np.tile(x, (3, 1)), out=out_matrix) is out_matrix
    assert np.all(np.isfinite(out_matrix))


def test_front_functions_reject_bad_shapes():
    packed = pack_cn4(pruned_weight(np.random.default_rng(9), (10, 16), 1), 1)
    with pytest.raises(ValueError, match=r"expected \(16,\)"):
        cn4_matvec(packed, np.zeros(12, dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected \(tokens, 16\)"):
        cn4_matmul(packed, np.zeros((2, 12), dtype=np.float32))
    with pytest.raises(ValueError, match="C-contiguous float32"):
        cn4_matvec(packed, np.zeros(16, dtype=np.float32), out=np.zeros(10, dtype=np.float64))
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        cn4_matvec(packed, np.zeros(16, dtype=np.float32), out=np.zeros(9, dtype=np.float32))


def test_matvec_converts_input_dtype():
    rng = np.random.default_rng(11)
    weight = pruned_weight(rng, (12, 8), 3)
    packed = pack_cn4(weight, 3)
    x = rng.standard_normal(8)
    assert_close_to_reference(cn4_matvec(packed, x), weight, x.astype(np.float32))
    assert_close_to_reference(cn4_matvec(packed, torch.from_numpy(x)), weight, x.astype(np.float32))


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_results_independent_of_thread_count(n):
    # Each output row is computed by one thread in a fixed order, so the thread count cannot
    # change the rounding.
    rng = np.random.default_rng(50 + n)
    weight = pruned_weight(rng, (101, 64), n)
    packed = pack_cn4(weight, n)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = (cn4_matvec(packed, x[0]), cn4_matmul(packed, x))
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        parallel = (cn4_matvec(packed, x[0]), cn4_matmul(packed, x))
    finally:
        numba.set_num_threads(previous)
    assert np.array_equal(single[0], parallel[0])
    assert np.array_equal(single[1], parallel[1])


def test_packed_dataclass_fields():
    packed = pack_cn4(pruned_weight(np.random.default_rng(12), (6, 12), 1), 1)
    assert isinstance(packed, PackedCn4)
    assert (packed.out_features, packed.in_features) == (6, 12)
    assert packed.kept == 3
    assert packed.groups == 3
    assert packed.bias is None
