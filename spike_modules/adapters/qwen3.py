"""Qwen3: the Llama layout with QK-norm (an RMSNorm over each head's q and k, before the rotary
embedding), an explicit ``head_dim`` and optional sliding-window layers. The QK-norms are
wrapped like every other norm (rate domain in the simulation); the q/k sites sit after them and
after the rotary embedding. Layout and sites: :mod:`.decoder`."""

from __future__ import annotations

from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm

from .decoder import llama_like
from .registry import register, register_gated_mlp, register_norm

register_norm(Qwen3RMSNorm)
register_gated_mlp(Qwen3MLP)
ADAPTER = register(llama_like("qwen3", ("qwen3",), qk_norm=True))
