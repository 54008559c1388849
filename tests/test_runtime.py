"""Swapping Linears of tiny Mamba and Mamba2 checkpoints for Cn4Linear modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from latency_models.runtime import Cn4Linear, restore_linears, swap_linears
from search.errors import PruningError
from search.models import eligible_layers, get_module, load_checkpoint

NEW_TOKENS = 16


def magnitude_prune_(linear: nn.Linear, n: int) -> None:
    """Zero the n smallest |w| of every group of 4 input weights, in place."""
    with torch.no_grad():
        groups = linear.weight.view(linear.out_features, -1, 4)
        smallest = groups.abs().argsort(dim=-1)[..., :n]
        groups.scatter_(-1, smallest, 0.0)


def prune_all_eligible(model: nn.Module) -> dict[str, int]:
    """Prune every eligible Linear, cycling through levels 0..3, and return the level map."""
    level_map = {}
    for index, info in enumerate(eligible_layers(model)):
        level = index % 4
        magnitude_prune_(get_module(model, info.name), level)
        level_map[info.name] = level
    return level_map


def greedy_generate(loaded) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the generated token ids and the stacked logits of greedy decoding."""
    prompt = loaded.tokenizer("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        output = loaded.model.generate(
            prompt,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=loaded.tokenizer.eos_token_id,
        )
    return output.sequences, torch.stack(output.logits)


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_swap_generates_same_tokens(arch, tiny_mamba_dir, tiny_mamba2_dir):
    loaded = load_checkpoint(tiny_mamba_dir if arch == "mamba" else tiny_mamba2_dir)
    level_map = prune_all_eligible(loaded.model)
    assert set(level_map.values()) == {0, 1, 2, 3}
    dense_ids, dense_logits = greedy_generate(loaded)

    replaced = swap_linears(loaded.model, level_map)
    assert set(replaced) == set(level_map)
    for name, level in level_map.items():
        module = get_module(loaded.model, name)
        assert isinstance(module, Cn4Linear)
        assert module.level == level
    swapped_ids, swapped_logits = greedy_generate(loaded)

    assert dense_logits.shape[0] == NEW_TOKENS
    assert torch.equal(swapped_ids, dense_ids)
    torch.testing.assert_close(swapped_logits, dense_logits, rtol=1e-4, atol=1e-4)

    restore_linears(loaded.model, replaced)
    for name, linear in replaced.items():
        assert get_module(loaded.model, name) is linear
    restored_ids, _ = greedy_generate(loaded)
    assert torch.equal(restored_ids, dense_ids)


def test_cn4_linear_matches_masked_linear():
    torch.manual_seed(0)
    linear = nn.Linear(24, 13, bias=True)
    magnitude_prune_(linear, 2)
    module = Cn4Linear(linear, 2)
    for shape in [(24,), (1, 1, 24), (2, 3, 24), (40, 24)]:
        x = torch.randn(shape)
        expected = nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())
        result = module(x)
        assert result.shape == (*shape[:-1], 13)
        assert result.dtype == torch.float32
        torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-5)


def test_cn4_linear_keeps_input_dtype():
    linear = nn.Linear(8, 4, bias=False)
    magnitude_prune_(linear, 1)
    result = Cn4Linear(linear, 1)(torch.randn(2, 8, dtype=torch.float64))
    assert result.dtype == torch.float64


def test_cn4_linear_weight_is_dense_copy():
    torch.manual_seed(1)
    linear = nn.Linear(16, 6, bias=True)
    magnitude_prune_(linear, 3)
    module = Cn4Linear(linear, 3)
    assert torch.equal(module.weight, linear.weight.detach())
    assert torch.equal(module.bias, linear.bias.detach())


def test_cn4_linear_rejects_wrong_features():
    linear = nn.Linear(8, 4)
    module = Cn4Linear(linear, 0)
    with pytest.raises(ValueError, match="expected in_features=8"):
        module(torch.randn(3, 12))


def test_swap_unpruned_weight_leaves_model_unchanged(tiny_mamba2_dir):
    loaded = load_checkpoint(tiny_mamba2_dir)
    names = [info.name for info in eligible_layers(loaded.model)]
    magnitude_prune_(get_module(loaded.model, names[0]), 2)
    level_map = {names[0]: 2, names[1]: 2}  # the second layer is still dense
    with pytest.raises(PruningError, match=rf"layer '{names[1]}' cannot run at level 2: row 0"):
        swap_linears(loaded.model, level_map)
    for name in names:
        assert type(get_module(loaded.model, name)) is nn.Linear


def test_swap_ineligible_layer_raises(tiny_mamba_dir):
    loaded = load_checkpoint(tiny_mamba_dir)
    with pytest.raises(PruningError, match="lm_head"):
        swap_linears(loaded.model, {"lm_head": 0})


def test_swap_twice_raises(tiny_mamba2_dir):
    loaded = load_checkpoint(tiny_mamba2_dir)
    name = eligible_layers(loaded.model)[0].name
    replaced = swap_linears(loaded.model, {name: 0})
    with pytest.raises(PruningError, match="swapped already"):
        swap_linears(loaded.model, {name: 0})
    restore_linears(loaded.model, replaced)
    with pytest.raises(PruningError, match="restored already"):
        restore_linears(loaded.model, replaced)


def test_swap_level_zero_uses_dense_storage(tiny_mamba2_dir):
    loaded = load_checkpoint(tiny_mamba2_dir)
    name = eligible_layers(loaded.model)[0].name
    weight = get_module(loaded.model, name).weight.detach().numpy().copy()
    swap_linears(loaded.model, {name: 0})
    module = get_module(loaded.model, name)
    assert module.packed.codes.shape[1] == 0
    assert np.array_equal(module.packed.values, weight)
