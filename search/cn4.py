"""Cn4 masks and the layer pruning methods: magnitude, Wanda and OBS (SparseGPT).

Level ``n`` (0..3) zeroes ``n`` weights in every group of 4 consecutive weights along a Linear's
input dimension, that is along the columns of its ``[out_features, in_features]`` weight, and
keeps ``4 - n``. Level 0 is dense. Masks are boolean with ``True`` for a kept weight.

Methods:

- ``magnitude`` keeps the largest ``|w|`` of each group and needs no calibration data.
- ``wanda`` (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
  ICLR 2024) scores ``|w_ij| * ||x_j||_2``, the input norm taken from the Hessian diagonal, and
  does not update the kept weights.
- ``obs`` (Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned
  in One-Shot", ICML 2023) sweeps the columns in blocks, picks each group's zeros by the smallest
  ``w^2 / [H^-1]_jj^2`` and spreads every pruned weight's error onto the columns still to come,
  so the kept weights compensate. It is the default.

All maths runs in float64; results come back in the weight's own dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from search.errors import PruningError

if TYPE_CHECKING:
    from search.calibration import LayerStats

logger = logging.getLogger(__name__)

GROUP_SIZE = 4
LEVELS = (0, 1, 2, 3)
METHODS = ("obs", "wanda", "magnitude")
# Share of the mean Hessian diagonal added to the diagonal before inversion (SparseGPT's 1%).
DEFAULT_DAMPING = 0.01
# Each failed Cholesky multiplies the damping share by this factor, up to MAX_DAMPING. At a share
# of 10 the damped Hessian is dominated by its diagonal, so OBS is close to magnitude pruning
# anyway, and giving up there costs little.
DAMPING_GROWTH = 10.0
MAX_DAMPING = 10.0
# Columns per block of the OBS sweep; a multiple of GROUP_SIZE.
DEFAULT_BLOCK_SIZE = 128
# Memory for the gathered Hessian rows of one batch of obs_reconstruct solves.
_RECONSTRUCT_CHUNK_BYTES = 256 * 2**20
# Layers whose exact reconstruction costs at most this many multiply-adds (rows x kept^3 / 3)
# get it after the sweep by default. The sweep freezes each column once visited, so on small
# layers with strongly correlated inputs the exact solve for the same mask can cut the output
# error several times over. On large layers its cost, cubic in in_features, is too high.
EXACT_RECONSTRUCT_MAX_COST = 2e8


@dataclass
class PruneResult:
    """A pruned weight with its mask and how it was obtained.

    ``damping`` is the share of the mean Hessian diagonal that OBS added (None for methods that
    do not invert the Hessian). ``note`` records a fallback or another fact worth logging.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    method: str
    damping: float | None = None
    note: str | None = None


def check_level(n: int) -> int:
    """Return ``n`` as an int, or raise PruningError when it is not a Cn4 level."""
    if isinstance(n, bool) or not isinstance(n, int) or n not in LEVELS:
        raise PruningError(
            f"level {n!r} is invalid: a Cn4 level is 0, 1, 2 or 3 zeros in each group of 4"
        )
    return int(n)


def check_weight(weight: torch.Tensor) -> None:
    """Raise PruningError unless ``weight`` is a finite 2-D matrix with groups of 4 columns."""
    if weight.dim() != 2:
        raise PruningError(
            f"weight of shape {tuple(weight.shape)} is invalid: give a Linear weight "
            "[out_features, in_features]"
        )
    in_features = weight.shape[1]
    if in_features % GROUP_SIZE != 0 or in_features == 0:
        raise PruningError(
            f"in_features={in_features} is not divisible by {GROUP_SIZE}: Cn4 groups of 4 "
            "consecutive input weights do not tile this layer, so leave it dense"
        )
    if not torch.isfinite(weight).all():
        raise PruningError("weight contains NaN or inf values: the checkpoint is damaged")


