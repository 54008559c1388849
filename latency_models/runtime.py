"""Swapping a model's Linears for Cn4 runtime layers that run the numba kernels.

:func:`swap_linears` replaces the Linears named in a level map with :class:`Cn4Linear` modules
in place, so a loaded Hugging Face Mamba or Mamba2 model runs its projections through packed Cn4
storage (level 0 through the dense kernel of the same build). The weights must already meet
their levels: pruning happens in :mod:`search.cn4`, and packing a weight with too few zeros
raises PruningError. :func:`restore_linears` puts the original Linears back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from latency_models.kernels import PackedCn4, cn4_matmul, cn4_matvec, pack_cn4
from search.errors import PruningError
from search.models import check_level_map, get_module

logger = logging.getLogger(__name__)


class Cn4Linear(nn.Module):
    """A Linear that stores its weight packed at a Cn4 level and runs the numba kernels.

    Inference only: the output is computed in float32 outside autograd, so no gradient reaches
    the input or the weight. One token (all leading dimensions multiplying to 1) runs the decode
    GEMV, more tokens the prefill GEMM. The output has the input's dtype.
    """

    def __init__(self, linear: nn.Linear, level: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.level = level
        self.packed: PackedCn4 = pack_cn4(linear.weight, level, bias=linear.bias)
        # Hugging Face Mamba reads ``dt_proj.bias`` directly, so the bias stays a tensor; it
        # shares memory with the packed copy the kernels read.
        bias = None if self.packed.bias is None else torch.from_numpy(self.packed.bias)
        self.register_buffer("bias", bias, persistent=False)
        self._dense_weight: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The dense float32 weight [out, in], unpacked on first access and then kept.

        Hugging Face Mamba 5.x multiplies by ``dt_proj.weight`` itself instead of calling the
        module, so that product runs in PyTorch on this dense copy, not in the Cn4 kernels.
        """
        if self._dense_weight is None:
            self._dense_weight = torch.from_numpy(self.packed.unpack())
        return self._dense_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has {x.shape[-1]} features in its last dimension, expected "
                f"in_features={self.in_features}"
            )
        leading = x.shape[:-1]
        tokens = x.detach().reshape(-1, self.in_features).to(device="cpu", dtype=torch.float32)
        array = tokens.numpy()
        if array.shape[0] == 1:
            result = cn4_matvec(self.packed, array[0]).reshape(1, self.out_features)
        else:
            result = cn4_matmul(self.packed, array)
        output = torch.from_numpy(result).reshape(*leading, self.out_features)
        return output.to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"level={self.level} ({self.level} zeros / {4 - self.level} kept), "
            f"bias={self.bias is not None}"
        )


def swap_linears(model: nn.Module, level_map: Mapping[str, int]) -> dict[str, nn.Linear]:
    """Replace each Linear named in ``level_map`` with a Cn4Linear at its level, in place.

    Every layer is packed before any is replaced, so a PruningError (an unknown or ineligible
    name, an invalid level, a weight with too few zeros, a layer already swapped) leaves the
    model unchanged. Returns the replaced Linears by name, for :func:`restore_linears`.
    """
    for name in level_map:
        if isinstance(get_module(model, name), Cn4Linear):
            raise PruningError(
                f"layer {name!r} is a Cn4Linear: it was swapped already, so restore it with "
                f"restore_linears first"
            )
    levels = check_level_map(model, level_map)
    replacements: dict[str, Cn4Linear] = {}
    originals: dict[str, nn.Linear] = {}
    for name, level in levels.items():
        module = get_module(model, name)
        try:
            replacements[name] = Cn4Linear(module, level)
        except PruningError as exc:
            raise PruningError(f"layer {name!r} cannot run at level {level}: {exc}") from exc
        originals[name] = module

    for name, replacement in replacements.items():
        _set_module(model, name, replacement)
    logger.info(
        "swapped %d Linears for Cn4 kernels (levels: %s)",
        len(replacements),
        _count_levels(levels),
    )
    return originals


def restore_linears(model: nn.Module, replaced: Mapping[str, nn.Linear]) -> None:
    """Put back the Linears that :func:`swap_linears` returned, undoing the swap."""
    for name, linear in replaced.items():
        current = get_module(model, name)
        if not isinstance(current, Cn4Linear):
            raise PruningError(
                f"layer {name!r} is a {type(current).__name__}, not a Cn4Linear: it was not "
                f"swapped, or was restored already"
            )
        _set_module(model, name, linear)
    logger.info("restored %d Linears", len(replaced))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)


def _count_levels(levels: Mapping[str, int]) -> dict[int, int]:
    counts = np.bincount(np.fromiter(levels.values(), dtype=np.int64), minlength=4)
    return {level: int(count) for level, count in enumerate(counts) if count}
