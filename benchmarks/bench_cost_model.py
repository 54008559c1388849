"""Accuracy of this machine's cost model on held-out level maps, and the probe's wall time.

For each model the probe measures its layers, the dense and uniform level maps and ``--configs``
seeded random level maps. The cost model is fitted on everything except the random maps (no
further hold-out), then predicts each random map's decode latency, which is compared with the
measured one: shares within ±5% and ±10%, MAPE and Spearman rank correlation.

Models: the embedded default (``search/embedded/model``) and a Mamba with the shape of
mamba-130m (hidden 768, vocab 50280, ``--layers`` blocks; 24 is the real depth) built from a
config with random weights, since latency does not depend on weight values.

    NUMBA_NUM_THREADS=2 .venv/bin/python benchmarks/bench_cost_model.py --out results.json

Prints one JSON object per model and a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numba
import numpy as np
import torch

from latency_models.cost_model import CostModel, accuracy_report
from latency_models.local import local_device_name
from latency_models.probe import probe_model

logger = logging.getLogger("bench_cost_model")


def build_130m_shaped(layers: int) -> torch.nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(
        vocab_size=50280, hidden_size=768, num_hidden_layers=layers, state_size=16,
        tie_word_embeddings=True,
    )
    return MambaForCausalLM(config).eval()


def compare_transformers(loaded, *, steps: int = 40, warmup: int = 5) -> dict:
    """Time dense decode steps of transformers and of the engine with this thread's CPU time.

    Both run on one thread (torch and numba), after the same 4-token prompt.
    """
    from latency_models.engine import DecodeEngine

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    model = loaded.model
    prompt = [5, 17, 33, 2]
    token = 7
    transformers_ms = []
    with torch.no_grad():
        output = model(torch.tensor([prompt]), use_cache=True)
        cache = output.cache
        for _ in range(steps):
            start = time.thread_time()
            output = model(torch.tensor([[token]]), cache=cache, use_cache=True)
            transformers_ms.append((time.thread_time() - start) * 1e3)
            cache = output.cache
    engine = DecodeEngine(model, {})
    engine.prefill(prompt)
    engine_ms = []
    for _ in range(steps):
        start = time.thread_time()
        engine.step(token)
        engine_ms.append((time.thread_time() - start) * 1e3)
    return {
        "transformers_ms": float(np.median(transformers_ms[warmup:])),
        "engine_ms": float(np.median(engine_ms[warmup:])),
        "steps": steps - warmup,
    }


def evaluate(name: str, loaded_or_model, args: argparse.Namespace, device: str) -> dict:
    started = time.perf_counter()
    result = probe_model(
        loaded_or_model,
        device=device,
        levels=(0, 1, 2, 3),
        configs=args.configs,
        repeats=args.repeats,
        seed=args.seed,
        clock=args.clock,
        progress=True,
    )
    probe_seconds = time.perf_counter() - started
    cost_model = CostModel.fit([*result.layers, *result.remainder, *result.calibration], holdout=0)
    measured = [record.median_ms for record in result.validation]
    predicted = [
        cost_model.predict_model(list(record.levels.values()), model=record.model)
        for record in result.validation
    ]
    report = accuracy_report(measured, predicted)
    dense = result.calibration[0].median_ms
    return {
        "model": name,
        "probe_seconds": round(probe_seconds, 1),
        "held_out": report["count"],
        "within_5pct": report["within_5pct"],
        "within_10pct": report["within_10pct"],
        "mape": report["mape"],
        "max_ape": report.get("max_ape"),
        "spearman": report["spearman"],
        "dense_ms": dense,
        "uniform_ms": {
            str(level): record.median_ms for level, record in enumerate(result.calibration)
        },
        # None when the measured Linears outweighed the step (see probe._remainder_record).
        "remainder_ms": result.remainder[0].median_ms if result.remainder else None,
        "layer_ms": {
            f"{r.out_features}x{r.in_features}@{r.level}": r.median_ms for r in result.layers
        },
        "measured_range_ms": [min(measured), max(measured)] if measured else None,
        "configs": args.configs,
        "repeats": args.repeats,
        "clock": args.clock,
        "threads": result.layers[0].threads,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=int, default=30, help="random held-out level maps")
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats per case")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--layers", type=int, default=24, help="blocks of the 130m-shaped model (24 is real)"
    )
    parser.add_argument(
        "--models", default="default,130m", help="comma-separated: default, 130m"
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "thread"),
        help="wall time, or this thread's CPU time (needs NUMBA_NUM_THREADS=1)",
    )
    parser.add_argument(
        "--compare-transformers",
        action="store_true",
        help="only time dense decode of the embedded model in transformers and in the engine",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    if args.compare_transformers:
        from search.models import load_checkpoint

        print(json.dumps(compare_transformers(load_checkpoint("default"))))
        return 0

    device = local_device_name()
    results = []
    for name in args.models.split(","):
        if name == "default":
            from search.models import load_checkpoint

            results.append(evaluate("embedded default", load_checkpoint("default"), args, device))
        elif name == "130m":
            model = build_130m_shaped(args.layers)
            label = f"130m-shaped Mamba, {args.layers} layers"
            results.append(evaluate(label, model, args, device))
            del model
        else:
            parser.error(f"unknown model {name!r}: use default or 130m")
        print(json.dumps(results[-1]), flush=True)

    meta = {
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
        "command": " ".join(["benchmarks/bench_cost_model.py", *sys.argv[1:]]),
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    if args.out is not None:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")

    print("| model | held-out maps | within ±5% | within ±10% | MAPE | Spearman | dense ms/token | probe s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in results:
        print(
            f"| {row['model']} | {row['held_out']} | {row['within_5pct']:.0%} | "
            f"{row['within_10pct']:.0%} | {row['mape']:.1f}% | {row['spearman']:.3f} | "
            f"{row['dense_ms']:.2f} | {row['probe_seconds']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
