"""Weighted sites capped below the levels their T reaches (``max_levels``), and the k and v sites of a
converted model capped so that the KV cache holds int8 counts at T=8 (``kv_levels``)."""

import pytest
import torch
from spikingjelly.activation_based import functional

from calibration import Calibration, CalibrationConfig, calibrate
from calibration.int8 import quantize_weights_
from smollm2_converter import ConversionConfig, convert, run_sequential
from spike_modules import DAQCFSSite, iter_sites, set_mode
from spike_modules.kv_cache import SpikeKVCache
from spike_modules.neurons import ParaInfNeuron
from spike_modules.neurons_multi import WeightedIFNeuron
from spike_modules.quantizer import capped_levels, weighted_spikes
from stac_lm.convert.options import DEFAULT_KV_LEVELS, ConvertOptions

T8 = 8


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("burst", [1.0, 3.0])
def test_a_capped_neuron_fires_its_counts_over_all_t_steps(signed, burst):
    """Fed x for T steps, a neuron capped at 127 levels sums its digits to the parallel neuron's count,
    which stops at B*127, and fires the spikes the parallel neuron's statistics count."""
    th = torch.tensor([0.5, 1.0, 2.0, 4.0])
    x = (torch.randint(-6 * 256, 6 * 256, (256, 4), generator=torch.Generator().manual_seed(0)).float() / 256) * th
    seq = WeightedIFNeuron(T8, th, signed=signed, burst=burst)
    par = ParaInfNeuron(T8, th, signed=signed, burst=burst, coding="weighted")
    seq.max_levels = par.max_levels = 127
    assert seq.levels == par.levels == 127
    train = seq(x.expand(T8, *x.shape))
    c = par.counts(x)
    assert float(c.abs().max()) == burst * 127, "the input must reach the cap"
    assert c.min() >= (-burst * 127 if signed else 0.0)
    torch.testing.assert_close(train.mean(0), c * (th / 127), rtol=1e-6, atol=0)
    assert seq.spikes_total == float(weighted_spikes(c, T8, burst).sum())
    torch.testing.assert_close(par.spike_train(x), train, rtol=0, atol=1e-6)
    par(x)
    assert par.spikes_total == seq.spikes_total
    functional.reset_net(seq)


def test_a_capped_site_quantises_as_a_site_of_fewer_steps():
    """127 levels at T=8: the values of a T=7 site (same thresholds), spikes at most those of T=7 (an
    8th digit can only shorten a signed-digit form), and sequential mode equal to parallel mode."""
    torch.manual_seed(0)
    capped = DAQCFSSite(16, T=T8, signed=True, mode="parallel", coding="weighted", max_levels=127)
    seven = DAQCFSSite(16, T=7, signed=True, mode="parallel", coding="weighted")
    for site in (capped, seven):
        site.set_params(theta=torch.rand(16) + 0.5, psi=0.01, phi=1.02)
    seven.set_params(theta=capped.theta, psi=0.01, phi=1.02)
    x = torch.randn(50, 16)
    y = capped(x)
    assert capped.levels == 127 and torch.equal(y, seven(x))
    assert capped.parallel.spikes_total <= seven.parallel.spikes_total
    capped.mode = "sequential"
    torch.testing.assert_close(capped(x.expand(T8, *x.shape)).mean(0), y, rtol=0, atol=1e-6)
    assert capped.sequential.spikes_total == capped.parallel.spikes_total


def test_the_cap_follows_every_t_and_is_refused_where_it_means_nothing():
    site = DAQCFSSite(4, T=T8, coding="weighted", max_levels=127)
    site.T = 6
    assert site.levels == 63, "T=6 reaches 63 levels: the cap changes nothing"
    site.T = 10
    assert site.levels == 127
    site.max_levels = None
    assert site.levels == 1023 and site.parallel.levels == 1023
    assert capped_levels(8, "weighted", 127) == 127 and capped_levels(8, "weighted") == 255
    with pytest.raises(ValueError, match="rate coding's levels are its timesteps"):
        DAQCFSSite(4, T=16, max_levels=8)
    with pytest.raises(ValueError, match="whole number >= 1"):
        DAQCFSSite(4, T=T8, coding="weighted", max_levels=0)
    with pytest.raises(ValueError, match="rate coding's levels"):
        ConversionConfig(T=16, kv_levels=127)


