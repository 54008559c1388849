"""A compiled decode step for Mamba and Mamba2 language models on the CPU.

Decoding one token through the Hugging Face modules on the CPU spends most of its time in Python
and PyTorch dispatch, which would hide what Cn4 sparsity changes. :class:`DecodeEngine` copies a
model's weights into numpy arrays once and runs each decode step as a short chain of numba calls.
Per block these are one fused residual add and RMSNorm, the ``in_proj`` GEMV, one fused kernel
for the causal depthwise conv1d, SiLU, the selective state update and (Mamba2) the gated
RMSNorm, and the ``out_proj`` GEMV. Mamba blocks add the ``x_proj`` and ``dt_proj`` GEMVs.
Linears at a level above 0 run the packed Cn4 GEMV of :mod:`latency_models.kernels`, the others
its dense GEMV.

The maths follows the single-token (recurrent) path of ``transformers`` 5.x,
``models/mamba/modeling_mamba.py`` and ``models/mamba2/modeling_mamba2.py``; the engine keeps
the conv window and the recurrent state of one sequence (batch size 1).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch

from latency_models import kernels
from search.errors import PruningError
from search.models import check_level_map

logger = logging.getLogger(__name__)

SUPPORTED_ACTIVATIONS = ("silu", "swish")

# Above this argument F.softplus returns its input (PyTorch's default threshold of 20).
SOFTPLUS_THRESHOLD = 20.0


# ---------------------------------------------------------------------------------------------
# numba kernels. Vectors are 1-D float32 arrays; every output is preallocated by the caller.


@numba.njit(cache=True, fastmath=False)
def _add_rmsnorm(residual, delta, weight, eps, out):
    """Add ``delta`` to ``residual`` in place, then write ``RMSNorm(residual) * weight`` to ``out``."""
    d = residual.shape[0]
    total = 0.0
    for i in range(d):
        value = residual[i] + delta[i]
        residual[i] = value
        total += value * value
    scale = np.float32(1.0 / np.sqrt(total / d + eps))
    for i in range(d):
        out[i] = weight[i] * (residual[i] * scale)


@numba.njit(cache=True)
def _silu(value):
    return value / (np.float32(1.0) + np.exp(-value))


@numba.njit(cache=True)
def _softplus(value):
    if value > SOFTPLUS_THRESHOLD:
        return value
    return np.log1p(np.exp(value))


@numba.njit(cache=True)
def _conv_step(inputs, window, conv_weight, conv_bias, out):
    """Shift ``inputs`` (channels,) into ``window`` (channels, kernel) and write SiLU(conv) to ``out``.

    ``window[:, -1]`` is the newest input, and the depthwise filter ``conv_weight`` (channels,
    kernel) is applied over the window, as a causal conv1d at the last position.
    """
    channels, kernel = window.shape
    for c in range(channels):
        acc = conv_bias[c]
        for k in range(kernel - 1):
            window[c, k] = window[c, k + 1]
            acc += conv_weight[c, k] * window[c, k]
        window[c, kernel - 1] = inputs[c]
        acc += conv_weight[c, kernel - 1] * inputs[c]
        out[c] = _silu(acc)


@numba.njit(cache=True)
def _mamba2_mixer_step(
    projected,
    window,
    conv_weight,
    conv_bias,
    conv_out,
    state,
    a,
    d_skip,
    dt_bias,
    dt_min,
    dt_max,
    norm_weight,
    norm_eps,
    n_groups,
    out,
):
    """Run the Mamba2 mixer between ``in_proj`` and ``out_proj`` for one token.

    ``projected`` is the ``in_proj`` output ``[gate (I) | x B C (I + 2 G N) | dt (H)]``,
    ``state`` the recurrent state (H, P, N), ``a`` is ``-exp(A_log)`` (H,). ``out`` (I,) receives
    the gated, group-normalised scan output that ``out_proj`` consumes.
    """
    heads, head_dim, state_size = state.shape
    inner = heads * head_dim
    conv_dim = window.shape[0]

    # 1. Causal conv1d with SiLU over x, B and C.
    _conv_step(projected[inner : inner + conv_dim], window, conv_weight, conv_bias, conv_out)
    b_offset = inner
    c_offset = inner + n_groups * state_size
    heads_per_group = heads // n_groups

    # 2. Selective state update per head: state = state * exp(dt A) + dt x B; y = C state + D x.
    for h in range(heads):
        dt = _softplus(projected[inner + conv_dim + h] + dt_bias[h])
        dt = min(max(dt, dt_min), dt_max)
        decay = np.exp(dt * a[h])
        g = h // heads_per_group
        for p in range(head_dim):
            x = conv_out[h * head_dim + p]
            acc = np.float32(0.0)
            for n in range(state_size):
                value = state[h, p, n] * decay + (dt * conv_out[b_offset + g * state_size + n]) * x
                state[h, p, n] = value
                acc += value * conv_out[c_offset + g * state_size + n]
            out[h * head_dim + p] = acc + d_skip[h] * x

    # 3. Gate with SiLU(z), then RMSNorm within each of the n_groups groups.
    group_size = inner // n_groups
    for g in range(n_groups):
        total = 0.0
        for i in range(g * group_size, (g + 1) * group_size):
            value = out[i] * _silu(projected[i])
            out[i] = value
            total += value * value
        scale = np.float32(1.0 / np.sqrt(total / group_size + norm_eps))
        for i in range(g * group_size, (g + 1) * group_size):
            out[i] = norm_weight[i] * (out[i] * scale)


@numba.njit(cache=True)
def _mamba_scan_step(conv_out, dt_raw, dt_bias, projected_dbc, rank, a, d_skip, gate, state, out):
    """Run Mamba's selective state update for one token and gate it with SiLU(gate).

    ``conv_out`` (I,) is the activated conv output, ``dt_raw`` (I,) the ``dt_proj`` output before
    its bias, ``projected_dbc`` the ``x_proj`` output ``[dt (rank) | B (N) | C (N)]``, ``a`` is
    ``-exp(A_log)`` (I, N) and ``state`` (I, N).
    """
    inner, state_size = state.shape
    for i in range(inner):
        dt = _softplus(dt_raw[i] + dt_bias[i])
        x = conv_out[i]
        acc = np.float32(0.0)
        for n in range(state_size):
            value = state[i, n] * np.exp(dt * a[i, n]) + (dt * projected_dbc[rank + n]) * x
            state[i, n] = value
            acc += value * projected_dbc[rank + state_size + n]
        out[i] = (acc + d_skip[i] * x) * _silu(gate[i])


@numba.njit(cache=True)
def _embed(embedding, token_id, residual, delta):
    residual[:] = embedding[token_id]
    delta[:] = 0.0


# ---------------------------------------------------------------------------------------------
# Weights


@dataclass
class EngineLinear:
    """One Linear of the engine: packed Cn4 storage at ``level`` > 0, else a dense fp32 matrix."""

    name: str
    out_features: int
    in_features: int
    level: int
    weight: np.ndarray | None
    packed: kernels.PackedCn4 | None
    bias: np.ndarray | None

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        if self.packed is not None:
            return kernels.cn4_matvec(self.packed, x, out=out)
        return kernels.dense_matvec(self.weight, x, out=out, bias=self.bias)


def _as_array(tensor) -> np.ndarray:
    """Return a float32 copy of ``tensor``: ``Tensor.numpy`` alone would share its memory."""
    return np.array(tensor.detach().to(dtype=torch.float32).cpu().numpy(), order="C", copy=True)


def zero_smallest_per_group(weight: np.ndarray, n: int) -> np.ndarray:
    """Return a copy of ``weight`` (out, in) with the ``n`` smallest |w| of each group of 4 zeroed.

    Groups are 4 consecutive weights along the input dimension. Used to give timing runs weights
    that meet a level; it is not a pruning method for quality (see ``search.cn4``).
    """
    out_features, in_features = weight.shape
    if in_features % 4:
        raise PruningError(
            f"in_features={in_features} is not a multiple of 4: Cn4 groups of 4 do not tile it"
        )
    result = np.array(weight, dtype=np.float32, copy=True)
    if n == 0:
        return result
    groups = result.reshape(out_features, in_features // 4, 4)
    order = np.argsort(np.abs(groups), axis=-1, kind="stable")[..., :n]
    np.put_along_axis(groups, order, 0.0, axis=-1)
    return result


# ---------------------------------------------------------------------------------------------
# Engine


class DecodeEngine:
    """Greedy single-sequence decoding of a Hugging Face Mamba or Mamba2 model in numba kernels.

    ``model`` is a loaded ``MambaForCausalLM`` or ``Mamba2ForCausalLM`` in fp32 and ``level_map``
    maps eligible Linear names (``backbone.layers.0.mixer.in_proj``) to Cn4 levels. Those
    Linears must already have at least ``level`` zeros in every group of 4 along the input
    dimension, unless ``prune_to_levels`` is set: then the engine's own copies get the ``level``
    smallest |w| of each group zeroed, which is meant for timing runs. Linears left out of the
    map, and those at level 0, run dense, as does an ``lm_head`` tied to the embedding.

    ``packed_cache``, a dict shared between engines of one model, reuses packed layers by
    ``(name, level)``: the probe builds many engines of the same weights at different maps.

    The engine copies the weights, so later changes to ``model`` do not reach it (nor reach the
    layers in ``packed_cache``).
    """

    def __init__(
        self,
        model,
        level_map: Mapping[str, int] | None = None,
        *,
        prune_to_levels: bool = False,
        packed_cache: dict[tuple[str, int], kernels.PackedCn4] | None = None,
    ) -> None:
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in ("mamba", "mamba2"):
            raise PruningError(
                f"model type {model_type!r} is not supported by the decode engine: give a "
                "MambaForCausalLM or Mamba2ForCausalLM"
            )
        activation = getattr(config, "hidden_act", "silu")
        if activation not in SUPPORTED_ACTIVATIONS:
            raise PruningError(
                f"hidden_act={activation!r} is not supported by the decode engine: it implements "
                f"{SUPPORTED_ACTIVATIONS}"
            )
        self.arch = model_type
        self.level_map = check_level_map(model, dict(level_map or {}))
        self._prune_to_levels = prune_to_levels
        self._packed_cache = packed_cache

        backbone = model.backbone
        self.embedding = _as_array(backbone.embeddings.weight)
        self.vocab_size, self.hidden_size = self.embedding.shape
        self.eps = np.float32(config.layer_norm_epsilon)
        self.final_norm = _as_array(backbone.norm_f.weight)
        lm_head = model.lm_head
        if lm_head.weight.data_ptr() == backbone.embeddings.weight.data_ptr():
            # Tied to the embedding, so ineligible for pruning: share the array.
            bias = _as_array(lm_head.bias) if lm_head.bias is not None else None
            self.lm_head = EngineLinear(
                "lm_head", self.vocab_size, self.hidden_size, 0, self.embedding, None, bias
            )
        else:
            self.lm_head = self._linear("lm_head", lm_head)

        self.blocks = [self._build_block(index, layer) for index, layer in enumerate(backbone.layers)]
        self.linears = [
            linear for block in self.blocks for linear in block["linears"].values()
        ] + [self.lm_head]

        self.residual = np.zeros(self.hidden_size, dtype=np.float32)
        self.delta = np.zeros(self.hidden_size, dtype=np.float32)
        self.normed = np.zeros(self.hidden_size, dtype=np.float32)
        self.logits = np.zeros(self.vocab_size, dtype=np.float32)
        self.reset()
        logger.debug(
            "built %s decode engine: %d blocks, %d Linears at a level above 0",
            self.arch,
            len(self.blocks),
            sum(1 for linear in self.linears if linear.level > 0),
        )

    # -- construction --------------------------------------------------------------------------

    def _linear(self, name: str, module, *, with_bias: bool = True) -> EngineLinear:
        weight = _as_array(module.weight)
        bias = _as_array(module.bias) if with_bias and module.bias is not None else None
        level = self.level_map.get(name, 0)
        out_features, in_features = weight.shape
        if level == 0:
            return EngineLinear(name, out_features, in_features, 0, weight, None, bias)
        cache = self._packed_cache
        if cache is not None and (name, level) in cache:
            packed = cache[name, level]
            return EngineLinear(name, out_features, in_features, level, None, packed, bias)
        if self._prune_to_levels:
            weight = zero_smallest_per_group(weight, level)
        try:
            packed = kernels.pack_cn4(weight, level, bias)
        except PruningError as exc:
            raise PruningError(
                f"layer {name} does not meet level {level}: {exc}. Prune it first, or pass "
                "prune_to_levels=True for a timing run"
            ) from exc
        if cache is not None:
            cache[name, level] = packed
        return EngineLinear(name, out_features, in_features, level, None, packed, bias)

    def _build_block(self, index: int, layer) -> dict:
        prefix = f"backbone.layers.{index}.mixer"
        mixer = layer.mixer
        names = ("in_proj", "x_proj", "dt_proj", "out_proj") if self.arch == "mamba" else (
            "in_proj",
            "out_proj",
        )
        # The scan adds dt_proj's bias before softplus, as transformers does, so its GEMV
        # leaves the bias out.
        linears = {
            short: self._linear(
                f"{prefix}.{short}", getattr(mixer, short), with_bias=short != "dt_proj"
            )
            for short in names
        }
        conv_weight = _as_array(mixer.conv1d.weight)[:, 0, :]  # (channels, kernel)
        channels, kernel = conv_weight.shape
        conv_bias = (
            _as_array(mixer.conv1d.bias)
            if mixer.conv1d.bias is not None
            else np.zeros(channels, dtype=np.float32)
        )
        a = -np.exp(_as_array(mixer.A_log))
        block = {
            "norm": _as_array(layer.norm.weight),
            "linears": linears,
            "conv_weight": np.ascontiguousarray(conv_weight),
            "conv_bias": conv_bias,
            "window": np.zeros((channels, kernel), dtype=np.float32),
            "conv_out": np.zeros(channels, dtype=np.float32),
            "a": np.ascontiguousarray(a.astype(np.float32)),
            "d": _as_array(mixer.D),
            "projected": np.zeros(linears["in_proj"].out_features, dtype=np.float32),
            "mixed": np.zeros(linears["out_proj"].in_features, dtype=np.float32),
        }
        if self.arch == "mamba2":
            heads, head_dim = mixer.num_heads, mixer.head_dim
            dt_min, dt_max = (float(v) for v in mixer.time_step_limit)
            block.update(
                state=np.zeros((heads, head_dim, mixer.ssm_state_size), dtype=np.float32),
                dt_bias=_as_array(mixer.dt_bias),
                dt_min=np.float32(dt_min),
                dt_max=np.float32(dt_max),
                gated_norm=_as_array(mixer.norm.weight),
                gated_eps=np.float32(mixer.norm.variance_epsilon),
                n_groups=int(mixer.n_groups),
            )
        else:
            dt_bias = mixer.dt_proj.bias
            block.update(
                state=np.zeros((mixer.intermediate_size, mixer.ssm_state_size), dtype=np.float32),
                dt_bias=_as_array(dt_bias)
                if dt_bias is not None
                else np.zeros(mixer.intermediate_size, dtype=np.float32),
                rank=int(mixer.time_step_rank),
                dbc=np.zeros(linears["x_proj"].out_features, dtype=np.float32),
                dt_raw=np.zeros(mixer.intermediate_size, dtype=np.float32),
            )
        return block

    # -- decoding ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Clear the conv windows and recurrent states, to start a new sequence."""
        for block in self.blocks:
            block["window"][:] = 0.0
            block["state"][:] = 0.0

    def step(self, token_id: int) -> np.ndarray:
        """Feed one token and return the next-token logits (vocab,), a view reused by the next step."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        _embed(self.embedding, token_id, self.residual, self.delta)
        for block in self.blocks:
            linears = block["linears"]
            _add_rmsnorm(self.residual, self.delta, block["norm"], self.eps, self.normed)
            linears["in_proj"](self.normed, block["projected"])
            if self.arch == "mamba2":
                self._mamba2_mix(block)
            else:
                self._mamba_mix(block)
            linears["out_proj"](block["mixed"], self.delta)
        _add_rmsnorm(self.residual, self.delta, self.final_norm, self.eps, self.normed)
        return self.lm_head(self.normed, self.logits)

    def _mamba2_mix(self, block: dict) -> None:
        _mamba2_mixer_step(
            block["projected"],
            block["window"],
            block["conv_weight"],
            block["conv_bias"],
            block["conv_out"],
            block["state"],
            block["a"],
            block["d"],
            block["dt_bias"],
            block["dt_min"],
            block["dt_max"],
            block["gated_norm"],
            block["gated_eps"],
            block["n_groups"],
            block["mixed"],
        )

    def _mamba_mix(self, block: dict) -> None:
        projected = block["projected"]
        inner = block["state"].shape[0]
        linears = block["linears"]
        _conv_step(
            projected[:inner], block["window"], block["conv_weight"], block["conv_bias"],
            block["conv_out"],
        )
        linears["x_proj"](block["conv_out"], block["dbc"])
        linears["dt_proj"](block["dbc"][: block["rank"]], block["dt_raw"])
        _mamba_scan_step(
            block["conv_out"],
            block["dt_raw"],
            block["dt_bias"],
            block["dbc"],
            block["rank"],
            block["a"],
            block["d"],
            projected[inner:],
            block["state"],
            block["mixed"],
        )

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Feed ``token_ids`` one step at a time and return the logits after the last one."""
        if len(token_ids) == 0:
            raise ValueError("token_ids is empty: give at least one token to prefill")
        logits = self.logits
        for token_id in token_ids:
            logits = self.step(int(token_id))
        return logits

    def generate_greedy(self, token_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Reset, feed ``token_ids`` and return them followed by ``max_new_tokens`` greedy tokens."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} is negative: give 0 or more")
        self.reset()
        tokens = [int(t) for t in token_ids]
        logits = self.prefill(tokens)
        for index in range(max_new_tokens):
            next_token = int(np.argmax(logits))
            tokens.append(next_token)
            if index + 1 < max_new_tokens:
                logits = self.step(next_token)
        return tokens
