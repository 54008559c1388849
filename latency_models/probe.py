"""On-machine latency measurements for fitting a cost model (``cn4 probe``).

The probe measures three kinds of cases on this machine, all through the numba kernels that the
:class:`~latency_models.engine.DecodeEngine` runs:

1. ``op="linear"``: every distinct eligible Linear shape of the model at every requested level
   and token count. Between two uses of a layer, a decode step reads every other weight of the
   model once. The probe therefore cycles through copies of the layer that add up to the
   model's weight bytes with every eligible layer at the measured level. A
   model larger than the caches thus streams each layer from memory, as decoding does, while a
   model that fits in cache is measured from cache. Beyond twice the largest CPU cache (read
   from /sys) more copies change nothing, so the rotation stops growing there.
2. ``op="model"``: whole-model decode steps through the engine for the all-dense map, each
   uniform level, and ``configs`` random level maps drawn with a fixed seed. The random maps
   are the validation set: :class:`ProbeResult` keeps them apart from the others.
3. ``op="remainder"``: the time no level changes (embedding, norms, conv1d, scan, ineligible
   Linears, ``lm_head``), computed as the step minus the measured Linears. For each non-random
   model record the probe subtracts the summed medians of its Linears' layer records, and the
   remainder is the median of those differences. Timing a step with the Linears skipped instead
   would keep ``lm_head`` and the states in cache, which a real step does not.

Records follow the ``cn4.latency/1`` format of :mod:`latency_models.measurements`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numba
import numpy as np

from latency_models import kernels
from latency_models.engine import DecodeEngine, zero_smallest_per_group
from latency_models.measurements import Measurement
from latency_models.probe_settings import (
    BACKEND,
    CALLS_PER_SAMPLE,
    DEFAULT_CONFIGS,
    DEFAULT_LEVELS,
    DEFAULT_REPEATS,
    DEFAULT_SEED,
    DEFAULT_WARMUP,
    TOOL_VERSION,
)
from search.errors import MeasurementError

logger = logging.getLogger(__name__)


# Used when /sys does not report the cache sizes: larger than the last-level cache of common
# desktop and server CPUs per socket.
FALLBACK_CACHE_BYTES = 64 << 20
# The rotated copies of one layer add up to this multiple of the largest cache, so that each
# call finds its weights evicted.
ROTATION_CACHE_MULTIPLE = 2
# Decode steps fed before the timed steps of a model measurement, so that the conv windows and
# recurrent states hold realistic values.
PRIME_TOKENS = 4


# ---------------------------------------------------------------------------------------------
# Machine facts


def largest_cache_bytes() -> int:
    """Return the size of the largest data or unified CPU cache that /sys reports, in bytes."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            kind = (index / "type").read_text().strip()
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        sizes.append(_parse_cache_size(text))
    if not sizes:
        logger.warning(
            "no CPU cache sizes under /sys/devices/system/cpu/cpu0/cache; rotating layer "
            "weights through %d MiB",
            FALLBACK_CACHE_BYTES >> 20,
        )
        return FALLBACK_CACHE_BYTES
    return max(sizes)


def _parse_cache_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def kernel_threads() -> int:
    """Return the number of threads the numba kernels run on."""
    return int(numba.get_num_threads())


def clock_function(clock: str) -> Callable[[], float]:
    """Return the timer of ``clock`` in seconds: ``wall`` or ``thread`` (this thread's CPU time).

    The thread clock leaves out time the scheduler gives to other processes, so it estimates
    the latency of an idle machine on a busy one. It counts only the calling thread, so it
    requires the kernels to run on one thread.
    """
    if clock == "wall":
        return time.perf_counter
    if clock == "thread":
        if kernel_threads() != 1:
            raise MeasurementError(
                f"clock='thread' counts only the calling thread's CPU time, but the kernels run "
                f"on {kernel_threads()} threads: set NUMBA_NUM_THREADS=1 or use clock='wall'"
            )
        return time.thread_time
    raise MeasurementError(f"clock={clock!r} is unknown: use 'wall' or 'thread'")


