"""Event-driven accumulation for the sequential simulation (``run_sequential(..., sparse=True)``).

In the time-stepped simulation a spiking linear layer receives, at every step, a spike train
that is mostly zeros: ``y_t = theta * s_t`` with ``s_t`` in ``{0, +-1, ..., +-B}``. A dense
layer multiplies every weight by every input, zeros included. The event-driven form only
touches the weight rows of inputs that fired::

    out[n] = bias + sum over inputs j that spiked in row n of y[n, j] * W[:, j]

which is a sparse (CSR) times dense product, run here by ``torch.sparse.mm`` (MKL / cuSPARSE).
Its cost grows with the number of spikes; the dense product's does not. Where the two cross
depends on the machine and the layer's shape: ``bench/sparse.py`` measures it. The result
equals the dense layer's up to floating-point summation order.

Supported layers: ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored ``[in, out]``) and STAC's own
int8 layer (anything with ``weight_int8`` ``[out, in]`` and per-output ``scale``, the int8
weight upcast and the scale applied to the output). bitsandbytes and torchao layers keep
their weights in formats a sparse product cannot read and are refused.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .linear import float_weight


def sparse_supported(linear: nn.Module) -> bool:
    """Whether :func:`event_linear` can run ``linear``."""
    if hasattr(linear, "weight_int8") and hasattr(linear, "scale"):
        return True
    if isinstance(linear, Conv1D):
        return True
    return isinstance(linear, nn.Linear) and type(linear.weight) is nn.Parameter and linear.weight.is_floating_point()


def _weight_in_out(linear: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight as ``[in, out]`` (a view where possible) and the per-output scale, if any."""
    if hasattr(linear, "weight_int8"):
        return linear.weight_int8.to(dtype).t(), linear.scale.to(dtype)
    return float_weight(linear).to(dtype).t(), None


def event_linear(linear: nn.Module, spikes: torch.Tensor) -> torch.Tensor:
    """``linear(spikes)`` computed from the nonzero entries of ``spikes`` only.

    Raises:
        TypeError: ``linear`` is not a supported layer (see the module docstring).
    """
    if not sparse_supported(linear):
        raise TypeError(f"event-driven accumulation supports nn.Linear, Conv1D and STAC's int8 layers, not "
                        f"{type(linear).__name__} (bitsandbytes/torchao 8-bit layers cannot be read sparsely); "
                        "convert with --quant_backend own or none to use --use_sparse")
    weight, scale = _weight_in_out(linear, spikes.dtype)
    flat = spikes.reshape(-1, spikes.shape[-1])
    out = torch.sparse.mm(flat.to_sparse_csr(), weight)
    if scale is not None:
        out = out * scale
    if linear.bias is not None:
        out = out + linear.bias.to(out.dtype)
    return out.reshape(*spikes.shape[:-1], out.shape[-1])
