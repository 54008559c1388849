"""Checkpoint loading, its error messages, and the layer eligibility report."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import write_tiny_checkpoint
from search import models
from search.cli import main
from search.errors import CheckpointError, PruningError
from search.models import (
    DEFAULT_MODEL_DIR,
    check_level_map,
    eligible_layers,
    format_layer_report,
    get_module,
    layer_report,
    load_checkpoint,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
MAMBA_KINDS = ["conv1d", "in_proj", "x_proj", "dt_proj", "out_proj"]
MAMBA2_KINDS = ["conv1d", "in_proj", "out_proj"]


def copy_checkpoint(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "checkpoint"))


def rewrite_weights(directory: Path, change) -> None:
    """Load model.safetensors, let ``change`` edit the dict of tensors, write it back."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


class UnpicklingMarker:
    """Pickles to a call that creates ``marker`` when unpickled, so unpickling leaves a trace."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


# Loading


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_load_checkpoint_runs_forward(arch, tiny_mamba_dir, tiny_mamba2_dir):
    directory = tiny_mamba_dir if arch == "mamba" else tiny_mamba2_dir
    loaded = load_checkpoint(directory)

    assert loaded.arch == arch
    assert loaded.path == directory.resolve()
    assert len(loaded.fingerprint) == 64
    assert not loaded.model.training
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}

    ids = loaded.tokenizer("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(loaded.tokenizer))
    assert torch.isfinite(logits).all()


def test_load_checkpoint_upcasts_float16(tiny_mamba2_dir, tmp_path):
    directory = copy_checkpoint(tiny_mamba2_dir, tmp_path)
    rewrite_weights(
        directory, lambda tensors: tensors.update({k: v.half() for k, v in tensors.items()})
    )
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = "float16"
    (directory / "config.json").write_text(json.dumps(config))

    loaded = load_checkpoint(directory)

    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    half = load_file(directory / "model.safetensors")
    in_proj = loaded.model.get_submodule("backbone.layers.0.mixer.in_proj").weight
    assert torch.equal(in_proj, half["backbone.layers.0.mixer.in_proj.weight"].float())


def test_fingerprint_same_in_fresh_process(tiny_mamba_dir):
    script = (
        "import sys; from search.models import load_checkpoint; "
        "print(load_checkpoint(sys.argv[1]).fingerprint)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny_mamba_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == load_checkpoint(tiny_mamba_dir).fingerprint


def test_fingerprint_changes_with_weights(tiny_mamba_dir, tmp_path):
    directory = copy_checkpoint(tiny_mamba_dir, tmp_path)
    before = load_checkpoint(directory).fingerprint

    rewrite_weights(directory, lambda t: t["backbone.norm_f.weight"].mul_(2.0))

    assert load_checkpoint(directory).fingerprint != before


def test_default_name_means_embedded_dir(monkeypatch, tmp_path):
    missing = tmp_path / "embedded" / "model"
    monkeypatch.setattr(models, "DEFAULT_MODEL_DIR", missing)

    with pytest.raises(CheckpointError, match="embedded default model is missing") as error:
        load_checkpoint("default")
    assert str(missing) in str(error.value)


@pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="embedded model not built yet"
)
def test_default_model_loads_float32():
    loaded = load_checkpoint("default")

    assert loaded.path == DEFAULT_MODEL_DIR.resolve()
    assert loaded.arch in ("mamba", "mamba2")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert eligible_layers(loaded.model)


def test_load_sharded_checkpoint(tiny_mamba2_dir, tmp_path):
    dense = load_checkpoint(tiny_mamba2_dir)
    directory = tmp_path / "sharded"
    dense.model.save_pretrained(directory, max_shard_size="100KB")
    dense.tokenizer.save_pretrained(directory)
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert (directory / "model.safetensors.index.json").is_file()

    loaded = load_checkpoint(directory)

    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, dense.model.state_dict()[name]), name


def test_load_sharded_missing_shard(tiny_mamba2_dir, tmp_path):
    dense = load_checkpoint(tiny_mamba2_dir)
    directory = tmp_path / "sharded"
    dense.model.save_pretrained(directory, max_shard_size="100KB")
    dense.tokenizer.save_pretrained(directory)
    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    shard.unlink()

    with pytest.raises(CheckpointError, match="names shard files") as error:
        load_checkpoint(directory)
    assert shard.name in str(error.value)


# Loading errors


def test_load_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="not found") as error:
        load_checkpoint(missing)
    assert str(missing) in str(error.value)


def test_load_file_instead_of_directory(tiny_mamba_dir):
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        load_checkpoint(tiny_mamba_dir / "config.json")


def test_load_missing_config(tiny_mamba_dir, tmp_path):
    directory = copy_checkpoint(tiny_mamba_dir, tmp_path)
    (directory / "config.json").unlink()

    with pytest.raises(CheckpointError, match="has no config.json"):
        load_checkpoint(directory)


def test_load_unknown_model_type(tiny_mamba_dir, tmp_path):
    directory = copy_checkpoint(tiny_mamba_dir, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "llama"
    (directory / "config.json").write_text(json.dumps(config))

    with pytest.raises(CheckpointError) as error:
        load_checkpoint(directory)
    message = str(error.value)
    assert "model_type='llama'" in message
    assert "['mamba', 'mamba2']" in message


def test_load_config_not_json(tiny_mamba_dir, tmp_path):
    directory = copy_checkpoint(tiny_mamba_dir, tmp_path)
    (directory / "config.json").write_text("{not json")

    with pytest.raises(CheckpointError, match="not a readable JSON file"):
        load_checkpoint(directory)


@pytest.mark.parametrize("keep_safetensors", [True, False])
def test_load_rejects_pickle_without_unpickling(keep_safetensors, tiny_mamba_dir, tmp_path):
    directory = copy_checkpoint(tiny_mamba_dir, tmp_path)
    marker = tmp_path / "unpickled"
    state = load_file(directory / "model.safetensors")
    state["marker"] = UnpicklingMarker(marker)
    torch.save(state, directory / "pytorch_model.bin")
    if not keep_safetensors:
        (directory / "model.safetensors").unlink()

    with pytest.raises(CheckpointError) as error:
        load_checkpoint(directory)
    message = str(error.value)
    assert "pytorch_model.bin" in message
    assert "safetensors" in message
    assert not marker.exists()


@pytest.mark.parametrize("name", ["weights.pt", "model.pth", "last.ckpt"])
def test_load_rejects_other_pickle_suffixes(name, tiny_mamba_dir, tmp_path):
    directory = copy_checkpoint(tiny_mamba_dir, tmp_path)
    torch.save({"w": torch.zeros(2)}, directory / name)

    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_checkpoint(directory)


def test_load_without_safetensors(tiny_mamba_dir, tmp_path):
    directory = copy_checkpoint(tiny_mamba_dir, tmp_path)
    (directory / "model.safetensors").unlink()

    with pytest.raises(CheckpointError, match="has no safetensors weights"):
        load_checkpoint(directory)


def test_load_misnamed_safetensors_suggests_rename(tiny_mamba_dir, tmp_path):
    directory = copy_checkpoint(tiny_mamba_dir, tmp_path)
    (directory / "model.safetensors").rename(directory / "weights.safetensors")

    with pytest.raises(CheckpointError, match="rename the weight file") as error:
        load_checkpoint(directory)
    assert "weights.safetensors" in str(error.value)


def test_load_rejects_wrong_tensor_shape(tiny_mamba_dir, tmp_path):
    directory = copy_checkpoint(tiny_mamba_dir, tmp_path)
    name = "backbone.layers.1.mixer.x_proj.weight"

    def shrink(tensors):
        tensors[name] = tensors[name][:, :96].contiguous()

    rewrite_weights(directory, shrink)

    with pytest.raises(CheckpointError) as error:
        load_checkpoint(directory)
    message = str(error.value)
    assert name in message
    assert "file shape [20, 96]" in message
    assert "config expects [20, 128]" in message


def test_load_rejects_missing_and_unexpected_tensors(tiny_mamba_dir, tmp_path):
    directory = copy_checkpoint(tiny_mamba_dir, tmp_path)

    def change(tensors):
        del tensors["backbone.layers.0.mixer.D"]
        tensors["backbone.layers.0.mixer.extra"] = torch.zeros(3)

    rewrite_weights(directory, change)

    with pytest.raises(CheckpointError) as error:
        load_checkpoint(directory)
    message = str(error.value)
    assert "backbone.layers.0.mixer.D: missing from the weight files, shape [128]" in message
    assert "backbone.layers.0.mixer.extra: not a tensor of this model (file shape [3])" in message


def test_load_accepts_absent_tied_head(tiny_mamba_dir):
    with safe_open(tiny_mamba_dir / "model.safetensors", framework="pt") as reader:
        assert "lm_head.weight" not in reader.keys()

    loaded = load_checkpoint(tiny_mamba_dir)

    embedding = loaded.model.get_input_embeddings().weight
    assert loaded.model.lm_head.weight.data_ptr() == embedding.data_ptr()


def test_load_missing_tokenizer(tiny_mamba_dir, tmp_path):
    directory = copy_checkpoint(tiny_mamba_dir, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).unlink()

    with pytest.raises(CheckpointError, match="has no tokenizer") as error:
        load_checkpoint(directory)
    assert "tokenizer.save_pretrained" in str(error.value)


# Layer report


def test_layer_report_mamba(tiny_mamba_dir):
    report = layer_report(load_checkpoint(tiny_mamba_dir).model)

    block_entries = [info for info in report if info.block is not None]
    assert [info.kind for info in block_entries] == MAMBA_KINDS * 2
    assert [info.block for info in block_entries] == [0] * 5 + [1] * 5
    assert report[-1].name == "lm_head"
    assert report[-1].block is None

    by_name = {info.name: info for info in report}
    in_proj = by_name["backbone.layers.0.mixer.in_proj"]
    assert (in_proj.out_features, in_proj.in_features, in_proj.eligible) == (256, 64, True)
    assert in_proj.reason is None
    dt_proj = by_name["backbone.layers.1.mixer.dt_proj"]
    assert (dt_proj.out_features, dt_proj.in_features, dt_proj.eligible) == (128, 4, True)


def test_layer_report_mamba2(tiny_mamba2_dir):
    model = load_checkpoint(tiny_mamba2_dir).model
    report = layer_report(model)

    block_entries = [info for info in report if info.block is not None]
    assert [info.kind for info in block_entries] == MAMBA2_KINDS * 2
    head = report[-1]
    assert head.kind == "lm_head"
    assert head.eligible
    assert [info.name for info in eligible_layers(model)] == [
        "backbone.layers.0.mixer.in_proj",
        "backbone.layers.0.mixer.out_proj",
        "backbone.layers.1.mixer.in_proj",
        "backbone.layers.1.mixer.out_proj",
        "lm_head",
    ]


def test_conv1d_reported_ineligible(tiny_mamba2_dir):
    report = layer_report(load_checkpoint(tiny_mamba2_dir).model)

    convs = [info for info in report if info.kind == "conv1d"]
    assert [info.name for info in convs] == [
        "backbone.layers.0.mixer.conv1d",
        "backbone.layers.1.mixer.conv1d",
    ]
    for info in convs:
        assert not info.eligible
        assert info.reason == "depthwise convolution, not a GEMM: stays dense"
        assert (info.out_features, info.in_features) == (160, 4)


def test_tied_head_ineligible(tiny_mamba_dir):
    report = layer_report(load_checkpoint(tiny_mamba_dir).model)

    head = report[-1]
    assert head.name == "lm_head"
    assert not head.eligible
    assert "tied to the input embedding" in head.reason
    eligible_names = [info.name for info in eligible_layers(load_checkpoint(tiny_mamba_dir).model)]
    assert "lm_head" not in eligible_names


def test_tied_mamba2_head_ineligible():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    config = Mamba2Config(
        vocab_size=96, hidden_size=64, num_hidden_layers=1, state_size=16, head_dim=16,
        num_heads=8, n_groups=1, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = Mamba2ForCausalLM(config)

    head = layer_report(model)[-1]
    assert head.name == "lm_head"
    assert not head.eligible
    assert "tied to the input embedding" in head.reason


def test_hidden_size_32_dt_proj_ineligible(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / "h32", "mamba", hidden_size=32, layers=1)
    loaded = load_checkpoint(directory)

    dt_proj = {info.name: info for info in layer_report(loaded.model)}[
        "backbone.layers.0.mixer.dt_proj"
    ]
    assert dt_proj.in_features == 2
    assert not dt_proj.eligible
    assert dt_proj.reason.startswith("in_features=2 is fewer than 4")
    eligible_kinds = [info.kind for info in eligible_layers(loaded.model)]
    assert eligible_kinds == ["in_proj", "x_proj", "out_proj"]

    ids = loaded.tokenizer("All the world", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(loaded.model(ids).logits).all()


def test_in_features_not_multiple_of_4():
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Linear(8, 3))

    first, second = layer_report(model)
    assert not first.eligible
    assert first.reason.startswith("in_features=10 is not a multiple of 4")
    assert second.eligible


def test_get_module_unknown_name(tiny_mamba_dir):
    model = load_checkpoint(tiny_mamba_dir).model

    assert get_module(model, "backbone.layers.0.mixer.in_proj").in_features == 64
    with pytest.raises(PruningError, match="'backbone.layers.9.mixer.in_proj' not found"):
        get_module(model, "backbone.layers.9.mixer.in_proj")


def test_check_level_map_rejects(tiny_mamba_dir):
    model = load_checkpoint(tiny_mamba_dir).model

    assert check_level_map(model, {"backbone.layers.0.mixer.in_proj": 2}) == {
        "backbone.layers.0.mixer.in_proj": 2
    }
    with pytest.raises(PruningError, match="'lm_head' cannot be pruned: tied"):
        check_level_map(model, {"lm_head": 1})
    with pytest.raises(PruningError, match="'backbone.layers.0.mixer.conv1d' cannot be pruned"):
        check_level_map(model, {"backbone.layers.0.mixer.conv1d": 1})
    with pytest.raises(PruningError, match="level 4 for layer"):
        check_level_map(model, {"backbone.layers.0.mixer.in_proj": 4})
    with pytest.raises(PruningError, match="not found"):
        check_level_map(model, {"backbone.nothing": 1})


def test_format_layer_report(tiny_mamba_dir):
    text = format_layer_report(layer_report(load_checkpoint(tiny_mamba_dir).model))
    lines = text.splitlines()

    assert lines[0].split() == ["layer", "block", "kind", "out", "in", "eligible", "reason"]
    first_row = lines[2].split()
    assert first_row[:6] == ["backbone.layers.0.mixer.conv1d", "0", "conv1d", "128", "4", "no"]
    # 8 eligible block Linears of 2 * (256*64 + 20*128 + 128*4 + 64*128) weights, head 96*64.
    assert lines[-1] == (
        "8 of 9 Linear layers eligible; 55,296 of 61,440 Linear weights (90.0%) in eligible layers"
    )


# Command line


def test_cli_layers_table(tiny_mamba_dir, capsys):
    assert main(["layers", str(tiny_mamba_dir)]) == 0

    output = capsys.readouterr().out
    assert "(mamba, fingerprint " in output
    rows = {
        line.split()[0]: line
        for line in output.splitlines()
        if line.startswith(("backbone", "lm_head"))
    }
    assert len(rows) == 11
    x_proj_cells = rows["backbone.layers.1.mixer.x_proj"].split()
    assert x_proj_cells[1:6] == ["1", "x_proj", "20", "128", "yes"]
    assert "tied to the input embedding" in rows["lm_head"]
    assert "8 of 9 Linear layers eligible" in output


def test_cli_layers_json(tiny_mamba2_dir, capsys):
    assert main(["layers", str(tiny_mamba2_dir), "--json"]) == 0

    document = json.loads(capsys.readouterr().out)
    assert document["arch"] == "mamba2"
    assert document["model"] == str(tiny_mamba2_dir.resolve())
    assert len(document["layers"]) == 7
    assert document["layers"][1] == {
        "name": "backbone.layers.0.mixer.in_proj",
        "block": 0,
        "kind": "in_proj",
        "out_features": 296,
        "in_features": 64,
        "eligible": True,
        "reason": None,
    }


def test_cli_layers_missing_model(tmp_path, capsys):
    assert main(["layers", str(tmp_path / "nowhere")]) == 1

    assert "cn4 layers: error: checkpoint directory" in capsys.readouterr().err


THREADED_IMPORT = """
import threading
from search.models import supported_architectures

barrier = threading.Barrier(8)
errors = []


def work():
    barrier.wait()
    try:
        supported_architectures()
    except Exception as exc:
        errors.append(repr(exc))


threads = [threading.Thread(target=work) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(len(errors), errors[:1])
"""


def test_architectures_import_from_threads():
    # Without a lock, most fresh interpreters failed here with "cannot import name".
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", THREADED_IMPORT], capture_output=True, text=True, check=True
        )
        assert result.stdout.strip().startswith("0 "), result.stdout
