"""Causal-LM conversion API: put per-channel spiking sites into a Hugging Face causal LM.

``convert(model, config)`` returns a new model; ``convert_`` changes ``model`` in place.
Sites start in ``ann`` mode; calibrate them (``calibration.calibrate``), then switch the
model to ``parallel`` with ``spike_modules.set_mode``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from spike_modules import DAQCFSSite, check_timesteps, iter_sites
from spike_modules.adapters import adapter_for
from spike_modules.layers import SharedInput, SpikeLinear, in_features

ACTIVATIONS = ("keep", "relu")


@dataclass(frozen=True)
class ConversionConfig:
    """What to swap. ``activation='relu'`` replaces GELU/SiLU by ReLU (damages a pretrained
    model unless fine-tuned; the report must say so)."""

    T: int = 16
    activation: str = "keep"

    def __post_init__(self):
        check_timesteps(self.T)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")


def _resolve(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
        getattr(parent, attr)
    except AttributeError:
        raise ValueError(f"the adapter expects a module at {path!r}, which this model does not have") from None
    return parent, attr


def convert_(model: nn.Module, config: ConversionConfig) -> nn.Module:
    """Swap in spiking sites in place and return ``model``.

    Raises:
        ValueError: unsupported architecture (lists the supported ones), an already converted
            model, or a module that is not where the adapter expects it (never skipped silently).
    """
    adapter = adapter_for(model)
    if any(True for _ in iter_sites(model)):
        raise ValueError("this model already has spiking sites; convert the original model")
    if config.activation == "relu":
        for path in adapter.activation_paths(model):
            parent, attr = _resolve(model, path)
            setattr(parent, attr, nn.ReLU())
    for group in adapter.site_groups(model, config.activation):
        linears = [_resolve(model, path) for path in group.linears]
        modules = [getattr(parent, attr) for parent, attr in linears]
        for path, module in zip(group.linears, modules):
            if not isinstance(module, (nn.Linear, Conv1D)):
                raise ValueError(f"{path} is a {type(module).__name__}, not a linear layer the adapter can wrap")
        widths = {in_features(m) for m in modules}
        if len(widths) != 1:
            raise ValueError(f"site group {group.name}: its layers read inputs of different widths {widths}")
        site = DAQCFSSite(widths.pop(), config.T, signed=group.signed, name=group.name)
        shared = SharedInput(site, len(modules))
        for k, ((parent, attr), module) in enumerate(zip(linears, modules)):
            setattr(parent, attr, SpikeLinear(module, shared, owner=k == 0))
    return model


def convert(model: nn.Module, config: ConversionConfig) -> nn.Module:
    """A converted copy of ``model``; the original is left untouched."""
    return convert_(copy.deepcopy(model), config)
