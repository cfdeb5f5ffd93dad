"""Llama family (SmolLM2, Llama 2/3): RMSNorm, rotary positions, grouped-query attention,
SiLU-gated MLP, tied head (SmolLM2). Layout and sites: :mod:`.decoder`."""

from __future__ import annotations

from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from .decoder import llama_like
from .registry import register, register_gated_mlp, register_norm

register_norm(LlamaRMSNorm)
register_gated_mlp(LlamaMLP)
ADAPTER = register(llama_like("llama", ("llama",)))
