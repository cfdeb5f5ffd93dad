"""``calibrate``: run data through a model's sites in ANN mode and fit every site per channel."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable

import torch
from rich.progress import Progress
from torch import nn

from spike_modules.site import SiteMode, iter_sites

from .affine import fit_affine, site_error
from .artifact import Calibration, CalibrationConfig, SiteParams
from .observer import ChannelObserver
from .thresholds import choose_thresholds, power_of_two_steps


def default_run_batch(model: nn.Module, batch: Any) -> None:
    """A dict batch is passed as keyword arguments, anything else positionally."""
    model(**batch) if isinstance(batch, dict) else model(batch)


def _batch_size(batch: Any) -> int:
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def calibrate(model: nn.Module, batches: Iterable, config: CalibrationConfig, *, model_id: str = "",
              run_batch: Callable[[nn.Module, Any], None] = default_run_batch,
              progress: bool = True) -> Calibration:
    """Observe every DA-QCFS site of ``model`` over ``batches`` and return a :class:`Calibration`.

    Sites run in ANN mode while observed (their modes are restored afterwards), so each sees
    the float activations of the model. ``config.n_samples`` is filled in from the data.

    Raises:
        ValueError: no sites in the model, no data, or NaN/inf activations (naming the site).
    """
    observers, n_samples = observe_sites(model, batches, config, run_batch=run_batch, progress=progress)
    return fit_calibration(observers, replace(config, n_samples=n_samples), model_id=model_id)


def observe_sites(model: nn.Module, batches: Iterable, config: CalibrationConfig, *,
                  run_batch: Callable[[nn.Module, Any], None] = default_run_batch,
                  progress: bool = True, first_index: int = 0) -> tuple[dict[str, tuple[ChannelObserver, bool]], int]:
    """Stream ``batches`` through ``model`` with an observer on every site.

    Returns ``({site name: (observer, signed)}, number of samples)``; the observers do not
    depend on T, so one pass serves calibrations for several T (:func:`fit_calibration`).
    ``first_index``: the position of ``model``'s first site in the whole model (each site's
    reservoir is seeded by its position, so a part observed alone samples as the whole would).
    """
    sites = list(iter_sites(model))
    if not sites:
        raise ValueError("the model has no DA-QCFS sites to calibrate; convert it first")
    modes = {name: site.mode for name, site in sites}
    observers = {}
    for i, (name, site) in enumerate(sites):
        site.observer = ChannelObserver(site.num_channels, name, reservoir_rows=config.reservoir_rows,
                                        seed=config.seed + first_index + i)
        observers[name] = (site.observer, site.signed)
        site.mode = SiteMode.ANN
    n_samples = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("calibrating", total=None)
            for batch in batches:
                run_batch(model, batch)
                n_samples += _batch_size(batch)
                bar.advance(task)
    finally:
        for name, site in sites:
            site.observer = None
            site.mode = modes[name]
        model.train(was_training)
    if n_samples == 0:
        raise ValueError("calibration got no batches; give at least one batch of data")
    unseen = [name for name, (obs, _) in observers.items() if obs.rows == 0]
    if unseen:
        raise ValueError(f"sites never reached by the calibration data: {unseen[:8]}")
    return observers, n_samples


def fit_calibration(observers: dict[str, tuple[ChannelObserver, bool]], config: CalibrationConfig,
                    model_id: str = "") -> Calibration:
    """Fit every observed site by ``config`` (rule, T, psi/phi) into a :class:`Calibration`."""
    params, stats = {}, {}
    for name, (obs, signed) in observers.items():
        params[name], stats[name] = fit_site(obs, config, signed)
    return Calibration(config, params, model_id=model_id, stats=stats)


def fit_site(obs: ChannelObserver, config: CalibrationConfig, signed: bool) -> tuple[SiteParams, dict]:
    """Thresholds by the configured rule, then (optionally) the ``psi``/``phi`` fit on the reservoir."""
    L = config.levels_of(obs.name)
    theta = choose_thresholds(obs, config.rule, L, signed, config.percentile, config.init_mem)
    raised = 0
    if config.burst_budget is not None:
        floor = (obs.absmax(signed) / config.burst_budget).to(theta.dtype)
        raised = int((floor > theta).sum())
        theta = torch.maximum(theta, floor)
    if config.power_of_two_steps:
        theta = power_of_two_steps(theta, config.step_rounding)
    psi, phi = torch.zeros_like(theta), torch.ones_like(theta)
    burst = torch.full_like(theta, float(config.max_burst))
    if config.fit_affine:
        psi, phi = fit_affine(obs.reservoir, theta, L, signed, config.init_mem, config.bias_weight,
                              burst=burst)
    stats = {"rows": obs.rows, "batches": obs.batches,
             "silent_channels": int((obs.absmax(signed) <= 0).sum()), "budget_raised_channels": raised,
             "burst_channels_seen": int((burst_needed(obs, theta, psi, phi, signed) > 1).sum())}
    if obs.reservoir.shape[0]:
        err = site_error(obs.reservoir, theta, psi, phi, L, signed, config.init_mem, burst)
        stats["reservoir_mean_abs_error"] = float(err.abs().mean())
    return SiteParams(theta, psi, phi, signed, burst), stats


def burst_needed(obs: ChannelObserver, theta: torch.Tensor, psi: torch.Tensor, phi: torch.Tensor,
                 signed: bool) -> torch.Tensor:
    """Per channel, the spikes per step that the largest calibration value needs,
    ``ceil(max |phi (x + psi)| / theta)`` (at least 1): a statistic for reports."""
    hi = phi * (obs.max + psi)
    peak = torch.maximum(hi, -phi * (obs.min + psi)) if signed else hi
    return torch.ceil(peak.clamp(min=0).float() / theta).clamp(min=1)
