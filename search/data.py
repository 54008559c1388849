"""The embedded texts and deterministic token windows cut from any text.

The embedded texts come from the Project Gutenberg editions of Shakespeare's works, split by
whole works (see ``docs/data_card.md``):

- ``calibration_text()``: one training play, the source of calibration windows for pruning;
- ``evaluation_text()``: two plays held out from training, the source of evaluation windows.

``token_windows`` tokenises a text and cuts it into non-overlapping windows of a fixed length.
With ``count`` set it picks that many of them with a seeded generator, so the same text,
tokenizer, count and seed always give the same tensor (with a given torch version, whose
``randperm`` draws the choice).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch

from search.errors import Cn4Error

logger = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED_MODEL_DIR = EMBEDDED_DIR / "model"
EMBEDDED_TEXTS_DIR = EMBEDDED_DIR / "texts"
CALIBRATION_FILE = EMBEDDED_TEXTS_DIR / "calibration.txt"
EVALUATION_FILE = EMBEDDED_TEXTS_DIR / "evaluation.txt"


class TextDataError(Cn4Error, ValueError):
    """A text file that cannot be read, or a text too short for the requested windows."""


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file given by a user, with line endings normalised to ``\\n``.

    Raises :class:`TextDataError` when the file is missing, is a directory, is not UTF-8, or
    holds only whitespace.
    """
    file = Path(path).expanduser()
    if not file.exists():
        raise TextDataError(f"text file {str(file)!r} not found: pass the path of a UTF-8 text file")
    if not file.is_file():
        raise TextDataError(
            f"text path {str(file)!r} is a directory, not a file: pass the path of a UTF-8 text file"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TextDataError(
            f"text file {str(file)!r} is not valid UTF-8 ({exc}): convert it, for example with "
            f"iconv -t UTF-8"
        ) from exc
    if not text.strip():
        raise TextDataError(
            f"text file {str(file)!r} is empty or holds only whitespace: pass a file with text"
        )
    return text.replace("\r\n", "\n").replace("\r", "\n")


@functools.cache
def calibration_text() -> str:
    """Return the embedded calibration text (one training play, about 140 KB)."""
    return read_text(CALIBRATION_FILE)


@functools.cache
def evaluation_text() -> str:
    """Return the embedded evaluation text (two held-out plays, about 330 KB)."""
    return read_text(EVALUATION_FILE)


def token_windows(
    tokenizer, text: str, *, window: int, count: int | None = None, seed: int = 0
) -> torch.LongTensor:
    """Tokenise ``text`` and return non-overlapping windows of ``window`` tokens.

    The token sequence is cut into ``len(tokens) // window`` consecutive windows from its start,
    and a trailing partial window is dropped. With ``count=None`` every window is returned in text
    order, shape ``[all, window]``. Otherwise ``count`` distinct windows are drawn by a
    ``torch.Generator`` seeded with ``seed`` and returned in text order, shape ``[count, window]``.
    No special tokens are added.

    Raises :class:`TextDataError` when ``window`` or ``count`` is not a positive integer, when the
    text yields no full window, or when ``count`` exceeds the windows available.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise TextDataError(f"window={window!r} is invalid: give a positive number of tokens")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise TextDataError(
            f"count={count!r} is invalid: give a positive number of windows, or None for all"
        )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    available = len(ids) // window
    if available == 0:
        raise TextDataError(
            f"the text tokenises to {len(ids)} tokens, fewer than one window of {window}: "
            "give a longer text or a smaller window"
        )
    windows = torch.tensor(ids[: available * window], dtype=torch.long).view(available, window)
    if count is None:
        return windows
    if count > available:
        raise TextDataError(
            f"count={count} windows of {window} tokens requested, but the text "
            f"({len(ids)} tokens) holds only {available}: request at most {available}, "
            "use a smaller window or a longer text"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:count].sort().values
    return windows[chosen]


def tokens_fingerprint(windows: torch.Tensor) -> str:
    """Return a sha256 hex digest of the windows' shape and int64 values, for cache keys."""
    values = windows.detach().to(device="cpu", dtype=torch.int64).contiguous()
    digest = hashlib.sha256()
    digest.update(repr(tuple(values.shape)).encode())
    digest.update(values.numpy().tobytes())
    return digest.hexdigest()
