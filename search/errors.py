"""Exceptions raised by cn4.

Every error cn4 raises on purpose derives from :class:`Cn4Error`, so a caller can catch the
whole family at once. Leaves that describe bad input also derive from :class:`ValueError`, and
lookups with no basis from :class:`LookupError`::

    Cn4Error
    ├── CheckpointError (ValueError)     a checkpoint that cannot be loaded safely
    ├── PruningError                     a layer or level that cannot be pruned
    ├── MeasurementError (ValueError)    an invalid latency measurement file or record
    ├── CostModelError (LookupError)     a prediction the fitted cost model has no basis for
    └── SearchError                      a search that cannot start or finish
        └── BudgetError (ValueError)     a latency budget or sparsity target no configuration meets

Messages name the offending value and say how to fix it.
"""

from __future__ import annotations


class Cn4Error(Exception):
    """Base class of every error that cn4 raises on purpose."""


class CheckpointError(Cn4Error, ValueError):
    """A checkpoint directory that is missing files, unsafe to load, or inconsistent."""


class PruningError(Cn4Error):
    """A layer, level or calibration statistic that cannot be used for pruning."""


class MeasurementError(Cn4Error, ValueError):
    """An invalid latency measurement file or record."""


class CostModelError(Cn4Error, LookupError):
    """A latency prediction for an op, shape or level the cost model has no basis for."""


class SearchError(Cn4Error):
    """A search that cannot start or cannot finish."""


class BudgetError(SearchError, ValueError):
    """A latency budget or sparsity target that no allowed configuration can meet."""
