"""Integration points: the only places ``stac_lm`` calls pieces that live elsewhere in STAC.

Each function imports its piece when called. A piece that this checkout does not have
raises :class:`NotIntegratedError` naming what is missing; nothing is replaced by a
stand-in.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module for its error type before torch is needed
    import torch
    from torch import nn


class NotIntegratedError(RuntimeError):
    """A STAC component this step needs is not in this checkout yet."""


def _need(module: str, name: str, what: str):
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module and not module.startswith(f"{e.name}."):
            raise  # the module exists but one of its own imports is missing: a real error
        raise NotIntegratedError(f"{what} needs {module}.{name}, which this checkout does not have") from None
    if not hasattr(mod, name):
        raise NotIntegratedError(f"{what} needs {module}.{name}, which this checkout does not have")
    return getattr(mod, name)


# -- converter (smollm2_converter) ---------------------------------------------------------------

def conversion_config(T: int, activation: str, simplified: bool, coding: str = "rate", spike_head: bool = False,
                      spike_probs: bool | None = None):
    """The converter's config for this run (the rest of the structure follows the converter's mode defaults)."""
    from smollm2_converter import ConversionConfig

    return ConversionConfig(T=T, mode="simplified" if simplified else "full", activation=activation, coding=coding,
                            spike_head=spike_head, spike_probs=spike_probs)


def conversion_config_from_dict(d: dict):
    from smollm2_converter import ConversionConfig

    return ConversionConfig(**d)


def conversion_config_to_dict(cfg) -> dict:
    return asdict(cfg)


def convert(model: nn.Module, cfg) -> nn.Module:
    from smollm2_converter import convert as _convert

    return _convert(model, cfg)


def convert_(model: nn.Module, cfg) -> nn.Module:
    from smollm2_converter import convert_ as _convert_

    return _convert_(model, cfg)


def swap_log(model: nn.Module) -> str:
    """Human-readable lines saying what the converter swapped where."""
    return _need("smollm2_converter", "swap_log", "the conversion log")(model)


def check_sparse() -> None:
    """``--use_sparse`` needs a sparse (event-driven) path in the sequential simulation."""
    fn = _need("smollm2_converter", "run_sequential", "--use_sparse")
    if "sparse" not in inspect.signature(fn).parameters:
        raise NotIntegratedError("--use_sparse: the sequential simulation (smollm2_converter.run_sequential) has "
                                 "no sparse path in this checkout; run without --use_sparse")


def run_sequential(model: nn.Module, input_ids: torch.Tensor, T: int, sparse: bool) -> torch.Tensor:
    """Logits ``[B, S, V]`` of the whole-model time-stepped simulation (sites in sequential mode)."""
    fn = _need("smollm2_converter", "run_sequential", "the parallel-vs-sequential check")
    if sparse:
        check_sparse()
        return fn(model, input_ids, T, sparse=True)
    return fn(model, input_ids, T)


# -- 8-bit weights (calibration.int8) ------------------------------------------------------------

def quantize_weights(model: nn.Module, backend: str, progress: bool, group_size: int = 0,
                     hessians: dict | None = None) -> dict:
    """Quantize ``model``'s weights in place; returns the backend's summary (with the quantized paths)."""
    return _need("calibration.int8", "quantize_weights_", "--quant_backend")(model, backend, progress=progress,
                                                                             group_size=group_size, hessians=hessians)


def quantized_paths(summary: dict) -> list[str]:
    """The qualified names of the layers ``quantize_weights_`` replaced."""
    return list(summary["paths"])


def prepare_int8(model: nn.Module, paths: list[str], backend: str = "own", group_size: int = 0) -> None:
    """Rebuild ``backend``'s int8 shells at ``paths`` so a saved state dict loads into ``model``."""
    _need("calibration.int8", "prepare_int8_", "loading a model with 8-bit weights")(model, paths, backend, group_size)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors of other components that mean "the user's setup", not a bug: an 8-bit backend that is
    not installed. A module never imported cannot have raised its error, so nothing is imported here."""
    backends = sys.modules.get("calibration.int8_backends")
    return (backends.BackendUnavailableError,) if backends is not None else ()


# -- distillation fine-tune (calibration.distill) ------------------------------------------------

def finetune_fn():
    """The distillation fine-tune, or :class:`NotIntegratedError` (checked before any work)."""
    return _need("calibration.distill", "finetune_", "--finetune_steps")


def finetune(snn: nn.Module, ann: nn.Module, batches: list, steps: int, surrogate: str, progress: bool,
             weight_lr: float = 0.0) -> dict:
    """Spike-aware distillation of ``snn`` from ``ann`` with the named SpikingJelly surrogate
    (its default settings); returns the fine-tune's summary."""
    from spikingjelly.activation_based import surrogate as sj_surrogate

    return finetune_fn()(snn, ann, batches, steps, surrogate=getattr(sj_surrogate, surrogate)(), progress=progress,
                         weight_lr=weight_lr)
