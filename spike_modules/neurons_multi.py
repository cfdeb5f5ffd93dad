"""Sequential neurons that fire more than one spike's worth per step: bursts of up to ``B`` spikes
(rate coding) and weighted spikes (a spike at step ``k`` of T carries ``2**(T-1-k)`` levels).

Same contract as ``spike_modules.neurons``: each integrates ``u = x / theta`` against a unit
threshold and scales its spikes back by ``theta``.
"""

from __future__ import annotations

import torch
from spikingjelly.activation_based.neuron.base_node import SimpleBaseNode

from .neuron_registry import register_neuron
from .neurons import SpikeStats, _check_seq, step_weights
from .quantizer import (as_burst, as_threshold, capped_levels, check_channels, check_init_mem, check_timesteps,
                        coding_levels, signed_digits)


@register_neuron(coding="rate", bursts=True)
class BurstIFNeuron(SimpleBaseNode, SpikeStats):
    r"""Sequential IF neuron that may fire up to ``B`` spikes in one step, on SpikingJelly's ``SimpleBaseNode``.

    Update (normalised membrane :math:`q = V/\theta`, starting at ``init_mem``; tracer :math:`A`):
        :math:`q \leftarrow q + X[t]/\theta`; :math:`S[t] = \mathrm{clamp}(\lfloor q \rfloor, lo\cdot B, B)`,
        further limited so that :math:`lo\cdot B T \le A + S[t] \le B T`;
        :math:`q \leftarrow q - S[t]`, :math:`A \leftarrow A + S[t]`. Output :math:`\theta S[t]`.

    With ``B = 1`` this is the IF neuron (unsigned, ``lo = 0``) or the ST-BIF neuron (signed,
    ``lo = -1``); a per-channel ``B > 1`` lets rare large inputs through without clipping, at
    the honest cost of one spike per unit. For constant input the tracer ends at
    ``clamp(floor(T x/theta + init_mem), lo B T, B T)``, the count of :class:`ParaInfNeuron`.

    ``catch_up=True`` lifts the per-step cap: a step may fire every spike the tracer still allows
    (``lo B T - A <= S[t] <= B T - A``), and an unsigned neuron may fire negative spikes while
    its tracer stays non-negative (ST-BIF with a tracer floor of 0). Behind other spiking
    layers the inputs vary over the steps; a neuron that may fire at most ``B`` spikes a step
    cannot emit a late surge before the window ends, or take back spikes fired too early. With
    catch-up the tracer after step ``t`` is ``clamp(floor(sum of inputs so far / theta +
    init_mem), ...)``, so the count over the window depends on the summed input only, as the
    parallel neuron's does. For constant input it fires the same count as without catch-up.
    Every spike is counted, bursts included.
    Inference only (the fire function has no surrogate gradient).
    """

    def __init__(self, T: int, th: float | torch.Tensor = 1.0, init_mem: float = 0.5, signed: bool = False,
                 burst: float | torch.Tensor = 1.0, catch_up: bool = False):
        super().__init__(v_threshold=1.0, v_reset=None, step_mode="m")
        self.T = check_timesteps(T)
        self.init_mem = check_init_mem(init_mem)
        self.signed = bool(signed)
        self.catch_up = bool(catch_up)
        self.register_buffer("th", as_threshold(th))
        self.register_buffer("burst", as_burst(burst))
        self.register_memory("acc", 0.0)
        self.v = self.init_mem
        self.set_reset_value("v", self.init_mem)
        self._init_stats()
        self._b: torch.Tensor | None = None

    def neuronal_charge(self, x: torch.Tensor) -> None:
        if not isinstance(self.v, torch.Tensor):
            self.v = torch.full_like(x, self.v)
            self.acc = torch.zeros_like(x)
        self.v = self.v + x

    def neuronal_fire(self) -> torch.Tensor:
        b, total = self._b, self._b * self.T
        if self.catch_up:
            hi = total - self.acc
            lo = -total - self.acc if self.signed else -self.acc
        else:
            hi = torch.minimum(b, total - self.acc)
            lo = torch.maximum(-b, -total - self.acc) if self.signed else torch.zeros_like(hi)
        return torch.minimum(torch.maximum(torch.floor(self.v), lo), hi)

    def neuronal_reset(self, spike: torch.Tensor) -> None:
        self.v = self.v - spike
        self.acc = self.acc + spike

    def forward(self, x_seq: torch.Tensor, th: torch.Tensor | None = None,
                burst: torch.Tensor | None = None) -> torch.Tensor:
        """Spikes per step times ``th``, ``[T, ..., H]``; ``th`` and ``burst`` override the stored ones."""
        th = self.th if th is None else th
        self._b = (self.burst if burst is None else burst).to(x_seq.dtype)
        _check_seq(x_seq, self.T, "BurstIFNeuron")
        check_channels(x_seq, th, "BurstIFNeuron")
        with torch.no_grad():
            spikes = super().multi_step_forward((x_seq / th).detach())
        self._record(spikes.abs().sum(), spikes[0].numel(), self.T, spikes.abs().sum(0).max())
        return spikes * th

    def extra_repr(self) -> str:
        return (f"T={self.T}, channels={self.th.numel()}, init_mem={self.init_mem}, signed={self.signed}, "
                f"max_burst={float(self.burst.max()):g}, catch_up={self.catch_up}")


