"""Operation counts on tiny models, checked against formulas worked out by hand."""

import pytest
import torch
from tiny_models import tiny_model

from calibration import CalibrationConfig, calibrate
from smollm2_converter import ConversionConfig, convert
from spike_modules import iter_sites, set_mode
from spike_modules.layers import SpikeLinear
from spike_modules.energy import E_AC_PJ, E_MAC_PJ, count_ops, energy_summary

VOCAB = 64
B, S = 2, 20


def ids(seed=1):
    return torch.randint(1, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def analytic_macs(arch: str, model) -> tuple[int, int]:
    """(all MACs, attention MACs) of one forward of ``[B, S]`` tokens, from the config alone."""
    c = model.config
    H, L, heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
    hd = H // heads
    if arch == "llama":
        kv = c.num_key_value_heads * hd
        per_token = H * (H + 2 * kv) + H * H + 2 * H * c.intermediate_size + c.intermediate_size * H
    else:  # GPT-2: c_attn H->3H, c_proj H->H, c_fc H->4H, mlp.c_proj 4H->H
        per_token = H * 3 * H + H * H + H * 4 * H + 4 * H * H
    # causal: S(S+1)/2 query-key pairs per row and head, hd MACs each, for QK^T and for PV
    attention = L * B * heads * hd * S * (S + 1)
    return B * S * (L * per_token + H * c.vocab_size) + attention, attention


def snn_of(ann, T=8):
    snn = convert(ann, ConversionConfig(T=T))
    calibrate(snn, [ids(2), ids(3)], CalibrationConfig(T=T, rule="max", fit_affine=False),
              progress=False).apply_to(snn)
    set_mode(snn, "parallel")
    return snn


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ann_mac_count_equals_the_formula(arch):
    ann = tiny_model(arch, VOCAB)
    counts = count_ops(ann, ids())
    total, attention = analytic_macs(arch, ann)
    assert counts.dense_macs == total and counts.attention_macs == attention
    assert counts.spike_acs == 0 and counts.spike_driven_macs == 0
    assert counts.tokens == B * S


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_snn_accumulates_are_spikes_times_readers_out_features(arch):
    ann = tiny_model(arch, VOCAB)
    snn = snn_of(ann)
    for _, site in iter_sites(snn):
        site.parallel.keep_counts = True  # sites keep no counts unless asked
    counts = count_ops(snn, ids())
    # by hand: every SpikeLinear site's spike count (its last call, |counts|), times the
    # out_features of every layer that reads that site
    readers = {}
    for m in snn.modules():
        if isinstance(m, SpikeLinear):
            out = m.linear.weight.shape[1] if type(m.linear).__name__ == "Conv1D" else m.linear.out_features
            readers.setdefault(id(m._shared.site), [m._shared.site, 0])[1] += out
    linear = sum(float(site.parallel.last_counts.float().abs().sum()) * out for site, out in readers.values())
    # attention, by hand: causal, no cache, so query i attends keys 0..i and key j is seen by S - j
    # queries; a q spike adds one key element per key it attends, a v spike one probability per
    # query that sees it, for each of the n_rep query heads sharing its kv head
    i = torch.arange(S, dtype=torch.float64)
    attention = 0.0
    for m in snn.modules():
        if hasattr(m, "q_site"):
            n_rep = m.q_site.num_channels // m.v_site.num_channels
            q = m.q_site.parallel.last_counts.double().abs().sum(-1)      # [B, S]
            v = m.v_site.parallel.last_counts.double().abs().sum(-1)      # [B, S]
            attention += float((q * (i + 1)).sum() + n_rep * (v * (S - i)).sum())
    assert linear > 0 and attention > 0
    assert counts.spike_acs == pytest.approx(linear + attention, rel=1e-12)
    # the same network: dense + spike-driven MACs add up to the ANN's count, and the attention
    # matmuls behind q and v sites are spike-driven
    ann_counts = count_ops(ann, ids())
    assert counts.total_macs_equivalent == ann_counts.dense_macs
    assert counts.attention_macs == 0 and ann_counts.attention_macs > 0
    summary = energy_summary(ann_counts, counts)
    e_ann = ann_counts.dense_macs * E_MAC_PJ
    e_snn = counts.dense_macs * E_MAC_PJ + (linear + attention) * E_AC_PJ
    assert summary["energy_ratio"] == pytest.approx(e_snn / e_ann, rel=1e-12)
    assert summary["coverage"] == counts.spike_driven_macs / ann_counts.dense_macs
    assert 0 < summary["coverage"] < 1 and summary["op_counts_consistent"]
    assert summary["memory_traffic_counted"] is False


def test_silent_site_costs_no_accumulates():
    ann = tiny_model("llama", VOCAB)
    with torch.no_grad():
        ann.model.layers[0].input_layernorm.weight.zero_()  # the layer-0 q/k/v site sees only zeros
    snn = snn_of(ann)
    per = count_ops(snn, ids()).per_module
    for p in "qkv":
        d = per[f"model.layers.0.self_attn.{p}_proj.linear"]
        assert d["kind"] == "spike" and d["acs"] == 0 and d["mac_equivalent"] > 0
    assert per["model.layers.0.mlp.gate_proj.linear"]["acs"] > 0
    assert per["lm_head"]["kind"] == "dense" and per["lm_head"]["acs"] == 0


def test_more_timesteps_cost_more_accumulates():
    """A spike count grows about linearly with T; a count that ignored T would not."""
    ann = tiny_model("llama", VOCAB)
    acs = {T: count_ops(snn_of(ann, T), ids()).spike_acs for T in (4, 16)}
    assert 3 < acs[16] / acs[4] < 5


def test_count_ops_wants_a_token_batch():
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
        count_ops(tiny_model("llama", VOCAB), torch.ones(5, dtype=torch.long))