def cn4_keep_mask(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Return the keep mask that zeroes the ``n`` lowest scores in each group of 4 columns.

    Ties go to the lower column index: of two equal scores, the earlier weight is pruned first,
    so the mask depends only on the scores.
    """
    n = check_level(n)
    check_weight(scores)
    rows, cols = scores.shape
    mask = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
    if n == 0:
        return mask
    groups = scores.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    order = torch.argsort(groups, dim=-1, stable=True)
    mask.view(rows, cols // GROUP_SIZE, GROUP_SIZE).scatter_(-1, order[..., :n], False)
    return mask


def count_cn4_violations(weight: torch.Tensor, n: int) -> int:
    """Count the groups of 4 columns that hold fewer than ``n`` zeros.

    A group with more zeros than ``n`` is valid, because a kept weight may happen to be zero.
    """
    n = check_level(n)
    if weight.dim() != 2 or weight.shape[1] % GROUP_SIZE != 0:
        raise PruningError(
            f"weight of shape {tuple(weight.shape)} has no Cn4 groups: give a 2-D weight whose "
            f"in_features is divisible by {GROUP_SIZE}"
        )
    rows, cols = weight.shape
    zeros = (weight == 0).reshape(rows, cols // GROUP_SIZE, GROUP_SIZE).sum(dim=-1)
    return int((zeros < n).sum())


def prune_magnitude(weight: torch.Tensor, n: int) -> PruneResult:
    """Zero the ``n`` smallest ``|w|`` in each group of 4; the kept weights stay unchanged."""
    n = check_level(n)
    check_weight(weight)
    mask = cn4_keep_mask(weight.abs(), n)
    return PruneResult(weight=weight * mask, mask=mask, method="magnitude")


def prune_wanda(weight: torch.Tensor, n: int, stats: LayerStats | None) -> PruneResult:
    """Zero the ``n`` lowest ``|w_ij| * ||x_j||_2`` in each group (Wanda), with no update.

    ``||x_j||_2`` over the calibration tokens is ``sqrt(H_jj)`` for ``H = sum x x^T``.
    """
    n = check_level(n)
    check_weight(weight)
    hessian = _checked_hessian(weight, stats, "wanda")
    input_norms = hessian.diagonal().clamp(min=0).sqrt()
    scores = weight.to(torch.float64).abs() * input_norms.unsqueeze(0)
    mask = cn4_keep_mask(scores, n)
    return PruneResult(weight=weight * mask, mask=mask, method="wanda")


def prune_obs(
    weight: torch.Tensor,
    n: int,
    stats: LayerStats | None,
    *,
    damping: float = DEFAULT_DAMPING,
    block_size: int = DEFAULT_BLOCK_SIZE,
    exact: bool | None = None,
) -> PruneResult:
    """Prune with OBS compensation: SparseGPT's blocked column sweep with a Cn4 mask.

    With ``exact`` the kept weights are then solved exactly for the sweep's mask
    (:func:`obs_reconstruct` on the damped Hessian); None does so for layers below
    ``EXACT_RECONSTRUCT_MAX_COST``. Falls back to magnitude pruning, with ``note`` saying why,
    when the damped Hessian stays singular up to ``MAX_DAMPING`` or when the result has
    non-finite weights.
    """
    return prune_obs_levels(
        weight, [n], stats, damping=damping, block_size=block_size, exact=exact
    )[0]


def prune_obs_levels(
    weight: torch.Tensor,
    levels: Sequence[int],
    stats: LayerStats | None,
    *,
    damping: float = DEFAULT_DAMPING,
    block_size: int = DEFAULT_BLOCK_SIZE,
    exact: bool | None = None,
) -> list[PruneResult]:
    """Prune one layer at several levels with OBS, sharing the Hessian factorisation.

    The levels are swept together as one stacked weight (the rows are independent in OBS), so
    preparing levels 1, 2 and 3 costs less than three separate runs. ``exact`` is as in
    :func:`prune_obs`. Returns one result per entry of ``levels``, in order.
    """
    levels = [check_level(n) for n in levels]
    check_weight(weight)
    hessian = _checked_hessian(weight, stats, "obs")
    if block_size < GROUP_SIZE or block_size % GROUP_SIZE != 0:
        raise PruningError(
            f"block_size={block_size} is invalid: give a positive multiple of {GROUP_SIZE}"
        )
    if not (math.isfinite(damping) and damping > 0):
        raise PruningError(f"damping={damping} is invalid: give a positive share such as 0.01")

    results: list[PruneResult | None] = [None] * len(levels)
    sparse = [i for i, n in enumerate(levels) if n > 0]
    for i, n in enumerate(levels):
        if n == 0:
            results[i] = PruneResult(
                weight=weight.clone(),
                mask=torch.ones_like(weight, dtype=torch.bool),
                method="obs",
            )
    if not sparse:
        return results  # type: ignore[return-value]

    factor, used_damping, dead, damped = _inverse_hessian_factor(hessian, damping)
    if factor is None:
        note = (
            f"the damped Hessian was not positive definite up to damping {MAX_DAMPING:g} "
            "of its mean diagonal, so this layer fell back to magnitude pruning"
        )
        logger.warning("OBS: %s", note)
        return _fill_fallback(results, weight, levels, note)

    rows = weight.shape[0]
    stacked = weight.to(torch.float64).repeat(len(sparse), 1)
    row_levels = torch.tensor([levels[i] for i in sparse]).repeat_interleave(rows)
    pruned, mask = _obs_sweep(stacked, row_levels, factor, dead, block_size)
    if exact is None:
        kept = GROUP_SIZE - min(levels[i] for i in sparse)
        kept_columns = weight.shape[1] * kept // GROUP_SIZE
        exact = stacked.shape[0] * kept_columns**3 / 3 <= EXACT_RECONSTRUCT_MAX_COST
    if exact:
        pruned = obs_reconstruct(stacked, mask, damped)
    # Checked after the cast, because a finite float64 can overflow float32.
    pruned = pruned.to(weight.dtype)

    if not torch.isfinite(pruned).all():
        note = "the OBS update produced non-finite weights, so this layer fell back to magnitude"
        logger.warning("OBS: %s", note)
        return _fill_fallback(results, weight, levels, note)

    note = None
    if used_damping != damping:
        note = (
            f"the Hessian needed damping {used_damping:g} of its mean diagonal instead of "
            f"{damping:g} to be positive definite"
        )
        logger.info("OBS: %s", note)
    for chunk, i in enumerate(sparse):
        part = slice(chunk * rows, (chunk + 1) * rows)
        results[i] = PruneResult(
            weight=pruned[part].clone(),
            mask=mask[part].clone(),
            method="obs",
            damping=used_damping,
            note=note,
        )
    return results  # type: ignore[return-value]


def prune_layer(
    weight: torch.Tensor,
    n: int,
    stats: LayerStats | None,
    method: str = "obs",
    *,
    damping: float = DEFAULT_DAMPING,
) -> PruneResult:
    """Prune ``weight`` to level ``n`` with ``method`` (``obs``, ``wanda`` or ``magnitude``)."""
    if method not in METHODS:
        raise PruningError(f"method {method!r} is unknown: use one of {', '.join(METHODS)}")
    if method == "magnitude":
        return prune_magnitude(weight, n)
    if method == "wanda":
        return prune_wanda(weight, n, stats)
    return prune_obs(weight, n, stats, damping=damping)


def obs_reconstruct(
    weight: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor
) -> torch.Tensor:
    """Return the exact OBS reconstruction of ``weight`` for a fixed ``mask``.

    For each row, the kept weights ``w'`` minimise ``||(w - w') X||^2`` with the pruned weights
    fixed at 0, where ``hessian = X X^T``. Setting the gradient to zero gives the linear system
    ``H_KK w'_K = H_KK w_K + H_KP w_P`` on the kept sub-block ``K``, solved by Cholesky, or in
    the least-squares sense (the minimum-norm solution) where Cholesky fails on a singular
    sub-block. Pass a damped Hessian when tokens are fewer than kept weights, because a nearly
    singular sub-block can pass Cholesky and give large weights. The cost is one solve of size ``|K|`` per row: meant for checks and small layers.
    """
    check_weight(weight)
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise PruningError(
            f"mask of shape {tuple(mask.shape)} and dtype {mask.dtype} does not fit weight "
            f"{tuple(weight.shape)}: give a bool mask of the same shape"
        )
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise PruningError(
            f"hessian of shape {tuple(hessian.shape)} does not fit in_features={cols}"
        )
    h = hessian.to(torch.float64)
    w = weight.to(torch.float64)
    result = w * mask
    # Rows with the same number of kept weights are solved as one batch.
    kept_counts = mask.sum(dim=1)
    for count in kept_counts.unique().tolist():
        if count == 0 or count == cols:
            continue
        rows = torch.nonzero(kept_counts == count).flatten()
        row_chunk = max(1, _RECONSTRUCT_CHUNK_BYTES // (8 * count * cols))
        for start in range(0, rows.numel(), row_chunk):
            chunk = rows[start : start + row_chunk]
            kept = torch.nonzero(mask[chunk])[:, 1].reshape(chunk.numel(), count)
            h_kept_rows = h[kept]  # [r, k, cols]
            h_kk = torch.gather(h_kept_rows, 2, kept.unsqueeze(1).expand(-1, count, -1))
            # Right side H_K: w: the kept rows of H applied to the dense row, pruned part included.
            rhs = torch.einsum("rkc,rc->rk", h_kept_rows, w[chunk])
            result[chunk.unsqueeze(1), kept] = _solve_symmetric(h_kk, rhs)
    return result.to(weight.dtype)


def _solve_symmetric(matrices: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve a batch of symmetric PSD systems: Cholesky where it works, least squares elsewhere."""
    lower, info = torch.linalg.cholesky_ex(matrices)
    solution = torch.cholesky_solve(rhs.unsqueeze(-1), lower).squeeze(-1)
    singular = info != 0
    if singular.any():
        fallback = torch.linalg.lstsq(matrices[singular], rhs[singular].unsqueeze(-1), driver="gelsd")
        solution[singular] = fallback.solution.squeeze(-1)
    return solution


