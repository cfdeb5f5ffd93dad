"""Backward passes through a model one decoder layer at a time (torch's activation checkpointing).

The Fisher weights of the dead zones (:mod:`calibration.silence`) and the spike-aware distillation
(:mod:`calibration.distill`) each take gradients through the whole converted model. Inside
:func:`checkpointed_layers`, every decoder layer runs under torch's non-reentrant checkpoint: the
graph keeps only each layer's inputs, and the backward pass recomputes one layer at a time. A layer
whose weights accelerate loads for its own forward (offloaded to disk, as a layer-by-layer
conversion leaves them) loads them for that recomputation and lets them go after it, so the backward
pass holds one layer's weights and activations, not the model's. Early stop is off, so a
recomputed layer runs to its end and accelerate's hook that drops its weights runs too.
Recomputation repeats the same operations: the gradients are the same bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop


class _Checkpointed(nn.Module):
    """A decoder layer run under torch's non-reentrant activation checkpoint."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)


@contextmanager
def layers_replaced(layers: nn.ModuleList, make: Callable[[int, nn.Module], nn.Module]) -> Iterator[None]:
    """Layer ``i`` of ``layers`` replaced by ``make(i, layer)`` for the duration, put back after."""
    kept = list(layers)
    try:
        for i, layer in enumerate(kept):
            layers[i] = make(i, layer)
        yield
    finally:
        for i, layer in enumerate(kept):
            layers[i] = layer


@contextmanager
def checkpointed_layers(layers: nn.ModuleList | None) -> Iterator[None]:
    """Every layer of ``layers`` checkpointed for the duration (nothing with None). The model must
    run without a KV cache inside (``use_cache=False``): a recomputed layer would append to it again."""
    if layers is None:
        yield
        return
    with layers_replaced(layers, lambda i, layer: _Checkpointed(layer)), set_checkpoint_early_stop(False):
        yield
