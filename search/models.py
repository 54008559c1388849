"""Loading Mamba and Mamba2 checkpoints, and which of their layers Cn4 sparsity can prune.

A checkpoint is a local directory as ``save_pretrained`` writes it: ``config.json``, the weights
as ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``) and the tokenizer
files. Pickle weight files are rejected, and every tensor's name and shape is checked against
the config before any weight is read, so a checkpoint either loads exactly or fails with the
tensors at fault.

A Linear is eligible for Cn4 pruning when its input dimension splits into groups of 4
consecutive weights. The depthwise ``conv1d`` of each block is listed too, as ineligible, so the
report accounts for every weight-bearing op in a block.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search.errors import CheckpointError, PruningError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).parent / "embedded" / "model"
DEFAULT_MODEL_NAME = "default"

GROUP_SIZE = 4
LEVELS = (0, 1, 2, 3)

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Files that hold pickled Python objects: loading them can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Files that mark a saved tokenizer. AutoTokenizer needs at least one of them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# Floating dtypes as safetensors headers spell them. Weights in any other dtype are rejected.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

_BLOCK_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_HASH_CHUNK_BYTES = 1 << 20


# transformers 5.x resolves its top-level names lazily, and threads importing them at the same
# time get "ImportError: cannot import name 'Mamba2Config'", so the first import is serialised.
_TRANSFORMERS_IMPORT_LOCK = threading.Lock()


def supported_architectures() -> dict[str, tuple[type, type]]:
    """Map each supported ``model_type`` to its transformers config and model classes."""
    with _TRANSFORMERS_IMPORT_LOCK:
        from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    return {
        "mamba": (MambaConfig, MambaForCausalLM),
        "mamba2": (Mamba2Config, Mamba2ForCausalLM),
    }


@dataclass(frozen=True)
class LayerInfo:
    """One weight-bearing op of a model and whether Cn4 pruning applies to it.

    ``name`` is the module path (``backbone.layers.0.mixer.in_proj``), ``block`` the index of
    the block that holds it (None for ``lm_head``), ``kind`` one of ``in_proj``, ``x_proj``,
    ``dt_proj``, ``out_proj``, ``lm_head`` or ``conv1d``. For a Linear, ``out_features`` and
    ``in_features`` are its weight's shape. For the depthwise conv1d they are the channel count
    and the taps per channel. ``reason`` explains why an entry is ineligible.
    """

    name: str
    block: int | None
    kind: str
    out_features: int
    in_features: int
    eligible: bool
    reason: str | None = None

    @property
    def weights(self) -> int:
        """Number of weights in the op (out_features x in_features)."""
        return self.out_features * self.in_features


@dataclass
class LoadedModel:
    """A checkpoint loaded in float32 and eval mode, with its tokenizer.

    ``fingerprint`` is the sha256 of config.json and the safetensors weight files, the same in
    every process, so caches of derived results can key on it.
    """

    model: nn.Module
    tokenizer: Any
    path: Path
    arch: str
    fingerprint: str


# Loading


def resolve_model_dir(path: str | Path) -> Path:
    """Return the checkpoint directory that ``path`` names (``"default"`` is the embedded model)."""
    if isinstance(path, str) and path == DEFAULT_MODEL_NAME:
        if not DEFAULT_MODEL_DIR.is_dir():
            raise CheckpointError(
                f"the embedded default model is missing: {DEFAULT_MODEL_DIR} does not exist. "
                "Reinstall cn4 (the model ships in search/embedded/model) or pass a checkpoint "
                "directory"
            )
        return DEFAULT_MODEL_DIR.resolve()
    directory = Path(path).expanduser()
    if not directory.exists():
        raise CheckpointError(
            f"checkpoint directory {str(directory)!r} not found: pass a directory that contains "
            f"{CONFIG_NAME}, {SAFE_WEIGHTS_NAME} and the tokenizer files, or 'default'"
        )
    if not directory.is_dir():
        raise CheckpointError(
            f"checkpoint path {str(directory)!r} is a file, not a directory: pass the directory "
            "that save_pretrained wrote"
        )
    return directory.resolve()


def load_checkpoint(path: str | Path) -> LoadedModel:
    """Load a local Mamba or Mamba2 checkpoint in float32 and eval mode.

    ``path`` is a checkpoint directory or ``"default"`` for the embedded model. Half-precision
    files are upcast. Raises :class:`CheckpointError` for a missing directory, config, tokenizer
    or weight file, an unsupported ``model_type``, any pickle weight file, and tensors whose
    names or shapes disagree with the config.
    """
    directory = resolve_model_dir(path)
    # config.json first: a folder without one is not a checkpoint, whatever else it holds.
    config_data = read_config(directory)
    reject_pickle_files(directory)
    arch = str(config_data["model_type"])
    config_class, model_class = supported_architectures()[arch]
    config = _build_config(config_class, directory)
    weight_files = find_weight_files(directory)
    check_tensors_match_config(model_class, config, weight_files)
    tokenizer = load_tokenizer(directory)

    model, loading_info = model_class.from_pretrained(
        directory,
        dtype=torch.float32,
        use_safetensors=True,
        local_files_only=True,
        output_loading_info=True,
    )
    _raise_on_loading_problems(directory, loading_info)
    model = model.float().eval()
    fingerprint = fingerprint_files([directory / CONFIG_NAME, *weight_files])
    logger.info("loaded %s checkpoint %s (fingerprint %s)", arch, directory, fingerprint[:12])
    return LoadedModel(
        model=model, tokenizer=tokenizer, path=directory, arch=arch, fingerprint=fingerprint
    )


def reject_pickle_files(directory: Path) -> None:
    """Raise CheckpointError if the directory contains a pickle weight file; none is opened."""
    pickles = sorted(
        entry.name
        for entry in directory.iterdir()
        if entry.is_file() and entry.suffix.lower() in PICKLE_SUFFIXES
    )
    if pickles:
        raise CheckpointError(
            f"checkpoint {str(directory)!r} contains pickle files {pickles}: cn4 never unpickles "
            "weights, because unpickling can run arbitrary code. Convert the checkpoint to "
            "safetensors (load it once where you trust it and call "
            "model.save_pretrained(DIR), which writes model.safetensors), then remove the "
            "pickle files"
        )


def read_config(directory: Path) -> dict[str, Any]:
    """Read config.json and check that its ``model_type`` is one cn4 supports."""
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(
            f"checkpoint {str(directory)!r} has no {CONFIG_NAME}: save the model with "
            "model.save_pretrained(DIR), which writes the config beside the weights"
        )
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{config_path} is not a readable JSON file ({exc}): rewrite it with "
            "config.save_pretrained(DIR)"
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{config_path} contains a JSON {type(data).__name__}, not a JSON object: "
            "rewrite it with config.save_pretrained(DIR)"
        )
    supported = sorted(supported_architectures())
    model_type = data.get("model_type")
    if model_type not in supported:
        raise CheckpointError(
            f"{config_path} has model_type={model_type!r}, which cn4 does not support: "
            f"supported model types are {supported} (MambaForCausalLM and Mamba2ForCausalLM)"
        )
    return data


def find_weight_files(directory: Path) -> list[Path]:
    """Return the safetensors files that transformers loads for this checkpoint.

    That is ``model.safetensors``, or the shards named in ``model.safetensors.index.json``.
    Other ``*.safetensors`` files, such as an export's ``cn4_masks.safetensors``, are not weights.
    """
    index_path = directory / SAFE_WEIGHTS_INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{index_path} is not a valid shard index ({exc}): it needs a 'weight_map' "
                "object of tensor name to shard file; rewrite the checkpoint with "
                "model.save_pretrained(DIR)"
            ) from exc
        shards = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise CheckpointError(
                f"{index_path} names shard files {missing} that are not in {str(directory)!r}: "
                "copy the missing shards or rewrite the checkpoint with model.save_pretrained(DIR)"
            )
        return shards

    single = directory / SAFE_WEIGHTS_NAME
    if single.is_file():
        return [single]
    others = sorted(entry.name for entry in directory.glob("*.safetensors"))
    hint = (
        f" It contains {others}, but transformers loads only {SAFE_WEIGHTS_NAME} or the shards "
        f"listed in {SAFE_WEIGHTS_INDEX_NAME}: rename the weight file."
        if others
        else " Save the weights with model.save_pretrained(DIR)."
    )
    raise CheckpointError(
        f"checkpoint {str(directory)!r} has no safetensors weights ({SAFE_WEIGHTS_NAME} or "
        f"{SAFE_WEIGHTS_INDEX_NAME}).{hint}"
    )


def read_tensor_headers(weight_files: Iterable[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Read each tensor's shape and dtype from safetensors headers, without loading the data."""
    from safetensors import SafetensorError, safe_open

    headers: dict[str, tuple[tuple[int, ...], str]] = {}
    for weight_file in weight_files:
        try:
            with safe_open(weight_file, framework="pt") as reader:
                for name in reader.keys():
                    if name in headers:
                        raise CheckpointError(
                            f"tensor {name!r} appears in more than one weight file of "
                            f"{str(weight_file.parent)!r}: keep one copy"
                        )
                    tensor_slice = reader.get_slice(name)
                    headers[name] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"{weight_file} is not a valid safetensors file ({exc}): rewrite the "
                "checkpoint with model.save_pretrained(DIR)"
            ) from exc
    return headers


