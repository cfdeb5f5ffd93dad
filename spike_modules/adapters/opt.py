"""OPT: learned positions (from the attention mask, offset 2), LayerNorm before (``do_layer_norm_before``)
or after each block, a ReLU MLP of ``fc1``/``fc2`` directly in the decoder layer, q pre-scaled
inside the attention module (``scaling=1`` at the attention function), tied head, and, in
some sizes, ``project_in``/``project_out`` around the decoder (outside the blocks: they stay dense).

Sites: the attention input (read by q, k and v), ``out_proj``, ``fc1`` and ``fc2``. The ``fc2``
input is ReLU's output, unsigned (signed only if the config names another activation).
"""

from __future__ import annotations

from torch import nn

from .registry import Adapter, AttentionSpec, SiteGroup, attention_spec, register


def _layers(model: nn.Module) -> list[str]:
    return [f"model.decoder.layers.{i}" for i in range(len(model.model.decoder.layers))]


def site_groups(model: nn.Module, activation: str) -> list[SiteGroup]:
    relu = activation == "relu" or model.config.activation_function == "relu"
    groups = []
    for p in _layers(model):
        groups += [
            SiteGroup(f"{p}.self_attn.qkv", tuple(f"{p}.self_attn.{n}_proj" for n in "qkv"), True),
            SiteGroup(f"{p}.self_attn.out_proj", (f"{p}.self_attn.out_proj",), True),
            SiteGroup(f"{p}.fc1", (f"{p}.fc1",), True),
            SiteGroup(f"{p}.fc2", (f"{p}.fc2",), not relu),
        ]
    return groups


def activation_paths(model: nn.Module) -> list[str]:
    return [f"{p}.activation_fn" for p in _layers(model)]


def gated_mlp_paths(model: nn.Module) -> list[str]:
    return []


def norm_paths(model: nn.Module) -> list[str]:
    per_layer = [f"{p}.{n}" for p in _layers(model) for n in ("self_attn_layer_norm", "final_layer_norm")]
    # OPT-350m and configs with _remove_final_layer_norm have no final norm
    final = ["model.decoder.final_layer_norm"] if model.model.decoder.final_layer_norm is not None else []
    return per_layer + final


def attentions(model: nn.Module) -> list[AttentionSpec]:
    return [attention_spec(model, f"{p}.self_attn") for p in _layers(model)]


ADAPTER = register(Adapter("opt", ("opt",), site_groups, activation_paths, gated_mlp_paths, norm_paths, attentions,
                           head="lm_head"))
