"""Benchmark the Cn4 decode GEMVs against dense at the Mamba-130m Linear shapes.

Each column times one GEMV ``y = W x`` per call with cold weights. The calls rotate through
enough copies of the weight to exceed the last-level cache several times, so every call reads
its weight from memory as a decode step would. Columns: PyTorch's
``torch.nn.functional.linear``, the dense numba kernel and the Cn4 kernels at n = 1, 2, 3, each
in microseconds (median, p10, p90) and in GB/s of bytes actually moved (float32 values, one
code byte per group of 4, x and y). Beside each Cn4 column: its speedup over the dense kernel
and the byte-ratio bound (dense bytes over Cn4 bytes), which a memory-bound kernel would reach.
The machine's read bandwidth is measured the same way, with numba parallel sums over cold blocks.

    .venv/bin/python benchmarks/bench_kernels.py --threads 2

Prints a Markdown report to stdout. Not a test: run it when the machine is quiet.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import torch

from latency_models.kernels import GROUP_SIZE, MATVEC_KERNELS, pack_cn4

logger = logging.getLogger("bench_kernels")

# [out, in] of the Mamba-130m block Linears: in_proj, x_proj, dt_proj, out_proj.
SHAPES = {
    "in_proj": (3072, 768),
    "x_proj": (80, 1536),
    "dt_proj": (1536, 48),
    "out_proj": (768, 1536),
}
LEVELS = (1, 2, 3)
# Bytes per timed call of the read-bandwidth sum: a few GEMVs' worth.
BANDWIDTH_BLOCK_BYTES = 8 * 2**20
# Pause after the PyTorch column so its OpenMP threads stop spinning before numba's run.
# NOTE: one second is a margin picked by hand, not measured against the spin time.
OPENMP_SETTLE_SECONDS = 1.0
# Used when neither sysfs nor lscpu reports a last-level cache.
FALLBACK_CACHE_BYTES = 32 * 2**20


@dataclass
class Timing:
    """Per-call times of one kernel at one shape, in microseconds, and the bytes each call moves."""

    median_us: float
    p10_us: float
    p90_us: float
    bytes_moved: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes_moved / self.median_us / 1e3


def last_level_cache_bytes() -> int:
    """Return the size of the largest cache level of CPU 0, from sysfs or else lscpu."""
    best_level, best_size = 0, 0
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = int((index / "level").read_text())
            size = _parse_size((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        if level > best_level:
            best_level, best_size = level, size
    if best_size:
        return best_size
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        output = ""
    match = re.search(r"L3 cache:\s+([\d.]+ \w+)", output)
    if match:
        return _parse_size(match.group(1).replace(" ", ""))
    logger.warning("no cache size in sysfs or lscpu, assuming %d MiB", FALLBACK_CACHE_BYTES >> 20)
    return FALLBACK_CACHE_BYTES


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"([\d.]+)\s*([KMG]?)(i?B)?", text.strip(), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot parse cache size {text!r}")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def cpu_model_name() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    match = re.search(r"Model name:\s+(.+)", output)
    return match.group(1).strip() if match else "unknown"


@numba.njit(fastmath={"reassoc"}, cache=True)
def _sum(part):
    acc = np.float32(0.0)
    for i in range(part.shape[0]):
        acc += part[i]
    return acc


@numba.njit(parallel=True, cache=True)
def _parallel_sum(array, chunks):
    size = array.shape[0]
    partial = np.zeros(chunks, dtype=np.float32)
    for chunk in numba.prange(chunks):
        partial[chunk] = _sum(array[chunk * size // chunks : (chunk + 1) * size // chunks])
    return partial.sum()


def measure_read_bandwidth(size_bytes: int, block_bytes: int, repeats: int) -> Timing:
    """Time parallel float32 sums over blocks of a ``size_bytes`` array, one block per call.

    Calls rotate through the blocks, so each reads cold memory, and each is as short as a
    GEMV: a sum over the whole array lasts long enough that background load nearly always
    deschedules one of the threads, which then holds up the other.
    """
    blocks = np.ones(size_bytes // 4, dtype=np.float32).reshape(-1, block_bytes // 4)
    chunks = numba.get_num_threads()
    for block in blocks:
        _parallel_sum(block, chunks)
    times = []
    for i in range(repeats):
        start = time.perf_counter_ns()
        _parallel_sum(blocks[i % len(blocks)], chunks)
        times.append((time.perf_counter_ns() - start) / 1e3)
    return _timing(times, block_bytes)


def _timing(times_us: list[float], bytes_moved: int) -> Timing:
    p10, median, p90 = np.percentile(times_us, [10, 50, 90])
    return Timing(float(median), float(p10), float(p90), bytes_moved)


def _time_round_robin(columns: dict[str, tuple], repeats: int) -> dict[str, list[float]]:
    """Time each column's ``call(*arguments[i])`` in turn, rotating through its copies.

    ``columns`` maps a key to ``(call, arguments)``. Calling the columns in turn, not one after
    another, exposes them all to the same background load. One untimed pass over every copy
    comes first, so page faults and lazy setup are not timed. Returns microseconds per call.
    """
    for call, arguments in columns.values():
        for args in arguments:
            call(*args)
    times: dict[str, list[float]] = {key: [] for key in columns}
    for i in range(repeats):
        for key, (call, arguments) in columns.items():
            args = arguments[i % len(arguments)]
            start = time.perf_counter_ns()
            call(*args)
            times[key].append((time.perf_counter_ns() - start) / 1e3)
    return times


def copies_for(bytes_per_copy: int, cold_bytes: int) -> int:
    return max(2, -(-cold_bytes // bytes_per_copy))


def pruned_weight(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    weight = rng.standard_normal(shape).astype(np.float32)
    groups = weight.reshape(shape[0], -1, GROUP_SIZE)
    smallest = np.argsort(np.abs(groups), axis=-1)[..., :n]
    np.put_along_axis(groups, smallest, 0.0, axis=-1)
    return weight


def bench_shape(
    shape: tuple[int, int], cold_bytes: int, repeats: int, rng: np.random.Generator
) -> dict[str, Timing]:
    """Time every column at one shape; keys are ``torch``, ``dense`` and ``n1``..``n3``."""
    out_features, in_features = shape
    vector_bytes = 4 * (in_features + out_features)
    x = rng.standard_normal(in_features).astype(np.float32)
    no_bias = np.zeros(0, dtype=np.float32)
    no_codes = np.zeros((0, 0), dtype=np.uint8)
    scratch = np.empty((GROUP_SIZE, in_features // GROUP_SIZE), dtype=np.float32)
    columns: dict[str, tuple] = {}
    bytes_moved: dict[str, int] = {}

    dense = pruned_weight(rng, shape, 0)
    copies = copies_for(dense.nbytes, cold_bytes)
    x_tensor = torch.from_numpy(x)
    tensors = [torch.from_numpy(dense.copy()) for _ in range(copies)]
    torch_column = {"torch": (torch.nn.functional.linear, [(x_tensor, w) for w in tensors])}
    bytes_moved["torch"] = dense.nbytes + vector_bytes
    y = np.empty(out_features, dtype=np.float32)
    arguments = [(dense.copy(), no_codes, x, scratch, no_bias, y) for _ in range(copies)]
    columns["dense"] = (MATVEC_KERNELS[0], arguments)
    bytes_moved["dense"] = dense.nbytes + vector_bytes

    for n in LEVELS:
        packed = pack_cn4(pruned_weight(rng, shape, n), n)
        copies = copies_for(packed.nbytes, cold_bytes)
        y = np.empty(out_features, dtype=np.float32)
        arguments = [
            (packed.values.copy(), packed.codes.copy(), x, scratch, no_bias, y) for _ in range(copies)
        ]
        columns[f"n{n}"] = (MATVEC_KERNELS[n], arguments)
        bytes_moved[f"n{n}"] = packed.nbytes + vector_bytes

    # PyTorch runs on its own OpenMP thread pool, whose threads keep spinning for a while after
    # each call and would steal the cores from numba's threads if the columns alternated.
    times = _time_round_robin(torch_column, repeats)
    del torch_column, tensors
    time.sleep(OPENMP_SETTLE_SECONDS)
    times.update(_time_round_robin(columns, repeats))
    logger.info("timed %s", shape)
    return {key: _timing(times[key], bytes_moved[key]) for key in times}


def format_report(
    results: dict[str, dict[str, Timing]],
    bandwidth: Timing,
    *,
    threads: int,
    cache_bytes: int,
    cold_multiple: int,
    repeats: int,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    command: str,
) -> str:
    lines = [
        f"Machine: {cpu_model_name()}, {os.cpu_count()} cores; numba {numba.__version__} "
        f"({threads} threads), torch {torch.__version__} ({torch.get_num_threads()} threads).",
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Command: `{command}`.",
        f"Load average (1, 5, 15 min) before: {_load(load_before)}, after: {_load(load_after)}.",
        f"Cold weights: torch alone first, then the numba columns called in turn, each rotating through copies totalling at least {cold_multiple}x "
        f"the {cache_bytes >> 20} MiB last-level cache; {repeats} timed calls after one warm-up "
        f"pass. Read bandwidth (numba parallel float32 sums over cold {bandwidth.bytes_moved >> 20} "
        f"MiB blocks, {threads} threads): median {bandwidth.gb_per_s:.1f} GB/s, p10-p90 "
        f"{bandwidth.bytes_moved / bandwidth.p90_us / 1e3:.1f}-"
        f"{bandwidth.bytes_moved / bandwidth.p10_us / 1e3:.1f} GB/s.",
        "",
        "| layer [out x in] | kernel | KiB moved | median µs | p10 µs | p90 µs | GB/s | "
        "speedup over dense kernel (median; p10) | byte-ratio bound | share of bound "
        "(median; p10) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    labels = {"torch": "torch F.linear", "dense": "numba dense", "n1": "Cn4 n=1 (3 kept)",
              "n2": "Cn4 n=2 (2 kept)", "n3": "Cn4 n=3 (1 kept)"}
    totals = {key: 0.0 for key in labels}
    totals_p10 = {key: 0.0 for key in labels}
    for name, columns in results.items():
        out_features, in_features = SHAPES[name]
        dense = columns["dense"]
        for key, label in labels.items():
            timing = columns[key]
            totals[key] += timing.median_us
            totals_p10[key] += timing.p10_us
            ratio_cells = ["", "", ""]
            if key != "dense":
                speedup = dense.median_us / timing.median_us
                speedup_p10 = dense.p10_us / timing.p10_us
                ratio_cells[0] = f"{speedup:.2f}x; {speedup_p10:.2f}x"
            if key.startswith("n"):
                bound = dense.bytes_moved / timing.bytes_moved
                ratio_cells[1] = f"{bound:.2f}x"
                ratio_cells[2] = f"{speedup / bound:.0%}; {speedup_p10 / bound:.0%}"
            lines.append(
                f"| {name} [{out_features} x {in_features}] | {label} | "
                f"{timing.bytes_moved / 1024:.0f} | {timing.median_us:.1f} | {timing.p10_us:.1f} | "
                f"{timing.p90_us:.1f} | {timing.gb_per_s:.1f} | " + " | ".join(ratio_cells) + " |"
            )
    dense_bytes = sum(columns["dense"].bytes_moved for columns in results.values())
    for key, label in labels.items():
        moved = sum(columns[key].bytes_moved for columns in results.values())
        speedup = totals["dense"] / totals[key]
        speedup_p10 = totals_p10["dense"] / totals_p10[key]
        bound = dense_bytes / moved
        ratio_cells = [
            f"{speedup:.2f}x; {speedup_p10:.2f}x",
            f"{bound:.2f}x",
            f"{speedup / bound:.0%}; {speedup_p10 / bound:.0%}",
        ]
        if not key.startswith("n"):
            ratio_cells[1:] = ["", ""]
        lines.append(
            f"| all four (sums) | {label} | {moved / 1024:.0f} | {totals[key]:.1f} | "
            f"{totals_p10[key]:.1f} | | {moved / totals[key] / 1e3:.1f} | "
            + " | ".join(ratio_cells) + " |"
        )
    return "\n".join(lines)


def _load(values: tuple[float, float, float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=numba.get_num_threads(),
        help="threads for numba and torch (default: numba's default, all cores)",
    )
    parser.add_argument("--repeats", type=int, default=400, help="timed calls per column")
    parser.add_argument(
        "--cold-multiple", type=int, default=4,
        help="rotate through weight copies totalling this many times the last-level cache",
    )
    parser.add_argument(
        "--bandwidth-mib", type=int, default=1024, help="array size of the read bandwidth sum, MiB"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    cache_bytes = last_level_cache_bytes()
    cold_bytes = args.cold_multiple * cache_bytes
    rng = np.random.default_rng(args.seed)
    load_before = os.getloadavg()

    bandwidth = measure_read_bandwidth(
        args.bandwidth_mib * 2**20, block_bytes=BANDWIDTH_BLOCK_BYTES, repeats=args.repeats
    )
    results = {}
    for name, shape in SHAPES.items():
        results[name] = bench_shape(shape, cold_bytes, args.repeats, rng)
    command = "python benchmarks/bench_kernels.py " + " ".join(
        f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items()
    )
    print(
        format_report(
            results,
            bandwidth,
            threads=args.threads,
            cache_bytes=cache_bytes,
            cold_multiple=args.cold_multiple,
            repeats=args.repeats,
            load_before=load_before,
            load_after=os.getloadavg(),
            command=command,
        )
    )


if __name__ == "__main__":
    main()
