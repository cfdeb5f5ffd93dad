"""DA-QCFS site: modes, straight-through gradients, statistics, model-wide helpers."""

import math

import pytest
import torch
from spikingjelly.activation_based import functional
from torch import nn

from spike_modules import DAQCFSSite, SiteMode, iter_sites, set_mode, set_timesteps, spike_rates


def toy(H=6, T=8):
    torch.manual_seed(0)
    return nn.Sequential(DAQCFSSite(H, T, name="in"), nn.Linear(H, H), DAQCFSSite(H, T, signed=True, name="mid"))


def test_ann_mode_is_identity_and_quant_is_not():
    site = DAQCFSSite(4, 4)
    x = torch.rand(3, 4)
    assert site(x) is x
    site.mode = "quant"
    assert not torch.equal(site(x), x)


def test_quant_mode_trains_with_straight_through_gradients():
    site = DAQCFSSite(5, 4, mode=SiteMode.QUANT)
    site.theta.requires_grad_(True)
    x = (torch.rand(10, 5) * 0.9).requires_grad_(True)
    site(x).sum().backward()
    assert x.grad is not None and bool((x.grad != 0).all()), "floor must pass gradients straight through"
    assert site.theta.grad is not None and bool((site.theta.grad != 0).any())


def test_sequential_network_matches_parallel_for_the_first_site():
    model = toy()
    x = torch.rand(2, 3, 6)
    set_mode(model, "parallel")
    first_parallel = model[0](x)
    set_mode(model, "sequential")
    functional.reset_net(model)
    first_train = model[0](x.expand(8, *x.shape))
    torch.testing.assert_close(first_train.mean(0), first_parallel)
    # the whole stack runs time-stepped: a linear layer between sites sees spikes per step
    out = model(x.expand(8, *x.shape))
    assert out.shape == (8, 2, 3, 6)


def test_spike_rates_are_recorded_per_site_and_T_is_set_model_wide():
    model = toy()
    set_mode(model, "parallel")
    x = torch.rand(4, 6)
    model(x)
    rates = spike_rates(model)
    assert set(rates) == {"0", "2"}
    assert all(0 < r < 1 for r in rates.values())
    set_timesteps(model, 16)
    assert [s.T for _, s in iter_sites(model)] == [16, 16]
    for _, s in iter_sites(model):
        s.reset_stats()
    assert all(math.isnan(r) for r in spike_rates(model).values())
    set_mode(model, "sequential")
    functional.reset_net(model)
    model(x.expand(16, *x.shape))  # neurons follow the new T (the shape check would fail otherwise)
    assert all(0 < r < 1 for r in spike_rates(model).values())


def test_set_params_broadcasts_scalars_and_copies_per_channel_values():
    site = DAQCFSSite(3, 4)
    site.set_params(2.0)
    assert torch.equal(site.theta, torch.full((3,), 2.0))
    site.set_params(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.1, 0.0, -0.1]), 1.5)
    assert torch.equal(site.phi, torch.full((3,), 1.5)) and site.psi[2] == torch.tensor(-0.1)


def test_burst_flag_follows_every_way_burst_changes():
    """``bursts`` is cached per tensor version: in-place copies, .data, load_state_dict and a new
    Parameter each change it."""
    s = DAQCFSSite(4, 8)
    seen = [s.bursts]
    with torch.no_grad():
        s.burst.copy_(torch.full((4,), 3.0))
    seen.append(s.bursts)
    s.burst.data = torch.ones(4)
    seen.append(s.bursts)
    s.load_state_dict({**s.state_dict(), "burst": torch.full((4,), 2.0)})
    seen.append(s.bursts)
    s.burst = torch.nn.Parameter(torch.ones(4), requires_grad=False)
    seen.append(s.bursts)
    assert seen == [False, True, False, True, False]


@pytest.mark.parametrize("signed", [False, True])
def test_training_path_gives_the_inference_bits(signed):
    """Quant and parallel sites agree bit for bit, with and without gradients."""
    torch.manual_seed(1)
    site = DAQCFSSite(7, 8, signed=signed, mode="quant")
    site.set_params(torch.rand(7) + 0.3, torch.randn(7) * 0.1, torch.rand(7) + 0.5, burst=torch.tensor([1.0, 3] * 3 + [1]))
    x = torch.randn(4, 5, 7) * 2
    with torch.no_grad():
        quant = site(x)
        site.mode = "parallel"
        parallel = site(x)
    site.mode = "quant"
    site.theta.requires_grad_(True)
    trained = site(x)
    assert torch.equal(quant, parallel) and torch.equal(trained.detach(), quant)


