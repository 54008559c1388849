"""Measured quality of level maps: the search objective and the held-out perplexity.

Every number here comes from running the assembled pruned model end to end. Per-layer sums
are a poor predictor of the whole model's loss (EvoPress, Sieberling et al., ICML 2025), so the
search scores each candidate by measuring it. Results are memoised per level map, because the
sampler proposes the same configuration more than once in a small space.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from search.quality import kl_to_reference, perplexity, reference_logprobs
from search.variants import apply_level_map

logger = logging.getLogger(__name__)

OBJECTIVE_LABELS = {
    "kl": "KL divergence to the dense model on calibration windows (nats per token)",
    "perplexity": "perplexity on calibration windows",
}
HELD_OUT_LABEL = "perplexity on held-out evaluation windows"


def level_key(level_map: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    """Return a hashable, order-independent key of a level map."""
    return tuple(sorted((name, int(level)) for name, level in level_map.items()))


class QualityEvaluator:
    """Measures pruned variants of one model against its dense self.

    ``calibration`` windows score the search objective: mean KL(dense ‖ pruned) per token
    (``objective="kl"``) or perplexity. The first ``proxy_count`` calibration windows score the
    cheaper single-layer losses behind the greedy baseline. ``evaluation`` windows are held out
    from pruning and search and only measure the reported perplexity.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache,
        *,
        calibration: torch.Tensor,
        evaluation: torch.Tensor,
        objective: str,
        proxy_count: int,
    ) -> None:
        if objective not in OBJECTIVE_LABELS:
            raise ValueError(
                f"objective={objective!r} is unknown: use one of {list(OBJECTIVE_LABELS)}"
            )
        self.model = model
        self.cache = cache
        self.calibration = calibration
        self.evaluation = evaluation
        self.objective_name = objective
        self.proxy_windows = calibration[: max(1, min(proxy_count, len(calibration)))]
        # Dense log-probabilities, taken now while no level map is applied.
        self._reference = (
            reference_logprobs(model, calibration) if objective == "kl" else None
        )
        self._proxy_reference: torch.Tensor | None = None
        self._objective: dict[tuple, float] = {}
        self._proxy: dict[tuple, float] = {}
        self._held_out: dict[tuple, float] = {}
        self.evaluations = 0

    @property
    def objective_label(self) -> str:
        return OBJECTIVE_LABELS[self.objective_name]

    def objective(self, level_map: Mapping[str, int]) -> float:
        """Return the search objective of ``level_map`` (lower is better), measured once."""
        key = level_key(level_map)
        if key not in self._objective:
            with apply_level_map(self.model, dict(level_map), self.cache):
                self._objective[key] = self._score(self.calibration)
            self.evaluations += 1
        return self._objective[key]

    def proxy_loss(self, level_map: Mapping[str, int]) -> float:
        """Return KL to the dense model on the proxy windows, the greedy baseline's measure."""
        key = level_key(level_map)
        if key not in self._proxy:
            if self._proxy_reference is None:
                self._proxy_reference = reference_logprobs(self.model, self.proxy_windows)
            with apply_level_map(self.model, dict(level_map), self.cache):
                value = kl_to_reference(self.model, self.proxy_windows, self._proxy_reference)
            self._proxy[key] = float(value)
        return self._proxy[key]

    def held_out_perplexity(self, level_map: Mapping[str, int]) -> float:
        """Return the perplexity of ``level_map`` on the held-out evaluation windows."""
        key = level_key(level_map)
        if key not in self._held_out:
            with apply_level_map(self.model, dict(level_map), self.cache):
                result = perplexity(self.model, self.evaluation)
            self._held_out[key] = float(result.perplexity)
        return self._held_out[key]

    def dense_objective(self) -> float:
        """Return the objective of the dense model: 0 for KL, its perplexity otherwise."""
        if self.objective_name == "kl":
            return 0.0
        return float(perplexity(self.model, self.calibration).perplexity)

    def _score(self, windows: torch.Tensor) -> float:
        if self.objective_name == "kl":
            return float(kl_to_reference(self.model, windows, self._reference))
        return float(perplexity(self.model, windows).perplexity)
