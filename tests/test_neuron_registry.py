"""Sites build their sequential neurons through the registry: one class plus a registration."""

import pytest
import torch

from spike_modules import neuron_registry
from spike_modules.neuron_registry import neuron_kind, register_neuron
from spike_modules.neurons import IFNeuron, SignedIFNeuron
from spike_modules.neurons_multi import BurstIFNeuron, WeightedIFNeuron
from spike_modules.site import DAQCFSSite


@pytest.mark.parametrize("coding, signed, bursts, cls", [
    ("rate", False, False, IFNeuron), ("rate", True, False, SignedIFNeuron), ("rate", False, True, BurstIFNeuron),
    ("rate", True, True, BurstIFNeuron), ("weighted", False, False, WeightedIFNeuron),
    ("weighted", True, True, WeightedIFNeuron)])
def test_built_in_neurons_by_coding_sign_and_bursts(coding, signed, bursts, cls):
    assert neuron_kind(coding, signed, bursts).cls is cls


def test_a_site_builds_what_the_registry_gives():
    rate = DAQCFSSite(3, 4, signed=True)
    assert type(rate.sequential) is SignedIFNeuron and type(rate.sequential_burst) is BurstIFNeuron
    weighted = DAQCFSSite(3, 4, coding="weighted")
    assert type(weighted.sequential) is WeightedIFNeuron and not hasattr(weighted, "sequential_burst")
    rate.T = 6
    assert rate.sequential.T == rate.sequential_burst.T == 6 and float(rate.sequential.pos_max) == 6.0


def test_a_new_neuron_is_one_class_and_a_registration(monkeypatch):
    """Registered first, a class serves every site of its coding; the site calls it with the burst cap."""
    monkeypatch.setattr(neuron_registry, "SEQUENTIAL_NEURONS", list(neuron_registry.SEQUENTIAL_NEURONS))
    calls = []

    class Doubling(BurstIFNeuron):
        def forward(self, x, th, burst):
            calls.append(tuple(x.shape))
            return 2 * super().forward(x, th, burst)

    neuron_registry.SEQUENTIAL_NEURONS.insert(0, neuron_registry.NeuronKind(Doubling, "rate", None, True))
    site = DAQCFSSite(2, 4, signed=True, mode="sequential")
    assert type(site.sequential) is Doubling
    out = site(torch.full((4, 1, 2), 0.5))
    assert calls == [(4, 1, 2)] and out.sum(0).flatten().tolist() == [4.0, 4.0]  # twice 0.5 * 4 steps


def test_no_neuron_for_a_coding_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(neuron_registry, "SEQUENTIAL_NEURONS", [])
    with pytest.raises(ValueError, match="no sequential neuron registered for rate coding, signed=True.*none"):
        DAQCFSSite(2, 4, signed=True)
    with pytest.raises(ValueError, match="coding"):
        register_neuron(coding="phase")
