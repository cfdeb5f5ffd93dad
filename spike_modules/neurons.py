"""Spiking neurons: sequential (SpikingJelly) and parallel (closed form).

Per-channel thresholds: SpikingJelly's neurons take one scalar threshold, so
every neuron here integrates the normalised input ``u = x / theta`` against a
unit threshold and scales its spikes back by ``theta``. With a soft reset this
is the same dynamics as integrating ``x`` against ``theta``.
"""

from __future__ import annotations

import torch
from spikingjelly.activation_based import surrogate
from spikingjelly.activation_based.neuron import IFNode, STBIFNode

from .neuron_registry import register_neuron
from .quantizer import (as_burst, as_threshold, capped_levels, check_channels, check_coding, check_init_mem,
                        check_timesteps, coding_levels, decode, signed_digits, spike_count, weighted_digit_table,
                        weighted_spikes)


PENDING_LIMIT = 1 << 16  # counts a parallel neuron keeps before reducing them to its statistics


class SpikeStats:
    """Running spike statistics of one neuron, kept apart from its membrane state.

    ``functional.reset_net`` clears membranes between samples; statistics keep
    accumulating until :meth:`reset_stats`. A parallel neuron defers its reductions: it keeps
    the count tensors of its calls (up to ``PENDING_LIMIT`` values) and reduces them in one go
    when a statistic is read, so decoding a token costs a list append per site, not four
    reductions. Sequential neurons record at once.
    """

    def _init_stats(self) -> None:
        # plain attributes written straight into __dict__: nn.Module.__setattr__ would cost more than
        # the site's own arithmetic when decoding one token
        self.__dict__.update(_spikes=0.0, neuron_steps_total=0, _peak=0.0, _inputs=0, _at_cap=0, _active=0,
                             _pending=[], _pending_numel=0, _pending_hi=None)

    def _record(self, n_spikes: torch.Tensor, numel: int, T: int, peak: torch.Tensor | None = None) -> None:
        """``peak``: the most spikes one neuron fired for one input over its T steps, in this call."""
        d = self.__dict__
        d["_spikes"] += float(n_spikes)
        d["neuron_steps_total"] += numel * T
        if peak is not None:
            d["_peak"] = max(d["_peak"], float(peak))

    def _defer_counts(self, c: torch.Tensor, hi: float | torch.Tensor) -> None:
        """Keep the counts ``c`` (not to be changed afterwards) with their cap ``hi`` for :meth:`_flush`."""
        d = self.__dict__
        n = c.numel()
        d["neuron_steps_total"] += n * self.T
        if n == 0:
            return
        last = d["_pending_hi"]
        if d["_pending"] and last is not hi and not (isinstance(hi, float) and hi == last):
            self._flush()
        d["_pending_hi"] = hi
        d["_pending"].append(c)
        d["_pending_numel"] += n
        if d["_pending_numel"] >= PENDING_LIMIT:
            self._flush()

    def _flush(self) -> None:
        d = self.__dict__
        pending, hi = d["_pending"], d["_pending_hi"]
        if not pending:
            return
        per_channel = isinstance(hi, torch.Tensor) and hi.dim() == 1
        flat = [p.reshape(-1, hi.numel()) if per_channel else p.reshape(-1) for p in pending]
        a = (flat[0] if len(flat) == 1 else torch.cat(flat)).abs()
        spikes, most, active, at_cap = self._reduce(a, hi)
        d["_spikes"] += spikes
        d["_peak"] = max(d["_peak"], most)
        d["_inputs"] += a.numel()
        d["_active"] += active
        d["_at_cap"] += at_cap
        d.update(_pending=[], _pending_numel=0, _pending_hi=None)

    def _reduce(self, a: torch.Tensor, hi: float | torch.Tensor) -> tuple[float, float, int, int]:
        """``(spikes, most spikes for one input, inputs with a spike, inputs at the cap)`` of the count
        magnitudes ``a`` capped at ``hi``: one spike per count unit (rate coding)."""
        peak = float(a.max())
        # only counts at the cap can be at the cap: skip that reduction when none reaches it
        at_cap = int(torch.count_nonzero(a >= hi)) if not isinstance(hi, float) or peak >= hi else 0
        return float(a.sum(dtype=torch.float64)), peak, int(torch.count_nonzero(a)), at_cap

    @property
    def spikes_total(self) -> float:
        """Spikes (|signed| spikes) since the last :meth:`reset_stats`."""
        self._flush()
        return self.__dict__["_spikes"]

    @property
    def peak_spikes(self) -> float:
        """The most spikes one neuron fired for one input over its T steps."""
        self._flush()
        return self.__dict__["_peak"]

    @property
    def at_cap_share(self) -> float:
        """Share of (neuron, input) counts at the cap (clipped, or exactly at it); NaN if not tracked."""
        self._flush()
        d = self.__dict__
        return d["_at_cap"] / d["_inputs"] if d["_inputs"] else float("nan")

    @property
    def active_share(self) -> float:
        """Share of (neuron, input) pairs with at least one spike (NaN if not tracked): an
        event-driven layer reads the weight row of such an input, and no other."""
        self._flush()
        d = self.__dict__
        return d["_active"] / d["_inputs"] if d["_inputs"] else float("nan")

    @property
    def spike_rate(self) -> float:
        """Spikes per neuron per timestep since the last :meth:`reset_stats` (NaN before any call)."""
        if self.neuron_steps_total == 0:
            return float("nan")
        return self.spikes_total / self.neuron_steps_total

    def reset_stats(self) -> None:
        self._init_stats()


