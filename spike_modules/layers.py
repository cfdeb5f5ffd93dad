"""Spiking linear layers: a DA-QCFS site in front of an unchanged linear layer."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .site import DAQCFSSite


def in_features(linear: nn.Module) -> int:
    """Input width of a linear layer. GPT-2's ``Conv1D`` stores its weight transposed,
    ``[in, out]``, so its input width is ``weight.shape[0]``, not ``shape[1]``."""
    if isinstance(linear, nn.Linear):
        return linear.in_features
    if isinstance(linear, Conv1D):
        return linear.weight.shape[0]
    raise TypeError(f"not a supported linear layer: {type(linear).__name__} (supported: nn.Linear, Conv1D)")


def _version(x: torch.Tensor) -> int | None:
    """In-place change counter; inference-mode tensors have none (identity must do)."""
    return None if x.is_inference() else x._version


class SharedInput:
    """One site feeding several linear layers that read the same tensor (q/k/v, gate/up).

    The first reader runs the site; the others get its output for the same input tensor.
    A plain object, not a module: the site is registered once, in the first reader.
    """

    def __init__(self, site: DAQCFSSite, readers: int):
        self.site, self.readers = site, readers
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._left = 0
        self._version = -1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        version = _version(x)
        if self._left and x is self._x and version == self._version:
            y, self._left = self._y, self._left - 1
            if not self._left:
                self._x = self._y = None  # do not keep activations alive past the last reader
            return y
        y = self.site(x)
        self._x, self._y, self._version, self._left = x, y, version, self.readers - 1
        if not self._left:
            self._x = self._y = None
        return y


class SpikeLinear(nn.Module):
    """``linear(site(x))``: the weights are the original module's, untouched (no copy, no transpose).

    Args:
        linear: ``nn.Linear`` or ``transformers.pytorch_utils.Conv1D``.
        shared: the site (through :class:`SharedInput`) this layer reads from.
        owner: whether this layer registers the site as its submodule ``site``.
    """

    def __init__(self, linear: nn.Module, shared: SharedInput, owner: bool):
        super().__init__()
        self.linear = linear
        self._shared = shared
        if owner:
            self.site = shared.site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self._shared(x))

    def extra_repr(self) -> str:
        return f"site={self._shared.site.name!r}"
