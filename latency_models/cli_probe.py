"""``cn4 probe``: measure a model's layers and whole-model decode latency on this machine."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from search.errors import MeasurementError

logger = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2,3"
        ) from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from latency_models.probe_settings import (
        CALLS_PER_SAMPLE,
        DEFAULT_CONFIGS,
        DEFAULT_REPEATS,
        DEFAULT_SEED,
        DEFAULT_WARMUP,
    )

    parser = subparsers.add_parser(
        "probe",
        help="measure layer and decode latency on this machine for a cost model",
        description=(
            "Time every distinct eligible Linear shape of a model at each Cn4 level, whole-model "
            "decode through the compiled engine for the dense map, each uniform level and "
            "random level maps (the validation set), and the remainder no level changes. "
            "Writes cn4.latency/1 records that `cn4 fit` reads."
        ),
    )
    parser.add_argument(
        "--model",
        default="default",
        metavar="PATH",
        help="checkpoint directory, or 'default' for the embedded model (the default)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE",
        help="measurement file to write, .jsonl or .csv (default: probe-<device>.jsonl here)",
    )
    parser.add_argument(
        "--levels",
        type=_int_list,
        default=[0, 1, 2, 3],
        metavar="LIST",
        help="Cn4 levels to measure, zeros per group of 4 (default: 0,1,2,3; 0 is always added)",
    )
    parser.add_argument(
        "--tokens",
        type=_int_list,
        default=[1],
        metavar="LIST",
        help="input rows per Linear call to measure (default: 1, one decoded token)",
    )
    parser.add_argument(
        "--configs",
        type=int,
        default=DEFAULT_CONFIGS,
        metavar="K",
        help=f"random level maps timed as the validation set (default: {DEFAULT_CONFIGS})",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        metavar="R",
        help=(
            f"timed repeats per case (default: {DEFAULT_REPEATS}); a Linear case times "
            f"{CALLS_PER_SAMPLE} single calls per repeat, a model case one decode step"
        ),
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=DEFAULT_WARMUP,
        metavar="W",
        help=f"untimed repeats before each case (default: {DEFAULT_WARMUP})",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="seed of the random level maps and inputs"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help=(
            "wall time (the default), or the probing thread's CPU time, which leaves out time "
            "taken by other processes; thread needs NUMBA_NUM_THREADS=1"
        ),
    )
    parser.add_argument(
        "--device",
        default=None,
        metavar="NAME",
        help="device name written into the records (default: this machine's id)",
    )
    parser.set_defaults(func=run_probe)


def run_probe(args: argparse.Namespace) -> int:
    from latency_models.local import local_device_name
    from latency_models.measurements import write_measurements
    from latency_models.probe import probe_model
    from search.models import load_checkpoint

    device = args.device or local_device_name()
    out = args.out or Path(f"probe-{device}.jsonl")
    if out.suffix.lower() not in (".jsonl", ".json", ".csv", ".ndjson"):
        raise MeasurementError(f"--out {out}: use a .jsonl or .csv file name")
    loaded = load_checkpoint(args.model)
    result = probe_model(
        loaded,
        device=device,
        levels=args.levels,
        tokens=args.tokens,
        configs=args.configs,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        clock=args.clock,
        progress=True,
    )
    write_measurements(result.records, out)
    dense = result.calibration[0]
    remainder = (
        f"remainder {result.remainder[0].median_ms:.3f} ms"
        if result.remainder
        else "no remainder (the Linears outweighed the step; probe again)"
    )
    print(
        f"wrote {len(result.records)} records to {out} in {result.seconds:.1f} s: "
        f"{len(result.layers)} linear, {len(result.calibration) + len(result.validation)} model "
        f"({len(result.validation)} random), {len(result.remainder)} remainder; dense decode "
        f"{dense.median_ms:.3f} ms/token, {remainder}"
    )
    return 0
