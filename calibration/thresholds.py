"""Per-channel threshold rules: ``max``, ``percentile`` and an MSE-optimal clip search."""

from __future__ import annotations

import torch

from .observer import LOG2_MIN, ChannelObserver

RULES = ("max", "percentile", "mse")


def check_rule(rule: str, percentile: float) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; allowed: {', '.join(RULES)}")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")


def choose_thresholds(obs: ChannelObserver, rule: str, T: int, signed: bool,
                      percentile: float = 99.9, init_mem: float = 0.5) -> torch.Tensor:
    """Per-channel thresholds ``[H]`` (float32, all > 0) for one site.

    ``max``: the largest value seen. ``percentile``: that percentile of ``x`` (unsigned site)
    or ``|x|`` (signed). ``mse``: the clip that minimises the expected squared error of the
    T-level quantizer over the whole histogram (rounding noise inside, clipping outside).
    A channel never positive on the calibration data (never non-zero if signed) cannot fire
    on such data; it gets the site's largest threshold, or 1.0 if the whole site is silent.
    """
    check_rule(rule, percentile)
    if rule == "max":
        theta = obs.absmax(signed)
    elif rule == "percentile":
        theta = obs.percentile(percentile, signed)
    else:
        theta = mse_thresholds(obs, T, signed, init_mem)
    theta = theta.float()
    alive = theta > 0
    fill = theta[alive].max() if bool(alive.any()) else torch.tensor(1.0)
    return torch.where(alive, theta, fill)


def mse_thresholds(obs: ChannelObserver, T: int, signed: bool, init_mem: float = 0.5,
                   candidates: int = 96, chunk: int = 64) -> torch.Tensor:
    """Clip per channel minimising ``sum_bins n * err(v, theta)`` with step ``d = theta/T``:
    ``v^2`` if ``v`` rounds to zero, ``d^2/12`` inside the range, ``(v - theta)^2`` beyond it.
    Candidates are geometric between ``absmax`` and ``absmax / 4096``."""
    hist = obs.magnitude_hist(signed).float()
    top = obs.absmax(signed).float()
    centers = torch.pow(2.0, LOG2_MIN + (torch.arange(obs.n_bins, dtype=torch.float32) + 0.5) / obs.bpo)
    ratios = torch.logspace(0, -12, candidates, base=2.0)
    out = torch.zeros(obs.H, dtype=torch.float64)
    for lo in range(0, obs.H, chunk):
        n = hist[lo:lo + chunk]                                   # [h, B]
        occupied = n.sum(0).nonzero().flatten()
        if occupied.numel() == 0:
            continue
        n = n[:, occupied[0]:occupied[-1] + 1]
        tops = top[lo:lo + chunk]
        v = torch.minimum(centers[occupied[0]:occupied[-1] + 1][None, :], tops[:, None])   # [h, B]
        theta = tops[:, None] * ratios[None, :]                   # [h, C]
        step = theta / T
        vv, th, st = v[:, None, :], theta[:, :, None], step[:, :, None]
        err = torch.where(vv < st * (1 - init_mem), vv ** 2,
                          torch.where(vv > th, (vv - th) ** 2, st ** 2 / 12))
        total = (err * n[:, None, :]).sum(-1)                     # [h, C]
        out[lo:lo + chunk] = theta.gather(1, total.argmin(1, keepdim=True)).squeeze(1).double()
    return out


STEP_ROUNDINGS = ("up", "nearest")


def power_of_two_steps(theta: torch.Tensor, rounding: str = "up") -> torch.Tensor:
    """Each threshold moved to a ``theta_max * 2**-k`` (``k`` whole, >= 0): every channel's step is then
    a power-of-two fraction of the site's largest, so a weighted spike's value is a shift of an int8
    weight and the per-site factor goes into the output's rescale (docs/design.md section 5 prices
    such a spike as an integer add and shift instead of a MAC).

    ``rounding='up'``: the nearest such value at or above the threshold; a channel's step grows by
    less than 2x (values above the old threshold need fewer bursts). ``'nearest'``: the nearest in
    log scale (within a factor sqrt(2) either way), so the steps are on average as fine as fitted;
    channels moved down need more spikes per value and clip later (bursts carry the rest)."""
    if rounding not in STEP_ROUNDINGS:
        raise ValueError(f"step rounding must be one of {STEP_ROUNDINGS}, got {rounding!r}")
    top = theta.max().double()
    t = theta.double()
    r = torch.log2(top / t)
    if rounding == "nearest":
        return (top * torch.exp2(-torch.round(r))).to(theta.dtype)
    k = torch.floor(r)
    k = torch.where(top * torch.exp2(-k) < t, k - 1, k)  # log2's rounding must not take a step below theta
    return (top * torch.exp2(-k)).to(theta.dtype)
