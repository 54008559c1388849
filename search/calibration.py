"""Per-layer input statistics from one hooked forward pass over calibration windows.

Each named Linear gets a forward pre-hook that adds ``x x^T`` of every input token to a float64
accumulator. All statistics come from the dense model in a single pass: a layer's inputs are
those it receives while every earlier layer is still dense, not after the earlier layers were
pruned. This is what lets each (layer, level) variant be pruned once and combined freely in any
level map, at the cost of ignoring how pruning one layer shifts the inputs of the next (SparseGPT
instead prunes layer by layer on the pruned model's inputs).

Mamba's ``dt_proj`` is the exception to plain hooks: transformers 5.x applies it as
``dt_proj.weight @ time_step`` without calling the module, so its input (the first
``dt_proj.in_features`` outputs of the sibling ``x_proj``) is read from a forward hook on
``x_proj``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from search.errors import PruningError

logger = logging.getLogger(__name__)


@dataclass
class LayerStats:
    """Calibration statistics of one Linear layer.

    ``hessian`` is ``sum x x^T`` over the calibration tokens, float64 ``[in_features,
    in_features]`` (a sum, not a mean, so statistics from separate passes add up). ``tokens``
    is the number of input vectors that went into it.
    """

    hessian: torch.Tensor
    tokens: int

    def merge(self, other: LayerStats) -> LayerStats:
        """Return the statistics of both token sets together."""
        if other.hessian.shape != self.hessian.shape:
            raise PruningError(
                f"cannot merge statistics of shapes {tuple(self.hessian.shape)} and "
                f"{tuple(other.hessian.shape)}: they belong to different layers"
            )
        return LayerStats(hessian=self.hessian + other.hessian, tokens=self.tokens + other.tokens)


def collect_layer_stats(
    model: nn.Module,
    windows: torch.Tensor,
    layer_names: Sequence[str],
    *,
    batch_size: int = 8,
) -> dict[str, LayerStats]:
    """Run ``model`` once over ``windows`` and return the input statistics of each named Linear.

    ``windows`` is a LongTensor ``[count, length]`` of token ids; each Linear receives
    ``count * length`` input vectors. The hooks are removed when the pass ends, also on error.
    """
    if windows.dim() != 2 or windows.numel() == 0:
        raise PruningError(
            f"calibration windows of shape {tuple(windows.shape)} are invalid: give a "
            "LongTensor [count, length] with at least one token"
        )
    if batch_size < 1:
        raise PruningError(f"batch_size={batch_size} is invalid: give at least 1")
    modules = dict(model.named_modules())
    layers: dict[str, nn.Linear] = {}
    for name in layer_names:
        module = modules.get(name)
        if module is None:
            raise PruningError(f"layer {name!r} not found in the model: check the layer name")
        if not isinstance(module, nn.Linear):
            raise PruningError(
                f"layer {name!r} is a {type(module).__name__}, not a Linear: only Linear "
                "layers are pruned"
            )
        layers[name] = module

    hessians = {
        name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
        for name, m in layers.items()
    }
    tokens = dict.fromkeys(layers, 0)

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            hessians[name].addmm_(x.T, x)
            tokens[name] += x.shape[0]

        return hook

    def make_time_step_hook(name: str, width: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = output.detach()[..., :width].reshape(-1, width).to(torch.float64)
            hessians[name].addmm_(x.T, x)
            tokens[name] += x.shape[0]

        return hook

    handles = []
    for name, layer in layers.items():
        source = _time_step_source(modules, name, layer)
        if source is None:
            handles.append(layer.register_forward_pre_hook(make_hook(name)))
        else:
            hook = make_time_step_hook(name, layer.in_features)
            handles.append(source.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[start : start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    stats: dict[str, LayerStats] = {}
    for name in layers:
        if not torch.isfinite(hessians[name]).all():
            raise PruningError(
                f"calibration inputs of layer {name!r} contain NaN or inf: the dense model "
                "overflows on this text"
            )
        if tokens[name] == 0:
            raise PruningError(
                f"layer {name!r} received no input during the calibration pass: it is not "
                "used by the model's forward"
            )
        # Rounding in addmm_ leaves the sum slightly asymmetric; Cholesky expects symmetry.
        hessian = (hessians[name] + hessians[name].T) / 2
        stats[name] = LayerStats(hessian=hessian, tokens=tokens[name])
    logger.info(
        "collected calibration statistics of %d layers over %d tokens",
        len(stats),
        windows.numel(),
    )
    return stats


def _time_step_source(modules: dict[str, nn.Module], name: str, layer: nn.Linear):
    """Return the Mamba ``x_proj`` whose output feeds ``dt_proj`` ``name``, or None."""
    parent_name, _, leaf = name.rpartition(".")
    if leaf != "dt_proj":
        return None
    source = modules.get(f"{parent_name}.x_proj" if parent_name else "x_proj")
    if isinstance(source, nn.Linear) and source.out_features >= layer.in_features:
        return source
    return None