def backend_name(clock: str) -> str:
    """Return the backend recorded for ``clock``, so that the two timings never mix in one fit."""
    return BACKEND if clock == "wall" else f"{BACKEND}/{clock}-time"


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class Timing:
    """Summary of repeated timings, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    repeats: int
    warmup: int

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], *, warmup: int) -> Timing:
        values = np.asarray(samples_ms, dtype=np.float64)
        return cls(
            median_ms=float(np.median(values)),
            p10_ms=float(np.percentile(values, 10)),
            p90_ms=float(np.percentile(values, 90)),
            mean_ms=float(values.mean()),
            std_ms=float(values.std()),
            repeats=len(values),
            warmup=warmup,
        )

    def as_dict(self) -> dict[str, float | int]:
        return {
            "median_ms": self.median_ms,
            "p10_ms": self.p10_ms,
            "p90_ms": self.p90_ms,
            "mean_ms": self.mean_ms,
            "std_ms": self.std_ms,
            "repeats": self.repeats,
            "warmup": self.warmup,
        }


def _check_counts(repeats: int, warmup: int) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise MeasurementError(f"repeats={repeats!r} is invalid: give a whole number of at least 1")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise MeasurementError(f"warmup={warmup!r} is invalid: give a whole number of 0 or more")


# ---------------------------------------------------------------------------------------------
# Single layers


def packed_bytes(out_features: int, in_features: int, level: int) -> int:
    """Estimate the bytes one GEMV streams: fp32 kept values plus one code byte per group of 4.

    Level 0 runs the dense kernel, which reads only the fp32 matrix.
    """
    weights = out_features * in_features
    if level == 0:
        return 4 * weights
    return (4 - level) * weights + weights // 4


def measure_linear(
    out_features: int,
    in_features: int,
    level: int,
    *,
    tokens: int = 1,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    rotation_bytes: int | None = None,
    seed: int = DEFAULT_SEED,
    clock: str = "wall",
) -> Timing:
    """Time one Linear (out_features x in_features) at ``level`` over ``tokens`` input rows.

    Random weights with the ``level`` smallest |w| of each group of 4 zeroed are packed into
    copies that together reach ``rotation_bytes`` (twice the largest CPU cache by default), and
    the calls cycle through them, so that each call finds in cache only what other traffic of
    that many bytes leaves there. Each call is timed on its own, ``CALLS_PER_SAMPLE`` calls per
    repeat, after ``warmup`` untimed rounds of as many calls. The returned ``repeats`` counts
    the timed calls. Level 0 runs the dense kernel.
    """
    _check_counts(repeats, warmup)
    if level not in DEFAULT_LEVELS:
        raise MeasurementError(f"level={level!r} is unknown: a Cn4 level is 0, 1, 2 or 3")
    if tokens < 1:
        raise MeasurementError(f"tokens={tokens!r} is invalid: give 1 or more")
    if rotation_bytes is None:
        rotation_bytes = ROTATION_CACHE_MULTIPLE * largest_cache_bytes()
    total_calls = (warmup + repeats) * CALLS_PER_SAMPLE
    copies = max(2, math.ceil(rotation_bytes / packed_bytes(out_features, in_features, level)))
    # Packing more copies than there are calls would only cost time: no copy is reused then.
    copies = min(copies, total_calls)

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((out_features, in_features), dtype=np.float32)
    if tokens == 1:
        inputs = rng.standard_normal(in_features, dtype=np.float32)
        output = np.empty(out_features, dtype=np.float32)
    else:
        inputs = rng.standard_normal((tokens, in_features), dtype=np.float32)
        output = np.empty((tokens, out_features), dtype=np.float32)
    call = _linear_call(weight, level, tokens, copies)

    now = clock_function(clock)
    samples = []
    for index in range(total_calls):
        start = now()
        call(index % copies, inputs, output)
        elapsed_ms = (now() - start) * 1e3
        if index >= warmup * CALLS_PER_SAMPLE:
            samples.append(elapsed_ms)
    return Timing.from_samples(samples, warmup=warmup)


def _linear_call(
    weight: np.ndarray, level: int, tokens: int, copies: int
) -> Callable[[int, np.ndarray, np.ndarray], object]:
    """Return ``call(index, inputs, out)`` running copy ``index`` of the layer the engine's way."""
    if level == 0:
        matrices = [weight.copy() for _ in range(copies)]
        if tokens == 1:
            return lambda index, x, out: kernels.dense_matvec(matrices[index], x, out=out)
        return lambda index, x, out: kernels.dense_matmul(matrices[index], x, out=out)
    pruned = zero_smallest_per_group(weight, level)
    packs = [kernels.pack_cn4(pruned, level) for _ in range(copies)]
    if tokens == 1:
        return lambda index, x, out: kernels.cn4_matvec(packs[index], x, out=out)
    return lambda index, x, out: kernels.cn4_matmul(packs[index], x, out=out)


