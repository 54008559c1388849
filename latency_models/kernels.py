"""Packed Cn4 storage and numba CPU kernels for decode (GEMV) and prefill (GEMM).

A Linear at level n (1..3) has n zeros in every group of 4 consecutive input weights, so each
group keeps 4-n values. :class:`PackedCn4` stores the kept values of each row in group order
(float32 ``values`` of shape [out, groups*(4-n)]) and one code byte per group: a 4-bit keep
mask whose bit p is set when position p of the group is kept. Level 0 stores the dense matrix
and no codes.

Kernels, all parallel over output rows with ``prange`` (they use ``numba.get_num_threads()``
threads, so ``numba.set_num_threads`` limits them) and writing into arrays the caller allocates:

- decode ``y = W x`` (one token): ``x`` is first rearranged by position within the group
  (``x_by_position[p, g] = x[4g + p]``), so the four candidates of a group are contiguous
  loads. Each kept value then picks its candidate with register blends on the keep mask and
  costs one multiply-add; a gather ``x[4g + position]`` would not vectorise. Each thread walks
  whole rows in order, so the weights stream from memory sequentially.
- prefill ``Y = X Wᵀ`` (many tokens): each thread takes whole rows and computes every token's
  dot product with the decode kernels' inner loop while the row sits in L1, so the weights
  are read from memory once.

The dense kernels share each loop structure and threading, without codes, so they are the fair
baseline for the Cn4 ones. Sums use ``fastmath`` reassociation and contraction only (no
assumptions about NaN or infinity), so results differ from a sequential float32 sum by rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from search.errors import PruningError

GROUP_SIZE = 4
LEVELS = (0, 1, 2, 3)

# Reassociation lets LLVM vectorise the reductions; contraction allows fused multiply-adds.
# No nnan/ninf flags, so NaN and infinity in inputs propagate as in a plain product.
SUM_FASTMATH = {"reassoc", "contract"}

_DECODE_SIGNATURE = (
    "void(float32[:, ::1], uint8[:, ::1], float32[::1], float32[:, ::1], float32[::1], "
    "float32[::1])"
)
_PREFILL_SIGNATURE = (
    "void(float32[:, ::1], uint8[:, ::1], float32[:, :, ::1], float32[::1], float32[:, ::1])"
)
_DENSE_PREFILL_SIGNATURE = "void(float32[:, ::1], float32[:, ::1], float32[::1], float32[:, ::1])"


@dataclass
class PackedCn4:
    """One Linear's weight in Cn4 packed storage.

    ``values``: float32 [out, groups*(4-n)], the kept weights of each row in group order (the
    whole dense matrix at n = 0). ``codes``: uint8 [out, groups], the keep mask of each group,
    bit p set when input column 4*group + p is kept ([out, 0] at n = 0). ``bias``: float32 [out]
    or None.
    """

    values: np.ndarray
    codes: np.ndarray
    n: int
    out_features: int
    in_features: int
    bias: np.ndarray | None = None

    @property
    def kept(self) -> int:
        """Kept weights per group of 4 (4 at level 0)."""
        return GROUP_SIZE - self.n

    @property
    def groups(self) -> int:
        """Groups of 4 along the input dimension (0 at level 0, which has no groups)."""
        return self.codes.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of weight storage a GEMV reads: values plus codes, bias excluded."""
        return int(self.values.nbytes + self.codes.nbytes)

    def unpack(self) -> np.ndarray:
        """Return the dense float32 weight [out, in], with zeros at the dropped positions."""
        if self.n == 0:
            return self.values.copy()
        shape = (self.out_features, self.groups, GROUP_SIZE)
        positions = np.arange(GROUP_SIZE, dtype=np.uint8)
        kept = ((self.codes[:, :, None] >> positions) & 1).astype(bool)
        dense = np.zeros(shape, dtype=np.float32)
        # Boolean assignment fills the True cells in C order: row, group, then position, which
        # is the order the values were packed in.
        dense[kept] = self.values.reshape(-1)
        return dense.reshape(self.out_features, self.in_features)


