"""Quality of a (pruned) model: held-out perplexity and KL divergence to the dense model.

Both work on fixed token windows ``[count, length]``: inside each window, the logits at position
``t`` predict token ``t + 1``, so a window of ``length`` tokens scores ``length - 1`` of them and
no state carries over between windows. Forward passes run under ``torch.inference_mode`` in
eval mode, and the results depend only on the weights and the windows. Sums are taken in
float64. A NaN or inf result raises :class:`QualityError` instead of being returned.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from search.errors import Cn4Error

logger = logging.getLogger(__name__)


class QualityError(Cn4Error):
    """A quality measurement that came out NaN or infinite, or invalid evaluation windows."""


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity ``exp(nll)`` with ``nll`` the mean negative log-likelihood in nats per token.

    ``tokens`` is the number of predicted tokens, ``windows`` the number of windows.
    """

    perplexity: float
    nll: float
    tokens: int
    windows: int


def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8) -> PerplexityResult:
    """Return the perplexity of ``model`` on ``windows`` (next-token prediction in each window)."""
    _check_windows(windows, batch_size)
    total_nll = torch.zeros((), dtype=torch.float64)
    scored = 0
    for batch in _batches(windows, batch_size):
        logits = _logits(model, batch)
        targets = batch[:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            reduction="none",
        )
        total_nll += nll.to(torch.float64).sum()
        scored += targets.numel()
    mean_nll = float(total_nll) / scored
    if not math.isfinite(mean_nll):
        raise QualityError(
            f"perplexity is not finite (mean NLL {mean_nll}): the model produced NaN or inf "
            "logits, so its weights are damaged"
        )
    return PerplexityResult(
        perplexity=math.exp(mean_nll), nll=mean_nll, tokens=scored, windows=windows.shape[0]
    )


def reference_logprobs(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return the dense model's log-probabilities ``[count, length - 1, vocab]`` on ``windows``.

    The full distribution is kept, in float32 by default, so the KL of the dense model to itself
    is exactly 0. It takes ``count * (length - 1) * vocab * 4`` bytes; pass
    ``dtype=torch.float16`` to halve that at the cost of about 1e-3 relative error per
    probability.
    """
    _check_windows(windows, batch_size)
    parts = []
    for batch in _batches(windows, batch_size):
        logits = _logits(model, batch)[:, :-1].float()
        parts.append(torch.log_softmax(logits, dim=-1).to(dtype))
    reference = torch.cat(parts)
    if not torch.isfinite(reference).all():
        raise QualityError(
            "the reference model produced NaN or inf log-probabilities: check the dense weights"
        )
    return reference


def kl_to_reference(
    model: nn.Module, windows: torch.Tensor, reference: torch.Tensor, *, batch_size: int = 8
) -> float:
    """Return the mean ``KL(dense || model)`` per predicted token, in nats.

    ``reference`` comes from :func:`reference_logprobs` on the same ``windows``.
    """
    _check_windows(windows, batch_size)
    expected_shape = (windows.shape[0], windows.shape[1] - 1)
    if tuple(reference.shape[:2]) != expected_shape:
        raise QualityError(
            f"reference log-probabilities of shape {tuple(reference.shape)} do not match "
            f"windows {tuple(windows.shape)}: compute them with reference_logprobs on the "
            "same windows"
        )
    total = torch.zeros((), dtype=torch.float64)
    for start, batch in zip(range(0, windows.shape[0], batch_size), _batches(windows, batch_size)):
        logprobs = torch.log_softmax(_logits(model, batch)[:, :-1].float(), dim=-1)
        if logprobs.shape[-1] != reference.shape[-1]:
            raise QualityError(
                f"model vocabulary {logprobs.shape[-1]} differs from the reference's "
                f"{reference.shape[-1]}: compare a model with its own dense version"
            )
        ref = reference[start : start + batch.shape[0]].float()
        # KL(p || q) = sum p (log p - log q), with p the dense model.
        per_token = (ref.exp() * (ref - logprobs)).sum(dim=-1)
        total += per_token.to(torch.float64).sum()
    mean_kl = float(total) / (expected_shape[0] * expected_shape[1])
    if not math.isfinite(mean_kl):
        raise QualityError(
            f"KL divergence is not finite ({mean_kl}): the model produced NaN or inf logits, "
            "so its weights are damaged"
        )
    # Rounding can leave a tiny negative sum when the two distributions agree.
    return max(mean_kl, 0.0)


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    if model.training:
        model.eval()
    with torch.inference_mode():
        return model(input_ids=batch, use_cache=False).logits


def _batches(windows: torch.Tensor, batch_size: int):
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]


def _check_windows(windows: torch.Tensor, batch_size: int) -> None:
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise QualityError(
            f"evaluation windows of shape {tuple(windows.shape)} are invalid: give a "
            "LongTensor [count, length] with count >= 1 and length >= 2"
        )
    if windows.dtype not in (torch.int64, torch.int32):
        raise QualityError(f"evaluation windows have dtype {windows.dtype}: give token ids")
    if batch_size < 1:
        raise QualityError(f"batch_size={batch_size} is invalid: give at least 1")