# ---------------------------------------------------------------------------------------------
# Whole models


def unwrap_model(loaded_or_model):
    """Return the ``nn.Module`` of a :class:`search.models.LoadedModel`, or the module itself."""
    return getattr(loaded_or_model, "model", loaded_or_model)


def model_id(loaded_or_model) -> str:
    """Return the id that model and remainder records carry for this model.

    A loaded checkpoint is named by its fingerprint (sha256 of config and weights). A module
    built in memory is named by a hash of its config, because its weights do not change its
    latency.
    """
    fingerprint = getattr(loaded_or_model, "fingerprint", None)
    if fingerprint:
        return str(fingerprint)
    config = unwrap_model(loaded_or_model).config
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return "config-" + hashlib.sha256(text.encode()).hexdigest()


def eligible_shapes(model) -> dict[str, tuple[int, int]]:
    """Map each eligible Linear name of ``model`` to ``(out_features, in_features)``."""
    from search.models import eligible_layers

    return {info.name: (info.out_features, info.in_features) for info in eligible_layers(model)}


def measure_engine(
    engine: DecodeEngine, *, repeats: int = DEFAULT_REPEATS, warmup: int = DEFAULT_WARMUP,
    seed: int = DEFAULT_SEED,
    clock: str = "wall",
) -> Timing:
    """Time single decode steps of ``engine`` on seeded random token ids; one sample per step."""
    _check_counts(repeats, warmup)
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, engine.vocab_size, size=PRIME_TOKENS + warmup + repeats)
    engine.reset()
    for token_id in token_ids[: PRIME_TOKENS + warmup]:
        engine.step(int(token_id))
    now = clock_function(clock)
    samples = []
    for token_id in token_ids[PRIME_TOKENS + warmup :]:
        start = now()
        engine.step(int(token_id))
        samples.append((now() - start) * 1e3)
    return Timing.from_samples(samples, warmup=warmup)


def measure_model_decode(
    loaded_or_model,
    level_map: Mapping[str, int] | None = None,
    *,
    tokens: int = 1,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    prune_to_levels: bool = False,
) -> dict[str, float | int]:
    """Measure the decode latency of one token through the engine, in milliseconds.

    ``level_map`` names the Linears that run packed Cn4 kernels; their weights must already
    meet their levels unless ``prune_to_levels`` is set (see :class:`DecodeEngine`). Returns
    ``median_ms``, ``p10_ms``, ``p90_ms``, ``mean_ms``, ``std_ms``, ``repeats``, ``warmup``,
    ``tokens`` and ``threads``.
    """
    if tokens != 1:
        raise MeasurementError(
            f"tokens={tokens} is not supported for whole-model decode: the engine decodes one "
            "token per step, so use tokens=1"
        )
    engine = DecodeEngine(
        unwrap_model(loaded_or_model), level_map or {}, prune_to_levels=prune_to_levels
    )
    timing = measure_engine(engine, repeats=repeats, warmup=warmup)
    return {**timing.as_dict(), "tokens": 1, "threads": kernel_threads()}


