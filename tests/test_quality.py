"""Perplexity and KL divergence to the dense model on tiny checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from search.cn4 import prune_magnitude
from search.models import eligible_layers, load_checkpoint
from search.quality import (
    PerplexityResult,
    QualityError,
    kl_to_reference,
    perplexity,
    reference_logprobs,
)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def random_windows(vocab: int, count: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=generator)


@pytest.fixture(scope="module", params=["mamba", "mamba2"])
def loaded(request, tiny_mamba_dir, tiny_mamba2_dir):
    directory = tiny_mamba_dir if request.param == "mamba" else tiny_mamba2_dir
    return load_checkpoint(directory)


def prune_all_layers(model, level: int) -> dict[str, torch.Tensor]:
    """Prune every eligible layer by magnitude in place and return the dense weights."""
    dense = {}
    with torch.no_grad():
        for info in eligible_layers(model):
            layer = model.get_submodule(info.name)
            dense[info.name] = layer.weight.detach().clone()
            layer.weight.copy_(prune_magnitude(layer.weight, level).weight)
    return dense


def restore(model, dense: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, weight in dense.items():
            model.get_submodule(name).weight.copy_(weight)


def test_perplexity_matches_cross_entropy(loaded):
    windows = random_windows(loaded.model.config.vocab_size, count=3, length=20)
    result = perplexity(loaded.model, windows, batch_size=2)

    with torch.no_grad():
        logits = loaded.model(input_ids=windows).logits
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    )
    assert isinstance(result, PerplexityResult)
    assert result.tokens == 3 * 19
    assert result.windows == 3
    assert result.nll == pytest.approx(float(expected), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.nll), rel=1e-12)


def test_perplexity_deterministic(loaded):
    windows = random_windows(loaded.model.config.vocab_size, count=4, length=16, seed=1)
    first = perplexity(loaded.model, windows)
    second = perplexity(loaded.model, windows)
    assert first == second


def test_dense_kl_to_itself_is_zero(loaded):
    windows = random_windows(loaded.model.config.vocab_size, count=3, length=16, seed=2)
    reference = reference_logprobs(loaded.model, windows, batch_size=2)

    assert reference.shape == (3, 15, loaded.model.config.vocab_size)
    assert reference.dtype == torch.float32
    torch.testing.assert_close(reference.exp().sum(dim=-1), torch.ones(3, 15))
    assert kl_to_reference(loaded.model, windows, reference, batch_size=2) == 0.0


def test_float16_reference_close_to_zero(loaded):
    windows = random_windows(loaded.model.config.vocab_size, count=2, length=16, seed=3)
    reference = reference_logprobs(loaded.model, windows, dtype=torch.float16)
    assert reference.dtype == torch.float16
    assert kl_to_reference(loaded.model, windows, reference) < 1e-3


def test_pruned_model_has_positive_kl(loaded):
    windows = random_windows(loaded.model.config.vocab_size, count=3, length=16, seed=4)
    reference = reference_logprobs(loaded.model, windows)
    dense_perplexity = perplexity(loaded.model, windows).perplexity

    dense = prune_all_layers(loaded.model, 3)
    try:
        pruned_kl = kl_to_reference(loaded.model, windows, reference)
        pruned_perplexity = perplexity(loaded.model, windows).perplexity
    finally:
        restore(loaded.model, dense)

    assert pruned_kl > 1e-4
    assert math.isfinite(pruned_kl)
    assert pruned_perplexity != dense_perplexity
    assert kl_to_reference(loaded.model, windows, reference) == 0.0


def test_kl_grows_with_level(loaded):
    windows = random_windows(loaded.model.config.vocab_size, count=2, length=16, seed=5)
    reference = reference_logprobs(loaded.model, windows)
    values = []
    for level in (1, 3):
        dense = prune_all_layers(loaded.model, level)
        try:
            values.append(kl_to_reference(loaded.model, windows, reference))
        finally:
            restore(loaded.model, dense)
    assert values[0] < values[1]


def test_nan_weights_raise(tiny_mamba2_dir):
    loaded = load_checkpoint(tiny_mamba2_dir)
    windows = random_windows(loaded.model.config.vocab_size, count=2, length=8)
    reference = reference_logprobs(loaded.model, windows)
    with torch.no_grad():
        loaded.model.backbone.layers[0].mixer.out_proj.weight[0, 0] = float("nan")
    with pytest.raises(QualityError, match="not finite"):
        perplexity(loaded.model, windows)
    with pytest.raises(QualityError, match="not finite"):
        kl_to_reference(loaded.model, windows, reference)
    with pytest.raises(QualityError, match="NaN or inf"):
        reference_logprobs(loaded.model, windows)


def test_reference_shape_mismatch_rejected(tiny_mamba2_dir):
    loaded = load_checkpoint(tiny_mamba2_dir)
    windows = random_windows(loaded.model.config.vocab_size, count=2, length=8)
    reference = reference_logprobs(loaded.model, windows)
    with pytest.raises(QualityError, match="do not match windows"):
        kl_to_reference(loaded.model, windows[:, :6], reference)


@pytest.mark.parametrize("shape", [(8,), (0, 8), (2, 1)])
def test_invalid_windows_rejected(tiny_mamba2_dir, shape):
    loaded = load_checkpoint(tiny_mamba2_dir)
    with pytest.raises(QualityError, match="evaluation windows"):
        perplexity(loaded.model, torch.zeros(shape, dtype=torch.long))
