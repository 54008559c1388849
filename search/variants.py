"""On-disk cache of pruned (layer, level) weights and their assembly into level maps.

Each (layer, level) is pruned once. A level map is then assembled by copying the cached weights
into the model's Linears, with no pruning at search time. A cache directory is keyed by the
sha256 of the model fingerprint, the calibration fingerprint, the method and its settings, so a
change to any of them starts a fresh directory::

    <root>/<key>/
        settings.json                                   the inputs of the key
        manifest.json                                   one record per variant, rebuilt after writes
        backbone.layers.0.mixer.in_proj.level2.safetensors   tensors "weight" and "mask"

A variant file carries its record (method, damping, note, relative reconstruction error,
seconds) in its safetensors metadata, so the file alone is the source of truth and
``manifest.json`` is a summary for people and tools. Every file is written to a temporary name
in the same directory and renamed into place, so a killed run leaves either a whole entry or
none. Several processes may fill the same directory: at worst two of them prune the same
variant and the last rename wins with identical content.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from search.calibration import LayerStats
from search.cn4 import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DAMPING,
    METHODS,
    PruneResult,
    check_level,
    prune_layer,
    prune_obs_levels,
    reconstruction_error,
)
from search.errors import PruningError
from search.paths import cn4_home

logger = logging.getLogger(__name__)

# Bump when the file layout or the meaning of a stored value changes; it is part of the key.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SETTINGS_NAME = "settings.json"
# Loaded variants kept in memory between level maps, in bytes of weight.
DEFAULT_MEMORY_LIMIT = 512 * 2**20
_LAYER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*$")

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class VariantRecord:
    """Record of one cached variant: how it was pruned and how close it stays to the dense layer.

    ``relative_error`` is ``||W X - W' X|| / ||W X||`` on the calibration inputs (None when the
    variant was pruned without statistics). ``seconds`` is the pruning time; variants of one
    layer pruned together by OBS share the time equally.
    """

    layer: str
    level: int
    method: str
    damping: float | None
    note: str | None
    relative_error: float | None
    seconds: float
    file: str


@dataclass(frozen=True)
class PrepareReport:
    """Outcome of :meth:`VariantCache.prepare`: variants pruned now and variants found on disk."""

    computed: int
    reused: int
    seconds: float


class VariantCache:
    """Pruned weights of every (layer, level) for one model, calibration set and method.

    ``root`` defaults to ``cn4_home() / "variants"``. ``model_fingerprint`` and
    ``calibration_fingerprint`` identify the dense weights and the calibration tokens (for
    example ``LoadedModel.fingerprint`` and ``search.data.tokens_fingerprint``). ``damping`` and
    ``block_size`` are OBS settings and enter the key only for OBS. ``prunings`` counts the
    variants this object pruned itself rather than read from disk.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        model_fingerprint: str,
        calibration_fingerprint: str,
        method: str = "obs",
        damping: float = DEFAULT_DAMPING,
        block_size: int = DEFAULT_BLOCK_SIZE,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
    ) -> None:
        if method not in METHODS:
            raise PruningError(f"method {method!r} is unknown: use one of {', '.join(METHODS)}")
        if not model_fingerprint or not calibration_fingerprint:
            raise PruningError(
                "model_fingerprint and calibration_fingerprint must be non-empty: they keep "
                "variants of different models or calibration texts apart"
            )
        self.method = method
        self.settings: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "model_fingerprint": model_fingerprint,
            "calibration_fingerprint": calibration_fingerprint,
            "method": method,
        }
        if method == "obs":
            self.settings["damping"] = float(damping)
            self.settings["block_size"] = int(block_size)
        self.damping = float(damping)
        self.block_size = int(block_size)
        encoded = json.dumps(self.settings, sort_keys=True).encode()
        self.key = hashlib.sha256(encoded).hexdigest()
        base = Path(root).expanduser() if root is not None else cn4_home() / "variants"
        self.directory = base / self.key
        self.memory_limit = int(memory_limit)
        self.prunings = 0
        self._memory: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._memory_bytes = 0

    # Lookup

    def variant_path(self, layer: str, level: int) -> Path:
        """Return the file of variant (``layer``, ``level``), whether or not it exists yet."""
        if not _LAYER_NAME.match(layer):
            raise PruningError(
                f"layer name {layer!r} is invalid: give a module path such as "
                "'backbone.layers.0.mixer.in_proj'"
            )
        return self.directory / f"{layer}.level{check_level(level)}.safetensors"

    def has(self, layer: str, level: int) -> bool:
        """Return whether the variant is available (level 0, the dense weight, always is)."""
        return check_level(level) == 0 or self.variant_path(layer, level).is_file()

    def missing(self, layers: Iterable[Any], levels: Iterable[int]) -> list[tuple[str, int]]:
        """Return the (layer, level) pairs among ``layers`` x ``levels`` not yet on disk."""
        names = _layer_names(layers)
        return [(name, n) for name in names for n in levels if not self.has(name, n)]

    def load(self, layer: str, level: int) -> torch.Tensor:
        """Return the pruned weight of (``layer``, ``level``); level 0 has no stored variant.

        The tensor is shared with the in-memory cache, so copy it before changing it.
        """
        if check_level(level) == 0:
            raise PruningError(
                f"level 0 of layer {layer!r} is the dense weight, which the cache does not "
                "store: read it from the model"
            )
        cache_key = (layer, level)
        cached = self._memory.get(cache_key)
        if cached is not None:
            self._memory.move_to_end(cache_key)
            return cached
        weight = self._read_tensor(layer, level, "weight")
        self._remember(cache_key, weight)
        return weight

    def load_mask(self, layer: str, level: int) -> torch.Tensor:
        """Return the keep mask (True = kept) of (``layer``, ``level``)."""
        if check_level(level) == 0:
            raise PruningError(f"level 0 of layer {layer!r} is dense and has no stored mask")
        return self._read_tensor(layer, level, "mask").to(torch.bool)

    def record(self, layer: str, level: int) -> VariantRecord:
        """Return the stored record of (``layer``, ``level``)."""
        path = self.variant_path(layer, level)
        if not path.is_file():
            raise PruningError(
                f"variant of layer {layer!r} at level {level} is not in the cache "
                f"{self.directory}: call prepare() first"
            )
        with safe_open(str(path), framework="pt") as handle:
            return _record_from_metadata(handle.metadata(), path.name)

    def records(self) -> list[VariantRecord]:
        """Return the records of every variant on disk, sorted by layer and level."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                found.append(_record_from_metadata(handle.metadata(), path.name))
        return sorted(found, key=lambda record: (record.layer, record.level))

    # Filling

    def prepare(
        self,
        model: nn.Module,
        layers: Iterable[Any],
        levels: Iterable[int],
        stats: Mapping[str, LayerStats] | None,
        progress: ProgressCallback | None = None,
    ) -> PrepareReport:
        """Prune and store every missing variant of ``layers`` x ``levels`` (level 0 skipped).

        ``layers`` contains module paths or report entries with a ``name``. ``stats`` maps layer
        names to calibration statistics. It may be None when nothing is missing or the method
        is ``magnitude``, so callers can skip the calibration pass for a warm cache.
        ``progress(done, total)`` is called after each layer with counts of variants.
        """
        started = time.perf_counter()
        names = _layer_names(layers)
        sparse_levels = sorted({check_level(n) for n in levels} - {0})
        todo: dict[str, list[int]] = {}
        for name, n in self.missing(names, sparse_levels):
            todo.setdefault(name, []).append(n)
        total = sum(len(v) for v in todo.values())
        reused = len(names) * len(sparse_levels) - total
        if total == 0:
            logger.debug("variant cache %s: all %d variants on disk", self.key[:12], reused)
            return PrepareReport(computed=0, reused=reused, seconds=time.perf_counter() - started)

        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_settings()
        done = 0
        try:
            for name, layer_levels in todo.items():
                module = _linear(model, name)
                layer_stats = None if stats is None else stats.get(name)
                self._prepare_layer(name, module.weight.detach(), layer_levels, layer_stats)
                done += len(layer_levels)
                if progress is not None:
                    progress(done, total)
        finally:
            if done:
                self.write_manifest()
        seconds = time.perf_counter() - started
        logger.info(
            "variant cache %s: pruned %d variants with %s in %.1f s, reused %d",
            self.key[:12],
            total,
            self.method,
            seconds,
            reused,
        )
        return PrepareReport(computed=total, reused=reused, seconds=seconds)

    def write_manifest(self) -> Path:
        """Rewrite ``manifest.json`` from the variant files on disk and return its path."""
        manifest = {
            "key": self.key,
            "settings": self.settings,
            "variants": [asdict(record) for record in self.records()],
        }
        path = self.directory / MANIFEST_NAME
        _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
        return path

    def clear_memory(self) -> None:
        """Drop the variants held in memory; the files stay."""
        self._memory.clear()
        self._memory_bytes = 0

    # Internals

    def _prepare_layer(
        self, name: str, weight: torch.Tensor, levels: Sequence[int], stats: LayerStats | None
    ) -> None:
        if self.method != "magnitude" and stats is None:
            raise PruningError(
                f"method {self.method!r} needs calibration statistics for layer {name!r}, which "
                "were not given: collect them with search.calibration.collect_layer_stats"
            )
        started = time.perf_counter()
        if self.method == "obs":
            results = prune_obs_levels(
                weight, levels, stats, damping=self.damping, block_size=self.block_size
            )
            # The levels share one factorisation and sweep, so they share its time.
            shares = [(time.perf_counter() - started) / len(levels)] * len(levels)
        else:
            results, shares = [], []
            for n in levels:
                level_started = time.perf_counter()
                results.append(prune_layer(weight, n, stats, self.method))
                shares.append(time.perf_counter() - level_started)
        for n, result, seconds in zip(levels, results, shares):
            self._store(name, n, weight, result, stats, seconds)

    def _store(
        self,
        name: str,
        level: int,
        dense: torch.Tensor,
        result: PruneResult,
        stats: LayerStats | None,
        seconds: float,
    ) -> None:
        if not torch.isfinite(result.weight).all():
            raise PruningError(
                f"pruning layer {name!r} at level {level} produced NaN or inf weights: this is "
                "a bug in the pruning method, please report it"
            )
        error = None if stats is None else reconstruction_error(dense, result.weight, stats.hessian)
        metadata = {
            "layer": name,
            "level": str(level),
            "method": result.method,
            "damping": "" if result.damping is None else repr(result.damping),
            "note": result.note or "",
            "relative_error": "" if error is None else repr(error),
            "seconds": repr(seconds),
        }
        tensors = {
            "weight": result.weight.detach().to(dense.dtype).contiguous(),
            "mask": result.mask.to(torch.uint8).contiguous(),
        }
        path = self.variant_path(name, level)
        _write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        self.prunings += 1
        if result.note:
            logger.warning("layer %s level %d: %s", name, level, result.note)

    def _read_tensor(self, layer: str, level: int, tensor_name: str) -> torch.Tensor:
        path = self.variant_path(layer, level)
        if not path.is_file():
            raise PruningError(
                f"variant of layer {layer!r} at level {level} is not in the cache "
                f"{self.directory}: call prepare() for this layer and level first"
            )
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(tensor_name)

    def _remember(self, cache_key: tuple[str, int], weight: torch.Tensor) -> None:
        size = weight.numel() * weight.element_size()
        if size > self.memory_limit:
            return
        self._memory[cache_key] = weight
        self._memory_bytes += size
        while self._memory_bytes > self.memory_limit:
            _, dropped = self._memory.popitem(last=False)
            self._memory_bytes -= dropped.numel() * dropped.element_size()

    def _write_settings(self) -> None:
        path = self.directory / SETTINGS_NAME
        if not path.is_file():
            text = json.dumps(self.settings, indent=2, sort_keys=True)
            _write_atomically(path, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def apply_level_map(
    model: nn.Module, level_map: Mapping[str, int], cache: VariantCache
) -> Iterator[nn.Module]:
    """Swap the cached variants of ``level_map`` into ``model`` and restore the dense weights on exit.

    Layers at level 0 or absent from the map keep the weights they have, so ``model`` should be
    dense on entry. The dense weights are restored bit for bit, also when the body raises.
    """
    saved = _swap_in(model, level_map, cache)
    try:
        yield model
    finally:
        with torch.no_grad():
            for module, dense in saved:
                module.weight.copy_(dense)


def assemble(model: nn.Module, level_map: Mapping[str, int], cache: VariantCache) -> nn.Module:
    """Copy the cached variants of ``level_map`` into ``model`` and leave them there (for export)."""
    _swap_in(model, level_map, cache)
    return model


def _swap_in(
    model: nn.Module, level_map: Mapping[str, int], cache: VariantCache
) -> list[tuple[nn.Linear, torch.Tensor]]:
    from search.models import check_level_map

    checked = check_level_map(model, level_map)
    # Load everything first, so a missing variant raises before the model changes.
    planned = []
    for name, level in checked.items():
        if level == 0:
            continue
        module = _linear(model, name)
        variant = cache.load(name, level)
        if variant.shape != module.weight.shape:
            raise PruningError(
                f"cached variant of layer {name!r} has shape {tuple(variant.shape)} but the "
                f"model's weight is {tuple(module.weight.shape)}: the cache belongs to another "
                "model, so pass this model's fingerprint"
            )
        planned.append((module, variant))
    saved = []
    with torch.no_grad():
        for module, variant in planned:
            saved.append((module, module.weight.detach().clone()))
            module.weight.copy_(variant)
    return saved


def _linear(model: nn.Module, name: str) -> nn.Linear:
    from search.models import get_module

    module = get_module(model, name)
    if not isinstance(module, nn.Linear):
        raise PruningError(
            f"layer {name!r} is a {type(module).__name__}, not a Linear: only Linear layers "
            "are pruned"
        )
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is not None and module.weight is embeddings.weight:
        raise PruningError(
            f"layer {name!r} shares its weight with the input embedding: pruning it would "
            "also change the embedding, so leave it dense"
        )
    return module


def _layer_names(layers: Iterable[Any]) -> list[str]:
    names = []
    for layer in layers:
        names.append(layer if isinstance(layer, str) else layer.name)
    return names


def _record_from_metadata(metadata: Mapping[str, str] | None, file_name: str) -> VariantRecord:
    if not metadata or "layer" not in metadata:
        raise PruningError(
            f"variant file {file_name} has no record in its metadata: delete it and prepare "
            "the variant again"
        )

    def optional_float(key: str) -> float | None:
        value = metadata.get(key, "")
        return float(value) if value else None

    return VariantRecord(
        layer=metadata["layer"],
        level=int(metadata["level"]),
        method=metadata["method"],
        damping=optional_float("damping"),
        note=metadata.get("note") or None,
        relative_error=optional_float("relative_error"),
        seconds=float(metadata["seconds"]),
        file=file_name,
    )


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Write ``path`` through ``write(temporary_path)`` and rename it into place."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        write(temporary_path)
        # mkstemp creates the file readable by its owner only; cache files are ordinary data.
        os.chmod(temporary_path, 0o644)
        os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise
