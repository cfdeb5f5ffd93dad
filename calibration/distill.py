"""Spike-aware distillation: learn the sites' thresholds (and shifts) from the ANN's outputs.

The converted model runs with its sites in ``quant`` mode, which computes exactly the
values of ``parallel`` mode (the spike counts) with a trainable floor: straight-through,
or a SpikingJelly surrogate gradient. The loss is the KL divergence from the ANN's
next-token distribution to the SNN's on the calibration text. What is learned per channel
is ``log theta`` (so thresholds stay positive, and channels whose scales differ by orders
of magnitude learn at the same relative rate) and ``psi`` in units of ``theta``; with
``weight_lr`` the float weights of the decoder learn too (embeddings, norms and 8-bit
layers stay frozen), which is what recovers a model whose activations were swapped to ReLU.
Burst caps are not trained: each neuron keeps the cap calibration gave it
(``CalibrationConfig.max_burst``), so the largest value a site passes, ``B * theta``, moves
with the learned theta.
"""

from __future__ import annotations

import math
import time
from typing import Iterable

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from spike_modules.site import DAQCFSSite, SiteMode, iter_sites

from .checkpointing import checkpointed_layers


class _LogParam(nn.Module):
    """``theta = exp(log_theta)`` as a ``torch.nn.utils.parametrize`` parametrization."""

    def forward(self, log_theta: torch.Tensor) -> torch.Tensor:
        return log_theta.exp()

    def right_inverse(self, theta: torch.Tensor) -> torch.Tensor:
        return theta.log()


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return nn.functional.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean")


