"""Llama family (SmolLM2, Llama 2/3): RMSNorm, rotary positions, grouped-query attention,
SiLU-gated MLP, tied head (SmolLM2). Layout and sites: :mod:`.decoder`."""

from __future__ import annotations

from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from . import register, register_gated_mlp, register_norm
from .decoder import llama_like

register_norm(LlamaRMSNorm)
register_gated_mlp(LlamaMLP)
ADAPTER = register(llama_like("llama", ("llama",)))