def _check_seq(x_seq: torch.Tensor, T: int, who: str) -> None:
    if x_seq.dim() < 2 or x_seq.shape[0] != T:
        raise ValueError(
            f"{who} is multi-step: expected input shaped [T={T}, ..., H], got {tuple(x_seq.shape)}; "
            "repeat a constant input with x.expand(T, *x.shape)"
        )


@register_neuron(coding="rate", signed=False)
class IFNeuron(IFNode, SpikeStats):
    r"""Sequential integrate-and-fire neuron, multi-step, on SpikingJelly's ``IFNode``.

    Update (soft reset, per channel threshold :math:`\theta`, :math:`V[0]=init\_mem\cdot\theta`):
        :math:`H[t] = V[t-1] + X[t]`, :math:`S[t] = \Theta(H[t]-\theta)`, :math:`V[t] = H[t] - \theta S[t]`.

    Args:
        T: timesteps expected in the leading dimension of the input.
        th: float or per-channel tensor ``[H]``.
        init_mem: initial membrane as a fraction of ``th``.

    Called on ``[T, ..., H]`` it returns spikes of the same shape with values in ``{0, th}``.
    Clear the membrane with ``spikingjelly.activation_based.functional.reset_net``.
    """

    def __init__(self, T: int, th: float | torch.Tensor = 1.0, init_mem: float = 0.5,
                 surrogate_function: surrogate.SurrogateFunctionBase | None = None):
        super().__init__(v_threshold=1.0, v_reset=None, step_mode="m",
                         surrogate_function=surrogate_function or surrogate.Sigmoid())
        self.T = check_timesteps(T)
        self.init_mem = check_init_mem(init_mem)
        self.register_buffer("th", as_threshold(th))
        self.set_reset_value("v", self.init_mem)
        self.v = self.init_mem
        self._init_stats()

    def forward(self, x_seq: torch.Tensor, th: torch.Tensor | None = None) -> torch.Tensor:
        """Spikes ``[T, ..., H]``; ``th`` overrides the stored threshold (a site passes its own)."""
        th = self.th if th is None else th
        _check_seq(x_seq, self.T, "IFNeuron")
        check_channels(x_seq, th, "IFNeuron")
        spikes = super().multi_step_forward(x_seq / th)
        self._record(spikes.detach().sum(), spikes[0].numel(), self.T, spikes.detach().sum(0).max())
        return spikes * th

    def extra_repr(self) -> str:
        return f"T={self.T}, channels={self.th.numel()}, init_mem={self.init_mem}"


