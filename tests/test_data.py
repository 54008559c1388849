"""Tests of search.data: embedded texts, user text files and deterministic token windows."""

from __future__ import annotations

import json

import pytest
import torch

from search import data
from search.errors import Cn4Error


@pytest.fixture(scope="module")
def tokenizer(tiny_mamba2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_mamba2_dir)


@pytest.fixture(scope="module")
def long_text() -> str:
    return data.calibration_text()[:20_000]


def test_embedded_texts_sizes():
    calibration = data.calibration_text()
    evaluation = data.evaluation_text()
    assert 100_000 <= len(calibration.encode()) <= 200_000
    assert 300_000 <= len(evaluation.encode()) <= 400_000
    assert "\r" not in calibration
    assert "\r" not in evaluation


def test_embedded_split_is_disjoint():
    split = json.loads((data.EMBEDDED_TEXTS_DIR / "split.json").read_text())
    evaluation = set(split["evaluation"])
    training = set(split["training"])
    assert len(evaluation) == 2
    assert evaluation.isdisjoint(training)
    assert set(split["calibration"]) <= training
    assert len(data.evaluation_text().encode()) == split["bytes"]["evaluation"]
    assert len(data.calibration_text().encode()) == split["bytes"]["calibration"]


def test_embedded_texts_hold_named_plays():
    evaluation = data.evaluation_text()
    calibration = data.calibration_text()
    assert evaluation.startswith("HAMLET, PRINCE OF DENMARK\n")
    assert "\nOTHELLO, THE MOOR OF VENICE\n" in evaluation
    assert calibration.startswith("ROMEO AND JULIET\n")
    assert "HAMLET" not in calibration
    # No line of 60+ characters is shared between the held-out plays and the calibration play.
    long_lines = {line for line in calibration.split("\n") if len(line) >= 60}
    assert long_lines
    assert not long_lines & set(evaluation.split("\n"))


def test_read_text_normalises_line_endings(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"first line\r\nsecond line\rthird\n")
    assert data.read_text(path) == "first line\nsecond line\nthird\n"


def test_read_text_missing_file(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(data.TextDataError, match="nowhere.txt.*not found"):
        data.read_text(missing)


def test_read_text_empty_file(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("  \n\n\t\n")
    with pytest.raises(data.TextDataError, match="blank.txt.*empty"):
        data.read_text(path)


def test_read_text_directory(tmp_path):
    with pytest.raises(data.TextDataError, match="is a directory"):
        data.read_text(tmp_path)


def test_read_text_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(data.TextDataError, match="not valid UTF-8"):
        data.read_text(path)


def test_text_data_error_is_cn4_value_error():
    assert issubclass(data.TextDataError, Cn4Error)
    assert issubclass(data.TextDataError, ValueError)


def test_token_windows_all_are_consecutive(tokenizer, long_text):
    ids = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    windows = data.token_windows(tokenizer, long_text, window=64)
    assert windows.dtype == torch.long
    assert windows.shape == (len(ids) // 64, 64)
    assert windows.reshape(-1).tolist() == ids[: windows.numel()]


def test_token_windows_count_shape_and_source(tokenizer, long_text):
    every = data.token_windows(tokenizer, long_text, window=64)
    chosen = data.token_windows(tokenizer, long_text, window=64, count=10, seed=3)
    assert chosen.shape == (10, 64)
    rows = {tuple(row) for row in every.tolist()}
    assert all(tuple(row) in rows for row in chosen.tolist())
    # Distinct windows, in text order.
    positions = [every.tolist().index(row) for row in chosen.tolist()]
    assert positions == sorted(set(positions))


def test_token_windows_same_seed_same_windows(tokenizer, long_text):
    first = data.token_windows(tokenizer, long_text, window=32, count=12, seed=7)
    second = data.token_windows(tokenizer, long_text, window=32, count=12, seed=7)
    assert torch.equal(first, second)


def test_token_windows_other_seed_other_windows(tokenizer, long_text):
    first = data.token_windows(tokenizer, long_text, window=32, count=12, seed=7)
    other = data.token_windows(tokenizer, long_text, window=32, count=12, seed=8)
    assert not torch.equal(first, other)


def test_token_windows_count_equal_to_available(tokenizer, long_text):
    every = data.token_windows(tokenizer, long_text, window=64)
    chosen = data.token_windows(tokenizer, long_text, window=64, count=len(every), seed=5)
    assert torch.equal(chosen, every)


def test_token_windows_text_shorter_than_window(tokenizer):
    text = "To be, or not to be."
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(data.TextDataError, match=f"{tokens} tokens, fewer than one window of 512"):
        data.token_windows(tokenizer, text, window=512)


def test_token_windows_count_above_available(tokenizer, long_text):
    available = len(data.token_windows(tokenizer, long_text, window=64))
    with pytest.raises(data.TextDataError, match=f"count={available + 1} .* holds only {available}"):
        data.token_windows(tokenizer, long_text, window=64, count=available + 1)


@pytest.mark.parametrize("window", [0, -4, 2.5, True])
def test_token_windows_invalid_window(tokenizer, window):
    with pytest.raises(data.TextDataError, match="window=.* is invalid"):
        data.token_windows(tokenizer, "some text", window=window)


@pytest.mark.parametrize("count", [0, -1, 1.5])
def test_token_windows_invalid_count(tokenizer, long_text, count):
    with pytest.raises(data.TextDataError, match="count=.* is invalid"):
        data.token_windows(tokenizer, long_text, window=16, count=count)


def test_tokens_fingerprint_stable_and_sensitive():
    windows = torch.arange(24, dtype=torch.long).view(4, 6)
    fingerprint = data.tokens_fingerprint(windows)
    assert len(fingerprint) == 64
    assert int(fingerprint, 16) >= 0
    assert data.tokens_fingerprint(windows.clone()) == fingerprint
    # int32 input hashes as int64 values.
    assert data.tokens_fingerprint(windows.to(torch.int32)) == fingerprint
    changed = windows.clone()
    changed[3, 5] += 1
    assert data.tokens_fingerprint(changed) != fingerprint
    # Same values in another shape give another fingerprint.
    assert data.tokens_fingerprint(windows.view(6, 4)) != fingerprint
