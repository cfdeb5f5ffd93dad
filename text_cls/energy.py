"""Operation counts, FLOPs and the energy estimate of docs/design.md section 4 for BERT-family classifiers.

The per-layer conventions and the counting are ``spike_modules.energy``'s; what differs
is attention: a BERT encoder attends both ways, so ``QK^T`` and ``PV`` cost MACs over all
``S x S`` query-key pairs of each head (padding inside a batch included: a dense kernel
computes it). Where the attention probabilities spike, their spikes are counted in the spike
rate but ``PV`` is still counted as dense MACs (conservative, as for the LMs).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from spike_modules.energy import E_AC_PJ, E_MAC_PJ, OpCounts
from spike_modules.energy import counting as lm_counting

CONVENTION = (
    "ops counted with forward hooks over the whole test set; MAC 4.6 pJ, accumulate (spike x weight) 0.9 pJ (45 nm); "
    "a linear layer behind a spiking site costs |spikes| x (sum of its readers' out_features) accumulates; other "
    "linear layers (pooler, classifier) cost tokens x in x out MACs; attention matmuls QK^T and PV cost MACs by "
    "shape over all S x S query-key pairs per head (bidirectional; spiking probabilities do not make PV cheaper "
    "here); element-wise ops (norms, GELU, softmax, residual adds, embedding lookups) and memory traffic are not "
    "counted")


# spike_modules.energy.counting with bidirectional attention (all S x S query-key pairs)
counting = partial(lm_counting, causal=False)


def energy_summary(ann: OpCounts, snn: OpCounts, samples: int) -> dict:
    """Energy per sample of the ANN and the SNN, their ratio, and the coverage behind it."""
    ann_macs = ann.total_macs_equivalent
    ann_pj = ann_macs * E_MAC_PJ  # the float network: every MAC a MAC
    return {
        "convention": CONVENTION, "memory_traffic_counted": False, "pj_per_mac": E_MAC_PJ, "pj_per_ac": E_AC_PJ,
        "samples": samples, "ann_macs_per_sample": ann_macs / samples,
        "snn_dense_macs_per_sample": snn.dense_macs / samples, "snn_spike_acs_per_sample": snn.spike_acs / samples,
        "synaptic_ops_per_sample": snn.spike_acs / samples,  # SOPs: one weight read and add per spike and target
        "coverage": snn.spike_driven_macs / snn.total_macs_equivalent if snn.total_macs_equivalent else 0.0,
        "ann_energy_uj_per_sample": ann_pj / samples * 1e-6,
        "snn_energy_uj_per_sample": snn.energy_pj / samples * 1e-6,
        "energy_ratio": snn.energy_pj / ann_pj if ann_pj else float("nan"),
        "op_counts_consistent": ann_macs == snn.total_macs_equivalent,
    }


def flops_per_sample(model: nn.Module, run, samples: int) -> float:
    """FLOPs (``torch.utils.flop_counter``: matmuls and the like, 2 per MAC) of ``run()`` per sample.

    The flop counter has no formula for the fused CPU attention kernel (SDPA), so a model using
    it is counted with eager attention (the same matmuls), then switched back.
    """
    impl = model.config._attn_implementation
    if impl in ("sdpa", "flash_attention_2", "flex_attention"):
        model.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            run()
    finally:
        if model.config._attn_implementation != impl:
            model.set_attn_implementation(impl)
    return fc.get_total_flops() / samples


def parameter_count(model: nn.Module) -> dict:
    """Parameters (weights, biases, embeddings) and the sites' per-channel values, counted apart."""
    site_params = sum(p.numel() for n, p in model.named_parameters()
                      if n.rsplit(".", 1)[-1] in ("theta", "psi", "phi", "burst"))
    total = sum(p.numel() for p in model.parameters())
    return {"weights": total - site_params, "site_parameters": site_params}
