"""Conversion of tiny random Llama and GPT-2 models: wiring proven by large-T agreement, configs, the log."""

import json
from dataclasses import asdict

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from calibration import CalibrationConfig, calibrate
from smollm2_converter import MODE_DEFAULTS, ConversionConfig, conversion_log, convert, convert_, swap_log
from spike_modules import iter_sites, set_mode, set_timesteps, spike_rates
from spike_modules.layers import SpikeGatedMLP, SpikeLinear
from spike_modules.norm import SpikeNorm
from spike_modules.temporal import RateActivation
from stac_lm.eval.perplexity import evaluate_lm, windows

VOCAB = 64


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0,
                     eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# sites per layer: 4 at block linear inputs, q/k/v, and one on the probabilities when spiked; 2 layers
SITES_PER_LAYER = {"full": 4 + 3, "simplified": 4 + 3 + 1}


def data(n=6, seq=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (n, seq), generator=g)


def converted(make, T, rule="max", **structure):
    ann = make()
    snn = convert(ann, ConversionConfig(T=T, **structure))
    calibrate(snn, data().split(2), CalibrationConfig(T=T, rule=rule, fit_affine=False), progress=False).apply_to(snn)
    set_mode(snn, "parallel")
    return ann, snn


@pytest.mark.parametrize("arch", MODELS)
def test_large_T_matches_ann_and_T1_does_not(arch):
    """With max thresholds (no clipping on this data) the only error is rounding, which
    vanishes as T grows: any miswired weight, transposition, position, head or mask would not.
    Every structural option is on: sites on q/k/v, on the probabilities and at the head."""
    ann, snn = converted(MODELS[arch], 512, mode="simplified", spike_head=True)
    assert len(list(iter_sites(snn))) == 2 * SITES_PER_LAYER["simplified"] + 1
    x = data()
    with torch.no_grad():
        ref, out = ann(x).logits, snn(x).logits
        rel = (out - ref).norm() / ref.norm()
        assert rel < 0.02, f"T=512 relative logit error {rel:.4f}"
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97
        set_timesteps(snn, 1)
        coarse = snn(x).logits
    assert (coarse - ref).norm() / ref.norm() > 5 * rel, "T must matter"
    rates = spike_rates(snn)
    assert all(0 < r < 1 for r in rates.values()), rates


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("mode", ["full", "simplified"])
def test_convert_returns_a_new_model_and_swaps_every_part(arch, mode):
    ann = MODELS[arch]()
    snn = convert(ann, ConversionConfig(T=8, mode=mode))
    assert not any(isinstance(m, (SpikeLinear, SpikeNorm)) for m in ann.modules()), "the original is untouched"
    assert ann.config._attn_implementation != "stac_spike"
    assert snn.config._attn_implementation == "stac_spike"
    wrapped = [n for n, m in snn.named_modules() if isinstance(m, SpikeLinear)]
    assert len(wrapped) == (7 if arch == "llama" else 4) * 2  # q,k,v,o,gate,up,down | c_attn,c_proj,c_fc,c_proj
    assert sum(isinstance(m, SpikeNorm) for m in snn.modules()) == 2 * 2 + 1
    if arch == "llama":
        assert sum(isinstance(m, SpikeGatedMLP) for m in snn.modules()) == 2
        assert not any(isinstance(m, RateActivation) for m in snn.modules()), "the gated MLP runs its activation"
    else:
        assert sum(isinstance(m, RateActivation) for m in snn.modules()) == 2
    # shared inputs: q/k/v projections read one site, so it is registered once
    names = [name for name, _ in iter_sites(snn)]
    assert len(names) == 2 * SITES_PER_LAYER[mode]
    attn = "model.layers.1.self_attn" if arch == "llama" else "transformer.h.1.attn"
    assert f"{attn}.q_site" in names and (f"{attn}.p_site" in names) == (mode == "simplified")
    with pytest.raises(ValueError, match="already has spiking sites"):
        convert_(snn, ConversionConfig(T=8))


def test_config_modes_defaults_and_json_round_trip():
    full, simple = ConversionConfig(), ConversionConfig(mode="simplified")
    assert (full.spike_probs, simple.spike_probs) == (False, True)
    assert all(getattr(full, k) == v for k, v in MODE_DEFAULTS["full"].items())
    custom = ConversionConfig(T=32, mode="simplified", spike_probs=False, spike_norm=False, activation="relu")
    assert (custom.spike_probs, custom.spike_norm, custom.spike_qkv, custom.activation) == (False, False, True, "relu")
    for cfg in (full, simple, custom):
        assert ConversionConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg
    for bad, match in [({"mode": "fast"}, "mode must be one of full, simplified"),
                       ({"activation": "gelu"}, "activation must be one of keep, relu"),
                       ({"spike_probs": 1}, "spike_probs must be True or False"),
                       ({"T": 0}, "T must be between")]:
        with pytest.raises(ValueError, match=match):
            ConversionConfig(**bad)


