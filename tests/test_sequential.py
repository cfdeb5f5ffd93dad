"""The whole-model sequential simulation: real SpikingJelly neurons, time-stepped, against parallel mode."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from smollm2_converter import ConversionConfig, run_sequential, sequential_mode
from spike_modules import DAQCFSSite, iter_sites, set_mode
from spike_modules.norm import SpikeNorm
from spike_modules.site import SiteMode
from spike_modules.temporal import apply_site, held_op, rate_op, running_mean
from tests.test_attention import calibrated, padded
from tests.test_converter import MODELS, data


def rel(a, b):
    return float((a - b).norm() / b.norm())


def parallel_logits(snn, x, T, mask=None):
    saved = {name: site.T for name, site in iter_sites(snn)}
    for _, site in iter_sites(snn):
        site.T = T
    with torch.no_grad():
        out = snn(x, attention_mask=mask).logits
    for name, site in iter_sites(snn):
        site.T = saved[name]
    return out


# --- the rate-domain schedules -------------------------------------------------------------------

def test_rate_op_time_sum_is_f_of_the_mean_and_it_is_causal():
    T, B = 6, 3
    x = torch.randn(T * B, 5)
    f = torch.nn.functional.softmax
    y = rate_op(lambda a: f(a, -1), T, x).view(T, B, 5)
    mean = x.view(T, B, 5).mean(0)
    torch.testing.assert_close(y.sum(0), T * f(mean, -1))
    # the running sum at every step is t * f(running mean): the op never looks ahead
    for t in range(1, T + 1):
        torch.testing.assert_close(y[:t].sum(0), t * f(x.view(T, B, 5)[:t].mean(0), -1))
    later = x.clone().view(T, B, 5)
    later[3:] += 10.0
    torch.testing.assert_close(rate_op(lambda a: f(a, -1), T, later.flatten(0, 1)).view(T, B, 5)[:3], y[:3])
    torch.testing.assert_close(running_mean(x, T).view(T, B, 5)[-1], mean)


def test_held_op_emits_f_of_the_window_mean_at_every_step():
    T, B = 4, 2
    x = torch.randn(T * B, 7)
    y = held_op(torch.tanh, T, x).view(T, B, 7)
    assert torch.equal(y[0], y[-1])
    torch.testing.assert_close(y[0], torch.tanh(x.view(T, B, 7).mean(0)))


@pytest.mark.parametrize("norm", [torch.nn.LayerNorm(6), LlamaRMSNorm(6)], ids=["layernorm", "rmsnorm"])
def test_spike_norm_is_the_norm_outside_the_simulation_and_sums_to_it_inside(norm):
    T, B = 5, 2
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(T * B, 3, 6)
    mean = x.view(T, B, 3, 6).mean(0)
    for causal in (True, False):
        sn = SpikeNorm(norm, causal=causal)
        assert torch.equal(sn(mean), norm(mean))
        sn.stac_sim_T = T
        y = sn(x).view(T, B, 3, 6)
        torch.testing.assert_close(y.sum(0), T * norm(mean))
        assert torch.equal(y[0], y[1]) != causal  # held: the same value at every step
    with pytest.raises(ValueError, match="SpikeNorm wraps LayerNorm, .*LlamaRMSNorm.*; got Linear"):
        SpikeNorm(torch.nn.Linear(6, 6))


def test_time_folding_is_step_major_and_matches_the_parallel_neuron():
    """A site fed the same input at every step (rows t*B..t*B+B-1 are step t) emits spikes
    whose mean is the parallel-mode value."""
    T, B = 8, 3
    site = DAQCFSSite(5, T, signed=True, name="s")
    site.set_params(torch.rand(5) + 0.5)
    x = torch.randn(B, 4, 5)
    site.mode = "parallel"
    ref = site(x)
    site.mode = "sequential"
    spikes = apply_site(site, x.repeat(T, 1, 1)).view(T, B, 4, 5)
    torch.testing.assert_close(spikes.mean(0), ref)
    with pytest.raises(ValueError, match="time-folded batch"):
        apply_site(site, torch.randn(T + 1, 5))


# --- the whole model -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", MODELS)
def test_large_T_sequential_matches_parallel_and_ann(arch):
    """At T=256 with max thresholds sequential ~ parallel ~ ANN. Measured relative logit errors
    were 0.002-0.003 for sequential against parallel and against the ANN; the bounds leave room
    for float noise. The tokens are prefixes of the calibration data, so nothing is clipped;
    the first two rows are left-padded, the third is not."""
    T = 256
    snn = calibrated(arch, T, mode="simplified")  # every site on, probabilities too
    x = data()[:3, :12]
    mask = padded(x)
    with torch.no_grad():
        ref = MODELS[arch]()(x[2:]).logits[0]
    par = parallel_logits(snn, x, T, mask)
    seq = run_sequential(snn, x, T, attention_mask=mask)
    live = mask.bool()
    assert rel(seq[live], par[live]) < 0.01, rel(seq[live], par[live])
    assert rel(seq[2], ref) < 0.01 and rel(par[2], ref) < 0.01, (rel(seq[2], ref), rel(par[2], ref))
    assert (seq[live].argmax(-1) == par[live].argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("arch", MODELS)
def test_sequential_counts_come_from_the_spikingjelly_neurons(arch):
    snn = calibrated(arch, 8)
    sites = [site for _, site in iter_sites(snn)]
    for site in sites:
        site.reset_stats()
    run_sequential(snn, data(n=2, seq=10), 8)
    assert all(site.sequential.neuron_steps_total > 0 for site in sites), "every site ran its sequential neuron"
    assert all(site.parallel.neuron_steps_total == 0 for site in sites), "the parallel neuron did not run"
    rates = [site.sequential.spike_rate for site in sites]
    assert all(0 < r < 1 for r in rates), rates
    assert all(site.mode is SiteMode.PARALLEL and site.T == 8 for site in sites), "modes are restored"


@pytest.mark.parametrize("arch", MODELS)
def test_spike_trains_are_valid_and_T_changes_the_output(arch):
    snn = calibrated(arch, 8, mode="simplified")
    trains = {}

    def keep(name):
        def hook(site, args, out):
            trains[name] = (out.detach(), site.theta.detach(), site.signed)
        return hook

    handles = [site.register_forward_hook(keep(name)) for name, site in iter_sites(snn)]
    x = data(n=2, seq=10)
    try:
        out8 = run_sequential(snn, x, 8)
    finally:
        for h in handles:
            h.remove()
    assert len(trains) == len(list(iter_sites(snn)))
    for name, (s, theta, signed) in trains.items():
        assert s.shape[0] == 8, name
        levels = s / theta
        allowed = {-1.0, 0.0, 1.0} if signed else {0.0, 1.0}
        assert set(levels.round().unique().tolist()) <= allowed, name
        assert torch.allclose(levels, levels.round(), atol=1e-5), name
        assert (levels != 0).any(), f"{name} never fires"
    out32 = run_sequential(snn, x, 32)
    assert rel(out8, out32) > 0.01, "T must matter"


def test_held_norms_change_the_schedule_not_the_sum():
    """spike_norm=False holds each norm's value over the window; at large T both schedules
    agree with parallel mode, at small T they differ from each other."""
    x = data(n=2, seq=10)
    held = calibrated("llama", 8, spike_norm=False)
    causal = calibrated("llama", 8, spike_norm=True)
    assert all(not m.causal for m in held.modules() if isinstance(m, SpikeNorm))
    assert not torch.equal(run_sequential(held, x, 8), run_sequential(causal, x, 8))
    par = parallel_logits(held, x, 128)
    assert rel(run_sequential(held, x, 128), par) < 0.02


def test_bad_use_is_refused_and_state_is_restored():
    snn = calibrated("gpt2", 4)
    with pytest.raises(ValueError, match="input_ids must be"):
        run_sequential(snn, data(n=1)[0], 4)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        run_sequential(snn, data(n=2), 4, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="was not converted by STAC"):
        run_sequential(MODELS["gpt2"](), data(n=1), 4)
    with pytest.raises(RuntimeError, match="boom"):
        with sequential_mode(snn, 4):
            assert all(site.mode is SiteMode.SEQUENTIAL for _, site in iter_sites(snn))
            raise RuntimeError("boom")
    assert all(site.mode is SiteMode.PARALLEL for _, site in iter_sites(snn))
    assert all(m.stac_sim_T is None for m in snn.modules() if hasattr(m, "stac_sim_T"))
    set_mode(snn, "parallel")
    with torch.no_grad():
        snn(data(n=1))  # parallel mode works again after the simulation
