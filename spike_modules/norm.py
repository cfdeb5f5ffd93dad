"""SpikeNorm: LayerNorm / RMSNorm in the rate domain (DESIGN.md section 1).

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
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .temporal import held_op, rate_op

# Norm types a SpikeNorm may wrap. Each normalises over the last dimension only, so it acts on
# every row (token, time step) alone, which the rate-domain schedules require.
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, LlamaRMSNorm)


class SpikeNorm(nn.Module):
    """A norm over the last dimension that takes part in the sequential simulation.

    Args:
        norm: an ``nn.LayerNorm`` over the last dimension or a ``LlamaRMSNorm``.
        causal: in the simulation, emit per-step differences of ``f(running mean)`` (True) or
            hold ``f(mean over T)`` at every step (False).

    Raises:
        ValueError: ``norm`` is not a supported type, or a LayerNorm over more than one dimension.
    """

    def __init__(self, norm: nn.Module, causal: bool = True):
        super().__init__()
        if not isinstance(norm, NORM_TYPES):
            names = ", ".join(t.__name__ for t in NORM_TYPES)
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
