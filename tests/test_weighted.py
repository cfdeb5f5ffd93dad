"""Weighted (phase-coded) spikes: the sequential neuron, its closed form, the site, the spike cost."""

import functools

import pytest
import torch
from spikingjelly.activation_based import functional

from spike_modules import DAQCFSSite, ParaInfNeuron
from spike_modules.neurons import weighted_train
from spike_modules.neurons_multi import WeightedIFNeuron
from spike_modules.quantizer import coding_levels, max_exact_burst, signed_digits, weighted_spikes


def test_levels_per_coding():
    assert coding_levels(8, "rate") == 8 and coding_levels(8, "weighted") == 255
    assert max_exact_burst(8, "weighted") == 2**24 // 255
    with pytest.raises(ValueError, match="weighted coding takes T"):
        coding_levels(17, "weighted")
    with pytest.raises(ValueError, match="coding must be one of"):
        coding_levels(8, "phase")


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 12])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("burst", [1.0, 3.0])
def test_sequential_equals_closed_form_on_constant_input(T, signed, burst):
    """Fed x for T steps, the neuron's digits sum (weighted) to the parallel neuron's count, exactly,
    and it fires exactly the spikes the closed-form cost says."""
    torch.manual_seed(T)
    L = 2**T - 1
    # dyadic inputs and power-of-two thresholds: no float rounding anywhere (the time-mean of T
    # equal values and u * L are exact), so any difference is a wrong neuron, not a rounding tie
    th = torch.tensor([0.5, 1.0, 2.0, 4.0])
    x = (torch.randint(-6 * 256, 6 * 256, (256, 4)).float() / 256) * th
    seq = WeightedIFNeuron(T, th, signed=signed, burst=burst)
    par = ParaInfNeuron(T, th, signed=signed, burst=burst, coding="weighted")
    train = seq(x.expand(T, *x.shape))
    c = par.counts(x)
    assert torch.allclose(train.mean(0), c * (th / L), rtol=1e-6, atol=0)
    lo = -burst * L if signed else 0.0
    assert c.min() >= lo and c.max() <= burst * L
    assert seq.spikes_total == float(weighted_spikes(c, T, burst).sum())
    # and the parallel neuron's spike train is the sequential one
    assert torch.allclose(par.spike_train(x), train, rtol=0, atol=1e-6)
    functional.reset_net(seq)


@functools.lru_cache(maxsize=None)
def fewest_digits(n: int, k: int) -> int:
    """Exhaustive search: the fewest nonzero digits in {-1, 0, 1} at weights 2**(k-1) .. 1 summing to n."""
    if k == 0:
        return 0 if n == 0 else 10**6
    w = 2 ** (k - 1)
    if abs(n) > 2 * w - 1:
        return 10**6
    return min(fewest_digits(n - d * w, k - 1) + (d != 0) for d in (-1, 0, 1))


@pytest.mark.parametrize("T", [1, 2, 5, 8, 10])
def test_unit_burst_digits_are_the_fewest_signed_digits(T):
    L = 2**T - 1
    n = torch.arange(-L, L + 1, dtype=torch.float32)
    digits = torch.stack(signed_digits(n, T))
    weights = torch.tensor([2.0 ** (T - 1 - k) for k in range(T)])[:, None]
    assert torch.equal((digits * weights).sum(0), n)
    assert weighted_spikes(n, T).tolist() == [fewest_digits(int(v), T) for v in n.tolist()]
    # and fewer than plain binary: 7 = 8 - 1 is two spikes, not three
    if T >= 4:
        assert float(weighted_spikes(torch.tensor([7.0]), T)) == 2


def test_bursts_carry_values_beyond_the_levels():
    # T=3 (L=7), B=4: 20 is out of reach of one spike per step; the digits sum to it, at most 4 a step
    c = torch.tensor([20.0, -20.0, 29.0])
    digits = torch.stack(signed_digits(c, 3, 4.0))
    assert torch.equal((digits * torch.tensor([4.0, 2.0, 1.0])[:, None]).sum(0), torch.tensor([20.0, -20.0, 28.0]))
    assert float(digits.abs().max()) <= 4
    train = weighted_train(c, 3, 4.0)
    assert torch.allclose(train.mean(0) * 7, torch.tensor([20.0, -20.0, 28.0]))


@pytest.mark.parametrize("signed", [False, True])
def test_weighted_site_parallel_equals_sequential_and_counts_cheap_spikes(signed):
    torch.manual_seed(0)
    site = DAQCFSSite(16, T=6, signed=signed, mode="parallel", coding="weighted")
    site.set_params(theta=torch.rand(16) + 0.5, psi=0.01, phi=1.02)
    x = torch.randn(10, 16)
    y = site(x)
    rate_site = DAQCFSSite(16, T=63, signed=signed, mode="parallel")
    rate_site.set_params(theta=site.theta, psi=0.01, phi=1.02)
    assert torch.equal(y, rate_site(x)), "63 weighted levels quantise as 63 rate steps"
    assert site.parallel.spikes_total < 0.5 * rate_site.parallel.spikes_total
    site.mode = "sequential"
    seq = site(x.expand(6, *x.shape))
    assert torch.allclose(seq.mean(0), y, atol=1e-6)
    assert site.sequential.spikes_total == site.parallel.spikes_total