def test_deferred_statistics_count_every_call():
    """A parallel site reduces its counts lazily (many small calls, then a read): nothing is lost."""
    torch.manual_seed(2)
    site = DAQCFSSite(576, 16, signed=True, mode="parallel")
    site.set_params(torch.rand(576) + 0.2)
    spikes, peak, at_cap = 0.0, 0.0, 0
    with torch.no_grad():
        for step in range(300):  # 300 x 576 counts: past the pending limit, so some flushes happen
            x = torch.randn(1, 1, 576) * (3 if step % 7 == 0 else 1)
            c = (site(x) * 16 / site.theta).round().abs()
            spikes, peak, at_cap = spikes + float(c.sum()), max(peak, float(c.max())), at_cap + int((c >= 16).sum())
    n = site.parallel
    assert n.spikes_total == spikes and n.peak_spikes == peak == 16
    assert n.neuron_steps_total == 300 * 576 * 16 and n.at_cap_share == at_cap / (300 * 576)


def _edit_data_copy(site, theta):
    site.theta.data.copy_(theta)


def _edit_data_fill(site, theta):
    site.theta.data.fill_(float(theta[0]))


def _edit_no_grad_copy(site, theta):
    with torch.no_grad():
        site.theta.copy_(theta)


def _edit_data_assign(site, theta):
    site.theta.data = theta.clone()


def _edit_load_state_dict(site, theta):
    state = site.state_dict()
    state["theta"] = theta.clone()
    site.load_state_dict(state)


def _edit_set_params(site, theta):
    site.set_params(theta=theta)


@pytest.mark.parametrize("edit", [_edit_data_copy, _edit_data_fill, _edit_no_grad_copy, _edit_data_assign,
                                  _edit_load_state_dict, _edit_set_params])
@pytest.mark.parametrize("mode", ["quant", "parallel"])
def test_every_parameter_edit_reaches_the_inference_path(edit, mode):
    """The fused multiply-add is cached; an edit by any route must still change the next output
    at the same T (``.data`` edits bump no version counter)."""
    site = DAQCFSSite(3, T=8, signed=True, mode=mode)
    site.set_params(theta=1.0)
    x = torch.tensor([[0.3, -0.7, 2.0]])
    before = site(x).clone()
    edit(site, torch.full((3,), 4.0))
    after = site(x)
    fresh = DAQCFSSite(3, T=8, signed=True, mode=mode)
    fresh.set_params(theta=4.0)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh(x))


@pytest.mark.parametrize("name", ["psi", "phi", "burst"])
def test_data_edits_of_psi_phi_burst_reach_the_inference_path(name):
    site = DAQCFSSite(2, T=4, signed=True, mode="parallel")
    site.set_params(theta=1.0)
    x = torch.tensor([[0.1, -3.0]])
    before = site(x).clone()
    getattr(site, name).data.fill_(3.0)
    assert not torch.equal(before, site(x))


def test_spike_counting_can_be_switched_off_without_changing_outputs():
    from spike_modules.site import set_spike_counting

    model = toy()
    set_mode(model, "parallel")
    x = torch.randn(4, 6)
    y = model(x)
    counted = model[0].parallel.neuron_steps_total
    set_spike_counting(model, False)
    assert torch.equal(model(x), y) and model[0].parallel.neuron_steps_total == counted
    set_spike_counting(model, True)
    model(x)
    assert model[0].parallel.neuron_steps_total == 2 * counted


def test_frozen_deployed_sites_take_the_lean_path_with_the_same_bits():
    # frozen, spike counting off, no observer, no gradients: the generation path; same values, and
    # anything that needs the full path (an observer, counting, a wrong width) still gets it
    from spike_modules.site import frozen, set_spike_counting

    site = DAQCFSSite(6, T=7, signed=True, coding="weighted", mode="parallel")
    site.set_params(torch.linspace(0.5, 1.5, 6), 0.1, 1.0, torch.tensor([1.0, 3.0, 1.0, 1.0, 2.0, 1.0]),
                    dead=torch.tensor([0.0, 4.0, 9.0, 0.0, 30.0, 2.0]))
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(4)) * 2
    with torch.no_grad():
        full = site(x)
        set_spike_counting(site, False)
        with frozen(site):
            lean = site(x)
            seen = []
            site.observer = type("Obs", (), {"update": lambda self, v: seen.append(v)})()
            watched = site(x)
            site.observer = None
            with pytest.raises(ValueError, match="channels"):
                site(x[..., :5])
    assert torch.equal(lean, full) and torch.equal(watched, full) and len(seen) == 1
    assert bool((full == 0).any()) and bool((site.dead > 0).any())
