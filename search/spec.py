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
# With no budget and no sparsity target, the budget sits this share of the way from the lowest
# latency the allowed levels reach up to the dense latency. A fixed share of dense would not do:
# the non-prunable part (embedding, scan, a tied head) differs per model and device, so a ratio
# that suits one model is out of reach for another.
DEFAULT_BUDGET_SHARE = 0.5
# Upper bounds that catch typing mistakes before a job is queued; raise them if needed.
MAX_TRIALS = 100_000
MAX_WINDOW = 8192
MAX_WINDOWS = 4096


class SpecError(SearchError, ValueError):
    """A search setting with an invalid value."""


@dataclass(frozen=True, kw_only=True)
class SearchSpec:
    """Settings of one search.

    ``model`` is a checkpoint directory or ``"default"`` for the embedded model. The budget is
    ``budget_ms`` (milliseconds per decoded token on the device) or ``budget_ratio`` (a share of
    the dense model's predicted latency). With neither and no ``sparsity_target``, the budget is
    halfway (``DEFAULT_BUDGET_SHARE``) between the lowest reachable latency and dense. ``device`` is ``"local"`` (this machine, probed and
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
        self._check_types()
        object.__setattr__(self, "levels", tuple(sorted(set(self.levels))))
        self.validate()

    def _check_types(self) -> None:
        """Raise SpecError for a value of the wrong type, and turn whole-number floats into float."""
        for name in ("model", "device", "method", "objective"):
            _require(name, getattr(self, name), str, "a string")
        for name in ("calibration_text", "evaluation_text"):
            value = getattr(self, name)
            if value is not None:
                _require(name, value, str, "a text file path or null")
        for name in ("budget_ms", "budget_ratio", "sparsity_target"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise SpecError(f"{name}={value!r} is invalid: give a number or null")
                object.__setattr__(self, name, float(value))
        for name in ("trials", "seed", "calibration_windows", "window", "evaluation_windows",
                     "proxy_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SpecError(f"{name}={value!r} is invalid: give a whole number")
        for name in ("multi_objective", "measure"):
            _require(name, getattr(self, name), bool, "true or false")
        _require("extra", self.extra, dict, "an object")
        if isinstance(self.levels, (str, bytes)) or not isinstance(self.levels, (list, tuple)):
            raise SpecError(
                f"levels={self.levels!r} is invalid: give a list of levels such as [1, 2, 3]"
            )
        for level in self.levels:
            if isinstance(level, bool) or not isinstance(level, int):
                raise SpecError(
                    f"levels contains {level!r}: a Cn4 level is the whole number 0, 1, 2 or 3"
                )

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
        if not 1 <= self.trials <= MAX_TRIALS:
            raise SpecError(f"trials={self.trials} is invalid: give a number from 1 to {MAX_TRIALS}")
        if self.method not in PRUNING_METHODS:
            raise SpecError(f"method={self.method!r} is unknown: use one of {PRUNING_METHODS}")
        if self.objective not in OBJECTIVES:
            raise SpecError(f"objective={self.objective!r} is unknown: use one of {OBJECTIVES}")
        if not 8 <= self.window <= MAX_WINDOW:
            raise SpecError(
                f"window={self.window} is invalid: give a window of 8 to {MAX_WINDOW} tokens"
            )
        for name in ("calibration_windows", "evaluation_windows", "proxy_windows"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_WINDOWS:
                raise SpecError(f"{name}={value} is invalid: give a number from 1 to {MAX_WINDOWS}")
        for name in ("calibration_text", "evaluation_text"):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise SpecError(
                    f"{name} is empty: give a text file path, or None for the embedded text"
                )

    @property
    def uses_default_budget(self) -> bool:
        """Whether no budget and no sparsity target is given, so the default budget applies."""
        return self.budget_ms is None and self.budget_ratio is None and self.sparsity_target is None

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


def _require(name: str, value: Any, expected: type, description: str) -> None:
    if not isinstance(value, expected):
        raise SpecError(f"{name}={value!r} is invalid: give {description}")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
