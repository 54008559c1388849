"""The settings of one search job, shared by ``cn4 search``, the REST API and batch files."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from search.errors import SearchError

ALL_LEVELS = (0, 1, 2, 3)
DEFAULT_LEVELS = (1, 2, 3)
PRUNING_METHODS = ("obs", "wanda", "magnitude")
OBJECTIVES = ("kl", "perplexity")
DEFAULT_BUDGET_RATIO = 0.6


class SpecError(SearchError, ValueError):
    """A search setting with an invalid value."""


@dataclass(frozen=True, kw_only=True)
class SearchSpec:
    """Settings of one search.

    ``model`` is a checkpoint directory or ``"default"`` for the embedded model. The budget is
    ``budget_ms`` (milliseconds per decoded token on the device) or ``budget_ratio`` (a share of
    the dense model's predicted latency); with neither, ``DEFAULT_BUDGET_RATIO`` applies unless
    a ``sparsity_target`` alone is given. ``device`` is ``"local"`` (this machine, probed and
    fitted on first use) or a path to a measurement file or fitted cost model.

    ``calibration_text`` and ``evaluation_text`` are paths to UTF-8 text files, or ``None`` for
    the embedded texts. Calibration windows drive pruning and the search objective; evaluation
    windows are held out and only measure the reported perplexity. ``proxy_windows`` of the
    calibration windows (at most all of them) measure the single-layer losses behind the greedy
    baseline.
    """

    model: str = "default"
    device: str = "local"
    budget_ms: float | None = None
    budget_ratio: float | None = None
    sparsity_target: float | None = None
    levels: tuple[int, ...] = DEFAULT_LEVELS
    trials: int = 40
    method: str = "obs"
    objective: str = "kl"
    multi_objective: bool = False
    seed: int = 0
    calibration_windows: int = 32
    window: int = 128
    measure: bool = True
    calibration_text: str | None = None
    evaluation_text: str | None = None
    evaluation_windows: int = 32
    proxy_windows: int = 8
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(sorted(set(int(n) for n in self.levels))))
        self.validate()

    def validate(self) -> None:
        if not self.model:
            raise SpecError("model is empty: give a checkpoint directory or 'default'")
        if not self.levels:
            raise SpecError("levels is empty: allow at least one of 0, 1, 2, 3")
        bad = [n for n in self.levels if n not in ALL_LEVELS]
        if bad:
            raise SpecError(f"levels {bad} are invalid: a Cn4 level is 0, 1, 2 or 3 zeros of 4")
        if self.budget_ms is not None and self.budget_ratio is not None:
            raise SpecError(
                f"budget_ms={self.budget_ms} and budget_ratio={self.budget_ratio} are both set: "
                "give one of them"
            )
        if self.budget_ms is not None and not (_finite(self.budget_ms) and self.budget_ms > 0):
            raise SpecError(f"budget_ms={self.budget_ms} is invalid: give a positive number of ms")
        if self.budget_ratio is not None and not (
            _finite(self.budget_ratio) and 0 < self.budget_ratio <= 1
        ):
            raise SpecError(
                f"budget_ratio={self.budget_ratio} is invalid: give a share of the dense "
                "latency in (0, 1]"
            )
        if self.sparsity_target is not None and not (
            _finite(self.sparsity_target) and 0 <= self.sparsity_target <= 0.75
        ):
            raise SpecError(
                f"sparsity_target={self.sparsity_target} is invalid: give a share of zeroed "
                "weights in [0, 0.75] (level 3 zeroes 3 of 4)"
            )
        if not isinstance(self.trials, int) or self.trials < 1:
            raise SpecError(f"trials={self.trials} is invalid: give a whole number of at least 1")
        if self.method not in PRUNING_METHODS:
            raise SpecError(f"method={self.method!r} is unknown: use one of {PRUNING_METHODS}")
        if self.objective not in OBJECTIVES:
            raise SpecError(f"objective={self.objective!r} is unknown: use one of {OBJECTIVES}")
        if self.calibration_windows < 1 or self.window < 8:
            raise SpecError(
                f"calibration_windows={self.calibration_windows} and window={self.window} are "
                "invalid: give at least 1 window of at least 8 tokens"
            )
        if self.evaluation_windows < 1:
            raise SpecError(
                f"evaluation_windows={self.evaluation_windows} is invalid: give at least 1"
            )
        if self.proxy_windows < 1:
            raise SpecError(f"proxy_windows={self.proxy_windows} is invalid: give at least 1")
        for name in ("calibration_text", "evaluation_text"):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise SpecError(
                    f"{name} is empty: give a text file path, or None for the embedded text"
                )

    @property
    def effective_budget_ratio(self) -> float | None:
        """The budget ratio in force: the given one, or the default when no budget is set."""
        if self.budget_ratio is not None:
            return self.budget_ratio
        if self.budget_ms is None and self.sparsity_target is None:
            return DEFAULT_BUDGET_RATIO
        return None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["levels"] = list(self.levels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown settings {unknown}: valid settings are {sorted(known)}")
        return cls(**data)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
