"""Cn4 sparsity for Mamba and Mamba2 language models: loading, pruning and the search."""

from search.errors import (
    BudgetError,
    CheckpointError,
    Cn4Error,
    CostModelError,
    MeasurementError,
    PruningError,
    SearchError,
)

__all__ = [
    "BudgetError",
    "CheckpointError",
    "Cn4Error",
    "CostModelError",
    "MeasurementError",
    "PruningError",
    "SearchError",
]
