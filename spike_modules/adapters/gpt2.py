"""GPT-2 family (distilgpt2, gpt2): Conv1D layers with transposed weights, learned positions,
GELU (tanh form), tied ``wte``/``lm_head``.

Sites: the attention input (``c_attn``, which computes q, k and v at once), ``attn.c_proj``,
the MLP input (``c_fc``) and ``mlp.c_proj``. The ``mlp.c_proj`` input is GELU's output,
which dips to -0.17; it is unsigned only after ``--activation relu``.
``Conv1D`` layers are wrapped, never copied, so their ``[in, out]`` weights stay as they are.
"""

from __future__ import annotations

from torch import nn

from . import Adapter, SiteGroup, register


def site_groups(model: nn.Module, activation: str) -> list[SiteGroup]:
    groups = []
    for i in range(len(model.transformer.h)):
        p = f"transformer.h.{i}"
        groups += [
            SiteGroup(f"{p}.attn.c_attn", (f"{p}.attn.c_attn",), True),
            SiteGroup(f"{p}.attn.c_proj", (f"{p}.attn.c_proj",), True),
            SiteGroup(f"{p}.mlp.c_fc", (f"{p}.mlp.c_fc",), True),
            SiteGroup(f"{p}.mlp.c_proj", (f"{p}.mlp.c_proj",), activation != "relu"),
        ]
    return groups


def activation_paths(model: nn.Module) -> list[str]:
    return [f"transformer.h.{i}.mlp.act" for i in range(len(model.transformer.h))]


ADAPTER = register(Adapter("gpt2", ("gpt2",), site_groups, activation_paths))
