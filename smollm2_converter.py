"""Causal-LM conversion API: turn a Hugging Face causal LM into a rate-coded spiking network.

``convert(model, config)`` returns a new model; ``convert_`` changes ``model`` in place.
Sites start in ``ann`` mode; calibrate them (``calibration.calibrate``), then switch the
model to ``parallel`` with ``spike_modules.set_mode``, or run the time-stepped simulation
with ``run_sequential``. ``swap_log(model)`` is the text for ``conversion_log.txt``.
``TemporalSpikeProcessor(model, T)`` wraps a converted model for KV-cached multi-turn generation.

The logic lives in ``spike_modules`` (conversion, attention, norm, temporal, simulation);
this module is the public face.
"""

from spike_modules.conversion import (
    MODE_DEFAULTS, MODES, ConversionConfig, SwapRecord, conversion_log, convert, convert_, register_swap, swap_log,
)
from spike_modules.kv_cache import SpikeKVCache
from spike_modules.simulation import run_sequential, sequential_mode
from stac_lm.generate.processor import Generation, StepOutput, TemporalSpikeProcessor

__all__ = [
    "MODE_DEFAULTS", "MODES", "ConversionConfig", "SwapRecord", "conversion_log", "convert", "convert_",
    "register_swap", "run_sequential", "sequential_mode", "swap_log",
    "SpikeKVCache", "TemporalSpikeProcessor", "Generation", "StepOutput",
]
