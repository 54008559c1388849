"""Compiled inner loop of the OBS column sweep, one row at a time.

Inside a block of columns the sweep is sequential: each group's mask depends on the updates from
the groups before it. Written as tensor ops, that is about 30 small ops per group of 4 columns,
and on a busy 2-core machine their dispatch and thread-pool waits cost far more than the
arithmetic. Rows are independent in OBS, so this numba kernel walks each row through the block
in plain loops instead.
"""

from __future__ import annotations

import numba
import numpy as np

GROUP_SIZE = 4


@numba.njit(cache=True)
def sweep_block(
    block: np.ndarray,
    u_block: np.ndarray,
    row_levels: np.ndarray,
    alive: np.ndarray,
    keep: np.ndarray,
    errors: np.ndarray,
) -> None:
    """Prune ``block`` [rows, width] in place, group by group, and fill ``keep`` and ``errors``.

    ``u_block`` is the block's diagonal tile of the upper Cholesky factor of ``H^-1``. Row ``r``
    zeroes ``row_levels[r]`` weights per group of 4: those with the smallest
    ``w^2 / U_jj^2 * alive_j`` when the group is reached, ties going to the lower column. Each
    pruned weight's error ``w_j / U_jj`` is spread onto the later columns of the block.
    ``errors`` receives those errors for the update of the columns after the block.
    """
    rows, width = block.shape
    scores = np.empty(GROUP_SIZE)
    for r in range(rows):
        level = row_levels[r]
        for g in range(0, width, GROUP_SIZE):
            # 1. Score the group's weights as they stand after the earlier updates.
            for j in range(GROUP_SIZE):
                diagonal = u_block[g + j, g + j]
                value = block[r, g + j]
                scores[j] = value * value / (diagonal * diagonal) * alive[g + j]
            # 2. A weight is pruned when fewer than ``level`` weights sort before it.
            for j in range(GROUP_SIZE):
                position = 0
                for i in range(GROUP_SIZE):
                    if scores[i] < scores[j] or (scores[i] == scores[j] and i < j):
                        position += 1
                keep[r, g + j] = position >= level
            # 3. Zero the pruned weights one by one and spread each error to the later columns.
            for j in range(GROUP_SIZE):
                col = g + j
                if keep[r, col]:
                    errors[r, col] = 0.0
                    continue
                error = block[r, col] / u_block[col, col]
                errors[r, col] = error
                block[r, col] = 0.0
                for c in range(col + 1, width):
                    block[r, c] -= error * u_block[col, c]
