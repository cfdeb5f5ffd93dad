"""Dead zones (silent channels) and the KV cache at the width its counts need."""

from __future__ import annotations

import pytest
import torch

from spike_modules import DAQCFSSite, SiteMode
from spike_modules.kv_cache import SpikeKVCache


def weighted_site(dead, signed=True):
    site = DAQCFSSite(4, T=5, signed=signed, coding="weighted", mode="parallel")
    site.set_params(torch.tensor([1.0, 2.0, 0.5, 1.0]), dead=dead)
    return site


@pytest.mark.parametrize("signed", [True, False])
def test_dead_zone_silences_small_counts_in_both_modes(signed):
    x = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(0))
    dead = torch.tensor([0.0, 5.0, 12.0, 31.0])
    plain, silent = weighted_site(0.0, signed), weighted_site(dead, signed)
    c0, step = plain.parallel_counts(x)
    c1, _ = silent.parallel_counts(x)
    quiet = c0.abs() < dead
    assert bool(quiet.any()) and bool((~quiet & (c0 != 0)).any())
    assert torch.equal(c1, c0.masked_fill(quiet, 0.0))
    assert torch.equal(silent(x), c1 * step)
    silent.mode = SiteMode.SEQUENTIAL  # the weighted neuron knows its count before it fires
    seq = silent(x.expand(5, *x.shape)).mean(0)
    assert torch.allclose(seq, c1 * step, atol=1e-5)


@pytest.mark.parametrize("signed", [True, False])
def test_a_dead_zone_between_whole_counts_keeps_the_counts_at_and_past_it(signed):
    # silencing is computed in float operations (|c| - (ceil(dead) - 1) clamped to [0, 1]); the counts on either
    # side of an integer or fractional dead zone, and a zone below 1 (silences nothing), as |c| < dead says
    x = torch.linspace(-2.5, 2.5, 4001).view(-1, 1).expand(-1, 4)
    dead = torch.tensor([2.0, 2.5, 0.4, 0.0])
    c0, _ = weighted_site(0.0, signed).parallel_counts(x)
    c1, _ = weighted_site(dead, signed).parallel_counts(x)
    assert all(bool((c0[:, j].abs() == k).any()) for j, k in ((0, 2), (0, 1), (1, 3), (1, 2)))
    assert torch.equal(c1, c0.masked_fill(c0.abs() < dead, 0.0))


def test_rate_coding_refuses_a_dead_zone():
    site = DAQCFSSite(4, T=5, coding="rate")
    with pytest.raises(ValueError, match="needs weighted coding"):
        site.set_params(1.0, dead=2.0)
    with pytest.raises(ValueError, match=">= 0"):
        weighted_site(-1.0)


def test_state_dicts_and_calibrations_saved_before_dead_zones_load(tmp_path):
    from calibration.artifact import TENSORS_FILE, Calibration, CalibrationConfig, SiteParams
    from safetensors.torch import load_file, save_file

    site = weighted_site(torch.tensor([0.0, 3.0, 0.0, 1.0]))
    state = {k: v for k, v in site.state_dict().items() if not k.endswith("dead")}
    fresh = weighted_site(0.0)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.dead, torch.zeros(4))
    p = SiteParams(site.theta.detach().clone(), site.psi.detach().clone(), site.phi.detach().clone(), True,
                   dead=site.dead.detach().clone())
    cal = Calibration(CalibrationConfig(T=5, coding="weighted"), {"s": p})
    cal.save(tmp_path / "new")
    assert torch.equal(Calibration.load(tmp_path / "new").sites["s"].dead, site.dead)
    cal.save(tmp_path / "old")
    tensors = {k: v for k, v in load_file(str(tmp_path / "old" / TENSORS_FILE)).items() if not k.endswith("dead")}
    save_file(tensors, str(tmp_path / "old" / TENSORS_FILE))
    meta = tmp_path / "old" / "calibration.json"
    import json

    from stac_common.io import sha256_file
    d = json.loads(meta.read_text())
    d["tensors_sha256"] = sha256_file(tmp_path / "old" / TENSORS_FILE)
    meta.write_text(json.dumps(d))
    assert torch.equal(Calibration.load(tmp_path / "old").sites["s"].dead, torch.zeros(4))


@pytest.fixture(scope="module")
def tiny_snn():
    from tiny_models import VOCAB, tiny_model

    from calibration import CalibrationConfig, calibrate
    from calibration.int8 import quantize_weights_
    from smollm2_converter import ConversionConfig, convert
    from spike_modules import set_mode

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(1, VOCAB, (2, 32), generator=g) for _ in range(2)]
    snn = convert(tiny_model("llama", VOCAB), ConversionConfig(T=5, coding="weighted", spike_head=True))
    quantize_weights_(snn, "own", progress=False, head=True)
    calibrate(snn, batches, CalibrationConfig(T=5, coding="weighted", rule="percentile", percentile=99.0,
                                              max_burst=8, fit_affine=False), progress=False).apply_to(snn)
    set_mode(snn, "parallel")
    return snn, batches