def random_level_maps(
    names: Sequence[str], levels: Sequence[int], count: int, *, seed: int = DEFAULT_SEED
) -> list[dict[str, int]]:
    """Draw ``count`` level maps over ``names``, each layer's level uniform over ``levels``."""
    rng = np.random.default_rng(seed)
    choices = np.asarray(sorted(levels))
    return [
        {name: int(level) for name, level in zip(names, rng.choice(choices, size=len(names)))}
        for _ in range(count)
    ]


# ---------------------------------------------------------------------------------------------
# The whole probe


@dataclass
class ProbeResult:
    """Records of one probe; ``validation`` contains the model records of the random level maps."""

    layers: list[Measurement] = field(default_factory=list)
    calibration: list[Measurement] = field(default_factory=list)
    validation: list[Measurement] = field(default_factory=list)
    remainder: list[Measurement] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def records(self) -> list[Measurement]:
        return [*self.layers, *self.remainder, *self.calibration, *self.validation]


def _parse_levels(levels: Iterable[int]) -> tuple[int, ...]:
    parsed = tuple(sorted(set(int(level) for level in levels)))
    bad = [level for level in parsed if level not in DEFAULT_LEVELS]
    if not parsed or bad:
        raise MeasurementError(
            f"levels {list(levels)} are invalid: give one or more of 0, 1, 2, 3 (zeros of 4)"
        )
    return parsed


def probe_model(
    loaded_or_model,
    *,
    device: str,
    levels: Iterable[int] = DEFAULT_LEVELS,
    tokens: Iterable[int] = (1,),
    configs: int = DEFAULT_CONFIGS,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    seed: int = DEFAULT_SEED,
    clock: str = "wall",
    progress: bool = False,
) -> ProbeResult:
    """Measure the layers, the remainder and whole-model decode of a model on this machine.

    ``levels`` are the Cn4 levels to measure; level 0 (dense) is always added, because budgets
    are set against the dense model. ``tokens`` are the input row counts of the layer records;
    model and remainder records are one decode step (tokens=1). ``configs`` random level maps
    over ``levels`` form the validation set. ``clock`` is ``wall`` or ``thread`` (see
    :func:`clock_function`); thread-clock records carry their own backend name. With
    ``progress``, a tqdm bar goes to stderr.
    """
    clock_function(clock)
    _check_counts(repeats, warmup)
    if isinstance(configs, bool) or not isinstance(configs, int) or configs < 0:
        raise MeasurementError(f"configs={configs!r} is invalid: give a whole number of 0 or more")
    levels = tuple(sorted(set(_parse_levels(levels)) | {0}))
    token_counts = tuple(sorted(set(int(t) for t in tokens)))
    if not token_counts or token_counts[0] < 1:
        raise MeasurementError(f"tokens {list(tokens)} are invalid: give counts of 1 or more")
    if not device or not device.strip():
        raise MeasurementError("device is empty: name the machine the probe runs on")

    model = unwrap_model(loaded_or_model)
    identity = model_id(loaded_or_model)
    shapes_by_name = eligible_shapes(model)
    if not shapes_by_name:
        raise MeasurementError(
            "the model has no eligible Linear layers: nothing for a Cn4 cost model to measure"
        )
    names = list(shapes_by_name)
    shapes = sorted(set(shapes_by_name.values()))
    maps: list[tuple[str, dict[str, int]]] = [("calibration", dict.fromkeys(names, 0))]
    maps += [("calibration", dict.fromkeys(names, level)) for level in levels if level > 0]
    maps += [("validation", level_map) for level_map in random_level_maps(names, levels, configs, seed=seed)]

    common = {
        "device": device,
        "backend": backend_name(clock),
        "dtype": "float32",
        "threads": kernel_threads(),
        "tool_version": TOOL_VERSION,
    }
    rotation_cap = ROTATION_CACHE_MULTIPLE * largest_cache_bytes()
    other_bytes = _other_weight_bytes(model, shapes_by_name)
    total_steps = len(shapes) * len(levels) * len(token_counts) + len(maps)
    bar = _progress_bar(total_steps, enabled=progress)
    started = time.perf_counter()
    result = ProbeResult()
    layer_ms: dict[tuple[int, int, int], float] = {}
    try:
        for out_features, in_features in shapes:
            for level in levels:
                for token_count in token_counts:
                    bar.set_description(f"linear {out_features}x{in_features} level {level}")
                    step_bytes = other_bytes + sum(
                        packed_bytes(o, i, level) for o, i in shapes_by_name.values()
                    )
                    timing = measure_linear(
                        out_features, in_features, level, tokens=token_count, repeats=repeats,
                        warmup=warmup, rotation_bytes=min(step_bytes, rotation_cap), seed=seed,
                        clock=clock,
                    )
                    result.layers.append(
                        Measurement(
                            op="linear", out_features=out_features, in_features=in_features,
                            level=level, tokens=token_count, timestamp=_now(),
                            **timing.as_dict(), **common,
                        )
                    )
                    if token_count == 1:
                        layer_ms[(out_features, in_features, level)] = timing.median_ms
                    bar.update(1)

        packed_cache: dict = {}
        for role, level_map in maps:
            bar.set_description(f"model {role} {len(result.calibration) + len(result.validation) + 1}/{len(maps)}")
            engine = DecodeEngine(
                model, level_map, prune_to_levels=True, packed_cache=packed_cache
            )
            timing = measure_engine(
                engine, repeats=repeats, warmup=warmup, seed=seed, clock=clock
            )
            del engine
            levels_field = {
                name: (*shapes_by_name[name], level) for name, level in level_map.items()
            }
            record = Measurement(
                op="model", model=identity, levels=levels_field, tokens=1, timestamp=_now(),
                **timing.as_dict(), **common,
            )
            getattr(result, role).append(record)
            bar.update(1)
    finally:
        bar.close()
        packed_cache = None

    remainder = _remainder_record(result.calibration, layer_ms, identity, common)
    if remainder is not None:
        result.remainder.append(remainder)
    result.seconds = time.perf_counter() - started
    logger.info(
        "probed %s on %s in %.1f s: %d layer records, %d model records",
        identity[:16], device, result.seconds, len(result.layers),
        len(result.calibration) + len(result.validation),
    )
    return result