def _as_float32_matrix(weight: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    array = np.ascontiguousarray(weight, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix [out, in], got shape {array.shape}")
    return array


def pack_cn4(
    weight: np.ndarray | torch.Tensor, n: int, bias: np.ndarray | torch.Tensor | None = None
) -> PackedCn4:
    """Pack a weight [out, in] that already has at least ``n`` zeros in every group of 4.

    Groups with more zeros than ``n`` keep some zeros as explicit values, so every group stores
    exactly 4-n values. Raises PruningError for a level outside 0..3, an input dimension that
    groups of 4 do not tile, or a group with fewer than ``n`` zeros, because packing it would
    silently drop non-zero weights.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) not in LEVELS:
        raise PruningError(f"level n={n!r} is invalid: a Cn4 level is 0, 1, 2 or 3 zeros per group of 4")
    n = int(n)
    matrix = _as_float32_matrix(weight, "weight")
    out_features, in_features = matrix.shape
    bias_array = _bias_array(bias, out_features)
    if n == 0:
        codes = np.zeros((out_features, 0), dtype=np.uint8)
        return PackedCn4(matrix.copy(), codes, 0, out_features, in_features, bias_array)
    if in_features % GROUP_SIZE:
        raise PruningError(
            f"in_features={in_features} is not a multiple of 4, so groups of 4 do not tile the "
            f"input dimension: keep this layer at level 0"
        )

    # 1. Check that every group has at least n zeros.
    groups = matrix.reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    nonzero = groups != 0
    zero_counts = GROUP_SIZE - nonzero.sum(axis=-1)
    short_rows, short_groups = np.nonzero(zero_counts < n)
    if short_rows.size:
        row, group = int(short_rows[0]), int(short_groups[0])
        raise PruningError(
            f"row {row}, group {group} (input columns {4 * group}..{4 * group + 3}) has "
            f"{int(zero_counts[row, group])} zeros, fewer than level n={n} needs, and "
            f"{short_rows.size} groups in all fall short: prune the weight to level {n} before "
            f"packing it"
        )

    # 2. Keep the non-zeros, then fill up to 4-n with the leftmost zeros; the stable sort puts
    # non-zero positions first, each part in position order.
    kept = GROUP_SIZE - n
    order = np.argsort(~nonzero, axis=-1, kind="stable")[..., :kept]
    positions = np.sort(order, axis=-1)
    values = np.take_along_axis(groups, positions, axis=-1).reshape(out_features, -1)
    codes = np.bitwise_or.reduce(np.left_shift(1, positions), axis=-1).astype(np.uint8)
    return PackedCn4(
        np.ascontiguousarray(values), codes, n, out_features, in_features, bias_array
    )


def _bias_array(bias: np.ndarray | torch.Tensor | None, out_features: int) -> np.ndarray | None:
    if bias is None:
        return None
    if isinstance(bias, torch.Tensor):
        bias = bias.detach().to(device="cpu", dtype=torch.float32).numpy()
    array = np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
    if array.shape[0] != out_features:
        raise ValueError(f"bias has {array.shape[0]} entries, expected out_features={out_features}")
    return array


# ---------------------------------------------------------------------------------------------
# Decode kernels: y[r] = sum over input columns of W[r, i] * x[i], plus bias[r] when given.
# Shared signature: (values, codes, x, x_by_position [4, groups] scratch, bias ([out] or [0]), y).


@numba.njit(cache=True)
def _fill_x_by_position(x, x_by_position):
    groups = x_by_position.shape[1]
    for g in range(groups):
        for p in range(GROUP_SIZE):
            x_by_position[p, g] = x[GROUP_SIZE * g + p]


@intrinsic
def _bit_is_set(typingctx, byte, bits):
    """Test ``byte & bits != 0`` in 8-bit arithmetic.

    numba widens uint8 operands of ``&`` to int64, and the vectorised loop then tests the codes
    in 64-bit lanes, 8 per register. That made the Cn4 GEMVs about 1.5x slower on the AMD EPYC
    (Zen 4) machine of docs/benchmarks.md.
    """
    if byte != types.uint8 or not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value, flag = args
        flag = context.cast(builder, flag, signature.args[1], types.uint8)
        masked = builder.and_(value, flag)
        return builder.icmp_unsigned("!=", masked, ir.Constant(ir.IntType(8), 0))

    return types.boolean(byte, bits), codegen


@intrinsic
def _bits_are_set(typingctx, byte, bits):
    """Test ``byte & bits == bits`` in 8-bit arithmetic, like :func:`_bit_is_set`."""
    if byte != types.uint8 or not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value, flag = args
        flag = context.cast(builder, flag, signature.args[1], types.uint8)
        return builder.icmp_unsigned("==", builder.and_(value, flag), flag)

    return types.boolean(byte, bits), codegen


@intrinsic
def _select(typingctx, condition, if_true, if_false):
    """Return ``if_true`` when ``condition`` else ``if_false``, as one LLVM select.

    A Python conditional expression becomes branches, which LLVM turns into a select of
    addresses and then a gather of ``x``. Both operands here are values already loaded, so the
    vectorised loop blends registers instead.
    """
    if condition != types.boolean or if_true != if_false:
        return None

    def codegen(context, builder, signature, args):
        return builder.select(*args)

    return if_true(condition, if_true, if_false), codegen


# Per group, each kept value multiplies the x entry at its position, picked from the four
# candidates a0..a3 = x[4g..4g+3] by the keep mask. Kept positions take the values in order,
# which limits where each value can sit: at n = 1, value j is at position j or j+1.


@numba.njit(inline="always")
def _group_dot_n1(values, codes, g, a0, a1, a2, a3):
    mask = codes[g]
    first = _select(_bit_is_set(mask, 1), a0, a1)
    second = _select(_bits_are_set(mask, 3), a1, a2)
    third = _select(_bit_is_set(mask, 8), a3, a2)
    return values[3 * g] * first + values[3 * g + 1] * second + values[3 * g + 2] * third


@numba.njit(inline="always")
def _group_dot_n2(values, codes, g, a0, a1, a2, a3):
    mask = codes[g]
    # The lower kept position is 0, 1 or 2, the higher one 1, 2 or 3.
    first = _select(_bit_is_set(mask, 1), a0, _select(_bit_is_set(mask, 2), a1, a2))
    second = _select(_bit_is_set(mask, 8), a3, _select(_bit_is_set(mask, 4), a2, a1))
    return values[2 * g] * first + values[2 * g + 1] * second


@numba.njit(inline="always")
def _group_dot_n3(values, codes, g, a0, a1, a2, a3):
    mask = codes[g]
    low = _select(_bit_is_set(mask, 1), a0, a1)
    high = _select(_bit_is_set(mask, 4), a2, a3)
    return values[g] * _select(_bit_is_set(mask, 3), low, high)


@numba.njit(_DECODE_SIGNATURE, parallel=True, fastmath=SUM_FASTMATH, cache=True)
def matvec_n1(values, codes, x, x_by_position, bias, y):
    """Cn4 GEMV at level 1 (3 kept of 4): ``y = W x + bias``."""
    _fill_x_by_position(x, x_by_position)
    groups = x_by_position.shape[1]
    x0 = x_by_position[0]
    x1 = x_by_position[1]
    x2 = x_by_position[2]
    x3 = x_by_position[3]
    for r in numba.prange(values.shape[0]):
        row_values = values[r]
        row_codes = codes[r]
        acc = np.float32(0.0)
        for g in range(groups):
            acc += _group_dot_n1(row_values, row_codes, g, x0[g], x1[g], x2[g], x3[g])
        y[r] = acc + bias[r] if bias.shape[0] else acc


@numba.njit(_DECODE_SIGNATURE, parallel=True, fastmath=SUM_FASTMATH, cache=True)
def matvec_n2(values, codes, x, x_by_position, bias, y):
    """Cn4 GEMV at level 2 (2 kept of 4): ``y = W x + bias``."""
    _fill_x_by_position(x, x_by_position)
    groups = x_by_position.shape[1]
    x0 = x_by_position[0]
    x1 = x_by_position[1]
    x2 = x_by_position[2]
    x3 = x_by_position[3]
    for r in numba.prange(values.shape[0]):
        row_values = values[r]
        row_codes = codes[r]
        acc = np.float32(0.0)
        for g in range(groups):
            acc += _group_dot_n2(row_values, row_codes, g, x0[g], x1[g], x2[g], x3[g])
        y[r] = acc + bias[r] if bias.shape[0] else acc


@numba.njit(_DECODE_SIGNATURE, parallel=True, fastmath=SUM_FASTMATH, cache=True)
def matvec_n3(values, codes, x, x_by_position, bias, y):
    """Cn4 GEMV at level 3 (1 kept of 4): ``y = W x + bias``."""
    _fill_x_by_position(x, x_by_position)
    groups = x_by_position.shape[1]
    x0 = x_by_position[0]
    x1 = x_by_position[1]
    x2 = x_by_position[2]
    x3 = x_by_position[3]
    for r in numba.prange(values.shape[0]):
        row_values = values[r]
        row_codes = codes[r]
        acc = np.float32(0.0)
        for g in range(groups):
            acc += _group_dot_n3(row_values, row_codes, g, x0[g], x1[g], x2[g], x3[g])
        y[r] = acc + bias[r] if bias.shape[0] else acc


@numba.njit(_DECODE_SIGNATURE, parallel=True, fastmath=SUM_FASTMATH, cache=True)
def matvec_dense(values, codes, x, x_by_position, bias, y):
    """Dense GEMV ``y = W x + bias`` with the Cn4 kernels' loops; ignores codes and scratch."""
    columns = values.shape[1]
    for r in numba.prange(values.shape[0]):
        row_values = values[r]
        acc = np.float32(0.0)
        for i in range(columns):
            acc += row_values[i] * x[i]
        y[r] = acc + bias[r] if bias.shape[0] else acc


# NOTE: rows of fewer than 16 groups (in_features < 64) do not fill one AVX-512 vector, so the
# Cn4 kernels gain less over dense there: 1.1-1.6x at n = 3 for a 1536x48 dt_proj.
# Decode kernel by level; level 0 is the dense kernel.
MATVEC_KERNELS = {0: matvec_dense, 1: matvec_n1, 2: matvec_n2, 3: matvec_n3}


# ---------------------------------------------------------------------------------------------
# Prefill kernels: out[t, r] = sum over input columns of X[t, i] * W[r, i], plus bias[r].
# Cn4 signature: (values, codes, x_by_position [tokens, 4, groups], bias, out [tokens, out]).
# Each thread takes whole rows and runs every token's dot product while the row is in L1, so
# the weights are read from memory once and the loop over groups vectorises as in decode.


@numba.njit(_PREFILL_SIGNATURE, parallel=True, fastmath=SUM_FASTMATH, cache=True)
def matmul_n1(values, codes, x_by_position, bias, out):
    """Cn4 GEMM at level 1: ``out = X Wᵀ + bias``."""
    tokens = x_by_position.shape[0]
    groups = x_by_position.shape[2]
    for r in numba.prange(values.shape[0]):
        row_values = values[r]
        row_codes = codes[r]
        offset = bias[r] if bias.shape[0] else np.float32(0.0)
        for t in range(tokens):
            x0 = x_by_position[t, 0]
            x1 = x_by_position[t, 1]
            x2 = x_by_position[t, 2]
            x3 = x_by_position[t, 3]
            acc = np.float32(0.0)
            for g in range(groups):
                acc += _group_dot_n1(row_values, row_codes, g, x0[g], x1[g], x2[g], x3[g])
            out[t, r] = acc + offset


@numba.njit(_PREFILL_SIGNATURE, parallel=True, fastmath=SUM_FASTMATH, cache=True)
def matmul_n2(values, codes, x_by_position, bias, out):
    """Cn4 GEMM at level 2: ``out = X Wᵀ + bias``."""
    tokens = x_by_position.shape[0]
    groups = x_by_position.shape[2]
    for r in numba.prange(values.shape[0]):
        row_values = values[r]
        row_codes = codes[r]
        offset = bias[r] if bias.shape[0] else np.float32(0.0)
        for t in range(tokens):
            x0 = x_by_position[t, 0]
            x1 = x_by_position[t, 1]
            x2 = x_by_position[t, 2]
            x3 = x_by_position[t, 3]
            acc = np.float32(0.0)
            for g in range(groups):
                acc += _group_dot_n2(row_values, row_codes, g, x0[g], x1[g], x2[g], x3[g])
            out[t, r] = acc + offset


@numba.njit(_PREFILL_SIGNATURE, parallel=True, fastmath=SUM_FASTMATH, cache=True)
def matmul_n3(values, codes, x_by_position, bias, out):
    """Cn4 GEMM at level 3: ``out = X Wᵀ + bias``."""
    tokens = x_by_position.shape[0]
    groups = x_by_position.shape[2]
    for r in numba.prange(values.shape[0]):
        row_values = values[r]
        row_codes = codes[r]
        offset = bias[r] if bias.shape[0] else np.float32(0.0)
        for t in range(tokens):
            x0 = x_by_position[t, 0]
            x1 = x_by_position[t, 1]
            x2 = x_by_position[t, 2]
            x3 = x_by_position[t, 3]
            acc = np.float32(0.0)
            for g in range(groups):
                acc += _group_dot_n3(row_values, row_codes, g, x0[g], x1[g], x2[g], x3[g])
            out[t, r] = acc + offset


@numba.njit(_DENSE_PREFILL_SIGNATURE, parallel=True, fastmath=SUM_FASTMATH, cache=True)
def matmul_dense(values, x, bias, out):
    """Dense GEMM ``out = X Wᵀ + bias`` for ``x`` [tokens, in], with the Cn4 kernels' loops."""
    tokens = x.shape[0]
    columns = values.shape[1]
    for r in numba.prange(values.shape[0]):
        row_values = values[r]
        offset = bias[r] if bias.shape[0] else np.float32(0.0)
        for t in range(tokens):
            row_x = x[t]
            acc = np.float32(0.0)
            for i in range(columns):
                acc += row_values[i] * row_x[i]
            out[t, r] = acc + offset


# Prefill kernel by level, for levels 1 to 3.
MATMUL_KERNELS = {1: matmul_n1, 2: matmul_n2, 3: matmul_n3}


# ---------------------------------------------------------------------------------------------
# Front functions: check shapes, allocate what the caller did not, pick the kernel.

_NO_BIAS = np.zeros(0, dtype=np.float32)
_NO_CODES = np.zeros((0, 0), dtype=np.uint8)
_NO_SCRATCH = np.zeros((0, 0), dtype=np.float32)


def _as_vector(x: np.ndarray | torch.Tensor, length: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    vector = np.ascontiguousarray(x, dtype=np.float32)
    if vector.shape != (length,):
        raise ValueError(f"x has shape {vector.shape}, expected ({length},) to match in_features")
    return vector


def _as_tokens(x: np.ndarray | torch.Tensor, in_features: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    matrix = np.asarray(x, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[1] != in_features:
        raise ValueError(
            f"X has shape {matrix.shape}, expected (tokens, {in_features}) to match in_features"
        )
    return matrix


def _output(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a C-contiguous float32 array of shape {shape}, got {out.dtype} "
            f"{out.shape}"
        )
    return out


def cn4_matvec(packed: PackedCn4, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Return ``W x + bias`` for one token ``x`` [in] through the decode kernel of the level."""
    x = _as_vector(x, packed.in_features)
    y = _output(out, (packed.out_features,))
    bias = _NO_BIAS if packed.bias is None else packed.bias
    if packed.n == 0:
        matvec_dense(packed.values, _NO_CODES, x, _NO_SCRATCH, bias, y)
        return y
    x_by_position = np.empty((GROUP_SIZE, packed.groups), dtype=np.float32)
    MATVEC_KERNELS[packed.n](packed.values, packed.codes, x, x_by_position, bias, y)
    return y


def cn4_matmul(packed: PackedCn4, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Return ``X Wᵀ + bias`` [tokens, out] for tokens ``X`` [tokens, in] (prefill)."""
    x = _as_tokens(x, packed.in_features)
    result = _output(out, (x.shape[0], packed.out_features))
    bias = _NO_BIAS if packed.bias is None else packed.bias
    if packed.n == 0:
        matmul_dense(packed.values, np.ascontiguousarray(x), bias, result)
        return result
    # [tokens, groups, 4] -> [tokens, 4, groups]: x_by_position[t, p, g] = X[t, 4g + p].
    grouped = x.reshape(x.shape[0], packed.groups, GROUP_SIZE)
    x_by_position = np.ascontiguousarray(grouped.transpose(0, 2, 1))
    MATMUL_KERNELS[packed.n](packed.values, packed.codes, x_by_position, bias, result)
    return result


def dense_matvec(
    weight: np.ndarray, x: np.ndarray, out: np.ndarray | None = None, bias: np.ndarray | None = None
) -> np.ndarray:
    """Return ``W x + bias`` for a dense float32 ``weight`` [out, in] (the Cn4 baseline)."""
    weight = _as_float32_matrix(weight, "weight")
    x = _as_vector(x, weight.shape[1])
    y = _output(out, (weight.shape[0],))
    bias_array = _NO_BIAS if bias is None else _bias_array(bias, weight.shape[0])
    matvec_dense(weight, _NO_CODES, x, _NO_SCRATCH, bias_array, y)
    return y


def dense_matmul(
    weight: np.ndarray, x: np.ndarray, out: np.ndarray | None = None, bias: np.ndarray | None = None
) -> np.ndarray:
    """Return ``X Wᵀ + bias`` for a dense float32 ``weight`` [out, in] (the Cn4 baseline)."""
    weight = _as_float32_matrix(weight, "weight")
    x = _as_tokens(x, weight.shape[1])
    result = _output(out, (x.shape[0], weight.shape[0]))
    bias_array = _NO_BIAS if bias is None else _bias_array(bias, weight.shape[0])
    matmul_dense(weight, np.ascontiguousarray(x), bias_array, result)
    return result
