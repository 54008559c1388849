"""Tests of the embedded default model: its files, its card and its held-out perplexity."""

from __future__ import annotations

import json
import math

import pytest
import torch

from search import data

CARD_FILE = data.EMBEDDED_MODEL_DIR / "cn4_card.json"
# Windows used by the quick perplexity checks; the card's numbers cover all of them.
SUBSET_WINDOWS = 16


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads(CARD_FILE.read_text())


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data.EMBEDDED_MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    from transformers import Mamba2ForCausalLM

    return Mamba2ForCausalLM.from_pretrained(data.EMBEDDED_MODEL_DIR, dtype=torch.float32).eval()


@torch.no_grad()
def perplexity_of(model, windows: torch.Tensor) -> tuple[float, int]:
    """Perplexity over tokens 2..window of each window, as the card measures it."""
    total = 0.0
    tokens = 0
    for start in range(0, len(windows), 8):
        batch = windows[start : start + 8]
        logits = model(input_ids=batch, use_cache=False).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        total -= logprobs.gather(-1, batch[:, 1:, None]).double().sum().item()
        tokens += batch[:, 1:].numel()
    return math.exp(total / tokens), tokens


def test_checkpoint_files_and_size():
    names = {path.name for path in data.EMBEDDED_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in names)
    size = sum(path.stat().st_size for path in data.EMBEDDED_MODEL_DIR.iterdir())
    assert size < 20_000_000


def test_weights_stored_as_float16():
    from safetensors import safe_open

    with safe_open(data.EMBEDDED_MODEL_DIR / "model.safetensors", framework="pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert dtypes == {"F16"}


def test_config_shape(card):
    config = json.loads((data.EMBEDDED_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "mamba2"
    assert config["vocab_size"] == 4096
    assert config["hidden_size"] == 512
    assert config["num_hidden_layers"] == 4
    assert config["num_heads"] * config["head_dim"] == config["expand"] * config["hidden_size"]
    assert config["tie_word_embeddings"] is True
    for key in ("hidden_size", "num_hidden_layers", "state_size", "chunk_size", "num_heads"):
        assert card["model"][key] == config[key]


def test_model_loads_in_float32(model, card):
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == card["model"]["parameters"]
    assert model.lm_head.weight.data_ptr() == model.backbone.embeddings.weight.data_ptr()


def test_tokenizer_vocab_and_end_of_text(tokenizer):
    assert len(tokenizer) == 4096
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id is not None
    line = "To be, or not to be, that is the question:"
    ids = tokenizer(line, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == line
    assert len(ids) < len(line) / 2


def test_card_window_count_matches_token_windows(tokenizer, card):
    evaluation = card["evaluation"]
    windows = data.token_windows(tokenizer, data.evaluation_text(), window=evaluation["window"])
    assert len(windows) == evaluation["windows"]
    assert windows.shape[0] * (windows.shape[1] - 1) == evaluation["tokens"]


def test_card_numbers_are_ordered(card):
    evaluation = card["evaluation"]
    model_ppl = evaluation["model_perplexity"]
    bigram_ppl = evaluation["bigram"]["perplexity"]
    unigram_ppl = evaluation["unigram"]["perplexity"]
    assert 1.0 < model_ppl < bigram_ppl < unigram_ppl < 4096
    assert model_ppl < 0.8 * bigram_ppl
    before = evaluation.get("model_perplexity_before_fp16")
    if before is not None:
        assert abs(model_ppl - before) / before < 0.005


def test_subset_perplexity_below_bigram(model, tokenizer, card):
    windows = data.token_windows(
        tokenizer, data.evaluation_text(), window=card["evaluation"]["window"],
        count=SUBSET_WINDOWS, seed=0,
    )
    perplexity, tokens = perplexity_of(model, windows)
    assert tokens == SUBSET_WINDOWS * (card["evaluation"]["window"] - 1)
    assert math.isfinite(perplexity)
    assert perplexity < 0.8 * card["evaluation"]["bigram"]["perplexity"]


def test_subset_perplexity_through_load_checkpoint(card):
    from search.models import load_checkpoint

    loaded = load_checkpoint("default")
    assert loaded.arch == "mamba2"
    windows = data.token_windows(
        loaded.tokenizer, data.evaluation_text(), window=card["evaluation"]["window"],
        count=4, seed=1,
    )
    perplexity, _ = perplexity_of(loaded.model, windows)
    assert math.isfinite(perplexity)
    assert perplexity < card["evaluation"]["bigram"]["perplexity"]


def test_full_perplexity_matches_card(model, tokenizer, card):
    evaluation = card["evaluation"]
    windows = data.token_windows(tokenizer, data.evaluation_text(), window=evaluation["window"])
    perplexity, tokens = perplexity_of(model, windows)
    assert tokens == evaluation["tokens"]
    assert perplexity == pytest.approx(evaluation["model_perplexity"], rel=1e-3)


def test_card_baselines_are_normalised(monkeypatch):
    """The n-gram models behind the card's baseline numbers sum to 1 over the vocabulary."""
    import numpy as np

    monkeypatch.syspath_prepend(str(data.EMBEDDED_DIR.parent.parent / "scripts"))
    import build_default_baselines as baselines

    vocab = 40
    stream = np.random.default_rng(0).integers(0, vocab - 2, 3000)
    stream[::5] = 7
    bigram = baselines.KneserNeyBigram(stream, vocab, discount=0.6)
    targets = np.arange(vocab)
    # Context 7 is frequent, 3 is ordinary, 39 never occurs and falls back to the lower order.
    for context in (7, 3, vocab - 1):
        contexts = np.full(vocab, context)
        probabilities = [
            math.exp(-bigram.nll(contexts[i : i + 1], targets[i : i + 1])) for i in range(vocab)
        ]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-9)
    unigram = baselines.AddKUnigram(stream, vocab, k=0.5)
    total = sum(math.exp(-unigram.nll(targets[i : i + 1])) for i in range(vocab))
    assert total == pytest.approx(1.0, abs=1e-9)
