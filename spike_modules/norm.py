"""SpikeNorm: LayerNorm / RMSNorm in the rate domain (docs/design.md section 2).

Outside the sequential simulation (ann, quant, parallel) a SpikeNorm is exactly the wrapped
norm: the same module, called on the same tensor. In the simulation it computes the norm of
the accumulated input and emits it as per-step differences (``causal=True``, the default) or
as a value held over the window (``causal=False``); see ``spike_modules.temporal``.

Parameter names: the original norm is the child ``norm``, so ``...input_layernorm.weight``
becomes ``...input_layernorm.norm.weight`` (and ``.bias`` likewise), the same tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from .temporal import held_op, rate_op

# Norm types a SpikeNorm may wrap, filled by the adapters (``spike_modules.adapters.register_norm``).
# Each normalises over the last dimension only, so it acts on every row (token, time step) alone,
# which the rate-domain schedules require.
_NORM_TYPES: list[type[nn.Module]] = [nn.LayerNorm]


def allow_norm(norm_type: type[nn.Module]) -> None:
    """Let SpikeNorm wrap ``norm_type``: a norm over the last dimension only (RMSNorm variants)."""
    if not (isinstance(norm_type, type) and issubclass(norm_type, nn.Module)):
        raise TypeError(f"a norm type must be an nn.Module subclass, got {norm_type!r}")
    if norm_type not in _NORM_TYPES:
        _NORM_TYPES.append(norm_type)


def norm_types() -> tuple[type[nn.Module], ...]:
    """The norm types SpikeNorm wraps (``nn.LayerNorm`` and those the adapters registered)."""
    return tuple(_NORM_TYPES)


class SpikeNorm(nn.Module):
    """A norm over the last dimension that takes part in the sequential simulation.

    Args:
        norm: an ``nn.LayerNorm`` over the last dimension or a registered RMSNorm (:func:`norm_types`).
        causal: in the simulation, emit per-step differences of ``f(running mean)`` (True) or
            hold ``f(mean over T)`` at every step (False).

    Raises:
        ValueError: ``norm`` is not a supported type, or a LayerNorm over more than one dimension.
    """

    def __init__(self, norm: nn.Module, causal: bool = True):
        super().__init__()
        if not isinstance(norm, norm_types()):
            names = ", ".join(t.__name__ for t in norm_types())
            raise ValueError(f"SpikeNorm wraps {names}; got {type(norm).__name__}")
        if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) != 1:
            raise ValueError(f"SpikeNorm needs a LayerNorm over the last dimension only, got normalized_shape="
                             f"{tuple(norm.normalized_shape)}")
        self.norm = norm
        self.causal = bool(causal)
        self.stac_sim_T: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = self.stac_sim_T
        if T is None:
            return self.norm(x)
        return (rate_op if self.causal else held_op)(self.norm, T, x)

    def extra_repr(self) -> str:
        return f"causal={self.causal}"