@register_neuron(coding="rate", signed=True)
class SignedIFNeuron(STBIFNode, SpikeStats):
    r"""Sequential signed IF neuron with a spike-count tracer (ST-BIF), on SpikingJelly's ``STBIFNode``.

    Update (normalised membrane :math:`q = V/\theta`, tracer :math:`A` of net spikes so far):
        :math:`q \leftarrow q + X[t]/\theta`;
        :math:`S[t] = +1` if :math:`q \ge 1` and :math:`A < T`; :math:`-1` if :math:`q < 0` and :math:`A > -T`;
        :math:`q \leftarrow q - S[t]`, :math:`A \leftarrow A + S[t]`. Output :math:`\theta S[t]`.

    For constant input the tracer ends at ``clamp(floor(T x/theta + init_mem), -T, T)``.
    Inference only (SpikingJelly's ST-BIF has no backward).
    """

    def __init__(self, T: int, th: float | torch.Tensor = 1.0, init_mem: float = 0.5):
        T = check_timesteps(T)
        super().__init__(1.0, level=2 * T + 1, sym=True, pos_max=float(T), neg_min=-float(T), step_mode="m")
        self._T = T
        self.init_mem = check_init_mem(init_mem)
        self.register_buffer("th", as_threshold(th))
        self._init_stats()

    @property
    def T(self) -> int:
        return self._T

    @T.setter
    def T(self, T: int) -> None:
        self._T = check_timesteps(T)
        self.pos_max.fill_(float(T))  # the tracer bounds follow T
        self.neg_min.fill_(-float(T))

    def materialize_states(self, inputs, states, step_mode):
        q, acc_q, cur = super().materialize_states(inputs, states, step_mode)
        if states[0] is None or states[0].shape != q.shape:
            q = torch.full_like(q, self.init_mem)  # STBIFNode starts at 0.5; honour init_mem
        return q, acc_q, cur

    def forward(self, x_seq: torch.Tensor, th: torch.Tensor | None = None) -> torch.Tensor:
        """Signed spikes ``[T, ..., H]``; ``th`` overrides the stored threshold."""
        th = self.th if th is None else th
        _check_seq(x_seq, self.T, "SignedIFNeuron")
        check_channels(x_seq, th, "SignedIFNeuron")
        # ST-BIF has no backward in SpikingJelly; this neuron is for inference
        signs = super().multi_step_forward((x_seq / th).detach())
        self._record(signs.detach().abs().sum(), signs[0].numel(), self.T, signs.detach().abs().sum(0).max())
        return signs * th

    def extra_repr(self) -> str:
        return f"T={self.T}, channels={self.th.numel()}, init_mem={self.init_mem}"


