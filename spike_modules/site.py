"""DA-QCFS spiking site: where a real activation becomes spikes before a linear layer."""

from __future__ import annotations

from contextlib import contextmanager
from enum import Enum
from typing import Iterator

import torch
from torch import nn

from .neuron_registry import neuron_kind
from . import neurons_multi  # noqa: F401  (registers the burst and weighted sequential neurons)
from .neurons import ParaInfNeuron  # also registers the built-in sequential neurons
from .quantizer import (as_burst, as_threshold, capped_levels, check_channels, check_coding, check_init_mem,
                        check_max_levels, check_timesteps, coding_levels, levels)


class SiteMode(str, Enum):
    """How a site computes: ``ann`` passes through, ``quant`` is QCFS with straight-through
    gradients, ``parallel`` uses :class:`ParaInfNeuron` on ``[..., H]``, ``sequential`` runs
    SpikingJelly neurons on ``[T, ..., H]`` and returns the spike train."""

    ANN = "ann"
    QUANT = "quant"
    PARALLEL = "parallel"
    SEQUENTIAL = "sequential"


class DAQCFSSite(nn.Module):
    r"""Distribution-aware QCFS site with per-channel :math:`\theta, \psi, \phi`.

    The site maps :math:`v = \phi (x + \psi)` per channel, then quantizes to
    :math:`\theta\, \mathrm{clamp}(\lfloor T v/\theta + init\_mem \rfloor, lo\,B T, B T) / T`
    (``lo`` = -1 for a signed site; ``B`` the per-channel burst cap, 1 unless calibration
    gives a channel bursts for its rare large values). The pre-activation is one multiply-add,
    ``scale x + shift`` with ``scale = phi T/theta`` and ``shift = psi scale + init_mem`` (kept
    per parameter version), and counts decode as ``c theta/T``: ``quant`` and ``parallel`` give
    bit-identical values, with or without gradients; a neuron fed ``phi (x + psi)`` gives the same
    counts except at float rounding ties; ``sequential`` gives spike trains whose mean over T
    equals them for constant input.

    Args:
        num_channels: H, the size of the last input dimension.
        T: timesteps.
        signed: allow negative spikes (for inputs that are not post-ReLU).
        mode: a :class:`SiteMode` or its string value.
        name: the site's name in the model, used in error messages and reports.
        coding: ``rate`` (one spike per level, T levels) or ``weighted`` (spike ``k`` of the
            window weighs ``2**(T-1-k)`` levels: ``2**T - 1`` levels, a level costs the ones of
            its binary form; :class:`~spike_modules.neurons_multi.WeightedIFNeuron`). Everything
            above holds with T replaced by the coding's levels ``L``.
        max_levels: weighted coding only: quantise to at most this many levels per sign, fewer than
            the ``2**T - 1`` that T steps reach (None: all of them). A KV cache stores a k or v
            site's counts, and 127 levels fit them in int8 whatever T the other sites take.

    An attached ``observer`` (see ``calibration``) sees every input ``x`` before the mapping.
    """

    def __init__(self, num_channels: int, T: int, signed: bool = False, mode: SiteMode | str = SiteMode.ANN,
                 init_mem: float = 0.5, name: str = "", coding: str = "rate", max_levels: int | None = None):
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive integer, got {num_channels!r}")
        self.num_channels = num_channels
        self.signed = bool(signed)
        self.name = name
        self.init_mem = check_init_mem(init_mem)
        self.coding = check_coding(coding)
        self._T = check_timesteps(T)
        self._max_levels = None
        self._L = coding_levels(T, coding)
        self.theta = nn.Parameter(torch.ones(num_channels), requires_grad=False)
        self.psi = nn.Parameter(torch.zeros(num_channels), requires_grad=False)
        self.phi = nn.Parameter(torch.ones(num_channels), requires_grad=False)
        self.burst = nn.Parameter(torch.ones(num_channels), requires_grad=False)
        # dead zone (counts): a channel whose count is smaller in magnitude stays silent for the token
        self.dead = nn.Parameter(torch.zeros(num_channels), requires_grad=False)
        self._register_load_state_dict_pre_hook(_no_dead_zone_saved)
        self.parallel = ParaInfNeuron(T, 1.0, init_mem, signed=self.signed, coding=coding)
        self.parallel.keep_counts = False  # a copy per call, and the counts of every site held at once
        # the sequential neurons come from the registry (spike_modules.neuron_registry): one for
        # channels that never burst, and one that takes a burst cap where that is another class
        self._kinds = {"sequential": neuron_kind(coding, self.signed, bursts=False)}
        burst_kind = neuron_kind(coding, self.signed, bursts=True)
        if burst_kind is not self._kinds["sequential"]:
            self._kinds["sequential_burst"] = burst_kind
        for attr, kind in self._kinds.items():
            self.add_module(attr, kind.build(T, init_mem, self.signed))
        self.observer = None
        self.count_spikes = True  # parallel mode keeps spike statistics (reports, energy); off when deployed
        self.surrogate: nn.Module | None = None  # gradient of the floor in quant mode; None = straight through
        self.mode = mode
        self.max_levels = max_levels

    @property
    def T(self) -> int:
        return self._T

    @T.setter
    def T(self, T: int) -> None:
        self._L = capped_levels(T, self.coding, self._max_levels)
        self.parallel._flush()  # pending counts are priced with the T they were fired at
        self._T = self.parallel.T = T
        for attr in self._kinds:
            getattr(self, attr).T = T

    @property
    def levels(self) -> int:
        """Quantisation levels per sign: T (rate coding) or ``2**T - 1`` (weighted), or ``max_levels``
        where that is fewer."""
        return self._L

    @property
    def max_levels(self) -> int | None:
        """The cap on the levels per sign (weighted coding), None for none; see the class docstring."""
        return self._max_levels

    @max_levels.setter
    def max_levels(self, cap: int | None) -> None:
        cap = check_max_levels(cap, self.coding)
        for attr in ("parallel", *self._kinds):
            neuron = getattr(self, attr)
            if hasattr(neuron, "max_levels"):
                neuron.max_levels = cap
            elif cap is not None:
                raise ValueError(f"site {self.name!r}: its {type(neuron).__name__} takes no max_levels, so it cannot "
                                 "cap the levels")
        self._max_levels = cap
        self.T = self._T  # the levels follow

    @property
    def mode(self) -> SiteMode:
        return self._mode

    @mode.setter
    def mode(self, mode: SiteMode | str) -> None:
        try:
            self._mode = SiteMode(mode)
        except ValueError:
            allowed = ", ".join(m.value for m in SiteMode)
            raise ValueError(f"site {self.name!r}: unknown mode {mode!r}; allowed: {allowed}") from None

    def set_params(self, theta: torch.Tensor | float, psi: torch.Tensor | float = 0.0,
                   phi: torch.Tensor | float = 1.0, burst: torch.Tensor | float = 1.0,
                   dead: torch.Tensor | float = 0.0) -> None:
        """Set per-channel parameters (scalars broadcast); raises ``ValueError`` on bad shapes or values.

        ``dead``: the dead zone in counts (levels), >= 0: a channel whose count ``n`` has ``|n| < dead``
        emits no spike in the token (0 everywhere: no dead zone). Only weighted coding's neurons know
        their count before they fire, so only weighted sites take one."""
        H = self.num_channels
        theta = as_threshold(theta, f"site {self.name!r} theta")
        values = {"theta": theta, "psi": torch.as_tensor(psi, dtype=torch.float32),
                  "phi": torch.as_tensor(phi, dtype=torch.float32),
                  "burst": as_burst(burst, f"site {self.name!r} burst"),
                  "dead": torch.as_tensor(dead, dtype=torch.float32)}
        for key, v in values.items():
            if v.dim() > 1 or (v.dim() == 1 and v.numel() != H):
                raise ValueError(f"site {self.name!r}: {key} must be a scalar or have {H} channels, "
                                 f"got shape {tuple(v.shape)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"site {self.name!r}: {key} has non-finite values")
        if bool((values["phi"] <= 0).any()):
            raise ValueError(f"site {self.name!r}: phi must be > 0 (it scales the input)")
        if bool((values["dead"] < 0).any()):
            raise ValueError(f"site {self.name!r}: dead is a dead zone in counts and must be >= 0")
        if bool((values["dead"] > 0).any()) and self.coding != "weighted":
            raise ValueError(f"site {self.name!r}: a dead zone needs weighted coding (its neurons integrate the whole "
                             f"window before they fire, so they know their count); this site codes {self.coding}")
        with torch.no_grad():
            for key, v in values.items():
                getattr(self, key).copy_(v.to(self.theta.device).expand(H))

    def _mapped(self, x: torch.Tensor) -> torch.Tensor:
        return self.phi * (x + self.psi)

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scale, shift, step)``: the pre-activation is ``L v/theta + init_mem = scale x + shift``
        (``L`` the levels) and a count ``c`` decodes to ``c step``; differentiable in theta, psi and phi."""
        scale = self.phi / self.theta * self._L
        return scale, self.psi * scale + self.init_mem, self.theta / self._L

    def _fused(self) -> tuple:
        """``(scale, shift, step, lo, hi)`` for inference, kept while T, the parameter tensors and
        their values stay the same. Values are compared, not only version counters: an edit
        through ``.data`` (``theta.data.copy_(...)``, ``.fill_``) changes no version, and must
        still reach the next call (``set_params``, ``load_state_dict`` and optimiser steps do
        too). ``lo``/``hi`` bound the counts: numbers without bursts, per channel with them.
        While distillation parametrises theta or psi they are computed afresh."""
        p = self._parameters
        if "theta" not in p or "psi" not in p:
            self._keep_dead_zone(self.dead)
            return self._fused_values()
        params = (p["theta"], p["psi"], p["phi"], p["burst"], p["dead"])
        key = (self._T, self._L, *(t.data_ptr() for t in params))
        d = self.__dict__
        snap = d.get("_fused_snap")
        if d.get("_fused_key") != key or snap is None or not all(map(torch.equal, params, snap)):
            d["_fused_cache"], d["_fused_key"] = self._fused_values(), key
            d["_fused_snap"] = tuple(t.detach().clone() for t in params)
            self._keep_dead_zone(p["dead"])
        return d["_fused_cache"]

    def _keep_dead_zone(self, dead: torch.Tensor) -> None:
        """Keep a copy of the dead zone (None without one) and, for :meth:`_silence`, ``ceil(dead) - 1`` where a
        channel has one and -1 where not: a whole count ``c`` keeps its value iff ``|c|`` minus it is >= 1."""
        kept = _dead_or_none(dead)
        self.__dict__["_dead_cache"] = kept
        self.__dict__["_dead_keep"] = None if kept is None else torch.where(kept > 0, kept.ceil() - 1, -1.0)

    def _fused_values(self) -> tuple:
        with torch.no_grad():
            scale, shift, step = self._affine()
            burst = self.burst
            if bool((burst > 1).any()):
                hi = burst * self._L
                return scale, shift, step, -hi if self.signed else torch.zeros_like(hi), hi
            hi = float(self._L)
            return scale, shift, step, -hi if self.signed else 0.0, hi

    def _trains(self) -> bool:
        """Whether theta, psi or phi carry gradients (parametrised by distillation, or set to)."""
        p = self._parameters
        if "theta" not in p or "psi" not in p:
            return True
        return p["theta"].requires_grad or p["psi"].requires_grad or p["phi"].requires_grad

    def _seen(self, x: torch.Tensor) -> None:
        """Check ``x``'s channels (the message is formatted only on a mismatch) and show it to the observer."""
        if not x.dim() or x.shape[-1] != self.num_channels:
            check_channels(x, self.burst, f"site {self.name!r}")
        if self.observer is not None:
            self.observer.update(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fz = self.lean()
        if fz is not None and x.dim() and x.shape[-1] == self.num_channels:
            return self.lean_values(x, fz)
        self._seen(x)
        mode = self._mode
        if mode is SiteMode.ANN:
            return x
        if mode is SiteMode.SEQUENTIAL:
            attr = self._sequential_attr()
            neuron = getattr(self, attr)
            self._fused()
            dead = self.__dict__["_dead_cache"]
            if dead is not None or hasattr(neuron, "dead"):
                if not hasattr(neuron, "dead"):
                    raise ValueError(f"site {self.name!r}: {type(neuron).__name__} fires before it knows its count, so "
                                     "it cannot keep a dead zone; dead zones need weighted coding")
                neuron.dead = dead
            return self._kinds[attr](neuron, self._mapped(x), self.theta, self.burst)
        if torch.is_grad_enabled() and (x.requires_grad or self._trains()):
            return self._forward_grad(x)
        # inference (quant and parallel alike, so they agree bit for bit): one fused multiply-add,
        # floor and clamp in place, one multiply to decode; statistics deferred (SpikeStats)
        c, step = self._counted(x)
        return c.mul_(step) if mode is SiteMode.QUANT else c * step

    def counts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts, step)`` in parallel or quant mode, without gradients: :meth:`forward` gives
        ``counts * step`` bit for bit, and the observer and spike statistics see the call as they see
        a forward call. The KV cache stores the counts."""
        if self._mode not in (SiteMode.PARALLEL, SiteMode.QUANT):
            raise ValueError(f"site {self.name!r}: counts exist in parallel and quant mode, not {self._mode.value}")
        if torch.is_grad_enabled() and (x.requires_grad or self._trains()):
            raise ValueError(f"site {self.name!r}: counts() is for inference; the input or parameters need gradients")
        self._seen(x)
        return self._counted(x)

    def _counted(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift, step, lo, hi = self.__dict__.get("_frozen") or self._fused()
        c = self._silence(self._counts(x, scale, shift, lo, hi))
        if self._mode is SiteMode.PARALLEL and self.count_spikes:
            self.parallel.record(c, hi)
        return c, step

    @staticmethod
    def _counts(x: torch.Tensor, scale, shift, lo, hi) -> torch.Tensor:
        return torch.addcmul(shift, x, scale).floor_().clamp_(lo, hi)  # lo <= hi: min(max(c, lo), hi)

    def _silence(self, c: torch.Tensor) -> torch.Tensor:
        """``c`` with the counts inside the dead zone set to 0 (in place when ``c`` needs no gradient)."""
        dead = self.__dict__.get("_dead_cache")
        if dead is None:
            return c
        if not c.requires_grad:
            return silence_(c, self.__dict__["_dead_keep"])
        return c.masked_fill(c.detach().abs() < dead, 0.0)

    def lean(self) -> tuple | None:
        """The frozen ``(scale, shift, step, lo, hi)`` where this site takes generation's lean path (within
        :func:`frozen`, parallel mode, spike counting off, no observer, no gradients), else None."""
        fz = self.__dict__.get("_frozen")
        if (fz is None or self._mode is not SiteMode.PARALLEL or self.count_spikes or self.observer is not None
                or torch.is_grad_enabled()):
            return None
        return fz

    def lean_values(self, x: torch.Tensor, fz: tuple) -> torch.Tensor:
        """The decoded values of ``x`` (its last dimension this site's channels) from :meth:`lean`'s ``fz``:
        the inference path of :meth:`forward` without its checks, counts decoded in place (same bits)."""
        return self.lean_counts(x, fz).mul_(fz[2])

    def lean_counts(self, x: torch.Tensor, fz: tuple) -> torch.Tensor:
        """The counts :meth:`lean_values` decodes (``fz[2]`` is their step)."""
        scale, shift, _, lo, hi = fz
        return self._silence(self._counts(x, scale, shift, lo, hi))

    @torch.no_grad()
    def parallel_counts(self, x: torch.Tensor, silence: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts, step)``: the signed spike counts parallel mode gives for ``x`` (decoded value
        ``counts * step``), whatever the site's mode, without observers or spike statistics; with
        ``silence=False``, the counts before the dead zone silences the small ones."""
        scale, shift, step, lo, hi = self._fused()
        counts = self._counts(x, scale, shift, lo, hi)
        return (self._silence(counts) if silence else counts), step

    def _forward_grad(self, x: torch.Tensor) -> torch.Tensor:
        # the same operations as the inference path, on tensors that carry gradients; quant mode
        # trains through a straight-through (or surrogate) floor, parallel mode has a plain floor
        scale, shift, step = self._affine()
        quant = self._mode is SiteMode.QUANT
        c = levels(torch.addcmul(shift, x, scale), self._L, self.signed, ste=quant, burst=self._burst(),
                   surrogate=self.surrogate if quant else None)
        self._fused()
        c = self._silence(c)
        if not quant:
            hi = self._fused()[4]
            self.parallel.record(c, hi)
        return c * step

    @property
    def catch_up(self) -> bool:
        """Whether the sequential neuron may catch up: fire, in one step, every spike its count still
        allows (:class:`BurstIFNeuron` ``catch_up``); parallel mode is the same either way. A
        weighted neuron integrates its whole input window before it fires, so it has no catch-up
        (a neuron offers catch-up by having a ``catch_up`` attribute)."""
        neuron = getattr(self, "sequential_burst", None)
        return bool(getattr(neuron, "catch_up", False))

    @catch_up.setter
    def catch_up(self, on: bool) -> None:
        neuron = getattr(self, "sequential_burst", None)
        if not hasattr(neuron, "catch_up"):
            if on:
                raise ValueError(f"site {self.name!r}: the {self.coding} coding's neurons have no catch-up (weighted "
                                 "neurons fire after their whole input window); catch-up applies to rate coding only")
            return
        neuron.catch_up = bool(on)

    @property
    def bursts(self) -> bool:
        """Whether any channel may fire more than one spike per step."""
        return not isinstance(self._fused()[4], float)

    def _burst(self) -> torch.Tensor | float:
        # a number keeps the clamp cheaper when no channel bursts
        return self.burst if self.bursts else 1.0

    @property
    def spike_rate(self) -> float:
        """Spikes per neuron per step of the neuron used by the current mode (NaN for ann/quant)."""
        if self._mode is SiteMode.PARALLEL:
            return self.parallel.spike_rate
        if self._mode is SiteMode.SEQUENTIAL:
            return self._sequential_neuron().spike_rate
        return float("nan")

    def _sequential_attr(self) -> str:
        """``sequential_burst`` where one exists and a channel bursts or the site catches up."""
        if "sequential_burst" in self._kinds and (self.bursts or self.catch_up):
            return "sequential_burst"
        return "sequential"

    def _sequential_neuron(self):
        return getattr(self, self._sequential_attr())

    def reset_stats(self) -> None:
        self.parallel.reset_stats()
        for attr in self._kinds:
            getattr(self, attr).reset_stats()

    def extra_repr(self) -> str:
        cap = "" if self._max_levels is None else f", max_levels={self._max_levels}"
        return (f"name={self.name!r}, channels={self.num_channels}, T={self._T}, signed={self.signed}, "
                f"mode={self._mode.value}, max_burst={float(self.burst.max()):g}, coding={self.coding}{cap}")


def silence_(c: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Whole counts ``c`` with those inside the dead zone set to 0, in place: ``keep`` is ``ceil(dead) - 1`` per
    channel (-1 without a zone), so ``|c| < dead`` iff ``|c| - keep < 1``; float operations only (comparisons to
    booleans and ``masked_fill_`` are slow on the CPU)."""
    return c.mul_(c.abs().sub_(keep).clamp_(0.0, 1.0))


def _dead_or_none(dead: torch.Tensor) -> torch.Tensor | None:
    """A copy of the dead zone, or None when no channel has one (the common case costs nothing)."""
    return dead.detach().clone() if bool((dead > 0).any()) else None


def _no_dead_zone_saved(state_dict, prefix, *args) -> None:
    """Models saved before dead zones have no ``dead`` tensor: they had none (zeros)."""
    key = prefix + "dead"
    theta = state_dict.get(prefix + "theta")
    if key not in state_dict and theta is not None:
        state_dict[key] = torch.zeros_like(theta)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Within the block, every site of ``model`` computes with the parameters it has on entry,
    without comparing them with a snapshot on each call as :meth:`DAQCFSSite._fused` does (a
    decoded token makes a few hundred site calls, and the comparisons took 2 ms of a SmolLM2
    token). For generation, where nothing edits a site: an edit inside the block is not seen
    until it ends. Nested blocks keep the outer block's parameters.

    The same holds for the weights of the spiking layers behind the sites: they read their rows as
    planned on their first call in the block (:meth:`spike_modules.row_groups.RowGroup.product`), so
    a weight edited inside the block is not seen until it ends either."""
    sites = [site for _, site in iter_sites(model) if "_frozen" not in site.__dict__]
    for site in sites:
        site.__dict__["_frozen"] = (*site._fused(),)  # a new object per block: what the row plans are keyed on
    try:
        yield
    finally:
        for site in sites:
            site.__dict__.pop("_frozen", None)


def silent_channels(site: DAQCFSSite) -> int:
    """Channels of ``site`` with a dead zone."""
    return int((site.dead > 0).sum())


def iter_sites(model: nn.Module) -> Iterator[tuple[str, DAQCFSSite]]:
    """Every DA-QCFS site in ``model`` with its qualified name, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, DAQCFSSite):
            yield name, module


def set_mode(model: nn.Module, mode: SiteMode | str) -> None:
    """Switch every site of ``model`` to ``mode``."""
    for _, site in iter_sites(model):
        site.mode = mode


def set_timesteps(model: nn.Module, T: int) -> None:
    """Set T on every site of ``model`` (the neurons are kept, so ``reset_net`` still finds them)."""
    T = check_timesteps(T)
    for _, site in iter_sites(model):
        site.T = T


def reset_spike_stats(model: nn.Module) -> None:
    """Zero the spike statistics of every neuron of every site (parallel and sequential)."""
    for _, site in iter_sites(model):
        site.reset_stats()


def set_spike_counting(model: nn.Module, on: bool) -> None:
    """Whether parallel-mode sites keep spike statistics (spike rates, energy counts need them; a
    deployed model does not, and skips their reductions)."""
    for _, site in iter_sites(model):
        site.count_spikes = bool(on)


def spike_rates(model: nn.Module) -> dict[str, float]:
    """Spike rate per site since the last ``reset_stats``."""
    return {name: site.spike_rate for name, site in iter_sites(model)}
