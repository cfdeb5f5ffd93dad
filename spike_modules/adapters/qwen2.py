"""Qwen2 and Qwen2.5: the Llama layout with biases on q, k and v, grouped-query attention and,
where ``use_sliding_window`` is set, sliding-window layers (``layer_types``; the model's own
mask carries the window, which the spiking attention checks). Layout and sites: :mod:`.decoder`."""

from __future__ import annotations

from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

from .decoder import llama_like
from .registry import register, register_gated_mlp, register_norm

register_norm(Qwen2RMSNorm)
register_gated_mlp(Qwen2MLP)
ADAPTER = register(llama_like("qwen2", ("qwen2",)))
