"""The Llama-style decoder layout, shared by Llama, Qwen2/2.5/3, Mistral and Gemma 1/2/3.

``model.layers.i`` holds ``self_attn`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, and
``q_norm``/``k_norm`` where the family normalises q and k per head), a gated ``mlp``
(``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``) and the layer's norms; ``model.norm``
and ``lm_head`` close the model.

Sites: one at the attention input (read by q, k and v), one at ``o_proj``, one at the MLP
input (read by gate and up), one at ``down_proj``. All are signed: norm outputs, attention
outputs and ``act(gate) * up`` all take both signs (``relu(gate) * up`` too: ``up`` does). The
``down_proj`` input is the worst site (docs/design.md section 1): a few tokens carry activations in the
thousands. Attention: q, k (after the rotary embedding, and after the QK-norm where there is
one) and v have their own sites; k and v have ``num_key_value_heads`` heads.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .registry import Adapter, AttentionSpec, SiteGroup, attention_spec

LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
# Gemma 2 and 3 also normalise around the MLP (pre/post feed-forward norms)
SANDWICH_NORMS = LAYER_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def _layers(model: nn.Module) -> list[str]:
    return [f"model.layers.{i}" for i in range(len(model.model.layers))]


def site_groups(model: nn.Module, activation: str) -> list[SiteGroup]:
    groups = []
    for p in _layers(model):
        groups += [
            SiteGroup(f"{p}.self_attn.qkv", tuple(f"{p}.self_attn.{n}_proj" for n in "qkv"), True),
            SiteGroup(f"{p}.self_attn.o_proj", (f"{p}.self_attn.o_proj",), True),
            SiteGroup(f"{p}.mlp.gate_up", (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"), True),
            SiteGroup(f"{p}.mlp.down_proj", (f"{p}.mlp.down_proj",), True),
        ]
    return groups


def activation_paths(model: nn.Module) -> list[str]:
    return [f"{p}.mlp.act_fn" for p in _layers(model)]


def gated_mlp_paths(model: nn.Module) -> list[str]:
    return [f"{p}.mlp" for p in _layers(model)]


def attentions(model: nn.Module) -> list[AttentionSpec]:
    return [attention_spec(model, f"{p}.self_attn") for p in _layers(model)]


def llama_like(family: str, model_types: tuple[str, ...], layer_norms: tuple[str, ...] = LAYER_NORMS,
               qk_norm: bool = False, check_config: Callable[[object], None] | None = None) -> Adapter:
    """An :class:`Adapter` for a Llama-style decoder.

    Args:
        family, model_types: the family's name and the ``config.model_type`` values it covers.
        layer_norms: the norms of each decoder layer (attribute names).
        qk_norm: the attention normalises q and k per head (``self_attn.q_norm``/``k_norm``):
            they run in the rate domain in the simulation, before the rotary embedding.
        check_config: refuses configurations the family cannot convert (see :class:`Adapter`).
    """
    attn_norms = ("self_attn.q_norm", "self_attn.k_norm") if qk_norm else ()

    def norm_paths(model: nn.Module) -> list[str]:
        per_layer = [f"{p}.{n}" for p in _layers(model) for n in (*layer_norms, *attn_norms)]
        return per_layer + ["model.norm"]

    return Adapter(family, model_types, site_groups, activation_paths, gated_mlp_paths, norm_paths, attentions,
                   head="lm_head", check_config=check_config)
