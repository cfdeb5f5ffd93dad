"""One adapter per architecture, behind one registry keyed by ``config.model_type``.

An adapter says *where* things go: groups of linear layers inside the blocks that read the
same input through one site (and whether that input can be negative), the activations, the
gated MLPs, the norms, the attention modules and the head. *What* replaces a module of a
given type is the swap registry's job (``spike_modules.conversion.SWAPS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class SiteGroup:
    """Linear layers (qualified names) that read one input through one site."""

    name: str
    linears: tuple[str, ...]
    signed: bool


@dataclass(frozen=True)
class AttentionSpec:
    """An attention module (qualified name) and its head layout."""

    path: str
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Adapter:
    """Where conversion acts in one architecture family; every callable takes the model.

    ``site_groups(model, activation)``: sites at the block linears' inputs.
    ``activation_paths``: the MLP activations (replaced by ReLU under ``activation='relu'``).
    ``gated_mlp_paths``: MLPs computing ``down(act(gate) * up)``; their activation is part of
    the gated MLP's rate-domain op and is not wrapped on its own.
    ``norm_paths``, ``attentions``, ``head``: the norms, attention modules and output head.
    """

    family: str
    model_types: tuple[str, ...]
    site_groups: Callable[[nn.Module, str], list[SiteGroup]]
    activation_paths: Callable[[nn.Module], list[str]]
    gated_mlp_paths: Callable[[nn.Module], list[str]]
    norm_paths: Callable[[nn.Module], list[str]]
    attentions: Callable[[nn.Module], list[AttentionSpec]]
    head: str


ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    for t in adapter.model_types:
        ADAPTERS[t] = adapter
    return adapter


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s architecture; ``ValueError`` listing the supported ones otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        families = sorted({f"{a.family} ({', '.join(a.model_types)})" for a in ADAPTERS.values()})
        raise ValueError(f"unsupported architecture {model_type!r} ({type(model).__name__}); "
                         f"STAC converts: {'; '.join(families)}")
    return ADAPTERS[model_type]


from . import bert, gpt2, llama  # noqa: E402,F401  (register the built-in adapters)
