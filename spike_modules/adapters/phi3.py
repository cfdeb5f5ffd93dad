"""Phi-3 (Phi-3/3.5-mini, Phi-4-mini): fused ``qkv_proj`` and fused ``gate_up_proj``, RMSNorm,
rotary positions (partial where ``partial_rotary_factor`` < 1, long-context scaling) and
grouped-query attention.

Sites: one at ``qkv_proj``'s input, one at ``o_proj``, one at ``gate_up_proj``'s input, one at
``down_proj``; all signed. The q, k, v sites still sit where q, k and v meet in attention: the
attention function receives them split from ``qkv_proj``'s output and rotated, as in every
other family. The MLP computes ``down(up * act(gate))`` with ``gate, up = gate_up(x).chunk(2)``;
:class:`SpikeFusedGatedMLP` runs ``up * act(gate)`` as one rate-domain op in the simulation.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.phi3.modeling_phi3 import Phi3MLP, Phi3RMSNorm

from ..temporal import rate_op
from .registry import (Adapter, AttentionSpec, SiteGroup, attention_spec, register, register_gated_mlp,
                       register_norm)


class SpikeFusedGatedMLP(nn.Module):
    """``down(up * act(gate))`` with ``gate, up = gate_up_proj(x).chunk(2, -1)`` (Phi-3's MLP), whose
    elementwise part runs causally in the rate domain in the sequential simulation; outside it,
    exactly the original. Children keep the original names (``gate_up_proj``, ``down_proj``,
    ``activation_fn``), so the parameter names do not change."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        missing = [n for n in ("gate_up_proj", "down_proj", "activation_fn") if not hasattr(mlp, n)]
        if missing:
            raise ValueError(f"SpikeFusedGatedMLP needs gate_up_proj, down_proj and activation_fn; "
                             f"{type(mlp).__name__} lacks {missing}")
        self.gate_up_proj, self.down_proj, self.activation_fn = mlp.gate_up_proj, mlp.down_proj, mlp.activation_fn
        self.stac_sim_T: int | None = None

    def _gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return up * self.activation_fn(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        h = self._gated(h) if self.stac_sim_T is None else rate_op(self._gated, self.stac_sim_T, h)
        return self.down_proj(h)


def _layers(model: nn.Module) -> list[str]:
    return [f"model.layers.{i}" for i in range(len(model.model.layers))]


def site_groups(model: nn.Module, activation: str) -> list[SiteGroup]:
    groups = []
    for p in _layers(model):
        groups += [SiteGroup(f"{p}.{n}", (f"{p}.{n}",), True)
                   for n in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    return groups


def activation_paths(model: nn.Module) -> list[str]:
    return [f"{p}.mlp.activation_fn" for p in _layers(model)]


def gated_mlp_paths(model: nn.Module) -> list[str]:
    return [f"{p}.mlp" for p in _layers(model)]


def norm_paths(model: nn.Module) -> list[str]:
    per_layer = [f"{p}.{n}" for p in _layers(model) for n in ("input_layernorm", "post_attention_layernorm")]
    return per_layer + ["model.norm"]


def attentions(model: nn.Module) -> list[AttentionSpec]:
    return [attention_spec(model, f"{p}.self_attn") for p in _layers(model)]


register_norm(Phi3RMSNorm)
register_gated_mlp(Phi3MLP, build=lambda m, cfg: SpikeFusedGatedMLP(m))
ADAPTER = register(Adapter("phi3", ("phi3",), site_groups, activation_paths, gated_mlp_paths, norm_paths, attentions,
                           head="lm_head"))