def test_silence_is_placed_within_its_budget(tiny_snn):
    from calibration.silence import SilenceConfig, _divergence, _log_probs, calibrate_silence_

    snn, batches = tiny_snn
    windows = [w[None] for b in batches for w in b]
    summary = calibrate_silence_(snn, batches, SilenceConfig(budget=0.05, steps=6, weighting="columns"))
    dead = [s for n, s in snn.named_modules() if isinstance(s, DAQCFSSite) and bool((s.dead > 0).any())]
    assert dead and 0 < summary["bytes_share_silenced"] < 1
    assert summary["kl"] <= 0.05 and set(summary["silent_share_per_group"]) >= {"lm_head.site"}
    held = windows[1:3]  # the statistics read the first window, the budget the next two
    for s in dead:  # the budget is measured against the same model without dead zones
        s.__dict__["_saved_dead"] = s.dead.detach().clone()
        s.set_params(s.theta, s.psi, s.phi, s.burst, 0.0)
    ref = _log_probs(snn, held)
    for s in dead:
        s.set_params(s.theta, s.psi, s.phi, s.burst, s.__dict__.pop("_saved_dead"))
    assert _divergence(snn, held, ref)[0] == pytest.approx(summary["kl"], rel=1e-4)
    assert calibrate_silence_(snn, batches, SilenceConfig(budget=0.0))["bytes_share_silenced"] == 0.0
    assert not any(bool((s.dead > 0).any()) for s in snn.modules() if isinstance(s, DAQCFSSite))


def test_windows_are_shared_out_when_the_text_is_short():
    from calibration.silence import SilenceConfig, split_windows

    w = list(range(10))
    assert split_windows(w, 4, 4) == (w[:4], w[4:8])
    assert split_windows(w[:6], 4, 4) == (w[:3], w[3:6])
    assert split_windows(w[:4], 1, 2) == (w[:1], w[1:3])
    assert split_windows(w[:2], 1, 2) == (w[:1], w[1:2])
    assert split_windows(w[:1], 4, 4) == (w[:1], w[:1])
    assert (SilenceConfig().stat_windows, SilenceConfig().eval_windows) == (4, 4)
    assert (SilenceConfig(weighting="columns").stat_windows, SilenceConfig(weighting="columns").eval_windows) == (1, 2)


def test_fisher_weights_are_the_root_mean_square_gradient_of_sampled_log_likelihoods(tiny_snn):
    import copy

    import torch.nn.functional as F

    from calibration.silence import driving_sites, fisher_weights

    snn, batches = tiny_snn
    windows = [w[None] for w in batches[0]]
    sites = driving_sites(snn)
    bare = driving_sites(snn, column_norms=False)  # Fisher weighting reads no weight columns
    assert {n: (s, b) for n, (s, _, b) in bare.items()} == {n: (s, b) for n, (s, _, b) in sites.items()}
    assert all(w is None for _, w, _ in bare.values())
    wanted = [p.requires_grad for p in snn.parameters()]
    got = fisher_weights(snn, sites, windows, seed=3)
    assert all(s.mode is SiteMode.PARALLEL for s, _, _ in sites.values())  # modes and gradients put back
    assert [p.requires_grad for p in snn.parameters()] == wanted and any(wanted)
    # by hand: quant mode (the same values as parallel), each site's output kept, one sampled token per position
    ref = copy.deepcopy(snn)
    kept: dict[str, list] = {n: [] for n in sites}
    for name, site in ref.named_modules():
        if isinstance(site, DAQCFSSite):
            site.mode = SiteMode.QUANT
            if name in kept:
                site.register_forward_hook(lambda m, a, y, name=name: kept[name].append(y))
    ref.get_input_embeddings().register_forward_hook(lambda m, a, out: out.detach().requires_grad_())
    for p in ref.parameters():
        p.requires_grad_(False)
    g, total = torch.Generator().manual_seed(3), {n: 0.0 for n in sites}
    for ids in windows:
        for v in kept.values():
            v.clear()
        lp = F.log_softmax(ref(ids).logits.float(), -1).reshape(-1, ref.config.vocab_size)
        pick = torch.multinomial(lp.detach().exp(), 1, generator=g)
        ys = [y for n in sites for y in kept[n]]
        grads = torch.autograd.grad(lp.gather(1, pick).sum(), ys)
        i = 0
        for n in sites:
            for _ in kept[n]:
                total[n] = total[n] + grads[i].double().pow(2).reshape(-1, grads[i].shape[-1]).sum(0)
                i += 1
    tokens = sum(w.numel() for w in windows)
    for n in sites:
        assert torch.allclose(got[n], (total[n] / tokens).sqrt().float(), rtol=1e-4, atol=1e-9), n
    assert all(bool((w > 0).all()) for w in got.values())


