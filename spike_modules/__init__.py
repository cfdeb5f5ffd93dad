"""Spiking neurons and DA-QCFS sites on top of SpikingJelly (see docs/design.md section 1)."""

import stac_common.logs as stac_logs  # noqa: F401  (drops known harmless library notes before they are logged)

from .neurons import IFNeuron, ParaInfNeuron, SignedIFNeuron, SpikeStats
from .neurons_multi import BurstIFNeuron, WeightedIFNeuron
from .site import DAQCFSSite, SiteMode, iter_sites, set_mode, set_timesteps, spike_rates
from .quantizer import MAX_TIMESTEPS, check_timesteps, decode, max_exact_burst, quantize, spike_count

__all__ = [
    "BurstIFNeuron", "IFNeuron", "ParaInfNeuron", "SignedIFNeuron", "SpikeStats", "WeightedIFNeuron",
    "DAQCFSSite", "SiteMode", "iter_sites", "set_mode", "set_timesteps", "spike_rates",
    "MAX_TIMESTEPS", "check_timesteps", "decode", "max_exact_burst", "quantize", "spike_count",
]
