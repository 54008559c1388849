"""Saving pruned models as ordinary checkpoints, with their Cn4 levels and keep masks.

An export directory is a checkpoint that :func:`search.models.load_checkpoint` and transformers
load as is (``config.json``, ``model.safetensors``, tokenizer files), plus two files:

``cn4_levels.json``
    Format version, the level of every eligible layer spelled "n zeros / 4-n kept", the source
    model's fingerprint and caller metadata.
``cn4_masks.safetensors``
    The keep mask of each pruned layer (level >= 1): a bool tensor of the weight's shape, True
    where the weight is kept. Each group of 4 consecutive input weights keeps exactly 4-n.

Saving and loading both check that every pruned group contains at least n zeros, so an export
that loads meets its levels.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search.errors import CheckpointError, PruningError
from search.models import (
    GROUP_SIZE,
    LoadedModel,
    check_level_map,
    describe_level,
    eligible_layers,
    get_module,
    load_checkpoint,
)

logger = logging.getLogger(__name__)

LEVELS_FILE = "cn4_levels.json"
MASKS_FILE = "cn4_masks.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LevelCheck:
    """Whether one layer's weight still meets its Cn4 level.

    ``groups`` counts the groups of 4 consecutive input weights, ``groups_below_level`` those
    with fewer than ``level`` zeros, and ``min_zeros`` the fewest zeros in any group. With a keep
    mask, ``masked_nonzero`` counts pruned positions whose weight is not zero, and
    ``mask_groups_invalid`` counts the groups whose mask does not keep exactly 4 - level. Without
    a mask both are None.
    """

    name: str
    level: int
    groups: int
    groups_below_level: int
    min_zeros: int
    masked_nonzero: int | None = None
    mask_groups_invalid: int | None = None

    @property
    def ok(self) -> bool:
        """True when no group falls short of the level and the mask, if any, agrees."""
        return (
            self.groups_below_level == 0
            and not self.masked_nonzero
            and not self.mask_groups_invalid
        )

    def describe_problems(self) -> str:
        """Return the violations as one sentence, or an empty string when there are none."""
        problems = []
        if self.groups_below_level:
            problems.append(
                f"{self.groups_below_level} of {self.groups} groups contain fewer than "
                f"{self.level} zeros (fewest: {self.min_zeros})"
            )
        if self.mask_groups_invalid:
            problems.append(
                f"{self.mask_groups_invalid} of {self.groups} mask groups do not keep exactly "
                f"{GROUP_SIZE - self.level}"
            )
        if self.masked_nonzero:
            problems.append(f"{self.masked_nonzero} masked weights are not zero")
        return "; ".join(problems)


def group_zero_counts(weight: torch.Tensor) -> torch.Tensor:
    """Count zeros in each group of 4 consecutive input weights: (out, in) -> (out, in / 4)."""
    out_features, in_features = weight.shape
    groups = weight.detach().reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    return (groups == 0).sum(dim=-1)


def keep_mask_from_weight(weight: torch.Tensor, level: int) -> torch.Tensor:
    """Return a keep mask (True = kept) without the ``level`` smallest weights of each group.

    On a weight already pruned to ``level`` the dropped positions are exactly its zeros. Where a
    group contains more zeros than ``level``, the lowest-indexed zeros are the ones marked pruned,
    so every group keeps exactly 4 - level positions.
    """
    out_features, in_features = weight.shape
    magnitudes = weight.detach().abs().float().reshape(out_features, -1, GROUP_SIZE)
    order = torch.argsort(magnitudes, dim=-1, stable=True)
    keep = torch.ones_like(magnitudes, dtype=torch.bool)
    keep.scatter_(-1, order[..., :level], False)
    return keep.reshape(out_features, in_features)


def verify_levels(
    model: nn.Module,
    level_map: Mapping[str, int],
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, LevelCheck]:
    """Check every layer of ``level_map`` against its level, in any floating dtype.

    Returns one :class:`LevelCheck` per layer; nothing raises for a violation, so callers decide.
    With ``masks`` (layer name to keep mask, True = kept), each listed layer's mask is checked
    too. Raises PruningError for a name that is not an eligible layer, or a mask of the wrong shape.
    """
    levels = check_level_map(model, level_map)
    checks: dict[str, LevelCheck] = {}
    for name, level in levels.items():
        weight = get_module(model, name).weight.detach()
        zeros = group_zero_counts(weight)
        masked_nonzero = None
        mask_groups_invalid = None
        mask = None if masks is None else masks.get(name)
        if mask is not None:
            if tuple(mask.shape) != tuple(weight.shape):
                raise PruningError(
                    f"keep mask of layer {name!r} has shape {list(mask.shape)}, but the weight "
                    f"has shape {list(weight.shape)}: the mask must match the weight"
                )
            mask = mask.to(torch.bool)
            masked_nonzero = int(((~mask) & (weight != 0)).sum())
            kept_per_group = mask.reshape(zeros.shape[0], zeros.shape[1], GROUP_SIZE).sum(dim=-1)
            mask_groups_invalid = int((kept_per_group != GROUP_SIZE - level).sum())
        checks[name] = LevelCheck(
            name=name,
            level=level,
            groups=zeros.numel(),
            groups_below_level=int((zeros < level).sum()),
            min_zeros=int(zeros.min()) if zeros.numel() else 0,
            masked_nonzero=masked_nonzero,
            mask_groups_invalid=mask_groups_invalid,
        )
    return checks


# Saving


def save_pruned(
    loaded: LoadedModel,
    level_map: Mapping[str, int],
    out_dir: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a pruned model as a checkpoint with ``cn4_levels.json`` and ``cn4_masks.safetensors``.

    ``level_map`` gives the level of each pruned layer, whose weights in ``loaded.model`` must
    already be pruned; unlisted eligible layers are recorded as level 0. ``masks`` optionally
    gives the keep masks the pruning produced; the others are derived from the zeros. The
    directory is written next to its final place and renamed, so a failed save leaves nothing
    half-written. Raises PruningError when a layer violates its level, naming the layer and the
    count, and CheckpointError for an unusable ``out_dir`` or metadata that is not JSON.
    Returns the export directory.
    """
    model = loaded.model
    levels = check_level_map(model, level_map)
    metadata_json = _metadata_as_json(metadata)
    out_dir = check_out_dir(Path(out_dir), loaded.path, overwrite=overwrite)

    keep_masks = _keep_masks(model, levels, masks or {})
    checks = verify_levels(model, levels, masks=keep_masks)
    violations = [check for check in checks.values() if not check.ok]
    if violations:
        details = "\n  ".join(
            f"{check.name} at level {check.level} ({describe_level(check.level)}): "
            f"{check.describe_problems()}"
            for check in violations
        )
        raise PruningError(
            f"cannot save: {len(violations)} layers violate their Cn4 level:\n  {details}\n"
            "Prune these layers to their level (or lower the level) before saving"
        )

    levels_record = _levels_record(loaded, levels, metadata_json)
    # A plain mkdir, not tempfile.mkdtemp, so the export gets the umask's permissions, not 0700.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        model.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        (staging / LEVELS_FILE).write_text(json.dumps(levels_record, indent=2) + "\n")
        _write_masks(staging / MASKS_FILE, keep_masks)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    logger.info(
        "saved pruned model to %s (%d of %d eligible layers pruned)",
        out_dir,
        len(keep_masks),
        len(levels_record["layers"]),
    )
    return out_dir


