"""SpikeAttention: exact in ann mode, consistent with the KV cache, sites where the matmuls meet."""

import pytest
import torch
from transformers import AttentionInterface

from calibration import CalibrationConfig, calibrate
from smollm2_converter import ConversionConfig, convert
from spike_modules import iter_sites, set_mode
from spike_modules.attention import ATTN_IMPLEMENTATION
from tests.test_converter import MODELS, data

ALL_ON = dict(mode="simplified", spike_head=True)  # sites on q/k/v, probabilities, head


def padded(x):
    """A left-padded batch: the first rows start 5 tokens late."""
    mask = torch.ones_like(x)
    mask[:2, :5] = 0
    return mask


@pytest.mark.parametrize("arch", MODELS)
def test_ann_mode_equals_the_original_eager_attention_exactly(arch):
    ann = MODELS[arch]()
    ann.set_attn_implementation("eager")
    snn = convert(ann, ConversionConfig(T=8, **ALL_ON))
    x = data()
    with torch.no_grad():
        for mask in (None, padded(x)):
            ref, out = ann(x, attention_mask=mask).logits, snn(x, attention_mask=mask).logits
            assert torch.equal(ref, out)
        ann.set_attn_implementation("sdpa")  # the default kernel: same math, other rounding
        torch.testing.assert_close(snn(x).logits, ann(x).logits, rtol=1e-5, atol=1e-5)


def calibrated(arch, T, **structure):
    snn = convert(MODELS[arch](), ConversionConfig(T=T, **structure))
    calibrate(snn, data().split(2), CalibrationConfig(T=T, rule="max", fit_affine=False), progress=False).apply_to(snn)
    set_mode(snn, "parallel")
    return snn


@pytest.mark.parametrize("arch", MODELS)
def test_prefill_then_decode_equals_one_full_pass_in_parallel_mode(arch):
    """The cache keeps float k/v and the sites encode them on every call: a prefill followed by
    decoding one token must give the logits of one full pass, bit for bit."""
    snn = calibrated(arch, 4, **ALL_ON)
    x = data(n=4, seq=20, seed=5)
    with torch.no_grad():
        full = snn(x).logits
        pre = snn(x[:, :-1], use_cache=True)
        step = snn(x[:, -1:], past_key_values=pre.past_key_values, use_cache=True).logits
    assert torch.equal(pre.logits, full[:, :-1])
    assert torch.equal(step[:, 0], full[:, -1])


@pytest.mark.parametrize("arch", MODELS)
def test_attention_sites_are_named_and_sized_per_head(arch):
    snn = convert(MODELS[arch](), ConversionConfig(T=8, **ALL_ON))
    sites = dict(iter_sites(snn))
    attn = "model.layers.0.self_attn" if arch == "llama" else "transformer.h.0.attn"
    kv_heads = 2 if arch == "llama" else 4  # the tiny Llama uses grouped-query attention
    expect = {"q_site": (4 * 8, True), "k_site": (kv_heads * 8, True), "v_site": (kv_heads * 8, True),
              "p_site": (4, False)}
    for name, (channels, signed) in expect.items():
        site = sites[f"{attn}.{name}"]
        assert (site.num_channels, site.signed, site.name) == (channels, signed, f"{attn}.{name}")
    assert f"{attn}.q_site.theta" in snn.state_dict()


@pytest.mark.parametrize("arch", MODELS)
def test_spiking_probabilities_are_levels_of_their_head_threshold(arch):
    T = 8
    snn = calibrated(arch, T, **ALL_ON)
    with torch.no_grad():
        probs = snn(data(n=2), output_attentions=True).attentions
    attn = "model.layers.{}.self_attn" if arch == "llama" else "transformer.h.{}.attn"
    sites = dict(iter_sites(snn))
    for layer, p in enumerate(probs):
        theta = sites[f"{attn.format(layer)}.p_site"].theta.view(1, -1, 1, 1)
        levels = p * T / theta
        assert torch.allclose(levels, levels.round(), atol=1e-4), "probabilities are whole spike counts"
        assert levels.min() >= 0 and levels.max() <= T
        assert len(levels.round().unique()) > 2, "more than one level is used"


def test_spiking_qkv_and_probabilities_change_the_output():
    x = data()
    with torch.no_grad():
        outs = {k: calibrated("llama", 4, mode="full", spike_qkv=q, spike_probs=p)(x).logits
                for k, (q, p) in {"none": (False, False), "qkv": (True, False), "all": (True, True)}.items()}
    assert not torch.equal(outs["none"], outs["qkv"]) and not torch.equal(outs["qkv"], outs["all"])


def test_sites_set_to_sequential_by_hand_are_refused():
    snn = calibrated("llama", 4)
    set_mode(snn, "sequential")
    with pytest.raises(ValueError, match="does not match the simulation state"):
        snn(data(n=4))  # a batch of T rows passes the linear sites' time folding


def test_unprepared_attention_modules_are_refused():
    ann = MODELS["llama"]()
    ann.set_attn_implementation(ATTN_IMPLEMENTATION)  # registered globally, but this model was not converted
    assert ATTN_IMPLEMENTATION in AttentionInterface._global_mapping
    with pytest.raises(ValueError, match="prepared by STAC's conversion"):
        ann(data(n=1))
