"""GPT-NeoX family (Pythia, GPT-NeoX-20B): fused ``query_key_value`` (per head ``[q, k, v]``),
partial rotary embedding (``rotary_pct``), LayerNorm, GELU MLP, and the parallel residual
``x + attn(ln1(x)) + mlp(ln2(x))`` (``use_parallel_residual``; the sequential form when False).

Sites: one at ``query_key_value``'s input, one at ``attention.dense``, one at the MLP input
(``dense_h_to_4h``) and one at ``dense_4h_to_h`` (GELU's output dips below zero: signed unless
``--activation relu``). The residual sums are linear, so either residual form needs nothing
more. The q, k, v sites sit where q, k and v meet in attention (split and rotated by the
module). The head (``lm_head``, untied) stays dense.
"""

from __future__ import annotations

from torch import nn

from .registry import Adapter, AttentionSpec, SiteGroup, attention_spec, register


def _layers(model: nn.Module) -> list[str]:
    return [f"gpt_neox.layers.{i}" for i in range(len(model.gpt_neox.layers))]


def site_groups(model: nn.Module, activation: str) -> list[SiteGroup]:
    groups = []
    for p in _layers(model):
        groups += [
            SiteGroup(f"{p}.attention.query_key_value", (f"{p}.attention.query_key_value",), True),
            SiteGroup(f"{p}.attention.dense", (f"{p}.attention.dense",), True),
            SiteGroup(f"{p}.mlp.dense_h_to_4h", (f"{p}.mlp.dense_h_to_4h",), True),
            SiteGroup(f"{p}.mlp.dense_4h_to_h", (f"{p}.mlp.dense_4h_to_h",), activation != "relu"),
        ]
    return groups


def activation_paths(model: nn.Module) -> list[str]:
    return [f"{p}.mlp.act" for p in _layers(model)]


def gated_mlp_paths(model: nn.Module) -> list[str]:
    return []


def norm_paths(model: nn.Module) -> list[str]:
    per_layer = [f"{p}.{n}" for p in _layers(model) for n in ("input_layernorm", "post_attention_layernorm")]
    return per_layer + ["gpt_neox.final_layer_norm"]


def attentions(model: nn.Module) -> list[AttentionSpec]:
    return [attention_spec(model, f"{p}.attention") for p in _layers(model)]


ADAPTER = register(Adapter("gpt_neox", ("gpt_neox",), site_groups, activation_paths, gated_mlp_paths, norm_paths,
                           attentions, head="lm_head"))