def _tiny(kv_levels):
    from tiny_models import VOCAB, tiny_model

    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    snn = convert(tiny_model("llama", VOCAB), ConversionConfig(T=T8, coding="weighted", spike_head=True,
                                                                kv_levels=kv_levels))
    quantize_weights_(snn, "own", progress=False, head=True)
    ccfg = CalibrationConfig(T=T8, coding="weighted", percentile=99.0, fit_affine=True, kv_levels=kv_levels)
    calib = calibrate(snn, [ids], ccfg, progress=False)
    return snn, calib, ids


def test_kv_levels_give_an_int8_cache_at_t8_and_cached_decoding_keeps_the_logits():
    snn, calib, ids = _tiny(127)
    calib.apply_to(snn)
    set_mode(snn, "parallel")
    caps = {name.rpartition(".")[2]: site.levels for name, site in iter_sites(snn)}
    assert caps["k_site"] == caps["v_site"] == 127 and caps["q_site"] == 255
    with torch.no_grad():
        full = snn(ids[:1]).logits
        cache = SpikeKVCache(snn)
        parts = [snn(ids[:1, :16], past_key_values=cache, use_cache=True).logits,
                 snn(ids[:1, 16:], past_key_values=cache, use_cache=True).logits]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)
    assert all(layer.keys.dtype == torch.int8 and layer.values.dtype == torch.int8 for layer in cache.layers)
    uncapped, ucalib, _ = _tiny(None)
    ucalib.apply_to(uncapped)
    set_mode(uncapped, "parallel")
    cache = SpikeKVCache(uncapped)
    with torch.no_grad():
        uncapped(ids[:1], past_key_values=cache, use_cache=True)
    assert all(layer.keys.dtype == torch.int16 for layer in cache.layers)
    # the time-stepped network computes parallel mode's logits with the caps too
    seq = run_sequential(snn, ids)
    with torch.no_grad():
        par = snn(ids).logits
    assert float((seq - par).norm() / par.norm()) < 1e-5


def test_calibration_fits_capped_sites_at_their_levels_and_must_match_the_model():
    snn, calib, _ = _tiny(127)
    _, full_calib, _ = _tiny(None)  # the same observations, every level
    k = next(name for name in calib.sites if name.endswith("k_site"))
    q = k.replace("k_site", "q_site")
    assert calib.config.levels_of(k) == 127 and calib.config.levels_of(q) == 255
    err = lambda c, name: c.stats[name]["reservoir_mean_abs_error"]  # noqa: E731
    assert err(calib, k) > 1.5 * err(full_calib, k), "a k site is fitted at half the levels: about twice the error"
    assert err(calib, q) == err(full_calib, q)
    with pytest.raises(ValueError, match="kv_levels differ"):
        Calibration(CalibrationConfig(T=T8, coding="weighted"), calib.sites).apply_to(snn)


def test_options_cap_kv_for_weighted_coding_and_old_files_read_back_uncapped():
    assert ConvertOptions().kv_levels == DEFAULT_KV_LEVELS == 127 and ConvertOptions(kv_levels=0).kv_levels == 0
    assert ConvertOptions(simplified=True).kv_levels == 0
    with pytest.raises(ValueError, match="--kv_levels 127 caps the levels of weighted spikes"):
        ConvertOptions(simplified=True, kv_levels=127)
    old = {k: v for k, v in ConvertOptions().to_dict().items() if k != "kv_levels"}
    assert ConvertOptions.from_dict(old).kv_levels == 0


def test_a_saved_capped_snn_loads_with_its_caps_and_its_logits(tmp_path):
    from tiny_models import tiny_tokenizer

    from stac_lm import SpikingCausalLM, from_pretrained

    snn, calib, ids = _tiny(127)
    calib.apply_to(snn)
    set_mode(snn, "parallel")
    model = SpikingCausalLM.from_converted_(snn, calib, tiny_tokenizer())
    loaded = from_pretrained(model.save_pretrained(tmp_path / "snn"))
    caps = {name: site.max_levels for name, site in iter_sites(loaded)}
    assert caps == {name: site.max_levels for name, site in iter_sites(snn)}
    assert sorted({c for c in caps.values()}, key=str) == [127, None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, snn(ids).logits)
