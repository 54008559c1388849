"""The compiled decode engine against transformers' own decoding, dense and Cn4-pruned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latency_models.engine import DecodeEngine, zero_smallest_per_group
from search.errors import PruningError
from search.models import eligible_layers, load_checkpoint

PROMPT = [5, 17, 33, 2, 60, 11]
NEW_TOKENS = 12
# fp32 logits of the engine and the PyTorch path differ by summation order only; the tiny
# models' logits are of order 1 to 10.
LOGIT_ATOL = 2e-4


def _load(directory):
    return load_checkpoint(directory).model


def _prune_in_place(model) -> dict[str, int]:
    """Zero the n smallest |w| per group of 4 in every eligible Linear, cycling n over 1, 2, 3."""
    level_map = {}
    for index, info in enumerate(eligible_layers(model)):
        level = 1 + index % 3
        module = model.get_submodule(info.name)
        with torch.no_grad():
            pruned = zero_smallest_per_group(module.weight.numpy(), level)
            module.weight.copy_(torch.from_numpy(pruned))
        level_map[info.name] = level
    return level_map


def _reference(model):
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        logits = model(ids).logits[0].numpy()
    return generated[0].tolist(), logits


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "cn4"])
@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_engine_matches_transformers(arch, pruned, tiny_mamba_dir, tiny_mamba2_dir):
    model = _load(tiny_mamba_dir if arch == "mamba" else tiny_mamba2_dir)
    level_map = _prune_in_place(model) if pruned else {}
    expected_tokens, expected_logits = _reference(model)

    engine = DecodeEngine(model, level_map)
    if pruned:
        assert {linear.level for linear in engine.linears if linear.packed is not None} == {1, 2, 3}
    engine.reset()
    for position, token_id in enumerate(PROMPT):
        logits = engine.step(token_id)
        np.testing.assert_allclose(logits, expected_logits[position], atol=LOGIT_ATOL, rtol=0)

    assert engine.generate_greedy(PROMPT, NEW_TOKENS) == expected_tokens


def test_engine_reset_repeats_sequence(tiny_mamba2_dir):
    engine = DecodeEngine(_load(tiny_mamba2_dir), {})
    first = engine.generate_greedy(PROMPT, 5)
    engine.step(3)
    assert engine.generate_greedy(PROMPT, 5) == first


def test_engine_prefill_equals_steps(tiny_mamba_dir):
    engine = DecodeEngine(_load(tiny_mamba_dir), {})
    engine.reset()
    from_prefill = engine.prefill(PROMPT).copy()
    engine.reset()
    for token_id in PROMPT:
        from_steps = engine.step(token_id)
    np.testing.assert_array_equal(from_prefill, from_steps)


def test_engine_rejects_unpruned_layer(tiny_mamba2_dir):
    model = _load(tiny_mamba2_dir)
    name = eligible_layers(model)[0].name
    with pytest.raises(PruningError, match="does not meet level 2"):
        DecodeEngine(model, {name: 2})


def test_engine_prune_to_levels_leaves_model_unchanged(tiny_mamba2_dir):
    model = _load(tiny_mamba2_dir)
    name = eligible_layers(model)[0].name
    before = model.get_submodule(name).weight.detach().clone()
    engine = DecodeEngine(model, {name: 3}, prune_to_levels=True)
    packed = engine.blocks[0]["linears"]["in_proj"].packed
    assert packed.n == 3
    assert (packed.unpack() != 0).sum(axis=1).max() <= packed.in_features // 4
    assert torch.equal(model.get_submodule(name).weight, before)


def test_engine_rejects_unknown_layer(tiny_mamba_dir):
    with pytest.raises(PruningError, match="not found"):
        DecodeEngine(_load(tiny_mamba_dir), {"backbone.layers.9.mixer.in_proj": 1})


def test_engine_rejects_token_outside_vocab(tiny_mamba_dir):
    engine = DecodeEngine(_load(tiny_mamba_dir), {})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.step(engine.vocab_size)


def test_zero_smallest_per_group_counts():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 16)).astype(np.float32)
    for level in (0, 1, 2, 3):
        pruned = zero_smallest_per_group(weight, level)
        zeros = (pruned.reshape(8, 4, 4) == 0).sum(axis=-1)
        assert (zeros == level).all()
        kept = pruned != 0
        np.testing.assert_array_equal(pruned[kept], weight[kept])
        # Every dropped weight is no larger than every kept weight of its group.
        groups = np.abs(weight.reshape(8, 4, 4))
        kept_groups = kept.reshape(8, 4, 4)
        if 0 < level:
            largest_dropped = np.where(kept_groups, -np.inf, groups).max(axis=-1)
            smallest_kept = np.where(kept_groups, groups, np.inf).min(axis=-1)
            assert (largest_dropped <= smallest_kept).all()


def test_engine_copies_weights(tiny_mamba2_dir):
    model = _load(tiny_mamba2_dir)
    engine = DecodeEngine(model, {})
    before = engine.generate_greedy(PROMPT, 4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    assert engine.generate_greedy(PROMPT, 4) == before
