"""text_cls model: BERT conversion with DA-QCFS sites (ffn / all), the sequential simulation against
parallel mode, the QCFS quantizer against the parallel neuron, op counting and save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from calibration import CalibrationConfig, calibrate
from spike_modules import iter_sites, set_mode, set_timesteps
from spike_modules.simulation import sequential_mode
from spike_modules.energy import site_spikes
from text_cls.energy import counting, flops_per_sample
from text_cls.evaluate import macro_f1, reset_spike_stats
from text_cls.model import SiteSpec, classify, convert_classifier, float_copy, run_sequential
from text_cls.saving import load_text_snn, write_model

torch.set_num_threads(1)


def tiny(seed=0, labels=3):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=32, num_labels=labels, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def inputs(seed=1, B=12, S=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (B, S), generator=g)
    mask = torch.ones_like(ids)
    mask[B // 2:, S - 3:] = 0  # some rows padded
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def converted(sites, T=8, activation="keep"):
    ann = tiny()
    snn = convert_classifier(ann, SiteSpec(sites, activation, T))
    x = inputs()
    calib = calibrate(snn, [x, inputs(seed=2)], CalibrationConfig(T=T), progress=False)
    calib.apply_to(snn)
    set_mode(snn, "parallel")
    return ann, snn, x, calib


@pytest.mark.parametrize("sites,per_layer,signed", [("ffn", 1, [True]), ("all", 5, [True, False, True, True, True])])
def test_sites_sit_where_the_scope_says_and_ann_mode_is_the_float_model(sites, per_layer, signed):
    ann = tiny()
    snn = convert_classifier(ann, SiteSpec(sites, "keep", 8))
    found = list(iter_sites(snn))
    assert len(found) == 2 * per_layer
    assert [s.signed for _, s in found[:per_layer]] == signed
    names = [n for n, _ in found]
    assert "bert.encoder.layer.0.output.dense.site" in names
    assert ("bert.encoder.layer.1.attention.self.p_site" in names) == (sites == "all")
    assert not list(iter_sites(ann))  # the float model is untouched
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(snn(**x).logits, ann(**x).logits, rtol=0, atol=1e-5)


def test_relu_makes_the_ffn_site_unsigned():
    snn = convert_classifier(tiny(), SiteSpec("ffn", "relu", 8))
    assert [s.signed for _, s in iter_sites(snn)] == [False, False]
    assert isinstance(snn.bert.encoder.layer[0].intermediate.intermediate_act_fn.act, torch.nn.ReLU)


def test_site_spec_and_conversion_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="spike_sites must be one of ffn, all"):
        SiteSpec("attention")
    with pytest.raises(ValueError, match="T must be between"):
        SiteSpec("all", "keep", 0)
    decoder = tiny()
    decoder.config.is_decoder = True
    with pytest.raises(ValueError, match="decoder"):
        convert_classifier(decoder, SiteSpec())


def test_parallel_neurons_compute_the_qcfs_quantizer_and_T_changes_the_output():
    _, snn, x, _ = converted("all")
    with torch.no_grad():
        par = snn(**x).logits
        set_mode(snn, "quant")
        quant = snn(**x).logits
        set_mode(snn, "parallel")
        set_timesteps(snn, 2)
        coarse = snn(**x).logits
    assert torch.equal(par, quant)
    assert not torch.allclose(par, coarse, atol=1e-4)


def test_ffn_sites_give_the_same_spike_counts_sequential_and_parallel():
    """With sites only at the FFN activation, every site's input is the same at every step (the
    ops before it are constant or rate-domain), so the SpikingJelly neurons fire exactly the
    parallel neuron's counts, site by site, and the logits agree."""
    _, snn, x, _ = converted("ffn")
    for T in (1, 3, 8):
        set_timesteps(snn, T)
        reset_spike_stats(snn)
        with torch.no_grad():
            par = snn(**x).logits
        par_spikes = {n: site_spikes(s) for n, s in iter_sites(snn)}
        reset_spike_stats(snn)
        seq = run_sequential(snn, x["input_ids"], x["attention_mask"], T)
        seq_spikes = {n: site_spikes(s) for n, s in iter_sites(snn)}
        assert all(v > 0 for v in par_spikes.values())
        assert seq_spikes == par_spikes, T
        torch.testing.assert_close(seq, par, rtol=0, atol=1e-5)


def test_all_sites_sequential_tracks_parallel_and_the_gap_shrinks_with_T():
    _, snn, x, _ = converted("all")
    gaps = []
    for T in (2, 16):
        set_timesteps(snn, T)
        with torch.no_grad():
            par = snn(**x).logits
        seq = run_sequential(snn, x["input_ids"], x["attention_mask"], T)
        gaps.append(float((seq - par).norm() / par.norm()))
        assert [s.mode.value for _, s in iter_sites(snn)] == ["parallel"] * 10  # modes restored
    assert 0 < gaps[1] < gaps[0] < 0.2