def test_fisher_backward_pass_holds_one_decoder_layer_at_a_time(tiny_snn):
    # with the decoder layers checkpointed, nothing a layer computes is kept for the backward pass
    # (each is recomputed there, alone): the graph keeps the layers' inputs, the embedding and the head
    from calibration.silence import driving_sites, fisher_weights
    from stac_lm.convert.layerwise import layer_list

    snn, batches = tiny_snn
    windows = [w[None] for w in batches[0]]
    sites = driving_sites(snn, column_norms=False)
    layers = layer_list(snn)
    inside = [0]
    for layer in layers:
        layer.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, inside[0] + 1))
        layer.register_forward_hook(lambda m, a, y: inside.__setitem__(0, inside[0] - 1))
    saved = {False: [], True: []}  # bytes saved for the backward pass, outside / inside a decoder layer

    def pack(t):
        saved[inside[0] > 0].append(t.nbytes)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            plain = fisher_weights(snn, sites, windows, seed=2)
        assert sum(saved[True]) > 0  # without checkpoints the graph keeps what every layer saved
        saved = {False: [], True: []}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            checkpointed = fisher_weights(snn, sites, windows, seed=2, layers=layers)
    finally:
        for layer in layers:
            layer._forward_pre_hooks.clear()
            layer._forward_hooks.clear()
    assert saved[True] == [] and saved[False]
    assert all(torch.equal(plain[n], checkpointed[n]) for n in sites)  # recomputation: the same weights, bit for bit
    assert list(layer_list(snn)) == list(layers) and all(type(m).__name__ != "_Checkpointed" for m in snn.modules())


def test_fisher_weighted_silence_is_placed_within_its_budget(tiny_snn):
    from calibration.silence import SilenceConfig, calibrate_silence_

    snn, batches = tiny_snn
    with pytest.raises(ValueError, match="silence weighting must be one of"):
        SilenceConfig(weighting="hessian")
    from calibration.silence import WEIGHTINGS
    from stac_lm.convert.options import SILENCE_WEIGHTINGS, ConvertOptions

    assert SILENCE_WEIGHTINGS == WEIGHTINGS
    assert ConvertOptions().silence_weighting == "fisher"
    assert ConvertOptions(layerwise=True).silence_weighting == "fisher"  # one layer recomputed at a time
    assert ConvertOptions(calib_tokens=2048).silence_weighting == "columns"  # too few windows for 4 + 4
    assert ConvertOptions(calib_tokens=2048, silence_weighting="fisher").silence_weighting == "fisher"
    saved = ConvertOptions().to_dict()
    del saved["silence_weighting"]  # saved before the choice: column norms
    assert ConvertOptions.from_dict(saved).silence_weighting == "columns"
    summary = calibrate_silence_(snn, batches, SilenceConfig(budget=0.05, steps=6, weighting="fisher"))
    assert 0 < summary["bytes_share_silenced"] < 1 and summary["kl"] <= 0.05
    assert summary["config"]["weighting"] == "fisher"
    assert all(s.mode is SiteMode.PARALLEL for s in snn.modules() if isinstance(s, DAQCFSSite))
    calibrate_silence_(snn, batches, SilenceConfig(budget=0.0))  # leave the shared model without dead zones


def test_cache_stores_int8_counts_and_rebuilds_from_decoded_values(tiny_snn):
    snn, batches = tiny_snn
    ids = batches[0][:1]
    with torch.no_grad():
        full = snn(ids).logits
        cache = SpikeKVCache(snn)
        first = snn(ids[:, :20], past_key_values=cache, use_cache=True).logits
        rest = snn(ids[:, 20:], past_key_values=cache, use_cache=True).logits
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-5)
    dtypes = {t.dtype for layer in cache.layers for t in (layer.keys, layer.values)}
    assert dtypes == {torch.int8} and 1 <= cache.stored_bytes_per_element() < 4
    rebuilt = SpikeKVCache(snn, cache.layer_tensors())
    for (k0, v0), (k1, v1) in zip(cache.layer_tensors(), rebuilt.layer_tensors()):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


def test_rate_coding_refuses_silence():
    from calibration.silence import calibrate_silence_, SilenceConfig
    from tiny_models import VOCAB, tiny_model
    from smollm2_converter import ConversionConfig, convert

    snn = convert(tiny_model("llama", VOCAB), ConversionConfig(T=4, coding="rate"))
    with pytest.raises(ValueError, match="weighted coding"):
        calibrate_silence_(snn, [torch.ones(1, 8, dtype=torch.long)], SilenceConfig())
    from stac_lm.convert.options import ConvertOptions
    with pytest.raises(ValueError, match="need weighted coding"):
        ConvertOptions(coding="rate", silence_budget=0.01)
    assert ConvertOptions(coding="rate").silence_budget == 0.0
