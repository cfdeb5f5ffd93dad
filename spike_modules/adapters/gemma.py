"""Gemma: the Llama layout with a GELU-tanh gated MLP, RMSNorm scaled by ``1 + weight``, embeddings
scaled by ``sqrt(hidden_size)`` (a constant: it commutes with the sites) and a ``head_dim`` that
need not be ``hidden_size / heads``. Layout and sites: :mod:`.decoder`."""

from __future__ import annotations

from transformers.models.gemma.modeling_gemma import GemmaMLP, GemmaRMSNorm

from .decoder import llama_like
from .registry import register, register_gated_mlp, register_norm

register_norm(GemmaRMSNorm)
register_gated_mlp(GemmaMLP)
ADAPTER = register(llama_like("gemma", ("gemma",)))