def test_sequential_needs_a_converted_model_and_batched_ids():
    with pytest.raises(ValueError, match="was not converted"):
        with sequential_mode(tiny(), 4):
            pass
    _, snn, x, _ = converted("ffn")
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        run_sequential(snn, x["input_ids"][0], None, 4)


def test_op_counts_cover_the_spiking_layers_and_energy_falls_with_T():
    ann, snn, x, _ = converted("all")
    with counting(ann) as a, torch.no_grad():
        ann(**x)
    ratios = []
    for T in (2, 8):
        set_timesteps(snn, T)
        with counting(snn) as s, torch.no_grad():
            snn(**x)
        assert s.total_macs_equivalent == a.total_macs_equivalent
        assert s.attention_macs == a.attention_macs == 2 * 2 * 12 * 4 * 8 * 10 * 10
        assert 0.9 < s.spike_driven_macs / s.total_macs_equivalent < 1
        ratios.append(s.energy_pj / a.energy_pj)
    assert ratios[0] < ratios[1]  # more steps, more spikes
    # the flop counter sees the same matmuls (the float model's fused attention counted through eager)
    assert flops_per_sample(ann, lambda: ann(**x), 12) == 2 * a.total_macs_equivalent / 12
    assert ann.config._attn_implementation == "sdpa"
    assert flops_per_sample(snn, lambda: snn(**x), 12) == 2 * a.total_macs_equivalent / 12


def test_macro_f1():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert macro_f1(y, y) == 1.0
    p = torch.tensor([0, 1, 1, 1, 2, 0])
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 2 fp 1 fn 0 -> 0.8; class 2: tp 1 fp 0 fn 1 -> 2/3
    assert macro_f1(p, y) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_saved_model_loads_in_one_call_with_identical_logits(tmp_path):
    from tests.test_text_cls_data import tiny_tokenizer

    ann, snn, x, calib8 = converted("all", T=8)
    calib4 = calibrate(snn, [x], CalibrationConfig(T=4), progress=False)
    calib8.apply_to(snn)
    with torch.no_grad():
        want8 = snn(**x).logits
    write_model(tmp_path / "m", snn, tiny_tokenizer(), {4: calib4, 8: calib8}, 8, SiteSpec("all", "keep", 8),
                {"classes": ["a", "b", "c"], "options": {"neuron_type": "ParaInfNeuron"}})
    model, tok, config = load_text_snn(tmp_path / "m")
    assert torch.equal(classify(model, **x), want8)
    assert config["classes"] == ["a", "b", "c"] and config["timesteps"] == [4, 8]
    model4, _, _ = load_text_snn(tmp_path / "m", T=4)
    calib4.apply_to(snn)
    with torch.no_grad():
        assert torch.equal(classify(model4, **x), snn(**x).logits)
    seq, _, _ = load_text_snn(tmp_path / "m", neuron_type="IFNeuron")
    assert torch.equal(classify(seq, **x), run_sequential(seq, x["input_ids"], x["attention_mask"], 8))
    with pytest.raises(ValueError, match="T=16 was not calibrated"):
        load_text_snn(tmp_path / "m", T=16)
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match="does not match its sha256"):
        load_text_snn(tmp_path / "m")


def test_float_copy_is_the_original_network_with_the_converted_weights():
    ann = tiny()
    snn = convert_classifier(ann, SiteSpec("all", "keep", 8))
    with torch.no_grad():
        snn.bert.encoder.layer[0].intermediate.dense.linear.weight.add_(0.5)  # as training would move it
        back = float_copy(snn, ann)
        x = inputs()
        torch.testing.assert_close(back(**x).logits, snn(**x).logits, rtol=0, atol=1e-5)
        assert torch.equal(back.bert.encoder.layer[0].intermediate.dense.weight,
                           snn.bert.encoder.layer[0].intermediate.dense.linear.weight)
        assert not torch.equal(back.bert.encoder.layer[0].intermediate.dense.weight,
                               ann.bert.encoder.layer[0].intermediate.dense.weight)
    assert not list(iter_sites(back)) and back.config._attn_implementation == "sdpa"


def test_held_norms_are_kept_through_save_and_load_and_change_only_the_simulation(tmp_path):
    from spike_modules.norm import SpikeNorm
    from tests.test_text_cls_data import tiny_tokenizer

    ann, snn, x, calib8 = converted("all", T=8)
    held = convert_classifier(ann, SiteSpec("all", "keep", 8, "held"))
    norms = [m for m in held.modules() if isinstance(m, SpikeNorm)]
    assert norms and not any(m.causal for m in norms)
    calib8.apply_to(held)
    set_mode(held, "parallel")
    with torch.no_grad():
        assert torch.equal(held(**x).logits, snn(**x).logits)  # parallel mode does not see the schedule
    seq_held = run_sequential(held, x["input_ids"], x["attention_mask"], 8)
    assert not torch.equal(seq_held, run_sequential(snn, x["input_ids"], x["attention_mask"], 8))
    write_model(tmp_path / "m", held, tiny_tokenizer(), {8: calib8}, 8, SiteSpec("all", "keep", 8, "held"),
                {"classes": ["a", "b", "c"], "options": {"neuron_type": "ParaInfNeuron"}})
    model, _, config = load_text_snn(tmp_path / "m")
    assert config["site_spec"]["norms"] == "held"
    assert torch.equal(run_sequential(model, x["input_ids"], x["attention_mask"], 8), seq_held)
    with pytest.raises(ValueError, match="norm_schedule must be one of causal, held"):
        SiteSpec("all", "keep", 8, "late")


