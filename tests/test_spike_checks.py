"""The verification's spike checks: silent sites, and saturation measured the way each neuron saturates."""

import torch

from spike_modules import DAQCFSSite
from stac_lm.checks.verify import AT_CAP_BOUND, spike_checks


def section(rates, at_cap, bursting=()):
    return {"per_site": rates, "at_cap_share": at_cap, "bursting_sites": list(bursting)}


def verdict(sec):
    return {c["name"]: c["passed"] for c in spike_checks(sec)}


def test_a_burst_site_may_pass_one_spike_per_step_without_saturating():
    assert verdict(section({"a": 1.7, "b": 0.3}, {"a": 0.0, "b": 0.0}, bursting=["a"]))["no site saturates"]


def test_a_plain_site_firing_on_every_step_saturates():
    assert not verdict(section({"a": 0.97, "b": 0.3}, {"a": 0.0, "b": 0.0}))["no site saturates"]


def test_a_site_clipping_many_values_at_its_cap_saturates_even_with_bursts():
    sec = section({"a": 0.4, "b": 0.3}, {"a": AT_CAP_BOUND * 2, "b": 0.0}, bursting=["a"])
    checks = spike_checks(sec)
    assert not checks[1]["passed"] and "'a'" in checks[1]["detail"]


def test_silent_site_fails():
    assert not verdict(section({"a": 0.0, "b": 0.3}, {"a": 0.0, "b": 0.0}))["every site fires"]


def test_parallel_neuron_counts_inputs_at_the_cap():
    site = DAQCFSSite(2, T=4, signed=True, mode="parallel")
    site.set_params(theta=1.0, burst=torch.tensor([1.0, 3.0]))
    site(torch.tensor([[0.5, 2.0], [5.0, -9.0], [-3.0, 0.1]]))
    # channel 0 (B=1): 5.0 and -3.0 clip; channel 1 (B=3): -9.0 clips; 3 of 6 counts at the cap
    assert site.parallel.at_cap_share == 0.5