def _metadata_as_json(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    try:
        return json.loads(json.dumps(dict(metadata), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"metadata is not JSON-serializable ({exc}): pass a mapping of strings, finite "
            "numbers, booleans, lists and dicts"
        ) from exc


def check_out_dir(out_dir: Path, source: Path, *, overwrite: bool) -> Path:
    """Return ``out_dir`` resolved, raising CheckpointError when a pruned model cannot go there."""
    out_dir = out_dir.expanduser().resolve()
    source = source.resolve()
    if out_dir == source or out_dir in source.parents:
        raise CheckpointError(
            f"out_dir {str(out_dir)!r} is or contains the source checkpoint {str(source)!r}: "
            "choose another directory, because saving there would replace the dense weights"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"out_dir {str(out_dir)!r} is a file: choose a directory path")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(
            f"out_dir {str(out_dir)!r} is not empty: choose a new directory, or allow "
            "replacing it (overwrite=True; cn4 prune --overwrite)"
        )
    return out_dir


def _keep_masks(
    model: nn.Module, levels: Mapping[str, int], given: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    unknown = sorted(set(given) - {name for name, level in levels.items() if level > 0})
    if unknown:
        raise PruningError(
            f"masks given for layers {unknown} that are not pruned in the level map: "
            "give masks only for layers at level 1, 2 or 3"
        )
    keep_masks = {}
    for name, level in levels.items():
        if level == 0:
            continue
        mask = given.get(name)
        if mask is None:
            mask = keep_mask_from_weight(get_module(model, name).weight, level)
        keep_masks[name] = mask.detach().to(device="cpu", dtype=torch.bool).contiguous()
    return keep_masks


def _levels_record(
    loaded: LoadedModel, levels: Mapping[str, int], metadata: dict[str, Any]
) -> dict[str, Any]:
    layers = {}
    eligible_weights = 0
    zeroed_weights = 0
    for info in eligible_layers(loaded.model):
        level = levels.get(info.name, 0)
        layers[info.name] = {
            "level": level,
            "pattern": describe_level(level),
            "out_features": info.out_features,
            "in_features": info.in_features,
        }
        eligible_weights += info.weights
        zeroed_weights += info.weights * level // GROUP_SIZE
    return {
        "format_version": FORMAT_VERSION,
        "group_size": GROUP_SIZE,
        "group_dimension": "input",
        "mask_file": MASKS_FILE,
        "mask_meaning": "True = kept, False = zeroed",
        "arch": loaded.arch,
        "source_path": str(loaded.path),
        "source_fingerprint": loaded.fingerprint,
        "zeroed_share_of_eligible_weights": (
            zeroed_weights / eligible_weights if eligible_weights else 0.0
        ),
        "layers": layers,
        "metadata": metadata,
    }


def _write_masks(path: Path, keep_masks: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(
        dict(keep_masks),
        str(path),
        metadata={"format_version": str(FORMAT_VERSION), "meaning": "True = kept"},
    )


# Loading


def load_pruned(path: str | Path) -> tuple[LoadedModel, dict[str, int]]:
    """Load an export written by :func:`save_pruned` and verify its levels and masks.

    Returns the model (float32, eval mode) and the level of every eligible layer. Raises
    CheckpointError naming the layer when a mask is missing or malformed, a masked weight is
    not zero, or a group contains fewer zeros than its level.
    """
    loaded = load_checkpoint(path)
    levels_path = loaded.path / LEVELS_FILE
    levels = read_levels(levels_path)
    try:
        levels = check_level_map(loaded.model, levels)
    except PruningError as exc:
        raise CheckpointError(f"{levels_path} does not fit the model: {exc}") from exc

    pruned = {name for name, level in levels.items() if level > 0}
    masks = read_masks(loaded.path / MASKS_FILE)
    missing = sorted(pruned - set(masks))
    extra = sorted(set(masks) - pruned)
    if missing or extra:
        raise CheckpointError(
            f"{loaded.path / MASKS_FILE} does not match {LEVELS_FILE}: pruned layers without a "
            f"mask {missing}, masks for layers not pruned {extra}. Re-export the model with "
            "save_pruned"
        )
    try:
        checks = verify_levels(loaded.model, levels, masks=masks)
    except PruningError as exc:
        raise CheckpointError(f"{loaded.path} contains an invalid mask: {exc}") from exc

    violations = [check for check in checks.values() if not check.ok]
    if violations:
        details = "\n  ".join(
            f"{check.name} at level {check.level} ({describe_level(check.level)}): "
            f"{check.describe_problems()}"
            for check in violations
        )
        raise CheckpointError(
            f"pruned checkpoint {str(loaded.path)!r} fails its Cn4 levels in "
            f"{len(violations)} layers:\n  {details}\n"
            "The weights were changed after export: re-export the model with save_pruned"
        )
    logger.info("verified Cn4 levels of %d pruned layers in %s", len(pruned), loaded.path)
    return loaded, levels


def read_levels(levels_path: Path) -> dict[str, int]:
    """Read the level of each layer from an export's ``cn4_levels.json``."""
    if not levels_path.is_file():
        raise CheckpointError(
            f"{str(levels_path.parent)!r} is not a cn4 export: {LEVELS_FILE} not found. Load "
            "a dense checkpoint with load_checkpoint, or export with save_pruned"
        )
    try:
        record = json.loads(levels_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{levels_path} is not valid JSON ({exc}): re-export the model with save_pruned"
        ) from exc
    version = record.get("format_version") if isinstance(record, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{levels_path} has format_version={version!r}, but this cn4 reads version "
            f"{FORMAT_VERSION}: re-export the model with this version of cn4"
        )
    layers = record.get("layers")
    if not isinstance(layers, dict):
        raise CheckpointError(f"{levels_path} has no 'layers' object: re-export with save_pruned")
    levels = {}
    for name, entry in layers.items():
        level = entry.get("level") if isinstance(entry, dict) else None
        if isinstance(level, bool) or not isinstance(level, int):
            raise CheckpointError(
                f"{levels_path}: layer {name!r} has level {level!r}, not an integer 0..3"
            )
        levels[name] = level
    return levels


def read_masks(masks_path: Path) -> dict[str, torch.Tensor]:
    """Read the keep masks (True = kept) from an export's ``cn4_masks.safetensors``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not masks_path.is_file():
        raise CheckpointError(
            f"{masks_path} not found: a cn4 export keeps its masks there; re-export the "
            "model with save_pruned"
        )
    try:
        stored = load_file(str(masks_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{masks_path} is not a valid safetensors file ({exc}): re-export with save_pruned"
        ) from exc
    masks = {}
    for name, mask in stored.items():
        if mask.dtype not in (torch.bool, torch.uint8):
            raise CheckpointError(
                f"{masks_path}: mask {name!r} has dtype {mask.dtype}, not bool or uint8"
            )
        if mask.dtype == torch.uint8 and bool((mask > 1).any()):
            raise CheckpointError(
                f"{masks_path}: mask {name!r} contains values other than 0 and 1"
            )
        masks[name] = mask.to(torch.bool)
    return masks
