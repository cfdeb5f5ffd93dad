"""Llama family (SmolLM2): RMSNorm, rotary positions, grouped-query attention, SiLU-gated MLP, tied head.

Sites: one at the attention input (read by q, k and v), one at ``o_proj``, one at the MLP
input (read by gate and up), one at ``down_proj``. All are signed: RMSNorm outputs, attention
outputs and ``silu(gate) * up`` all take both signs. The ``down_proj`` input is the worst
site (DESIGN.md): a few tokens carry activations in the thousands.
"""

from __future__ import annotations

from torch import nn

from . import Adapter, SiteGroup, register


def site_groups(model: nn.Module, activation: str) -> list[SiteGroup]:
    groups = []
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}"
        groups += [
            SiteGroup(f"{p}.self_attn.qkv", tuple(f"{p}.self_attn.{n}_proj" for n in "qkv"), True),
            SiteGroup(f"{p}.self_attn.o_proj", (f"{p}.self_attn.o_proj",), True),
            SiteGroup(f"{p}.mlp.gate_up", (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"), True),
            # relu(gate) * up is still signed: up takes both signs
            SiteGroup(f"{p}.mlp.down_proj", (f"{p}.mlp.down_proj",), True),
        ]
    return groups


def activation_paths(model: nn.Module) -> list[str]:
    return [f"model.layers.{i}.mlp.act_fn" for i in range(len(model.model.layers))]


ADAPTER = register(Adapter("llama", ("llama",), site_groups, activation_paths))
