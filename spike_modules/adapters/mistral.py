"""Mistral: the Llama layout with sliding-window attention on every layer (``sliding_window``;
the model's own mask carries the window, which the spiking attention checks). Layout and sites:
:mod:`.decoder`."""

from __future__ import annotations

from transformers.models.mistral.modeling_mistral import MistralMLP, MistralRMSNorm

from .decoder import llama_like
from .registry import register, register_gated_mlp, register_norm

register_norm(MistralRMSNorm)
register_gated_mlp(MistralMLP)
ADAPTER = register(llama_like("mistral", ("mistral",)))
