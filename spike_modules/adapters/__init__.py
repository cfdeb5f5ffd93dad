"""One adapter per architecture, behind one registry keyed by ``config.model_type``.

An adapter says where the spiking sites go: groups of linear layers inside the
blocks that read the same input, and whether that input can be negative.
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
class Adapter:
    family: str
    model_types: tuple[str, ...]
    site_groups: Callable[[nn.Module, str], list[SiteGroup]]   # (model, activation) -> groups
    activation_paths: Callable[[nn.Module], list[str]]          # modules replaced by --activation relu


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


from . import gpt2, llama  # noqa: E402,F401  (register the built-in adapters)
