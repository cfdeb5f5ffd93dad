"""Conversion of tiny random Llama and GPT-2 models: wiring proven by large-T agreement."""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from calibration import CalibrationConfig, calibrate
from smollm2_converter import ConversionConfig, convert, convert_
from spike_modules import iter_sites, set_mode, set_timesteps, spike_rates
from spike_modules.layers import SpikeLinear
from stac_eval import evaluate_lm, windows

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


MODELS = {"llama": (tiny_llama, 4 * 2), "gpt2": (tiny_gpt2, 4 * 2)}  # sites: 4 per layer, 2 layers


def data(n=6, seq=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (n, seq), generator=g)


def converted(make, T, rule="max"):
    ann = make()
    snn = convert(ann, ConversionConfig(T=T))
    calibrate(snn, data().split(2), CalibrationConfig(T=T, rule=rule, fit_affine=False), progress=False).apply_to(snn)
    set_mode(snn, "parallel")
    return ann, snn


@pytest.mark.parametrize("arch", MODELS)
def test_large_T_matches_ann_and_T1_does_not(arch):
    """With max thresholds (no clipping on this data) the only error is rounding, which
    vanishes as T grows: any miswired weight, transposition or position would not."""
    make, n_sites = MODELS[arch]
    ann, snn = converted(make, 512)
    assert len(list(iter_sites(snn))) == n_sites
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
def test_convert_returns_a_new_model_and_wraps_every_block_linear(arch):
    make, n_sites = MODELS[arch]
    ann = make()
    snn = convert(ann, ConversionConfig(T=8))
    assert not any(isinstance(m, SpikeLinear) for m in ann.modules()), "the original is untouched"
    wrapped = [n for n, m in snn.named_modules() if isinstance(m, SpikeLinear)]
    assert len(wrapped) == (7 if arch == "llama" else 4) * 2  # q,k,v,o,gate,up,down | c_attn,c_proj,c_fc,c_proj
    # shared inputs: q/k/v read one site, so the site is registered once
    assert len(list(iter_sites(snn))) == n_sites
    with pytest.raises(ValueError, match="already has spiking sites"):
        convert_(snn, ConversionConfig(T=8))


def test_gpt2_conv1d_weights_are_wrapped_not_copied():
    ann = tiny_gpt2()
    w = ann.transformer.h[0].attn.c_attn.weight
    snn = convert_(ann, ConversionConfig(T=8))
    assert snn.transformer.h[0].attn.c_attn.linear.weight is w  # [in, out] as GPT-2 stores it
    assert snn.transformer.h[0].attn.c_attn.site.num_channels == 32


def test_relu_activation_swap_makes_gpt2_mlp_output_site_unsigned():
    snn = convert(tiny_gpt2(), ConversionConfig(T=8, activation="relu"))
    assert isinstance(snn.transformer.h[0].mlp.act, nn.ReLU)
    sites = dict(iter_sites(snn))
    assert not sites["transformer.h.0.mlp.c_proj.site"].signed and sites["transformer.h.0.mlp.c_fc.site"].signed


def test_unsupported_architecture_lists_supported_ones():
    from transformers import BertConfig, BertModel
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match=r"unsupported architecture 'bert'.*gpt2 \(gpt2\); llama \(llama\)"):
        convert(bert, ConversionConfig(T=8))
    with pytest.raises(ValueError, match="activation must be one of keep, relu"):
        ConversionConfig(T=8, activation="gelu")


def test_evaluate_lm_protocol_and_agreement():
    ann, snn = converted(tiny_llama, 512)
    ids = torch.randint(2, VOCAB, (3 * 16 + 5,), generator=torch.Generator().manual_seed(3))
    res = evaluate_lm({"ann": ann, "snn": snn}, ids, window=16, progress=False)
    assert res["windows"] == 3 and res["tokens"] == 3 * 15
    assert res["top1_agreement"]["ann"] == 1.0 and res["top1_agreement"]["snn"] > 0.9
    assert abs(res["ppl"]["snn"] / res["ppl"]["ann"] - 1) < 0.02
    with pytest.raises(ValueError, match="fewer than one 512-token window"):
        windows(ids[:100])