def reconstruction_error(
    weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor
) -> float:
    """Return ``||W X - W' X||_F / ||W X||_F`` on the calibration inputs behind ``hessian``.

    Computed from ``H = X X^T`` as ``sqrt(tr(D H D^T) / tr(W H W^T))`` with ``D = W - W'``.
    Returns 0.0 for a layer whose dense output is zero and unchanged.
    """
    h = hessian.to(torch.float64)
    w = weight.to(torch.float64)
    delta = w - pruned.to(torch.float64)
    error = float(((delta @ h) * delta).sum().clamp(min=0))
    dense = float(((w @ h) * w).sum().clamp(min=0))
    if dense == 0.0:
        return 0.0 if error == 0.0 else math.inf
    return math.sqrt(error / dense)


def _checked_hessian(weight: torch.Tensor, stats: LayerStats | None, method: str) -> torch.Tensor:
    if stats is None:
        raise PruningError(
            f"method {method!r} needs calibration statistics for this layer: run "
            "search.calibration.collect_layer_stats first, or use method 'magnitude'"
        )
    hessian = stats.hessian
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise PruningError(
            f"calibration Hessian of shape {tuple(hessian.shape)} does not fit a layer with "
            f"in_features={cols}: the statistics belong to another layer"
        )
    if stats.tokens < 1:
        raise PruningError("calibration statistics cover 0 tokens: calibrate on some text first")
    hessian = hessian.to(torch.float64)
    if not torch.isfinite(hessian).all():
        raise PruningError(
            "calibration Hessian contains NaN or inf: the dense model overflowed on the "
            "calibration text"
        )
    return hessian