def test_weighted_site_refuses_catch_up():
    site = DAQCFSSite(4, T=4, coding="weighted")
    with pytest.raises(ValueError, match="catch-up applies to rate coding only"):
        site.catch_up = True


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_weighted_network_time_stepped_simulation_equals_parallel_mode(arch):
    """Every weighted neuron integrates its whole input window before it fires, and every rate-domain
    op's window sum is f of its mean input, so the time-stepped network computes parallel mode's
    logits (to float rounding), where rate-coded sites only approach them."""
    from tiny_models import VOCAB, tiny_model

    from calibration import CalibrationConfig, calibrate
    from smollm2_converter import ConversionConfig, convert, run_sequential
    from spike_modules import set_mode

    torch.manual_seed(0)
    ann = tiny_model(arch, VOCAB)
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    snn = convert(ann, ConversionConfig(T=5, coding="weighted", spike_head=True))
    calibrate(snn, [ids], CalibrationConfig(T=5, coding="weighted", rule="percentile", percentile=99.0,
                                            max_burst=8, fit_affine=False), progress=False).apply_to(snn)
    set_mode(snn, "parallel")
    with torch.no_grad():
        par = snn(ids).logits
        ann_logits = ann(ids).logits
    seq = run_sequential(snn, ids)
    rel = float((seq - par).norm() / par.norm())
    assert rel < 1e-5, rel
    # and it is a spiking network: the logits are not the ANN's
    assert float((par - ann_logits).norm() / ann_logits.norm()) > 1e-3


def test_the_frontier_marks_the_default_conversion():
    from bench.frontier import DEFAULT_POINT
    from stac_lm.convert.options import ConvertOptions

    o = ConvertOptions()
    assert (o.coding, o.timesteps, o.percentile, o.spike_head, o.quant_backend != "none" and o.int8_rounding,
            o.power_of_two_steps, o.step_rounding, o.silence_budget, o.silence_weighting, o.kv_levels or None) \
        == DEFAULT_POINT


def test_frontier_points_name_their_step_rounding():
    from bench.frontier import parse_point

    assert parse_point("weighted:7:99.9:p2:s0.02")["step_rounding"] == "up"
    near = parse_point("weighted:7:99.9:p2n")
    assert near["power_of_two_steps"] and near["step_rounding"] == "nearest" and near["silence_budget"] == 0.0
    assert not parse_point("rate:16:95")["power_of_two_steps"]
    assert parse_point("weighted:7:99.9:s0.02")["silence_weighting"] == "fisher"
    assert parse_point("weighted:7:99.9:cols:s0.02")["silence_weighting"] == "columns"
    assert parse_point("weighted:7:99.9:p2:gptq:s0.02")["int8_rounding"] == "gptq"
    assert parse_point("weighted:7:99.9:p2:s0.02")["int8_rounding"] == "nearest"
    assert parse_point("weighted:8:99.9:p2:gptq:s0.01:kv127")["kv_levels"] == 127
    assert parse_point("weighted:8:99.9:p2:gptq:s0.01")["kv_levels"] is None
    for bad in ("weighted:7:99.9:p2:p2n", "weighted:7:99.9:p3", "weighted:7", "weighted:7:99.9:float:gptq",
                "weighted:8:99.9:kv0", "weighted:8:99.9:kv127:kv63"):
        with pytest.raises(ValueError, match="expected coding:T:percentile"):
            parse_point(bad)


def test_frontier_draws_points_of_other_runs_only_on_the_same_texts():
    from bench.frontier import merged

    texts = {"calibration": {"name": "hamlet"}, "evaluation": {"name": "tempest"}, "calib_tokens": 8, "eval_tokens": 4}
    one = dict(texts, points=[{"spec": "a"}, {"spec": "b"}])
    two = dict(texts, points=[{"spec": "b", "new": 1}, {"spec": "c"}])
    assert [p["spec"] for p in merged(one, [two])["points"]] == ["a", "b", "c"]
    assert merged(one, [two])["points"][1] == {"spec": "b"}, "a point of the first file is kept as measured there"
    with pytest.raises(ValueError, match="evaluation differ"):
        merged(one, [dict(two, evaluation={"name": "lear"})])


@pytest.mark.parametrize("burst", [1.0, 4.0])
def test_weighted_statistics_equal_a_direct_count(burst):
    """The histogram reduction of the parallel neuron's statistics against the digits counted one by one."""
    torch.manual_seed(1)
    T, H = 5, 6
    L = 2**T - 1
    site = DAQCFSSite(H, T=T, signed=True, mode="parallel", coding="weighted")
    site.set_params(theta=torch.rand(H) + 0.5, burst=burst)
    xs = [torch.randn(40, H) * 2, torch.randn(7, H) * 0.1]
    counts = []
    for x in xs:
        site(x)
        scale, shift, _, lo, hi = site._fused()
        counts.append(torch.clamp(torch.floor(scale * x + shift), min=-burst * L, max=burst * L))
    c = torch.cat(counts).abs()
    spikes = weighted_spikes(c, T, burst)
    n = site.parallel
    assert n.spikes_total == float(spikes.sum()) and n.peak_spikes == float(spikes.max())
    assert n.active_share == int((c > 0).sum()) / c.numel()
    assert n.at_cap_share == int((c >= burst * L).sum()) / c.numel()
    if burst > 1:
        assert float(c.max()) > L, "the test must reach the bursts"


def test_counts_are_priced_with_the_t_they_were_fired_at():
    site = DAQCFSSite(1, T=3, signed=False, mode="parallel", coding="weighted")
    site.set_params(theta=1.0)
    site(torch.tensor([[1.0]]))            # level 7 of 7: three spikes at T=3
    site.T = 7                              # at T=7 level 7 would be two spikes (8 - 1)
    assert site.parallel.spikes_total == 3
