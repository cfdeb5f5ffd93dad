"""GPT-2 family (distilgpt2, gpt2): Conv1D layers with transposed weights, learned positions,
GELU (tanh form), tied ``wte``/``lm_head``, LayerNorm.

Sites: the attention input (``c_attn``, which computes q, k and v at once), ``attn.c_proj``,
the MLP input (``c_fc``) and ``mlp.c_proj``. The ``mlp.c_proj`` input is GELU's output,
which dips to -0.17; it is unsigned only after ``--activation relu``.
``Conv1D`` layers are wrapped, never copied, so their ``[in, out]`` weights stay as they are.
Attention: q, k and v (split from ``c_attn``'s output) have their own sites, all heads full
(no grouped-query attention). Cross-attention (``add_cross_attention``) is not supported.
"""

from __future__ import annotations

from torch import nn

from .registry import Adapter, AttentionSpec, SiteGroup, register


def _blocks(model: nn.Module) -> list[str]:
    return [f"transformer.h.{i}" for i in range(len(model.transformer.h))]


def site_groups(model: nn.Module, activation: str) -> list[SiteGroup]:
    groups = []
    for p in _blocks(model):
        groups += [
            SiteGroup(f"{p}.attn.c_attn", (f"{p}.attn.c_attn",), True),
            SiteGroup(f"{p}.attn.c_proj", (f"{p}.attn.c_proj",), True),
            SiteGroup(f"{p}.mlp.c_fc", (f"{p}.mlp.c_fc",), True),
            SiteGroup(f"{p}.mlp.c_proj", (f"{p}.mlp.c_proj",), activation != "relu"),
        ]
    return groups


def activation_paths(model: nn.Module) -> list[str]:
    return [f"{p}.mlp.act" for p in _blocks(model)]


def gated_mlp_paths(model: nn.Module) -> list[str]:
    return []


def norm_paths(model: nn.Module) -> list[str]:
    return [f"{p}.{n}" for p in _blocks(model) for n in ("ln_1", "ln_2")] + ["transformer.ln_f"]


def check_config(config) -> None:
    if getattr(config, "add_cross_attention", False):
        raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not supported; "
                         "STAC converts decoder-only GPT-2 models")


def attentions(model: nn.Module) -> list[AttentionSpec]:
    specs = []
    for p in _blocks(model):
        attn = model.get_submodule(f"{p}.attn")
        specs.append(AttentionSpec(f"{p}.attn", attn.num_heads, attn.num_heads, attn.head_dim))
    return specs


ADAPTER = register(Adapter("gpt2", ("gpt2",), site_groups, activation_paths, gated_mlp_paths, norm_paths,
                           attentions, head="lm_head", check_config=check_config))