@pytest.mark.parametrize("arch", MODELS)
def test_conversion_log_records_every_change(arch):
    snn = convert(MODELS[arch](), ConversionConfig(T=8, mode="simplified", spike_head=True))
    log = conversion_log(snn)
    paths = {r.path: r for r in log}
    swapped = [n for n, m in snn.named_modules() if isinstance(m, (SpikeLinear, SpikeNorm, SpikeGatedMLP, RateActivation))]
    assert set(swapped) <= set(paths), set(swapped) - set(paths)
    assert {n for n, _ in iter_sites(snn)} <= set(paths)
    assert paths["config._attn_implementation"].new == "stac_spike"
    assert paths["lm_head"].new == "SpikeLinear"
    text = swap_log(snn)
    assert text.count("\n") == len(log) and "lm_head: Linear -> SpikeLinear" in text
    with pytest.raises(ValueError, match="was not converted by STAC"):
        conversion_log(MODELS[arch]())


def test_spike_head_keeps_the_tied_weight():
    snn = convert(tiny_llama(), ConversionConfig(T=8, spike_head=True))
    assert snn.lm_head.linear.weight is snn.model.embed_tokens.weight
    assert snn.lm_head.site.num_channels == 32 and snn.lm_head.site.signed


def test_gpt2_conv1d_weights_are_wrapped_not_copied():
    ann = tiny_gpt2()
    w = ann.transformer.h[0].attn.c_attn.weight
    snn = convert_(ann, ConversionConfig(T=8))
    assert snn.transformer.h[0].attn.c_attn.linear.weight is w  # [in, out] as GPT-2 stores it
    assert snn.transformer.h[0].attn.c_attn.site.num_channels == 32


def test_norm_parameters_keep_their_tensors_under_the_wrapper():
    ann = tiny_llama()
    w = ann.model.layers[0].input_layernorm.weight
    snn = convert_(ann, ConversionConfig(T=8))
    assert snn.model.layers[0].input_layernorm.norm.weight is w
    assert "model.layers.0.input_layernorm.norm.weight" in snn.state_dict()


def test_relu_activation_swap_makes_gpt2_mlp_output_site_unsigned():
    snn = convert(tiny_gpt2(), ConversionConfig(T=8, activation="relu"))
    assert isinstance(snn.transformer.h[0].mlp.act, RateActivation)
    assert isinstance(snn.transformer.h[0].mlp.act.act, nn.ReLU)
    assert ("transformer.h.0.mlp.act", "NewGELUActivation", "ReLU") in conversion_log(snn)
    sites = dict(iter_sites(snn))
    assert not sites["transformer.h.0.mlp.c_proj.site"].signed and sites["transformer.h.0.mlp.c_fc.site"].signed


def test_unsupported_architecture_and_modules_are_errors_not_skips():
    from transformers import BloomConfig, BloomForCausalLM
    bloom = BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=VOCAB))  # ALiBi
    with pytest.raises(ValueError, match=r"unsupported architecture 'bloom'.*gpt2 \(gpt2\);.* llama \(llama\)"):
        convert(bloom, ConversionConfig(T=8))
    odd = tiny_llama()
    odd.model.layers[1].post_attention_layernorm = nn.Identity()
    with pytest.raises(ValueError, match=r"model.layers.1.post_attention_layernorm is a Identity; as a norm STAC "
                                         r"converts: .*LayerNorm, LlamaRMSNorm"):
        convert(odd, ConversionConfig(T=8))
    cross = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB, add_cross_attention=True))
    with pytest.raises(ValueError, match="cross-attention"):
        convert(cross, ConversionConfig(T=8))


def test_evaluate_lm_protocol_and_agreement():
    ann, snn = converted(tiny_llama, 512)
    ids = torch.randint(2, VOCAB, (3 * 16 + 5,), generator=torch.Generator().manual_seed(3))
    res = evaluate_lm({"ann": ann, "snn": snn}, ids, window=16, progress=False)
    assert res["windows"] == 3 and res["tokens"] == 3 * 15
    assert res["top1_agreement"]["ann"] == 1.0 and res["top1_agreement"]["snn"] > 0.9
    assert abs(res["ppl"]["snn"] / res["ppl"]["ann"] - 1) < 0.02
    with pytest.raises(ValueError, match="fewer than one 512-token window"):
        windows(ids[:100])
