"""Gemma 3 (text: ``Gemma3ForCausalLM``, model type ``gemma3_text``): Gemma 2's four norms per
layer, QK-norm, sliding-window (local) and global layers with their own rotary bases (the
attention module applies the rotary embedding of its layer type before the q/k sites), and
softcapping where the config sets it. The multimodal ``gemma3`` (vision tower) is not
supported. Layout and sites: :mod:`.decoder`."""

from __future__ import annotations

from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP, Gemma3RMSNorm

from .decoder import SANDWICH_NORMS, llama_like
from .registry import register, register_gated_mlp, register_norm

register_norm(Gemma3RMSNorm)
register_gated_mlp(Gemma3MLP)
ADAPTER = register(llama_like("gemma3", ("gemma3_text",), layer_norms=SANDWICH_NORMS, qk_norm=True))
