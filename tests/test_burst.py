"""Burst neurons: up to B spikes per step, parallel == sequential == quantizer, and calibration
gives bursts only to channels whose calibration values exceed the threshold."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spikingjelly.activation_based import functional

from calibration import CalibrationConfig, ChannelObserver, fit_site
from spike_modules import DAQCFSSite, ParaInfNeuron
from spike_modules.neurons import IFNeuron, SignedIFNeuron
from spike_modules.neurons_multi import BurstIFNeuron

GRID = 64


@st.composite
def burst_case(draw):
    T = draw(st.integers(1, 40))
    H = draw(st.integers(1, 5))
    rows = draw(st.integers(1, 4))
    th = torch.tensor([2.0 ** draw(st.integers(-3, 3)) for _ in range(H)])
    burst = torch.tensor([float(draw(st.integers(1, 6))) for _ in range(H)])
    m = draw(st.lists(st.integers(-600, 600), min_size=rows * H, max_size=rows * H))
    x = torch.tensor(m, dtype=torch.float32).view(rows, H) / GRID * th
    return T, th, burst, x


@settings(max_examples=150, deadline=None)
@given(case=burst_case(), signed=st.booleans())
def test_burst_neuron_equals_parallel_and_reference(case, signed):
    T, th, burst, x = case
    seq = BurstIFNeuron(T, th, signed=signed, burst=burst)
    train = seq(x.expand(T, *x.shape))
    para = ParaInfNeuron(T, th, signed=signed, burst=burst)
    assert torch.equal(para.spike_train(x), train)  # every step
    para(x)
    hi = burst.double() * T
    ref = torch.floor(x.double() * T / th.double() + 0.5)
    ref = torch.minimum(torch.maximum(ref, -hi if signed else torch.zeros_like(hi)), hi)
    assert torch.equal(para.last_counts.double(), ref)
    per_step = (train / th).round().abs()
    assert bool((per_step <= burst).all())  # never more than B spikes in one step
@settings(max_examples=100, deadline=None)
@given(case=burst_case(), signed=st.booleans())
def test_catch_up_fires_the_parallel_count_for_constant_input(case, signed):
    T, th, burst, x = case
    plain = BurstIFNeuron(T, th, signed=signed, burst=burst)(x.expand(T, *x.shape))
    catch_up = BurstIFNeuron(T, th, signed=signed, burst=burst, catch_up=True)(x.expand(T, *x.shape))
    assert torch.equal(catch_up.sum(0), plain.sum(0))  # same count; a catch-up neuron may fire it sooner


@pytest.mark.parametrize("signed", [False, True])
def test_catch_up_count_follows_the_summed_input_when_the_input_varies(signed):
    T, th = 8, torch.tensor([1.0, 1.0, 0.5])
    x = torch.zeros(T, 3)
    x[-1, 0] = 6.0                 # a late surge: one spike a step can fire only 1 of 6 in the last step
    x[0, 1], x[1:, 1] = 5.0, -0.6  # early overshoot, then taken back: net 5 - 4.2 = 0.8
    x[:, 2] = torch.tensor([1.0, 1.0, -3.0, 0.0, 0.0, 0.0, 0.0, 0.2])  # net -0.8 / 0.5: below zero
    spikes = BurstIFNeuron(T, th, signed=signed, catch_up=True)(x)
    summed = x.sum(0) / th + 0.5
    lo = -T if signed else 0
    assert torch.equal(spikes.sum(0) / th, summed.floor().clamp(lo, T))  # [6, 1, -2 or 0]
    plain = IFNeuron(T, th) if not signed else SignedIFNeuron(T, th)
    assert plain(x).sum(0)[0] / th[0] == 1  # the plain neuron loses the surge
    if not signed:
        counts = (spikes / th).cumsum(0)
        assert bool((counts >= 0).all()) and (spikes < 0).any()  # takes spikes back, never below zero




@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_burst_of_one_is_the_plain_if_neuron(signed):
    th = torch.tensor([0.5, 1.0, 2.0])
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0)) * 2
    for T in (1, 4, 16, 33):
        plain = (SignedIFNeuron(T, th) if signed else IFNeuron(T, th))(x.expand(T, *x.shape))
        burst = BurstIFNeuron(T, th, signed=signed, burst=1.0)(x.expand(T, *x.shape))
        assert torch.equal(plain, burst), f"T={T}"


def test_bursts_pass_what_plain_neurons_clip_and_count_their_spikes():
    T, th = 8, torch.ones(2)
    x = torch.tensor([[0.5, 30.0]])
    plain = ParaInfNeuron(T, th, signed=True)
    assert plain(x)[0, 1] == 1.0  # clipped at theta
    bursty = ParaInfNeuron(T, th, signed=True, burst=torch.tensor([1.0, 30.0]))
    assert bursty(x)[0, 1] == 30.0
    assert bursty.spikes_total == 4 + 240 and plain.spikes_total == 4 + 8
    assert bursty.spike_rate > 1  # spikes per neuron per step may exceed 1 with bursts
    assert bursty.peak_spikes == 240 and plain.peak_spikes == 8  # most spikes of one neuron for one input
    seq = BurstIFNeuron(T, th, signed=True, burst=torch.tensor([1.0, 30.0]))
    seq(x.expand(T, *x.shape))
    assert seq.peak_spikes == 240
    bursty.reset_stats()
    assert bursty.peak_spikes == 0


def test_burst_state_resets_with_reset_net():
    n = BurstIFNeuron(4, torch.ones(3), signed=True, burst=torch.tensor([1.0, 2.0, 5.0]))
    x = torch.tensor([[0.3, 1.7, -4.2]]).expand(4, 1, 3)
    first = n(x)
    functional.reset_net(n)
    assert torch.equal(n(x), first)


def test_site_bursts_in_every_mode():
    site = DAQCFSSite(2, 4, signed=True, mode="quant")
    site.set_params(torch.ones(2), burst=torch.tensor([1.0, 3.0]))
    x = torch.tensor([[2.6, 2.6], [-2.6, -2.6]])
    q = site(x)
    assert torch.equal(q, torch.tensor([[1.0, 2.5], [-1.0, -2.5]]))
    site.mode = "parallel"
    assert torch.equal(site(x), q)
    site.mode = "sequential"
    train = site(x.expand(4, *x.shape))
    torch.testing.assert_close(train.mean(0), q)
    assert site.spike_rate > 0
    with pytest.raises(ValueError, match="whole numbers >= 1"):
        site.set_params(1.0, burst=torch.tensor([1.0, 0.5]))


def test_calibration_sets_a_uniform_burst_cap_and_keeps_the_rule_thresholds():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 3, generator=g)
    x[7, 1] = 40.0  # one token with a huge value in channel 1
    obs = ChannelObserver(3, "site")
    obs.update(x)
    plain, stats = fit_site(obs, CalibrationConfig(T=8, rule="percentile", fit_affine=False), signed=True)
    assert torch.equal(plain.burst, torch.ones(3))
    assert stats["burst_channels_seen"] >= 1  # channel 1 needed bursts in calibration
    cfg = CalibrationConfig(T=8, rule="percentile", fit_affine=False, max_burst=64)
    params, _ = fit_site(obs, cfg, signed=True)
    assert torch.equal(params.theta, plain.theta)  # thresholds come from the rule either way
    assert torch.equal(params.burst, torch.full((3,), 64.0))
    site = DAQCFSSite(3, 8, signed=True, mode="parallel")
    site.set_params(params.theta, burst=params.burst)
    big = torch.tensor([[0.0, 40.0, 0.0]])
    torch.testing.assert_close(site(big), big, atol=float(params.theta.max()) / 16, rtol=0)  # no clipping
    with pytest.raises(ValueError, match="max_burst"):
        CalibrationConfig(T=8, max_burst=0)


def test_burst_budget_raises_theta_only_where_the_calibration_max_needs_more_spikes():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4000, 3, generator=g)
    x[0, 2] = 5000.0  # a "massive activation": one token, one channel
    obs = ChannelObserver(3, "site")
    obs.update(x)
    base = CalibrationConfig(T=8, rule="percentile", percentile=95.0, fit_affine=True, max_burst=2**20)
    plain, _ = fit_site(obs, base, signed=True)
    budgeted, stats = fit_site(obs, dataclasses.replace(base, burst_budget=16), signed=True)
    assert stats["budget_raised_channels"] == 1 and budgeted.theta.dtype == torch.float32
    assert torch.equal(budgeted.theta[:2], plain.theta[:2])
    assert float(budgeted.theta[2]) == pytest.approx(5000.0 / 16)  # the max needs exactly 16 spikes per step
    with pytest.raises(ValueError, match="burst_budget"):
        CalibrationConfig(T=8, max_burst=8, burst_budget=16)
