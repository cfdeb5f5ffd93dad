"""Time in the whole-model sequential simulation: folded batches, sites, rate-domain ops.

The simulation folds time into the batch: a tensor of per-step values is ``[T*B, ...]``,
step-major (rows ``t*B .. t*B+B-1`` hold step ``t``). Linear layers act on every step at
once. A site reshapes to ``[T, B, ...]`` and runs its SpikingJelly multi-step neuron.
Every other nonlinear op ``f`` (norms, softmax, SiLU/GELU, gate*up, q.k^T, probs.V) runs in
the rate domain (docs/design.md section 2), in one of two schedules:

- causal (:func:`rate_op`): on the running mean ``A_t`` of its inputs, emitting
  ``y_t = t f(A_t) - (t-1) f(A_{t-1})``, so ``sum_{s<=t} y_s = t f(A_t)`` at every step;
- held (:func:`held_op`): ``f`` of the mean over all T steps, emitted as the same value at
  every step (not causal: it waits for the whole window, as a float op between spiking
  stages would).

Either way the time-sum of the output is ``T f(mean input)``, so for constant inputs the
simulation gives the parallel-mode values; where spike trains are not constant it does not,
and that gap is measured (``run_sequential``), never assumed.

Modules that take part carry ``stac_sim_T``: ``None`` outside the simulation (plain ``f``),
the number of steps inside it. :func:`set_simulation` sets it on every such module.
"""

from __future__ import annotations

from typing import Callable

import torch
from spikingjelly.activation_based import functional
from torch import nn

from .site import DAQCFSSite, SiteMode

SIM_ATTR = "stac_sim_T"


def unfold(x: torch.Tensor, T: int) -> torch.Tensor:
    """``[T*B, ...]`` to ``[T, B, ...]``; ``ValueError`` if the batch is not a multiple of T."""
    if x.dim() == 0 or x.shape[0] % T:
        raise ValueError(f"sequential simulation: expected a time-folded batch [T*B, ...] with T={T}, got shape "
                         f"{tuple(x.shape)}; run the model through smollm2_converter.run_sequential")
    return x.reshape(T, x.shape[0] // T, *x.shape[1:])


def apply_site(site: DAQCFSSite, x: torch.Tensor) -> torch.Tensor:
    """Run ``site`` on ``x``: as is in ann/quant/parallel mode, time-folded in sequential mode.

    In sequential mode the site's neuron state is reset first: one call simulates all T steps
    of a fresh input, so no membrane may carry over from an earlier call.
    """
    if site.mode is not SiteMode.SEQUENTIAL:
        return site(x)
    functional.reset_net(site)
    return site(unfold(x, site.T)).flatten(0, 1)


def _steps(T: int, like: torch.Tensor, dims: int) -> torch.Tensor:
    return torch.arange(1, T + 1, dtype=like.dtype, device=like.device).view(T, *([1] * (dims - 1)))


def running_mean(x: torch.Tensor, T: int) -> torch.Tensor:
    """``A_t = (1/t) sum_{s<=t} x_s`` for every step, ``[T*B, ...]`` in and out."""
    xs = unfold(x, T)
    return (xs.cumsum(0) / _steps(T, xs, xs.dim())).flatten(0, 1)


def rate_op(fn: Callable[..., torch.Tensor], T: int, *xs: torch.Tensor) -> torch.Tensor:
    """Causal rate-domain op: per-step differences ``t f(A_t) - (t-1) f(A_{t-1})``.

    ``fn`` takes the running means of ``xs`` (time-folded, so it sees a batch of ``T*B``) and
    must act on each batch row alone (no mixing across the batch).
    """
    F = unfold(fn(*(running_mean(x, T) for x in xs)), T)
    tF = F * _steps(T, F, F.dim())
    out = tF.clone()
    out[1:] -= tF[:-1]
    return out.flatten(0, 1)


def held_op(fn: Callable[..., torch.Tensor], T: int, *xs: torch.Tensor) -> torch.Tensor:
    """Held rate-domain op: ``f`` of the time-mean of ``xs``, emitted unchanged at every step."""
    F = fn(*(unfold(x, T).mean(0) for x in xs))
    return F.unsqueeze(0).expand(T, *F.shape).flatten(0, 1)


class RateActivation(nn.Module):
    """An elementwise activation (SiLU, GELU, ReLU, ...) that runs causally in the rate domain
    in the sequential simulation; outside it, exactly the wrapped module. The wrapped module is
    the child ``act``; it has no parameters in the supported models."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act
        self.stac_sim_T: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stac_sim_T is None:
            return self.act(x)
        return rate_op(self.act, self.stac_sim_T, x)


def temporal_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` that takes part in the simulation (carries ``stac_sim_T``)."""
    return [m for m in model.modules() if hasattr(m, SIM_ATTR)]


def set_simulation(model: nn.Module, T: int | None) -> None:
    """Tell every rate-domain op of ``model`` the number of steps (``None``: no simulation)."""
    for m in temporal_modules(model):
        setattr(m, SIM_ATTR, T)
