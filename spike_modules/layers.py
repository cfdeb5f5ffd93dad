"""Spiking linear layers (a DA-QCFS site in front of an unchanged linear layer) and the gated
MLP whose ``act(gate) * up`` product runs in the rate domain in the sequential simulation."""

from __future__ import annotations

import torch
from torch import nn

from .site import DAQCFSSite, SiteMode
from .row_groups import RowGroup
from .row_sparse import tensor_version
from .sparse import event_linear, sparse_supported
from .temporal import apply_site, rate_op


class SharedInput:
    """One site feeding several linear layers that read the same tensor (q/k/v, gate/up).

    The first reader runs the site; the others get its output for the same input tensor.
    A plain object, not a module: the site is registered once, in the first reader.
    """

    def __init__(self, site: DAQCFSSite, readers: int):
        self.site, self.readers = site, readers
        self.rows = RowGroup()  # the readers (SpikeLinear), read by rows together while decoding
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._left = 0
        self._version = -1

    def __call__(self, x: torch.Tensor, lean: tuple | None = None) -> torch.Tensor:
        """The site's output for ``x`` (``lean``: the site's :meth:`~DAQCFSSite.lean` parameters, generation's
        path without the checks)."""
        version = tensor_version(x)
        if self._left and x is self._x and version == self._version:
            y, self._left = self._y, self._left - 1
            if not self._left:
                self._x = self._y = None  # do not keep activations alive past the last reader
            return y
        y = apply_site(self.site, x) if lean is None else self.site.lean_values(x, lean)
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

    ``sparse`` (set by ``run_sequential(..., sparse=True)``): while the site is in sequential
    mode the layer accumulates only the spikes that fired (``spike_modules.sparse``).

    ``row_sparse`` (default on, :func:`set_row_sparse`): while the site is in parallel mode, a call
    of a few tokens (decoding) reads only the weight rows of the channels whose decoded count is
    nonzero (``spike_modules.row_sparse.row_linear``), the event-driven layer's memory traffic; the
    narrow layers behind one site are read in one kernel call (``spike_modules.row_groups``). The
    result equals the dense product up to float summation order. Layers that cannot be read by rows
    (bitsandbytes, torchao), prefills and tensors that need gradients run the dense product.
    """

    def __init__(self, linear: nn.Module, shared: SharedInput, owner: bool):
        super().__init__()
        self.linear = linear
        self._shared = shared
        shared.rows.members.append(self)
        if owner:
            self.site = shared.site
        self.sparse = False
        self.row_sparse = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self._shared
        site = shared.site
        if self.row_sparse:  # generation (frozen sites, deployed): the site's lean path, the rows read as planned
            lean = site.lean()
            if lean is not None and x.dim() and x.shape[-1] == site.num_channels:
                return shared.rows.product(self, shared(x, lean), token=lean)
        y = shared(x)
        mode = site.mode
        if mode is SiteMode.PARALLEL and self.row_sparse:
            return shared.rows.product(self, y)
        if self.sparse and mode is SiteMode.SEQUENTIAL:
            return event_linear(self.linear, y)
        return self.linear(y)

    def extra_repr(self) -> str:
        return f"site={self._shared.site.name!r}"


class SpikeGatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` (Llama's MLP) whose elementwise part ``act(g) * u`` runs
    causally in the rate domain in the sequential simulation; outside it, exactly the original.

    The children keep the original names (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``),
    so the parameter names do not change. ``act_fn`` must not be a ``RateActivation`` itself:
    the product and the activation form one rate-domain op.
    """

    def __init__(self, mlp: nn.Module):
        super().__init__()
        missing = [n for n in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(mlp, n)]
        if missing:
            raise ValueError(f"SpikeGatedMLP needs a gated MLP with gate_proj, up_proj, down_proj and act_fn; "
                             f"{type(mlp).__name__} lacks {missing}")
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.stac_sim_T: int | None = None

    def _gated(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.act_fn(g) * u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        h = self._gated(g, u) if self.stac_sim_T is None else rate_op(self._gated, self.stac_sim_T, g, u)
        return self.down_proj(h)


def set_row_sparse(model: nn.Module, on: bool) -> None:
    """Whether the spiking linear layers of ``model`` read only the rows of fired channels in parallel
    mode (:class:`SpikeLinear` ``row_sparse``); off, they run the dense product (same values up to
    float summation order)."""
    for m in model.modules():
        if isinstance(m, SpikeLinear):
            m.row_sparse = bool(on)


def unsupported_layers(model: nn.Module) -> list[str]:
    """Qualified names of the spiking linear layers of ``model`` that :func:`event_linear` cannot run."""
    return [name for name, m in model.named_modules() if isinstance(m, SpikeLinear) and not sparse_supported(m.linear)]
