"""What a linear layer is, in one place: ``nn.Linear`` (weight ``[out, in]``) and GPT-2's ``Conv1D``,
which computes ``x @ W + b`` with ``W`` stored ``[in, out]``. Every part of STAC that reads a
layer's shape or float weight asks here, so the transposition is written once.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

FLOAT_LINEARS = (nn.Linear, Conv1D)


def _unsupported(linear: nn.Module) -> TypeError:
    return TypeError(f"not a supported linear layer: {type(linear).__name__} (supported: nn.Linear, Conv1D)")


def float_weight(linear: nn.Module) -> torch.Tensor:
    """The weight of a float linear layer as ``[out, in]`` (a view; ``Conv1D``'s is transposed).

    Raises:
        TypeError: neither ``nn.Linear`` nor ``Conv1D``.
    """
    if isinstance(linear, Conv1D):
        return linear.weight.T
    if isinstance(linear, nn.Linear):
        return linear.weight
    raise _unsupported(linear)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like leaf layer, else None.

    ``Conv1D`` is read from its ``[in, out]`` weight; other linear layers (8-bit ones included)
    are recognised by integer ``in_features``/``out_features`` attributes.
    """
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    i, o = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(i, int) and isinstance(o, int) and not isinstance(i, bool):
        return i, o
    return None


def in_features(linear: nn.Module) -> int:
    """Input width of a float linear layer (``nn.Linear`` or ``Conv1D``).

    Raises:
        TypeError: neither ``nn.Linear`` nor ``Conv1D``.
    """
    if not isinstance(linear, FLOAT_LINEARS):
        raise _unsupported(linear)
    return linear_shape(linear)[0]
