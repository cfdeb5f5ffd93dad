"""The whole-model sequential simulation: a converted model run time-stepped on SpikingJelly neurons.

Time is folded into the batch (``spike_modules.temporal``): the token ids are repeated T
times, so the embeddings are constant over the T steps; every linear layer acts on every
step; every site runs its multi-step SpikingJelly neuron (membranes reset before each run);
every other nonlinear op runs in the rate domain. The logits are the time-mean of the
head's per-step outputs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from spikingjelly.activation_based import functional
from torch import nn

from .layers import SpikeLinear, unsupported_layers
from .quantizer import check_timesteps
from .site import SiteMode, iter_sites
from .temporal import set_simulation


def _check_converted(model: nn.Module) -> None:
    if not hasattr(model, "stac_conversion_log"):
        raise ValueError(f"{type(model).__name__} was not converted by STAC (smollm2_converter.convert); "
                         "the sequential simulation needs its sites and rate-domain ops")


@contextmanager
def sequential_mode(model: nn.Module, T: int | None = None, sparse: bool = False) -> Iterator[int]:
    """Within the block ``model`` is the time-stepped SNN: sites in ``sequential`` mode with ``T``
    steps, rate-domain ops told T, eval mode, neurons reset; with ``sparse`` the spiking linear
    layers accumulate only the spikes that fired (``spike_modules.sparse``). Yields T. On exit
    the sites' modes and T, the rate-domain ops, the layers' sparse flags and train/eval are restored.

    Call the model inside only with time-folded inputs ``[T*B, ...]`` (:func:`run_sequential`
    does this). ``T=None`` uses the sites' T, which must then agree.

    Raises:
        ValueError: ``model`` was not converted by STAC, bad ``T``, sites with different T, or
            ``sparse`` with spiking layers whose weights cannot be read sparsely (named).
    """
    _check_converted(model)
    if sparse and (bad := unsupported_layers(model)):
        raise ValueError(f"sparse (event-driven) simulation cannot run {len(bad)} layer(s) such as {bad[0]!r}: their "
                         "8-bit format (bitsandbytes/torchao) has no sparse product; use --quant_backend own or none")
    sites = [site for _, site in iter_sites(model)]
    if T is None:
        found = sorted({site.T for site in sites})
        if len(found) != 1:
            raise ValueError(f"the sites have different T {found}; pass T explicitly")
        T = found[0]
    T = check_timesteps(T)
    saved = [(site, site.mode, site.T) for site in sites]
    layers = [m for m in model.modules() if isinstance(m, SpikeLinear)]
    was_training = model.training
    try:
        model.eval()
        for layer in layers:
            layer.sparse = bool(sparse)
        for site in sites:
            site.T = T
            site.mode = SiteMode.SEQUENTIAL
        set_simulation(model, T)
        functional.reset_net(model)
        yield T
    finally:
        for site, mode, site_T in saved:
            site.mode, site.T = mode, site_T
        for layer in layers:
            layer.sparse = False
        set_simulation(model, None)
        functional.reset_net(model)
        model.train(was_training)


@torch.no_grad()
def run_sequential(model: nn.Module, input_ids: torch.Tensor, T: int | None = None,
                   attention_mask: torch.Tensor | None = None, sparse: bool = False) -> torch.Tensor:
    """Logits ``[B, S, V]`` of the time-stepped simulation of a converted causal LM.

    Args:
        model: a model converted by ``smollm2_converter.convert`` (sites calibrated).
        input_ids: ``[B, S]`` token ids.
        T: timesteps (default: the sites' T).
        attention_mask: optional ``[B, S]`` padding mask.
        sparse: event-driven accumulation in the spiking linear layers (same logits up to float
            summation order; faster only below the spike rate ``bench/sparse.py`` measures).

    Memory grows with ``T * B``: every activation holds all T steps at once.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    B = input_ids.shape[0]
    # Gemma 2's final-logit softcapping is a nonlinearity on the logits: applied to the time-mean
    # (as the rate domain would), not to each step's partial logits
    cap = getattr(model.config, "final_logit_softcapping", None)
    with sequential_mode(model, T, sparse) as T:
        ids = input_ids.repeat(T, 1)  # step-major: rows t*B .. t*B+B-1 are step t
        mask = None if attention_mask is None else attention_mask.repeat(T, 1)
        if cap is not None:
            model.config.final_logit_softcapping = None
        try:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            if cap is not None:
                model.config.final_logit_softcapping = cap
    logits = logits.reshape(T, B, *logits.shape[1:]).mean(0)
    return logits if cap is None else torch.tanh(logits / cap) * cap
