"""Llama family (SmolLM2): RMSNorm, rotary positions, grouped-query attention, SiLU-gated MLP, tied head.

Sites: one at the attention input (read by q, k and v), one at ``o_proj``, one at the MLP
input (read by gate and up), one at ``down_proj``. All are signed: RMSNorm outputs, attention
outputs and ``silu(gate) * up`` all take both signs. The ``down_proj`` input is the worst
site (DESIGN.md): a few tokens carry activations in the thousands.
Attention: q, k (after the rotary embedding) and v have their own sites; k and v have
``num_key_value_heads`` heads.
"""

from __future__ import annotations

from torch import nn

from . import Adapter, AttentionSpec, SiteGroup, register


def _layers(model: nn.Module) -> list[str]:
    return [f"model.layers.{i}" for i in range(len(model.model.layers))]


def site_groups(model: nn.Module, activation: str) -> list[SiteGroup]:
    groups = []
    for p in _layers(model):
        groups += [
            SiteGroup(f"{p}.self_attn.qkv", tuple(f"{p}.self_attn.{n}_proj" for n in "qkv"), True),
            SiteGroup(f"{p}.self_attn.o_proj", (f"{p}.self_attn.o_proj",), True),
            SiteGroup(f"{p}.mlp.gate_up", (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"), True),
            # relu(gate) * up is still signed: up takes both signs
            SiteGroup(f"{p}.mlp.down_proj", (f"{p}.mlp.down_proj",), True),
        ]
    return groups


def activation_paths(model: nn.Module) -> list[str]:
    return [f"{p}.mlp.act_fn" for p in _layers(model)]


def gated_mlp_paths(model: nn.Module) -> list[str]:
    return [f"{p}.mlp" for p in _layers(model)]


def norm_paths(model: nn.Module) -> list[str]:
    return [f"{p}.{n}" for p in _layers(model) for n in ("input_layernorm", "post_attention_layernorm")] + ["model.norm"]


def attentions(model: nn.Module) -> list[AttentionSpec]:
    specs = []
    for p in _layers(model):
        attn = model.get_submodule(f"{p}.self_attn")
        cfg = attn.config
        specs.append(AttentionSpec(f"{p}.self_attn", cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim))
    return specs


ADAPTER = register(Adapter("llama", ("llama",), site_groups, activation_paths, gated_mlp_paths, norm_paths,
                           attentions, head="lm_head"))