def expected_tensors(
    model_class: type, config: Any
) -> tuple[dict[str, tuple[int, ...]], list[set[str]]]:
    """Build the model on the meta device and return its tensor shapes and tied-tensor groups.

    A tied group lists state-dict names that share one parameter (``lm_head.weight`` and
    ``backbone.embeddings.weight`` when the config ties them), so a file needs only one of them.
    """
    with torch.device("meta"):
        model = model_class(config)
    shapes: dict[str, tuple[int, ...]] = {}
    names_by_tensor: dict[int, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        shapes[name] = tuple(tensor.shape)
        names_by_tensor.setdefault(id(tensor), set()).add(name)
    tied_groups = [names for names in names_by_tensor.values() if len(names) > 1]
    return shapes, tied_groups


def check_tensors_match_config(model_class: type, config: Any, weight_files: list[Path]) -> None:
    """Raise CheckpointError unless the files hold exactly the tensors the config describes."""
    expected, tied_groups = expected_tensors(model_class, config)
    found = read_tensor_headers(weight_files)
    directory = weight_files[0].parent
    problems: list[str] = []

    for name in sorted(set(expected) & set(found)):
        shape, dtype = found[name]
        if shape != expected[name]:
            problems.append(
                f"{name}: file shape {list(shape)}, config expects {list(expected[name])}"
            )
        if dtype not in FLOAT_DTYPES:
            problems.append(f"{name}: dtype {dtype} is not a floating type {list(FLOAT_DTYPES)}")

    tied_names = {name: group for group in tied_groups for name in group}
    for name in sorted(set(expected) - set(found)):
        group = tied_names.get(name)
        if group is not None and group & set(found):
            continue
        problems.append(f"{name}: missing from the weight files, shape {list(expected[name])}")
    for name in sorted(set(found) - set(expected)):
        problems.append(f"{name}: not a tensor of this model (file shape {list(found[name][0])})")

    if problems:
        listing = "\n  ".join(problems)
        raise CheckpointError(
            f"checkpoint {str(directory)!r} does not match its {CONFIG_NAME} "
            f"({len(problems)} problems):\n  {listing}\n"
            "Fix the config to describe these weights, or re-save the weights from a model "
            "built with this config"
        )


def load_tokenizer(directory: Path) -> Any:
    """Load the tokenizer saved beside the weights, from local files only."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"checkpoint {str(directory)!r} has no tokenizer (none of {list(TOKENIZER_FILES)}): "
            "save it next to the weights with tokenizer.save_pretrained(DIR)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"the tokenizer in {str(directory)!r} failed to load ({exc}): re-save it with "
            "tokenizer.save_pretrained(DIR)"
        ) from exc


def _build_config(config_class: type, directory: Path) -> Any:
    from huggingface_hub.errors import StrictDataclassError

    # from_pretrained, unlike from_dict, decodes the JSON spellings of values such as Infinity.
    try:
        return config_class.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError, StrictDataclassError) as exc:
        raise CheckpointError(
            f"{directory / CONFIG_NAME} is not a valid {config_class.__name__} ({exc}): fix the "
            "listed field or rewrite the config with config.save_pretrained(DIR)"
        ) from exc


def _raise_on_loading_problems(directory: Path, loading_info: Mapping[str, Any]) -> None:
    # The header check above should leave nothing here; this guards against transformers
    # renaming or skipping tensors in ways the headers cannot show.
    problems = {
        key: sorted(str(item) for item in loading_info.get(key) or ())
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    problems = {key: items for key, items in problems.items() if items}
    if problems:
        raise CheckpointError(
            f"transformers loaded {str(directory)!r} with problems {problems}: re-save the "
            "checkpoint with model.save_pretrained(DIR) from a model built with its config"
        )


def fingerprint_files(paths: Iterable[Path]) -> str:
    """Return the sha256 hex digest over each file's name, size and bytes, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode("utf-8") + b"\0")
        digest.update(str(path.stat().st_size).encode("ascii") + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


# Layer eligibility


def layer_report(model: nn.Module) -> list[LayerInfo]:
    """List every Linear in module order, plus each block's depthwise conv1d, with eligibility.

    A Linear is eligible when its ``in_features`` is a positive multiple of 4, the Cn4 group
    size, and its weight is not shared with the input embedding.
    """
    embedding_weight = _input_embedding_weight(model)
    report = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            report.append(_linear_info(name, module, embedding_weight))
        elif isinstance(module, nn.Conv1d) and module.groups == module.in_channels > 1:
            report.append(
                LayerInfo(
                    name=name,
                    block=_block_index(name),
                    kind="conv1d",
                    out_features=module.out_channels,
                    in_features=module.weight.shape[1] * module.weight.shape[2],
                    eligible=False,
                    reason="depthwise convolution, not a GEMM: stays dense",
                )
            )
    return report


def eligible_layers(model: nn.Module) -> list[LayerInfo]:
    """Return the report entries of the layers Cn4 pruning can apply to, in module order."""
    return [info for info in layer_report(model) if info.eligible]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule at module path ``name``, or raise PruningError naming it."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise PruningError(
            f"layer {name!r} not found in the model: give a module path such as "
            "'backbone.layers.0.mixer.in_proj' (`cn4 layers MODEL` lists them)"
        ) from exc


def check_level_map(model: nn.Module, level_map: Mapping[str, int]) -> dict[str, int]:
    """Validate a level map against the model and return it as a plain dict.

    Every name must be an eligible layer and every level one of 0, 1, 2, 3 (zeros per group of
    4). Raises PruningError naming the first offending layer.
    """
    report = {info.name: info for info in layer_report(model)}
    checked: dict[str, int] = {}
    for name, level in level_map.items():
        info = report.get(name)
        if info is None:
            get_module(model, name)
            raise PruningError(
                f"layer {name!r} is not a Linear or conv1d: only Linear layers can be pruned"
            )
        if not info.eligible:
            raise PruningError(f"layer {name!r} cannot be pruned: {info.reason}")
        if isinstance(level, bool) or not isinstance(level, int) or level not in LEVELS:
            raise PruningError(
                f"level {level!r} for layer {name!r} is invalid: a Cn4 level is 0, 1, 2 or 3 "
                "(zeros per group of 4)"
            )
        checked[name] = level
    return checked


def describe_level(level: int) -> str:
    """Spell a level out both ways, because "2:4" reads as zeros in some tools, kept in others."""
    return f"{level} zeros / {GROUP_SIZE - level} kept"


def format_layer_report(report: list[LayerInfo]) -> str:
    """Format a layer report as a fixed-width table with a summary line of eligible weights."""
    header = ("layer", "block", "kind", "out", "in", "eligible", "reason")
    rows = [
        (
            info.name,
            "-" if info.block is None else str(info.block),
            info.kind,
            str(info.out_features),
            str(info.in_features),
            "yes" if info.eligible else "no",
            info.reason or "",
        )
        for info in report
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    right_aligned = {1, 3, 4}

    def format_row(row: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(width) if column in right_aligned else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        ]
        return "  ".join(cells).rstrip()

    lines = [format_row(header), format_row(tuple("-" * width for width in widths))]
    lines.extend(format_row(row) for row in rows)

    linears = [info for info in report if info.kind != "conv1d"]
    eligible = [info for info in linears if info.eligible]
    total_weights = sum(info.weights for info in linears)
    eligible_weights = sum(info.weights for info in eligible)
    share = 100.0 * eligible_weights / total_weights if total_weights else 0.0
    lines.append("")
    lines.append(
        f"{len(eligible)} of {len(linears)} Linear layers eligible; "
        f"{eligible_weights:,} of {total_weights:,} Linear weights ({share:.1f}%) "
        "in eligible layers"
    )
    return "\n".join(lines)


def _linear_info(name: str, module: nn.Linear, embedding_weight: torch.Tensor | None) -> LayerInfo:
    kind = name.rsplit(".", 1)[-1]
    out_features, in_features = module.out_features, module.in_features
    reason = None
    if embedding_weight is not None and _shares_storage(module.weight, embedding_weight):
        reason = "tied to the input embedding: pruning it would prune the embedding"
    elif in_features < GROUP_SIZE:
        reason = (
            f"in_features={in_features} is fewer than {GROUP_SIZE}: a Cn4 group needs "
            f"{GROUP_SIZE} consecutive input weights"
        )
    elif in_features % GROUP_SIZE:
        reason = (
            f"in_features={in_features} is not a multiple of {GROUP_SIZE}: the input "
            f"dimension must split into whole groups of {GROUP_SIZE}"
        )
    return LayerInfo(
        name=name,
        block=_block_index(name),
        kind=kind,
        out_features=out_features,
        in_features=in_features,
        eligible=reason is None,
        reason=reason,
    )


def _input_embedding_weight(model: nn.Module) -> torch.Tensor | None:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    return getattr(embeddings, "weight", None)


def _shares_storage(first: torch.Tensor, second: torch.Tensor) -> bool:
    if first is second:
        return True
    # Meta tensors have no storage to compare, so identity is the only evidence there.
    if first.device.type == "meta" or second.device.type == "meta":
        return False
    return first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()


def _block_index(name: str) -> int | None:
    match = _BLOCK_PATTERN.search(name)
    return int(match.group(1)) if match else None
