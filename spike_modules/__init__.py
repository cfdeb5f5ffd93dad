"""Spiking neurons and DA-QCFS sites on top of SpikingJelly (see DESIGN.md section 1)."""

import logging

# SpikingJelly registers Triton kernels at import; on a machine without Triton, torch logs
# "Triton not available" once per kernel while SpikingJelly uses its CPU kernels. Only that
# exact note is dropped.
logging.getLogger("torch._library.triton").addFilter(lambda r: "Triton not available" not in r.getMessage())

from .neurons import IFNeuron, ParaInfNeuron, SignedIFNeuron, SpikeStats
from .site import DAQCFSSite, SiteMode, iter_sites, set_mode, set_timesteps, spike_rates
from .quantizer import MAX_TIMESTEPS, check_timesteps, decode, quantize, spike_count

__all__ = [
    "IFNeuron", "ParaInfNeuron", "SignedIFNeuron", "SpikeStats",
    "DAQCFSSite", "SiteMode", "iter_sites", "set_mode", "set_timesteps", "spike_rates",
    "MAX_TIMESTEPS", "check_timesteps", "decode", "quantize", "spike_count",
]
