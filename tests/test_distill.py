"""Spike-aware distillation: it lowers the SNN's divergence from the ANN, leaves the sites as it
found them (modes, no parametrizations, no gradients), and refuses bad input."""

import pytest
import torch
from spikingjelly.activation_based import surrogate
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from calibration import CalibrationConfig, calibrate, finetune_
from smollm2_converter import ConversionConfig, convert
from spike_modules import iter_sites, set_mode


def _setup(T=4, activation="keep"):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    ann = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(1))
    snn = convert(ann, ConversionConfig(T=T, activation=activation))
    cal = calibrate(snn, list(ids.split(4)), CalibrationConfig(T=T, rule="mse", fit_affine=False), progress=False)
    cal.apply_to(snn)
    set_mode(snn, "parallel")
    return ann, snn, ids


def _kl(snn, ann, ids):
    with torch.no_grad():
        s, t = snn(ids).logits.log_softmax(-1), ann(ids).logits.log_softmax(-1)
    return float(nn.functional.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("sg", [None, surrogate.Sigmoid()], ids=["straight-through", "sigmoid"])
def test_distillation_lowers_divergence_and_restores_sites(sg):
    ann, snn, ids = _setup()
    before = _kl(snn, ann, ids)
    theta0 = {n: s.theta.detach().clone() for n, s in iter_sites(snn)}
    out = finetune_(snn, ann, list(ids.split(4)), steps=30, lr=1e-2, surrogate=sg, progress=False)
    after = _kl(snn, ann, ids)
    assert after < 0.9 * before, (before, after)
    assert out["loss_last"] < out["loss_first"]
    for name, site in iter_sites(snn):
        assert site.mode.value == "parallel"
        assert not site.theta.requires_grad and not hasattr(site, "parametrizations")
        assert bool((site.theta > 0).all()) and bool(torch.isfinite(site.psi).all())
    assert any(not torch.equal(theta0[n], s.theta) for n, s in iter_sites(snn))
    assert all(not p.requires_grad for n, p in snn.named_parameters() if ".site." in n)


def test_weight_training_moves_weights_and_keeps_the_head():
    ann, snn, ids = _setup(activation="relu")
    head = snn.lm_head.weight.detach().clone()
    w0 = snn.model.layers[0].mlp.down_proj.linear.weight.detach().clone()
    before = _kl(snn, ann, ids)
    out = finetune_(snn, ann, list(ids.split(4)), steps=30, lr=1e-2, weight_lr=3e-3, progress=False)
    assert _kl(snn, ann, ids) < before
    assert not torch.equal(w0, snn.model.layers[0].mlp.down_proj.linear.weight)
    assert torch.equal(head, snn.lm_head.weight)
    assert any("weight" in t for t in out["trained"])


@pytest.mark.parametrize("sg", [None, surrogate.Sigmoid()], ids=["straight-through", "sigmoid"])
def test_checkpointed_layers_train_the_same_sites_bit_for_bit(sg):
    # one decoder layer recomputed at a time in the backward pass (a layer-by-layer conversion's layers
    # live on disk): the same steps; the layers are put back
    from stac_lm.convert.layerwise import layer_list

    ann, plain, ids = _setup()
    _, checkpointed, _ = _setup()
    layers = layer_list(checkpointed)
    kept = list(layers)
    a = finetune_(plain, ann, list(ids.split(4)), steps=6, lr=1e-2, surrogate=sg, progress=False)
    b = finetune_(checkpointed, ann, list(ids.split(4)), steps=6, lr=1e-2, surrogate=sg, progress=False,
                  layers=layers)
    assert (a["loss_first"], a["loss_last"]) == (b["loss_first"], b["loss_last"])
    for (name, s), (_, t) in zip(iter_sites(plain), iter_sites(checkpointed)):
        assert torch.equal(s.theta, t.theta) and torch.equal(s.psi, t.psi), name
    assert list(layer_list(checkpointed)) == kept
    with pytest.raises(ValueError, match="keeps on disk"):
        finetune_(checkpointed, ann, [ids], steps=1, weight_lr=1e-3, layers=layers, progress=False)


def test_bad_steps_and_missing_data():
    ann, snn, ids = _setup()
    with pytest.raises(ValueError, match="steps"):
        finetune_(snn, ann, [ids], steps=0, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        finetune_(snn, ann, [], steps=3, progress=False)
    with pytest.raises(ValueError, match="no spiking sites"):
        finetune_(ann, ann, [ids], steps=3, progress=False)


def test_decoder_weights_skip_a_spiking_or_int8_head():
    """The weights a ReLU-swap fine-tune trains: the block layers' float weights, never the tied head,
    whether the head sits behind a site (SpikeLinear) or is int8 with the embeddings."""
    from tiny_models import VOCAB, tiny_model

    from calibration.distill import _decoder_weights
    from calibration.int8 import quantize_weights_
    from smollm2_converter import ConversionConfig, convert

    snn = convert(tiny_model("llama", VOCAB), ConversionConfig(T=5, coding="weighted", spike_head=True))
    emb = snn.get_input_embeddings().weight
    weights = _decoder_weights(snn)
    assert weights and all(w is not emb and w.shape != emb.shape for w in weights)
    quantize_weights_(snn, "own", progress=False, head=True)
    assert _decoder_weights(snn) == []