def test_catch_up_neurons_are_kept_through_save_and_load_and_change_only_the_simulation(tmp_path):
    from tests.test_text_cls_data import tiny_tokenizer

    ann, snn, x, calib8 = converted("all", T=8)
    assert all(site.catch_up for _, site in iter_sites(snn))  # the default
    plain = convert_classifier(ann, SiteSpec("all", "keep", 8, "causal", "if"))
    assert not any(site.catch_up for _, site in iter_sites(plain))
    calib8.apply_to(plain)
    set_mode(plain, "parallel")
    with torch.no_grad():
        par = snn(**x).logits
        assert torch.equal(plain(**x).logits, par)  # parallel mode does not see the neurons of the simulation
    seq_plain = run_sequential(plain, x["input_ids"], x["attention_mask"], 8)
    seq_catch = run_sequential(snn, x["input_ids"], x["attention_mask"], 8)
    assert not torch.equal(seq_plain, seq_catch)
    write_model(tmp_path / "m", plain, tiny_tokenizer(), {8: calib8}, 8, SiteSpec("all", "keep", 8, "causal", "if"),
                {"classes": ["a", "b", "c"], "options": {"neuron_type": "ParaInfNeuron"}})
    model, _, config = load_text_snn(tmp_path / "m")
    assert config["site_spec"]["sequential"] == "if" and model.stac_site_spec.sequential == "if"
    assert torch.equal(run_sequential(model, x["input_ids"], x["attention_mask"], 8), seq_plain)
    with pytest.raises(ValueError, match="sequential_neuron must be one of catch_up, if"):
        SiteSpec("all", "keep", 8, "causal", "lazy")


def test_calibration_batches_go_to_the_device_of_the_model():
    """The site observation pass feeds CPU batches to the model where its weights are (it failed on CUDA)."""
    from text_cls.pipeline import _run_batch

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, device="meta"))
            self.seen = {}

        def forward(self, **inputs):
            self.seen = {k: v.device.type for k, v in inputs.items()}

    model = Recorder()
    _run_batch(model, {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3),
                       "labels": torch.zeros(2, dtype=torch.long)})
    assert model.seen == {"input_ids": "meta", "attention_mask": "meta"}


def test_probabilities_over_the_row_max_keep_the_float_model_and_survive_save_and_load(tmp_path):
    """probs='max': the probability sites see each row over its largest probability and probs.V is divided by
    the row sum after; in ann mode that is the float model, the simulation tracks parallel mode as with 'sum',
    the site's inputs lie in (0, 1] with 1 in every row, and a saved model rebuilds with the same scale."""
    from spike_modules.attention import SCALE_ATTR
    from tests.test_text_cls_data import tiny_tokenizer

    ann, x = tiny(), inputs()
    snn = convert_classifier(ann, SiteSpec("all", "keep", 8, probs="max"))
    with torch.no_grad():
        torch.testing.assert_close(snn(**x).logits, ann(**x).logits, rtol=0, atol=1e-5)
    seen = []
    site = snn.bert.encoder.layer[0].attention.self.p_site
    handle = site.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    calib = calibrate(snn, [x, inputs(seed=2)], CalibrationConfig(T=8), progress=False)
    handle.remove()
    rows = seen[0]  # [batch, queries, keys, heads]: one channel per head
    assert float(rows.max()) == 1.0 and bool((rows.amax(-2) == 1.0).all()) and float(rows.min()) >= 0.0
    calib.apply_to(snn)
    set_mode(snn, "parallel")
    with torch.no_grad():
        par = snn(**x).logits
    seq = run_sequential(snn, x["input_ids"], x["attention_mask"], 8)
    assert float((seq - par).norm() / par.norm()) < 0.2
    write_model(tmp_path / "m", snn, tiny_tokenizer(), {8: calib}, 8, SiteSpec("all", "keep", 8, probs="max"),
                {"classes": ["a", "b", "c"], "options": {"neuron_type": "ParaInfNeuron"}})
    model, _, config = load_text_snn(tmp_path / "m")
    assert config["site_spec"]["probs"] == "max"
    assert getattr(model.bert.encoder.layer[1].attention.self, SCALE_ATTR) == "max"
    with torch.no_grad():
        assert torch.equal(model(**x).logits, par)
    with pytest.raises(ValueError, match="probs_scale must be one of sum, max"):
        SiteSpec("all", "keep", 8, probs="mean")