def _other_weight_bytes(model, shapes_by_name: Mapping[str, tuple[int, int]]) -> int:
    """Return the fp32 bytes of every Linear weight that is not eligible (a tied head included)."""
    import torch

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in shapes_by_name:
            total += 4 * module.weight.numel()
    return total


def _remainder_record(
    calibration: Sequence[Measurement],
    layer_ms: Mapping[tuple[int, int, int], float],
    identity: str,
    common: Mapping[str, object],
) -> Measurement | None:
    """Build the remainder as the median over calibration maps of step minus measured Linears.

    Returns None, with a warning, when that median is not positive.
    """
    differences = []
    for record in calibration:
        linears = sum(layer_ms[tuple(entry)] for entry in record.levels.values())
        differences.append(record.median_ms - linears)
    remainder = statistics.median(differences)
    if remainder <= 0:
        logger.warning(
            "no remainder record for model %s: the measured Linears add up to more than the "
            "whole decode step (step minus Linears = %.4f ms), so the machine was probably "
            "busy; probe again for a usable remainder",
            identity[:16], remainder,
        )
        return None
    values = np.asarray(differences)
    p10 = float(min(np.percentile(values, 10), remainder))
    mean = float(values.mean())
    return Measurement(
        op="remainder", model=identity, tokens=1, timestamp=_now(),
        median_ms=float(remainder),
        # A latency field must be positive: a spread reaching below zero is left out.
        p10_ms=p10 if p10 > 0 else None,
        p90_ms=float(max(np.percentile(values, 90), remainder)),
        mean_ms=mean if mean > 0 else None,
        std_ms=float(values.std()),
        repeats=len(differences),
        **common,
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _NullBar:
    def set_description(self, text: str) -> None:
        pass

    def update(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, *, enabled: bool):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="case", dynamic_ncols=True)
