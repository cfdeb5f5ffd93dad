"""Parallel neuron == sequential SpikingJelly neuron == DA-QCFS quantizer, for every T in 1..64."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spikingjelly.activation_based import functional

from spike_modules import DAQCFSSite, IFNeuron, ParaInfNeuron, SignedIFNeuron, decode, spike_count

GRID = 64  # inputs are multiples of theta/64: every sum the neurons form is exact in float32


def sequential(T, th, signed):
    return SignedIFNeuron(T, th) if signed else IFNeuron(T, th)


@st.composite
def grid_case(draw):
    """T, per-channel power-of-two thresholds, and inputs on an exact grid (ties included)."""
    T = draw(st.integers(1, 64))
    H = draw(st.integers(1, 5))
    rows = draw(st.integers(1, 4))
    th = torch.tensor([2.0 ** draw(st.integers(-4, 4)) for _ in range(H)])
    m = draw(st.lists(st.integers(-90, 90), min_size=rows * H, max_size=rows * H))
    x = torch.tensor(m, dtype=torch.float32).view(rows, H) / GRID * th
    return T, th, x


@settings(max_examples=150, deadline=None)
@given(case=grid_case(), signed=st.booleans())
def test_parallel_spike_trains_equal_sequential_exactly(case, signed):
    T, th, x = case
    seq = sequential(T, th, signed)
    train_seq = seq(x.expand(T, *x.shape))
    para = ParaInfNeuron(T, th, signed=signed)
    assert torch.equal(para.spike_train(x), train_seq)  # every step, not only the total
    decoded = para(x)
    assert torch.equal(para.last_counts.float(), (train_seq.sum(0) / th).round())
    # independent float64 reference of docs/design.md section 1: count = clamp(floor(x*T/theta + 1/2), lo, T)
    ref = torch.clamp(torch.floor(x.double() * T / th.double() + 0.5), -T if signed else 0, T)
    assert torch.equal(para.last_counts.double(), ref)
    torch.testing.assert_close(decoded.double(), ref * th.double() / T, rtol=1e-6, atol=0)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_every_T_from_1_to_64_on_the_whole_grid(signed):
    """No T is left to chance: every T, every grid input in [-1.4, 1.4]*theta (all ties included)."""
    th = torch.tensor([0.25, 1.0, 8.0])
    x = (torch.arange(-90, 91, dtype=torch.float32) / GRID).view(-1, 1) * th
    for T in range(1, 65):
        train = sequential(T, th, signed)(x.expand(T, *x.shape))
        para = ParaInfNeuron(T, th, signed=signed)
        assert torch.equal(para.spike_train(x), train), f"T={T}"
        site = DAQCFSSite(3, T, signed=signed, mode="quant")
        site.set_params(th)
        assert torch.equal(para(x), site(x)), f"T={T}"


@settings(max_examples=150, deadline=None)
@given(case=grid_case(), signed=st.booleans(), data=st.data())
def test_parallel_decoded_equals_daqcfs_quantizer(case, signed, data):
    T, th, x = case
    H = th.numel()
    psi = torch.tensor(data.draw(st.lists(st.floats(-0.5, 0.5, width=32), min_size=H, max_size=H)))
    phi = torch.tensor(data.draw(st.lists(st.floats(0.5, 2.0, width=32), min_size=H, max_size=H)))
    site = DAQCFSSite(H, T, signed=signed, mode="quant")
    site.set_params(th, psi, phi)
    quantized = site(x)
    site.mode = "parallel"
    assert torch.equal(site(x), quantized)
    # the site folds phi, psi and theta into one multiply-add, so against the neuron fed the mapped
    # input its counts may differ only where T*phi*(x+psi)/theta + 1/2 is within float error of an integer
    para = ParaInfNeuron(T, th, signed=signed)
    para(phi * (x + psi))
    diff = (para.last_counts.float() - quantized * T / th).round().abs()
    pre = phi.double() * (x.double() + psi.double()) * T / th.double() + 0.5
    near_tie = (pre - pre.round()).abs() <= 1e-5 * torch.clamp(pre.abs(), min=1.0)
    assert bool((diff[~near_tie] == 0).all()) and bool((diff <= 1).all())
    # and the sequential site's spikes average to the same value
    site.mode = "sequential"
    train = site(x.expand(T, *x.shape))
    torch.testing.assert_close(train.mean(0), quantized, rtol=1e-6, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(T=st.integers(1, 64), signed=st.booleans(),
       x=st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=24),
       theta=st.floats(0.015625, 128.0, width=32))
def test_arbitrary_floats_agree_except_at_rounding_ties(T, signed, x, theta):
    """Off the grid, the sequential sum and the closed form round differently only when
    T*x/theta + 1/2 is within float error of an integer; there the counts differ by one at most."""
    x = torch.tensor(x).view(1, -1)
    th = torch.full((x.shape[1],), theta)
    c_seq = sequential(T, th, signed)(x.expand(T, *x.shape)).sum(0) / th
    para = ParaInfNeuron(T, th, signed=signed)
    para(x)
    diff = (c_seq.round() - para.last_counts.float()).abs()
    pre = x.double() * T / theta + 0.5
    near_tie = (pre - pre.round()).abs() <= 1e-4 * torch.clamp(pre.abs(), min=1.0)
    assert bool((diff[~near_tie] == 0).all())
    assert bool((diff <= 1).all())


def test_counts_vary_with_input_and_with_T():
    """A dead or saturated neuron fails here."""
    x = torch.linspace(-0.5, 1.5, 201).view(1, -1)
    for cls_args in [dict(signed=False), dict(signed=True)]:
        counts = {}
        for T in (4, 16):
            n = ParaInfNeuron(T, 1.0, **cls_args)
            n(x)
            c = n.last_counts.flatten()
            assert bool((c[1:] >= c[:-1]).all()), "counts must be monotone in the input"
            assert len(c.unique()) >= T, f"a ramp over [-0.5, 1.5] must reach at least {T} levels at T={T}"
            assert 0.0 < n.spike_rate < 1.0
            counts[T] = n(x)
        assert not torch.equal(counts[4], counts[16]), "T must change the output"
    seq = IFNeuron(8, 1.0)
    spikes = seq(x.expand(8, *x.shape))
    per_input = spikes.sum(0).flatten()
    assert per_input.min() == 0 and per_input.max() == 8 and len(per_input.unique()) == 9


@pytest.mark.parametrize("make", [lambda T: IFNeuron(T), lambda T: SignedIFNeuron(T)], ids=["IF", "signed"])
def test_reset_net_clears_membrane(make):
    n = make(6)
    x = torch.full((6, 3, 4), 0.3)
    first = n(x)
    carried = n(x)
    assert not torch.equal(first, carried), "without reset the membrane carries over"
    functional.reset_net(n)
    assert torch.equal(n(x), first)


def test_text_shaped_input_and_per_channel_thresholds():
    B, S, H, T = 2, 7, 10, 8
    th = torch.logspace(-2, 2, H)
    x = torch.rand(B, S, H) * th * 1.2
    para = ParaInfNeuron(T, th)
    y = para(x)
    assert y.shape == (B, S, H) and para.last_counts.shape == (B, S, H)
    assert torch.equal(para.spike_train(x), IFNeuron(T, th)(x.expand(T, B, S, H)))
    # each channel quantizes on its own scale: error below one step per channel
    assert bool(((y - x.clamp(max=th)).abs() <= th / T / 2 + 1e-6).all())


def test_spike_rate_counts_every_spike():
    n = ParaInfNeuron(4, 1.0)
    n(torch.tensor([[1.0, 0.5, 0.0, -1.0]]))  # 4 + 2 + 0 + 0 spikes over 4 neurons x 4 steps
    assert math.isclose(n.spike_rate, 6 / 16)
    n.reset_stats()
    assert math.isnan(n.spike_rate)


@pytest.mark.parametrize("signed", [False, True])
def test_inference_path_equals_autograd_path(signed):
    """ParaInfNeuron runs in place when no gradient is needed; both paths give the same bits."""
    th = torch.rand(7) + 0.3
    x = torch.randn(3, 5, 7)
    para = ParaInfNeuron(16, th, signed=signed)
    with torch.no_grad():
        fast, fast_counts = para(x), para.last_counts.clone()
    slow = para(x.clone().requires_grad_(True))
    assert torch.equal(fast, slow.detach()) and torch.equal(fast_counts, para.last_counts)
    assert torch.equal(fast, decode(spike_count(x / th, 16, signed), th, 16))