class ParaInfNeuron(torch.nn.Module, SpikeStats):
    r"""Parallel IF neuron: all T steps of constant input in closed form, one pass.

    Count after :math:`t` steps: :math:`c_t = \mathrm{clamp}(\lfloor t x/\theta + init\_mem \rfloor, lo\cdot B t, B t)`,
    spike at step :math:`t`: :math:`s_t = c_t - c_{t-1}` (``lo`` = -1 if ``signed`` else 0; ``B`` the
    burst cap, 1 by default). Identical counts to :class:`IFNeuron` / :class:`SignedIFNeuron`
    (B = 1) or :class:`BurstIFNeuron` fed ``x`` for T steps.

    Called on ``[..., H]`` it returns the decoded value :math:`\theta c_T / T` (mean of its spikes).
    With ``keep_counts`` (default) ``last_counts`` keeps the spike counts of the last call; a
    site turns it off, as it costs a copy per call and holds the counts of every site.

    ``coding='weighted'``: the closed form of :class:`WeightedIFNeuron`. The count is
    :math:`n = \mathrm{clamp}(\lfloor L x/\theta + init\_mem \rfloor, lo\cdot B L, B L)` with
    :math:`L = 2^T - 1` levels, decoded :math:`\theta n / L`; its spikes are the signed digits of
    :math:`n` (:func:`~spike_modules.quantizer.weighted_spikes`), and those are what the
    statistics count.
    """

    def __init__(self, T: int, th: float | torch.Tensor = 1.0, init_mem: float = 0.5, signed: bool = False,
                 burst: float | torch.Tensor = 1.0, coding: str = "rate"):
        super().__init__()
        self.coding = check_coding(coding)
        self.T = check_timesteps(T)
        coding_levels(self.T, coding)
        self.init_mem = check_init_mem(init_mem)
        self.signed = bool(signed)
        self.register_buffer("th", as_threshold(th))
        self.register_buffer("burst", as_burst(burst))
        self.keep_counts = True
        self.last_counts: torch.Tensor | None = None
        self.max_levels: int | None = None  # weighted coding: a cap below 2**T - 1 (set by its site)
        self._init_stats()

    def counts(self, x: torch.Tensor, th: torch.Tensor | None = None,
               burst: torch.Tensor | None = None) -> torch.Tensor:
        """Spike counts ``c_T`` (float tensor, same shape as ``x``); negative for signed spikes."""
        th = self.th if th is None else th
        burst = self.burst if burst is None else burst
        check_channels(x, th, "ParaInfNeuron")
        return spike_count(x / th, self.levels, self.signed, self.init_mem, burst)

    @property
    def levels(self) -> int:
        """Levels per sign: T (rate) or ``2**T - 1`` (weighted), or ``max_levels`` where that is fewer."""
        return capped_levels(self.T, self.coding, self.max_levels)

    def _reduce(self, a: torch.Tensor, hi: float | torch.Tensor) -> tuple[float, float, int, int]:
        """Weighted coding: counts within the levels are histogrammed (one pass) and priced from a
        table of every level's spikes, which also gives the inputs with a spike; the few beyond the
        levels (bursts, the only ones that can reach the cap) get their digits computed."""
        if self.coding == "rate":
            return super()._reduce(a, hi)
        L = self.levels
        big = a > L
        n_big = int(torch.count_nonzero(big))
        small = a.clamp(max=L)
        if bool(torch.isnan(small).any()):  # a NaN count: no spike figure either
            return float("nan"), float("nan"), 0, 0
        table = weighted_digit_table(self.T, a.device)[: L + 1].double()  # L below 2**T - 1 where capped
        hist = torch.bincount(small.long().flatten(), minlength=L + 1)
        hist[L] -= n_big  # the bursts, counted below
        spikes = float((hist.double() * table).sum())
        most = float(table[hist > 0].max()) if bool((hist > 0).any()) else 0.0
        active = a.numel() - int(hist[0])
        at_cap = 0
        if n_big:
            caps = hi.expand_as(a)[big] if isinstance(hi, torch.Tensor) else torch.full((n_big,), hi)
            extra = weighted_spikes(a[big], self.T, caps / L)
            spikes += float(extra.sum(dtype=torch.float64))
            most = max(most, float(extra.max()))
            at_cap = int(torch.count_nonzero(a[big] >= caps))
        elif not isinstance(hi, torch.Tensor):  # no bursts: the cap is L itself
            at_cap = int(hist[L])
        return spikes, most, active, at_cap

    def forward(self, x: torch.Tensor, th: torch.Tensor | None = None,
                burst: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded value ``th * c_T / T``; ``th`` and ``burst`` override the stored ones."""
        th = self.th if th is None else th
        burst = self.burst if burst is None else burst
        c = self.counts(x, th, burst)
        plain = burst.dim() == 0 and float(burst) == 1.0
        L = self.levels
        self.record(c, float(L) if plain else burst.to(c.dtype) * L)
        return decode(c, th, L)

    def record(self, c: torch.Tensor, hi: float | torch.Tensor) -> None:
        """Count the spikes ``c`` (counts of one call, capped at ``hi``; kept, so not to be changed
        in place afterwards) in the statistics, and in ``last_counts`` if ``keep_counts``."""
        c = c.detach()
        if self.keep_counts:
            top = hi if isinstance(hi, float) else float(hi.max())
            # int16 holds any count up to 32767 (T=4096 without bursts) at half the memory of int32
            big = top > torch.iinfo(torch.int16).max
            self.__dict__["last_counts"] = c.to(torch.int32 if big else torch.int16)  # a plain attribute
        self._defer_counts(c, hi)

    def spike_train(self, x: torch.Tensor, th: torch.Tensor | None = None,
                    burst: torch.Tensor | None = None) -> torch.Tensor:
        """All T steps at once: ``[T, ..., H]``, each the number of spikes in that step times ``th``
        (values in ``{0, th}``, or ``{-th, 0, th}`` if signed, without bursts)."""
        th = self.th if th is None else th
        burst = self.burst if burst is None else burst
        check_channels(x, th, "ParaInfNeuron")
        if self.coding == "weighted":
            return weighted_train(self.counts(x, th, burst), self.T, burst, self.levels) * th
        t = torch.arange(0, self.T + 1, dtype=x.dtype, device=x.device).view(-1, *([1] * x.dim()))
        c = spike_count((x / th).unsqueeze(0), t, self.signed, self.init_mem, burst)
        # c_0 = floor(init_mem) = 0 for init_mem in [0, 1), so the diff starts from zero spikes
        return torch.diff(c, dim=0) * th

    def extra_repr(self) -> str:
        return (f"T={self.T}, channels={self.th.numel()}, init_mem={self.init_mem}, signed={self.signed}, "
                f"max_burst={float(self.burst.max()):g}, coding={self.coding}")


def step_weights(T: int, like: torch.Tensor) -> torch.Tensor:
    """``[T, 1, ...]``: the levels ``2**(T-1-k)`` a weighted spike at step ``k`` carries, shaped to
    broadcast against digits ``[T, *like.shape]``."""
    w = torch.tensor([2.0 ** (T - 1 - k) for k in range(T)], dtype=like.dtype, device=like.device)
    return w.view(-1, *([1] * like.dim()))


def weighted_train(counts: torch.Tensor, T: int, burst: float | torch.Tensor = 1.0,
                   levels: int | None = None) -> torch.Tensor:
    """The spike train ``[T, ...]`` of ``counts`` in weighted coding, as multiples of one level each:
    step ``k`` carries ``S[k] * 2**(T-1-k) * T / L`` (``S`` the :func:`signed_digits`; ``L`` = ``levels``,
    default ``2**T - 1``), so that the mean over the T steps is ``counts / L`` (the decoded value over
    ``theta``), as a rate-coded train's mean is."""
    digits = torch.stack(signed_digits(counts, T, burst))
    return digits * step_weights(T, counts) * (T / (levels or coding_levels(T, "weighted")))