@register_neuron(coding="weighted", bursts=True)
class WeightedIFNeuron(SimpleBaseNode, SpikeStats):
    r"""Phase-coded (weighted-spike) integrate-and-fire neuron with signed spikes, multi-step, on
    SpikingJelly's ``SimpleBaseNode``.

    A spike at step :math:`k` of the window weighs :math:`w_k = 2^{T-1-k}` levels, so T steps
    reach :math:`L = 2^T - 1` levels per sign where rate coding reaches T, and a level costs
    the nonzero digits of a signed-digit form (about a third of its binary digits), not one
    spike per level. ``max_levels`` (set by its site) caps :math:`L` below :math:`2^T - 1`: the counts
    stop there, and the T steps still fire them.

    Update (normalised membrane :math:`q`, one level = 1; per-channel burst cap :math:`B`):
        charge, over the whole input window (a phase-coded neuron fires after its input
        window, so each spiking layer adds one window of latency):
        :math:`q = L \cdot \frac{1}{T}\sum_t X[t]/\theta + init\_mem`, :math:`r = \lfloor q \rfloor`
        (:math:`\max(r, 0)` for an unsigned neuron);
        a dead zone ``dead`` (per channel, from the site) silences the window: :math:`r = 0` where
        :math:`|r| <` ``dead``;
        fire, :math:`k = 0 .. T-1`: :math:`n_k = \lceil (|r| - B (w_k - 1)) / w_k \rceil`;
        :math:`|S[k]| = \min(B, n_k)` if :math:`n_k > 0`, else 1 if :math:`|r| > \lfloor 2 w_k / 3 \rfloor`,
        else 0; :math:`S[k]` takes the sign of :math:`r`; :math:`r \leftarrow r - w_k S[k]`.
        Output :math:`\theta\, S[k]\, w_k T / L`, whose mean over the window is :math:`\theta n / L`.

    The digits sum to :math:`n = \mathrm{clamp}(\lfloor q \rfloor, lo\cdot B L, B L)` (``lo`` = -1 if
    signed, else 0), the count of :class:`ParaInfNeuron` with ``coding='weighted'``, and
    :func:`~spike_modules.quantizer.signed_digits` gives the same digits in closed form.
    An unsigned neuron's total stays >= 0, though single digits may be negative. Inference only.
    """

    def __init__(self, T: int, th: float | torch.Tensor = 1.0, init_mem: float = 0.5, signed: bool = False,
                 burst: float | torch.Tensor = 1.0):
        super().__init__(v_threshold=1.0, v_reset=None, step_mode="m")
        self.T = check_timesteps(T)
        coding_levels(self.T, "weighted")
        self.init_mem = check_init_mem(init_mem)
        self.signed = bool(signed)
        self.register_buffer("th", as_threshold(th))
        self.register_buffer("burst", as_burst(burst))
        self.dead: torch.Tensor | None = None  # dead zone in counts, set by its site: |r| below it fires nothing
        self.max_levels: int | None = None  # a cap below 2**T - 1 on the count, set by its site
        self._init_stats()

    @property
    def levels(self) -> int:
        return capped_levels(self.T, "weighted", self.max_levels)

    def multi_step_forward(self, u_seq: torch.Tensor) -> torch.Tensor:
        """Signed digits ``[T, ...]`` (spikes per step, before weighting) of the normalised input ``u_seq``."""
        r = torch.floor(u_seq.mean(0) * self.levels + self.init_mem)
        if not self.signed:
            r = r.clamp(min=0)
        if self.dead is not None:  # the whole window is integrated first, so the count is known before firing
            r = r.masked_fill(r.abs() < self.dead, 0.0)
        top = self._b * self.levels  # T digits reach B (2**T - 1); a capped neuron (max_levels) stops at B L
        digits = torch.stack(signed_digits(torch.minimum(torch.maximum(r, -top), top), self.T, self._b))
        self.v = r - (digits * step_weights(self.T, r)).sum(0)  # what the window could not fire (clamped)
        return digits

    def forward(self, x_seq: torch.Tensor, th: torch.Tensor | None = None,
                burst: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted spikes ``[T, ..., H]`` (step k: ``th * S[k] * 2**(T-1-k) * T / L``); ``th`` and
        ``burst`` override the stored ones."""
        th = self.th if th is None else th
        self._b = (self.burst if burst is None else burst).to(x_seq.dtype)
        _check_seq(x_seq, self.T, "WeightedIFNeuron")
        check_channels(x_seq, th, "WeightedIFNeuron")
        with torch.no_grad():
            digits = self.multi_step_forward((x_seq / th).detach())
        per_input = digits.abs().sum(0)
        self._record(per_input.sum(), digits[0].numel(), self.T, per_input.max())
        return digits * step_weights(self.T, digits[0]) * (self.T / self.levels) * th

    def extra_repr(self) -> str:
        return (f"T={self.T}, channels={self.th.numel()}, init_mem={self.init_mem}, signed={self.signed}, "
                f"max_burst={float(self.burst.max()):g}, coding=weighted")