def _inverse_hessian_factor(
    hessian: torch.Tensor, damping: float
) -> tuple[torch.Tensor | None, float, torch.Tensor, torch.Tensor]:
    """Return the upper Cholesky factor of the damped inverse Hessian and how it was obtained.

    The other values are the damping share used, the dead columns and the damped Hessian.

    Dead input channels (zero diagonal: the input was always 0) get a unit diagonal so the
    matrix can be inverted. Each failed factorisation multiplies the damping share by
    DAMPING_GROWTH; past MAX_DAMPING the factor is None.
    """
    h = hessian.clone()
    diagonal = h.diagonal()
    dead = diagonal <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    diagonal[dead] = 1.0
    mean_diagonal = float(diagonal.mean())
    identity = torch.eye(h.shape[0], dtype=torch.float64)

    share = damping
    while share <= MAX_DAMPING * (1 + 1e-9):
        damped = h + (share * mean_diagonal) * identity
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            factor, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and torch.isfinite(factor).all():
                return factor, share, dead, damped
        logger.debug("OBS: Cholesky failed at damping %g, retrying with more", share)
        share *= DAMPING_GROWTH
    return None, share, dead, h


def _obs_sweep(
    weight: torch.Tensor,
    row_levels: torch.Tensor,
    factor: torch.Tensor,
    dead: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run SparseGPT's column sweep on a float64 weight whose rows may have different levels.

    ``factor`` is the upper Cholesky factor ``U`` of the damped ``H^-1``. Column ``j`` at the
    moment it is visited has the OBS error ``err = (w_j - q_j) / U_jj``, and the columns after it
    receive ``-err * U_j,j+1:``. A compiled kernel does this inside each block, row by row; the
    columns after the block are updated by one matrix product per block. Returns the pruned
    weight and its keep mask.
    """
    from search._obs_kernel import sweep_block

    w = weight.clone()
    rows, cols = w.shape
    mask = torch.ones(rows, cols, dtype=torch.bool)
    levels = row_levels.to(torch.int64).contiguous().numpy()
    # A pruned weight in a dead column costs nothing on the calibration data, so such weights
    # score 0 and go first.
    alive = (~dead).to(torch.float64)

    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].contiguous()
        u_block = factor[start:end, start:end].contiguous()
        keep = torch.empty(rows, end - start, dtype=torch.bool)
        errors = torch.empty(rows, end - start, dtype=torch.float64)
        sweep_block(
            block.numpy(),
            u_block.numpy(),
            levels,
            alive[start:end].contiguous().numpy(),
            keep.numpy(),
            errors.numpy(),
        )
        w[:, start:end] = block
        mask[:, start:end] = keep
        # Spread the block's errors onto every later column at once.
        if end < cols:
            w[:, end:] -= errors @ factor[start:end, end:]

    return w * mask, mask


def _fill_fallback(
    results: list[PruneResult | None], weight: torch.Tensor, levels: Sequence[int], note: str
) -> list[PruneResult]:
    for i, n in enumerate(levels):
        if results[i] is None:
            fallback = prune_magnitude(weight, n)
            results[i] = PruneResult(
                weight=fallback.weight, mask=fallback.mask, method="magnitude", note=note
            )
    return results  # type: ignore[return-value]