def finetune_(snn: nn.Module, ann: nn.Module, batches: Iterable[torch.Tensor], steps: int, lr: float = 2e-3,
              surrogate: nn.Module | None = None, train_psi: bool = True, weight_lr: float = 0.0,
              progress: bool = True, layers: nn.ModuleList | None = None) -> dict:
    """Distil ``ann`` into the calibrated ``snn`` for ``steps`` optimizer steps, in place.

    Args:
        snn: a converted, calibrated model (sites' thresholds set).
        ann: the original model (frozen; its logits are the targets).
        batches: token-id batches ``[B, S]``, cycled until ``steps`` is reached.
        steps: optimizer steps (>= 1).
        lr: Adam learning rate on ``log theta`` (and on ``psi / theta``).
        surrogate: a SpikingJelly surrogate function for the floor; None = straight-through.
        train_psi: learn the per-channel shift as well as the threshold.
        weight_lr: if > 0, also train the decoder's float linear weights at this learning rate.
        layers: the SNN's decoder layers, run checkpointed (:mod:`calibration.checkpointing`): the
            backward pass holds one layer at a time, so layers whose weights stay on disk (a
            layer-by-layer conversion) train their sites without the whole model in memory; the same
            steps bit for bit. Not with ``weight_lr``: weights on disk do not train.

    Returns:
        ``{"steps", "seconds", "loss_first", "loss_last", "lr", "weight_lr", "surrogate", "trained"}``; the
        sites keep their modes from before the call.

    Raises:
        ValueError: ``steps < 1``, no batches, a model without sites, or ``weight_lr`` with ``layers``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"finetune steps must be an integer >= 1, got {steps!r}")
    sites = [site for _, site in iter_sites(snn)]
    if not sites:
        raise ValueError("the model has no spiking sites to fine-tune; convert and calibrate it first")
    data = list(batches)
    if not data:
        raise ValueError("fine-tuning got no batches of calibration text")
    if layers is not None and weight_lr > 0:
        raise ValueError("weight_lr trains the decoder's weights, which a layer-by-layer fine-tune keeps on disk; "
                         "train the thresholds alone (weight_lr 0) or convert the whole model")
    start = time.time()
    modes = [site.mode for site in sites]
    frozen = [(p, p.requires_grad) for p in snn.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    params = _attach(sites, surrogate, train_psi)
    groups = [{"params": params, "lr": lr}]
    weights = _decoder_weights(snn) if weight_lr > 0 else []
    if weights:
        for w in weights:
            w.requires_grad_(True)
        groups.append({"params": weights, "lr": weight_lr})
    opt = torch.optim.Adam(groups)
    losses = []
    was_training = snn.training
    snn.eval()  # no dropout: the trained values are the ones inference uses
    ann.eval()
    try:
        columns = [TextColumn("distilling"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                   TimeRemainingColumn()]
        with Progress(*columns, disable=not progress, transient=True) as bar, checkpointed_layers(layers):
            task = bar.add_task("distil", total=steps, loss="-")
            for step in range(steps):
                ids = data[step % len(data)]
                with torch.no_grad():
                    target = ann(ids).logits
                loss = _kl(snn(ids, use_cache=False).logits, target)
                if not math.isfinite(float(loss.detach())):
                    raise ValueError(f"distillation diverged at step {step + 1} (loss {float(loss.detach())}); "
                                     "use a smaller learning rate or fewer steps")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                bar.update(task, advance=1, loss=f"{losses[-1]:.4f}")
    finally:
        _detach(sites, train_psi)
        for site, mode in zip(sites, modes):
            site.mode = mode
        for p, flag in frozen:
            p.requires_grad_(flag)
        snn.train(was_training)
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
    trained = ["log_theta", "psi"] if train_psi else ["log_theta"]
    if weights:
        trained.append(f"{len(weights)} decoder weight matrices")
    return {"steps": steps, "seconds": time.time() - start, "lr": lr, "weight_lr": weight_lr,
            "loss_first": sum(head) / len(head), "loss_last": sum(tail) / len(tail),
            "surrogate": type(surrogate).__name__ if surrogate is not None else "straight-through",
            "trained": trained}


def _decoder_weights(model: nn.Module) -> list[torch.Tensor]:
    """Float weight matrices of linear layers (nn.Linear / Conv1D), except the (tied) head."""
    from spike_modules.linear import FLOAT_LINEARS

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = set()
    for m in (head, inputs):
        m = getattr(m, "linear", m)  # a spiking head is a SpikeLinear around the linear layer
        # int8 heads and embeddings hold no float weight to train (Int8Embedding.weight decodes a copy)
        if m is not None and not hasattr(m, "weight_int8") and isinstance(getattr(m, "weight", None), torch.Tensor):
            tied.add(id(m.weight))
    return [m.weight for m in model.modules()
            if isinstance(m, FLOAT_LINEARS) and m.weight.is_floating_point() and id(m.weight) not in tied]


def _attach(sites: list[DAQCFSSite], surrogate: nn.Module | None, train_psi: bool) -> list[torch.Tensor]:
    from torch.nn.utils import parametrize

    params = []
    for site in sites:
        site.mode = SiteMode.QUANT
        site.surrogate = surrogate
        parametrize.register_parametrization(site, "theta", _LogParam())
        original = site.parametrizations.theta.original
        original.requires_grad_(True)
        params.append(original)
        if train_psi:
            # learn psi in units of theta: a shift of a fraction of a step means the same everywhere
            site._psi_unit = nn.Parameter(site.psi.detach() / site.theta.detach())
            parametrize.register_parametrization(site, "psi", _ScaledBy(site))
            params.append(site._psi_unit)
    return params


class _ScaledBy(nn.Module):
    """``psi = psi_unit * theta`` where ``psi_unit`` is the trained tensor (the stored original is unused)."""

    def __init__(self, site: DAQCFSSite):
        super().__init__()
        self._site = [site]  # a list, so the site is not registered as a submodule of itself

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        site = self._site[0]
        return site._psi_unit * site.theta


def _detach(sites: list[DAQCFSSite], train_psi: bool) -> None:
    from torch.nn.utils import parametrize

    for site in sites:
        if train_psi and parametrize.is_parametrized(site, "psi"):
            psi = site.psi.detach().clone()
            parametrize.remove_parametrizations(site, "psi", leave_parametrized=False)
            with torch.no_grad():
                site.psi.copy_(psi)
            del site._psi_unit
        if parametrize.is_parametrized(site, "theta"):
            parametrize.remove_parametrizations(site, "theta", leave_parametrized=True)
        site.theta.requires_grad_(False)
        site.psi.requires_grad_(False)
        site.surrogate = None
