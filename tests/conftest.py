"""Shared fixtures: tiny Mamba and Mamba2 checkpoints written to disk, as users would give them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def cn4_home(tmp_path_factory) -> Path:
    """Point CN4_HOME (caches of variants, measurements, cost models) at a fresh folder."""
    home = tmp_path_factory.mktemp("cn4-home")
    previous = os.environ.get("CN4_HOME")
    os.environ["CN4_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("CN4_HOME", None)
    else:
        os.environ["CN4_HOME"] = previous

TINY_VOCAB = 96


@pytest.fixture(scope="module")
def single_torch_thread():
    """Run torch on one thread for a module.

    On a machine shared with other jobs, oversubscribed thread pools make the many small ops of
    the OBS sweep and the Mamba scan tens of times slower than one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def single_kernel_thread():
    """Run the numba kernels on one thread for a module: parallel regions stall on busy cores."""
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(previous)


def _tiny_tokenizer():
    """A real byte-level BPE tokenizer trained on a few sentences, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60],
        show_progress=False,
    )
    lines = ["To be, or not to be, that is the question.", "All the world's a stage."] * 20
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def write_tiny_checkpoint(
    directory: Path, arch: str = "mamba2", *, hidden_size: int = 64, layers: int = 2, seed: int = 0
) -> Path:
    """Write a randomly initialised tiny checkpoint (config, safetensors, tokenizer) to ``directory``."""
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    vocab = len(tokenizer)
    if arch == "mamba":
        config = MambaConfig(
            vocab_size=vocab, hidden_size=hidden_size, num_hidden_layers=layers, state_size=8
        )
        model = MambaForCausalLM(config)
    elif arch == "mamba2":
        head_dim = 16
        config = Mamba2Config(
            vocab_size=vocab,
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            state_size=16,
            expand=2,
            head_dim=head_dim,
            num_heads=2 * hidden_size // head_dim,
            n_groups=1,
            chunk_size=16,
        )
        model = Mamba2ForCausalLM(config)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_mamba_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-mamba"), "mamba")


@pytest.fixture(scope="session")
def tiny_mamba2_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-mamba2"), "mamba2")
